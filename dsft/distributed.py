"""Process topology and the per-process settings every launcher needs (torchrun, deepspeed, Slurm)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from dsft.errors import DsftError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topology:
    """Where this process sits, as the launcher's environment says (single process when unset)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


# Where the node rank comes from, first found wins: torchrun's GROUP_RANK (its node's rank in the rendezvous, the
# one RANK is counted from), NODE_RANK (set by other launchers and by hand), the deepspeed launcher's CROSS_RANK
# (its --node_rank), Slurm's SLURM_NODEID (srun / submitit, one Slurm task per rank). Never the host name: several
# nodes can share one (several slurmd on one host, containers), and a name says nothing about the order.
NODE_RANK_VARS = ("GROUP_RANK", "NODE_RANK", "CROSS_RANK", "SLURM_NODEID")


def topology(environ: dict | None = None) -> Topology:
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", 1))
    # torchrun sets LOCAL_WORLD_SIZE; the deepspeed launcher sets LOCAL_SIZE (its CPU device count)
    local_world = max(1, min(int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world))), world))
    rank = int(env.get("RANK", 0))
    found = next((env[k] for k in NODE_RANK_VARS if str(env.get(k, "")).strip() != ""), None)
    # no launcher said: ranks are laid out node by node (as torchrun and the deepspeed launcher count them)
    node_rank = int(found) if found is not None else rank // local_world
    return Topology(rank=rank, local_rank=int(env.get("LOCAL_RANK", 0)), world_size=world,
                    local_world_size=local_world, node_rank=node_rank)


def node_layout_problems(ranks: list[dict], hpz_partition_size: int | None = None) -> list[str]:
    """What is wrong with the layout all ranks reported (each a dict with rank, node_rank, local_rank,
    ranks_per_node): every node must hold ranks_per_node ranks with local ranks 0..n-1, and a ZeRO++ hpZ
    partition (> 1) must equal the ranks per node, else its secondary partition spans nodes (or leaves some
    of a node's ranks out). Empty when all is well."""
    problems = []
    by_node: dict[int, list[dict]] = {}
    for r in ranks:
        by_node.setdefault(int(r["node_rank"]), []).append(r)
    per_node = {int(r["ranks_per_node"]) for r in ranks}
    if len(per_node) != 1:
        problems.append(f"ranks disagree on the ranks per node: {sorted(per_node)}")
    expected = max(per_node) if per_node else 1
    for node, members in sorted(by_node.items()):
        local = sorted(int(r["local_rank"]) for r in members)
        if local != list(range(expected)):
            problems.append(f"node {node} holds ranks {sorted(int(r['rank']) for r in members)} with local ranks "
                            f"{local}, expected local ranks 0..{expected - 1}")
    if sorted(by_node) != list(range(len(by_node))):
        problems.append(f"node ranks {sorted(by_node)} are not 0..{len(by_node) - 1}")
    if hpz_partition_size is not None and hpz_partition_size > 1 and hpz_partition_size != expected:
        problems.append(f"zero_hpz_partition_size {hpz_partition_size} != {expected} ranks per node")
    return problems


def export_local_world_size(environ: dict | None = None) -> None:
    """The deepspeed launcher sets LOCAL_SIZE but not LOCAL_WORLD_SIZE; on CPU, accelerate then writes
    LOCAL_WORLD_SIZE=1 into the environment, and every later reader (a second run in the same process, thread
    counts) sees one local rank. Export the launcher's value first so all agree."""
    env = os.environ if environ is None else environ
    if "LOCAL_WORLD_SIZE" not in env and "LOCAL_SIZE" in env:
        env["LOCAL_WORLD_SIZE"] = env["LOCAL_SIZE"]


def accelerator_is_cpu() -> bool:
    # DS_ACCELERATOR=cpu is DeepSpeed's switch to its CPU accelerator; honour it for the Trainer too.
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return True
    return not torch.accelerator.is_available()


def configure_cpu_threads(topo: Topology) -> int | None:
    """On CPU, give each rank cores / local ranks threads. Two ranks each using every core run ~8x slower
    here; the deepspeed launcher sets OMP_NUM_THREADS=2 per rank. DSFT_CPU_THREADS overrides."""
    if not accelerator_is_cpu():
        return None
    wanted = os.environ.get("DSFT_CPU_THREADS")
    threads = int(wanted) if wanted else max(1, (os.cpu_count() or 1) // topo.local_world_size)
    torch.set_num_threads(threads)
    # else accelerate, finding OMP_NUM_THREADS unset (the deepspeed launcher, srun), warns on every rank and sets
    # its own count (physical cores / local ranks) over this one
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return threads


def apply_collective_timeout(timeout_s: float, use_cpu: bool, backend: str | None = None) -> None:
    """Make every process group of the run give up on a silent peer after ``timeout_s`` (train.ddp_timeout).

    Two gaps measured here (one rank SIGSTOPped, ddp_timeout 15 s, still waiting after 150 s): DeepSpeed builds
    its own groups with ``torch.distributed.new_group`` and no timeout, so they take torch's module default
    (30 min gloo, 10 min NCCL), which is set here; and transformers 5.23 passes ddp_timeout to accelerate only on
    accelerators, so on CPU the default group is started here (env://) with it. accelerate and DeepSpeed reuse
    a group that exists.
    """
    from torch.distributed import distributed_c10d  # deferred: callers check torch.distributed.is_available()

    timeout = timedelta(seconds=timeout_s)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if hasattr(distributed_c10d, name):
            setattr(distributed_c10d, name, timeout)
    if use_cpu and topology().world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend or "gloo", timeout=timeout)


def init_deepspeed_distributed(timeout_s: float | None = None) -> None:
    """Start DeepSpeed's process group on the accelerator's backend (NCCL on CUDA, gloo/ccl on CPU).

    Needed before ZeRO-3 loading: zero.Init partitions weights across the group while they load, and
    building its config before deepspeed.comm knows the group fails ("... 8 != 4 * 1 * 1") on CPU.
    ``timeout_s``: how long a collective waits for a peer (train.ddp_timeout), as for the Trainer's group.
    """
    # deferred: DeepSpeed is optional, and its import logs an accelerator banner on runs that do not use it
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), **kwargs)


def shutdown(barrier: bool = True) -> bool:
    """Tear the process group down; True if there was one. ``barrier=False`` after a failure: a dead or
    failed peer would never arrive, and the barrier would wait for the whole timeout."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if barrier:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return True
    return False


def exit_now(code: int) -> None:
    """Exit a finished multi-process run without interpreter teardown: after a successful ZeRO-3 run on
    CPU, a rank aborted there intermittently ("terminate called without an active exception", a native
    thread still joinable), turning a good run into a failed launch. Everything is saved and flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def world_views(args, accelerator=None, environ: dict | None = None) -> dict[str, tuple[int, int]]:
    """(process index, process count) as each layer of the stack sees it: the launcher's environment, the
    TrainingArguments, accelerate, torch.distributed and DeepSpeed's comm (the last two only when started)."""
    topo = topology(environ)
    views = {"launcher environment (RANK, WORLD_SIZE)": (topo.rank, topo.world_size),
             "TrainingArguments": (args.process_index, args.world_size)}
    if accelerator is not None:
        views["accelerate"] = (accelerator.process_index, accelerator.num_processes)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        views["torch.distributed"] = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    ds_comm = sys.modules.get("deepspeed.comm")  # only if DeepSpeed is in use: importing it costs seconds
    if ds_comm is not None and ds_comm.is_initialized():
        views["DeepSpeed"] = (ds_comm.get_rank(), ds_comm.get_world_size())
    return views


def check_world_agreement(views: dict[str, tuple[int, int]]) -> None:
    """Refuse to train when the layers disagree about this process's place in the world.

    Seen on a CPU box: accelerate's state for DeepSpeed picked no backend, so both ranks had process_index 0 while
    torch.distributed had 0 and 1 -- ZeRO-2 then trained every sample twice, silently. Each rank checks its own
    views (no collective), so every rank stops with the same kind of error before the first step.
    """
    if len(set(views.values())) <= 1:
        return
    seen = "; ".join(f"{name}: rank {index} of {count}" for name, (index, count) in views.items())
    raise DsftError(f"the processes of this run disagree about the world ({seen}): ranks would read the same "
                    "batches (duplicate data) or wait for each other forever; start every rank with the same "
                    "launcher settings (torchrun/deepspeed/srun) and do not set RANK/WORLD_SIZE by hand")
