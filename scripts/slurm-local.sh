#!/usr/bin/env bash
# A Slurm cluster on 127.0.0.1 for tests and CI (Debian 12, Slurm 22.05), started without systemd.
#
#   scripts/slurm-local.sh up [--nodes N]  install missing packages, write the config, start the daemons, wait
#                                          until every node takes jobs (idempotent: a running cluster with the
#                                          same config, node count included, is left alone; another N restarts it)
#   scripts/slurm-local.sh down            stop the daemons this script started (by their pid files)
#   scripts/slurm-local.sh status          which daemons run, and sinfo
#
# --nodes 1 (the default) is one node named after this host. --nodes N > 1 runs N slurmd on this host (Debian's
# Slurm is built with multiple-slurmd support): nodes n1..nN, all NodeHostname=<this host>, NodeAddr=127.0.0.1,
# each slurmd on its own port (17001..) with its own spool dir, pid file and log (%n in the config), started as
# `slurmd -N nK`; the names go into /etc/hosts (as 127.0.0.1), since launchers resolve the first node's name for
# their rendezvous. Every node declares the whole machine's CPUs and memory (as `slurmd -C` reports them: slurmd
# refuses a node that declares more than the hardware has), so N nodes oversubscribe the real cores N times.
# All nodes share one host name: what tells the nodes apart inside a job is SLURM_NODEID, not the host name.
#
# Daemons: munged (auth), mariadbd + slurmdbd (accounting: sacct, and so job states in submitit and
# `dsft status`), slurmctld, slurmd (one per node). All listen on 127.0.0.1 (mariadb on its unix socket only).
# Must run as root. Environment (all optional):
#   DSFT_SLURM_ACCOUNTING=1    0: no mariadb/slurmdbd (then sacct, submitit's job.state and `dsft status`
#                              show UNKNOWN for finished jobs, and a cancelled job's result() can hang)
#   DSFT_SLURM_CRED_EXPIRE=10  AuthInfo=cred_expire (Slurm minimum 5, default 120): a requeued job may not
#                              start again before it has passed, so it is the floor of the requeue gap
#   DSFT_SLURM_PARTITION=debug
#   DSFT_SLURM_WAIT_S=60       how long `up` waits for the node to become usable
#   DSFT_SLURM_INSTALL=1       0: fail instead of running apt-get when packages are missing
set -euo pipefail

ACTION=${1:-}
[ "$#" -gt 0 ] && shift
NODES=1
while [ "$#" -gt 0 ]; do
  case "$1" in
    --nodes) [ "$#" -ge 2 ] || { echo "--nodes needs a number" >&2; exit 2; }; NODES=$2; shift 2 ;;
    --nodes=*) NODES=${1#--nodes=}; shift ;;
    *) echo "unknown argument: $1 (usage: $0 up [--nodes N] | down | status)" >&2; exit 2 ;;
  esac
done
# a plain number from 1 to 99: it ends up in node names, port numbers and file names
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { echo "--nodes: expected a number from 1 to 99, got '$NODES'" >&2; exit 2; }
ACCOUNTING=${DSFT_SLURM_ACCOUNTING:-1}
CRED_EXPIRE=${DSFT_SLURM_CRED_EXPIRE:-10}
PARTITION=${DSFT_SLURM_PARTITION:-debug}
WAIT_S=${DSFT_SLURM_WAIT_S:-60}

CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
DBD_PID=/run/slurmdbd.pid
MUNGE_PID=/run/munge/munged.pid
DB_PID=/run/mysqld/mysqld.pid
DB_SOCK=/run/mysqld/mysqld.sock
NODE=$(hostname -s)
SLURMD_PORT0=17000  # node nK's slurmd listens on 17000+K (multi-node only; one node keeps SlurmdPort 6818)
HOSTS_MARK="# dsft scripts/slurm-local.sh nodes"

node_names() {  # the node names of this cluster, one per line
  if [ "$NODES" = 1 ]; then echo "$NODE"; else seq -f 'n%g' 1 "$NODES"; fi
}

slurmd_pid_file() {  # $1: node name -> its slurmd's pid file (SlurmdPidFile with %n filled in)
  if [ "$NODES" = 1 ]; then echo "$SLURMD_PID"; else echo "/run/slurmd-$1.pid"; fi
}

say() { echo "[slurm-local] $*" >&2; }
die() { say "$*"; exit 1; }

running() {  # $1: pid file -> true if it names a live (non-zombie) process
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat")" != Z ]
}

stop() {  # $1: pid file, $2: name
  if running "$1"; then
    local pid; pid=$(cat "$1")
    say "stopping $2 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do running "$1" || break; sleep 0.1; done
    if running "$1"; then say "$2 did not stop, SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$1"
}

down() {
  if running "$CTLD_PID"; then scancel --full 2>/dev/null || true; sleep 1; fi  # let slurmstepd exit first
  # every slurmd whatever the node count it was started with: the one-node pid file and the per-node ones
  local f
  for f in "$SLURMD_PID" /run/slurmd-*.pid; do
    [ -e "$f" ] || continue
    stop "$f" "slurmd ($(basename "$f" .pid))"
  done
  stop "$CTLD_PID" slurmctld
  stop "$DBD_PID" slurmdbd
  stop "$DB_PID" mariadbd
  stop "$MUNGE_PID" munged
}

install_packages() {
  local packages=(slurmctld slurmd slurm-client munge) programs=(slurmctld slurmd sbatch munged) missing=0
  if [ "$ACCOUNTING" = 1 ]; then packages+=(slurmdbd mariadb-server); programs+=(slurmdbd mariadbd); fi
  for p in "${programs[@]}"; do command -v "$p" >/dev/null || missing=1; done
  [ "$missing" = 0 ] && return 0
  [ "${DSFT_SLURM_INSTALL:-1}" = 1 ] || die "Slurm packages are missing and DSFT_SLURM_INSTALL=0"
  say "apt-get install ${packages[*]}"
  # No init system here: keep the packages' maintainer scripts from starting services (policy-rc.d 101).
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
  fi
  apt-cache show slurmd >/dev/null 2>&1 || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}

slurm_conf() {
  local node auth accounting names spool=/var/spool/slurmd pid_file=$SLURMD_PID log_file=$LOG_DIR/slurmd.log
  names=$NODE
  if [ "$NODES" != 1 ]; then
    names="n[1-${NODES}] NodeHostname=${NODE} Port=[$((SLURMD_PORT0 + 1))-$((SLURMD_PORT0 + NODES))]"
    # several slurmd on one host: %n (the node name) keeps their files apart
    spool=/var/spool/slurmd/%n; pid_file=/run/slurmd-%n.pid; log_file=$LOG_DIR/slurmd-%n.log
  fi
  # the node(s) exactly as slurmd detects the machine (CPUs, sockets, cores, threads, RealMemory), named as we
  # call them (a sed replacement: escape & and / in it)
  node=$(slurmd -C 2>/dev/null | head -n 1 \
         | sed -E "s/^NodeName=[^ ]+/NodeName=$(printf '%s' "$names" | sed 's/[&/\\]/\\&/g')/")
  [ -n "$node" ] || die "slurmd -C printed no node line"
  if [ "$ACCOUNTING" = 1 ]; then
    accounting=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819\nJobAcctGatherType=jobacct_gather/linux'
  else
    accounting=$'AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none'
  fi
  cat <<EOF
# written by dsft scripts/slurm-local.sh: $([ "$NODES" = 1 ] && echo one node || echo "${NODES} nodes") on 127.0.0.1
ClusterName=dsft-local
SlurmctldHost=${NODE}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
# also how long a requeued job waits before it may start again (Slurm's default is 120 s)
AuthInfo=cred_expire=${CRED_EXPIRE}
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
# listen on the address the host name resolves to, not on 0.0.0.0
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=${spool}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${pid_file}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${log_file}
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
${accounting}
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# schedule every second (defaults 60 s / 30 s) so queued and requeued jobs start promptly
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
${node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

slurmdbd_conf() {
  cat <<EOF
# written by dsft scripts/slurm-local.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
# honoured by slurmdbd 22.05 although not documented for it: listen on 127.0.0.1 only
CommunicationParameters=NoInAddrAny
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=${LOG_DIR}/slurmdbd.log
PidFile=${DBD_PID}
EOF
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating a munge key"
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key --force 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged  # daemonizes; as root it would need --force
  for _ in $(seq 1 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  tail -n 20 /var/log/munge/munged.log >&2 || true
  die "munged did not come up"
}

start_accounting() {  # mariadb on its unix socket only, a fresh accounting database, then slurmdbd
  [ "$ACCOUNTING" = 1 ] || return 0
  mkdir -p /run/mysqld; chown mysql:mysql /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  mariadbd --user=mysql --skip-networking --socket="$DB_SOCK" --pid-file="$DB_PID" \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --skip-log-bin \
    >"$LOG_DIR/mariadb.log" 2>&1 </dev/null &
  disown || true
  local up=0
  for _ in $(seq 1 150); do
    mariadb -uroot -S "$DB_SOCK" -e 'select 1' >/dev/null 2>&1 && { up=1; break; }
    sleep 0.1
  done
  [ "$up" = 1 ] || { tail -n 20 "$LOG_DIR/mariadb.log" >&2; die "mariadb did not come up"; }
  # the controller starts from a clean state (job ids from 1), so the accounting starts clean too
  mariadb -uroot -S "$DB_SOCK" -e "DROP DATABASE IF EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  /usr/sbin/slurmdbd
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && return 0
    sleep 0.1
  done
  tail -n 20 "$LOG_DIR/slurmdbd.log" >&2 || true
  die "slurmdbd did not come up"
}

wait_usable() {  # until every node takes jobs
  local t0=$SECONDS states="" usable name state
  while (( SECONDS - t0 < WAIT_S )); do
    usable=0
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
    while read -r name state; do
      [ -n "$name" ] || continue
      case "$state" in
        idle|mixed|allocated|completing) usable=$((usable + 1)) ;;
        down*|drain*) scontrol update nodename="$name" state=resume 2>/dev/null || true ;;
      esac
    done <<<"$states"
    # with accounting, also wait until slurmctld has registered with slurmdbd (sacct answers)
    if [ "$usable" -ge "$NODES" ] && { [ "$ACCOUNTING" != 1 ] || sacct -n -X -S now >/dev/null 2>&1; }; then
      say "$NODES node(s) usable: $(echo "$states" | tr '\n' ' ')($((SECONDS - t0)) s)"; return 0
    fi
    sleep 0.2
  done
  scontrol show node >&2 || true
  tail -n 30 "$LOG_DIR"/*.log >&2 || true
  die "not all ${NODES} node(s) are usable after ${WAIT_S} s (${states//$'\n'/, })"
}

hosts_entry() {  # multi-node: the node names resolve to 127.0.0.1 (a rendezvous on the first node looks it up)
  local rest line=""
  [ "$NODES" = 1 ] || line="127.0.0.1 $(node_names | tr '\n' ' ')${HOSTS_MARK}"
  rest=$(grep -vF "$HOSTS_MARK" /etc/hosts || true)
  if [ -n "$line" ] && grep -qxF "$line" /etc/hosts; then return 0; fi
  if [ -z "$line" ] && [ "$rest" = "$(cat /etc/hosts)" ]; then return 0; fi
  # rewritten in place, not replaced: /etc/hosts is often a bind mount, which a rename would fail on
  if [ -n "$line" ]; then printf '%s\n%s\n' "$rest" "$line" >/etc/hosts; else printf '%s\n' "$rest" >/etc/hosts; fi
}

slurmds_running() {
  local name
  for name in $(node_names); do running "$(slurmd_pid_file "$name")" || return 1; done
}

up() {
  install_packages
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
  hosts_entry
  local conf dbd_conf
  conf=$(mktemp); dbd_conf=$(mktemp)
  slurm_conf >"$conf"; slurmdbd_conf >"$dbd_conf"
  if cmp -s "$conf" "$CONF" && { [ "$ACCOUNTING" != 1 ] || cmp -s "$dbd_conf" "$DBD_CONF"; } \
     && running "$MUNGE_PID" && running "$CTLD_PID" && slurmds_running \
     && { [ "$ACCOUNTING" != 1 ] || { running "$DB_PID" && running "$DBD_PID"; }; }; then
    rm -f "$conf" "$dbd_conf"
    say "already running with this config"
    wait_usable
    return
  fi
  down
  install -m 0644 "$conf" "$CONF"
  install -m 0600 "$dbd_conf" "$DBD_CONF"
  rm -f "$conf" "$dbd_conf"
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*  # a clean cluster state on every (re)start
  local f name
  for f in slurmctld slurmd slurmdbd mariadb; do : >"$LOG_DIR/$f.log"; done
  rm -f "$LOG_DIR"/slurmd-*.log
  start_munge
  start_accounting
  /usr/sbin/slurmctld -i  # -i: ignore unreadable state; the daemons fork into the background
  if [ "$NODES" = 1 ]; then
    /usr/sbin/slurmd
  else
    for name in $(node_names); do
      mkdir -p "/var/spool/slurmd/$name"  # SlurmdSpoolDir=/var/spool/slurmd/%n: slurmd does not create it
      /usr/sbin/slurmd -N "$name"
    done
  fi
  wait_usable
}

status() {
  local f
  for f in "$MUNGE_PID" "$DB_PID" "$DBD_PID" "$CTLD_PID" "$SLURMD_PID" /run/slurmd-*.pid; do
    [ -e "$f" ] || [[ "$f" != *'*'* ]] || continue  # no per-node slurmd: the glob matched nothing
    if running "$f"; then echo "$f: pid $(cat "$f") running"; else echo "$f: not running"; fi
  done
  sinfo -N 2>/dev/null || true
}

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts system daemons)"; }
case "$ACTION" in
  up) need_root; up ;;
  down) need_root; down ;;
  status) status ;;
  *) echo "usage: $0 up [--nodes N] | down | status" >&2; exit 2 ;;
esac
