"""Two Slurm nodes on one machine (issue 14): `scripts/slurm-local.sh up --nodes 2` runs two slurmd on this host
(nodes n1 and n2, one host name). Pure: the requeue budget (slurm.max_requeues) of the rendered sbatch scripts, run
against stub srun/scontrol. Integration, on the real 2-node Slurm: the budget on a real job (requeued once, then left
failed); a 2-node `dsft submit` of a ZeRO-3 job whose ranks report node ranks 0 and 1 (from Slurm, not from the
shared host name) and train like a 1-node 2-rank job; both rendered templates across the 2 nodes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_task_rows, free_port, write_jsonl
from test_slurm import _env, _finish, _job_id, _losses, _results, _submit, _wait_for

NODES = 2


def _cfg(**slurm):
    from dsft.config import from_dict

    return from_dict({"model": {"name_or_path": "/models/m"}, "data": {"train": "/data/t.jsonl"},
                      "train": {"output_dir": "/runs/x"}, "slurm": {"nodes": 2, "tasks_per_node": 1, **slurm}})


def _stub_dir(tmp_path: Path, calls: Path) -> Path:
    """scontrol records every call except `show hostnames` (which answers n1, n2); srun exits with $STEP_RC."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    (stubs / "scontrol").write_text(
        '#!/bin/bash\nif [ "$1" = show ]; then printf "n1\\nn2\\n"; exit 0; fi\n'
        f'printf "%s\\n" "$*" >>{str(calls)!r}\n')
    (stubs / "srun").write_text('#!/bin/bash\nexit "$STEP_RC"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    return stubs


# ==================================================================================================
# pure: the requeue budget in the rendered scripts


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
@pytest.mark.parametrize("budget,restart,step_rc,calls,message", [
    (2, None, 0, [], None),  # a step that succeeds: nothing to do
    (2, 1, 3, ["requeue 77"], "the job step failed (exit 3): requeue 2 of slurm.max_requeues=2"),
    # budget used up: Slurm may not requeue it any more (node failure, preemption) and a failure is final
    (2, 2, 3, ["update JobId=77 Requeue=0"],
     "dsft: error: the job step failed (exit 3) and the requeue budget is used up (2 of slurm.max_requeues=2)"),
    (2, 2, 0, ["update JobId=77 Requeue=0"], None),
    (0, None, 1, ["update JobId=77 Requeue=0"], "requeue budget is used up (0 of slurm.max_requeues=0)"),
])
def test_rendered_script_requeues_a_failed_step_until_the_budget_is_used_up(tmp_path, launcher, budget, restart,
                                                                           step_rc, calls, message):
    from dsft.slurm.sbatch import render

    recorded = tmp_path / "calls"
    stubs = _stub_dir(tmp_path, recorded)
    text = render(_cfg(max_requeues=budget), config_path="/c/run.yaml", launcher=launcher, job_dir=str(tmp_path),
                  workdir=str(tmp_path), executables={"torchrun": "torchrun", "deepspeed": "deepspeed",
                                                      "python": "true"})  # no `dsft validate` of /c/run.yaml
    script = tmp_path / "job.sh"
    script.write_text(text)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n[1-2]",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="77", STEP_RC=str(step_rc))
    env.pop("SLURM_RESTART_COUNT", None)
    if restart is not None:
        env["SLURM_RESTART_COUNT"] = str(restart)
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == step_rc, proc.stderr  # the step's status is the job's
    assert (recorded.read_text().splitlines() if recorded.exists() else []) == calls
    if message:
        assert message in proc.stderr
    else:
        assert "slurm.max_requeues" not in proc.stderr
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH --")]
    assert ("#SBATCH --requeue" in directives) == (budget > 0)
    assert ("#SBATCH --no-requeue" in directives) == (budget == 0)


# ==================================================================================================
# integration: a real 2-node Slurm on this machine


@pytest.fixture(scope="module")
def slurm2():
    """The repo's local Slurm with 2 nodes, up (idempotent: well under a second when it already runs so)."""
    if os.geteuid() == 0:
        t0 = time.time()
        proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm-local.sh"), "up", "--nodes", str(NODES)],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"scripts/slurm-local.sh up --nodes {NODES} failed:\n{proc.stderr[-3000:]}"
        print(f"slurm-local.sh up --nodes {NODES}: {time.time() - t0:.1f} s")
    elif not shutil.which("sinfo"):
        pytest.skip("no Slurm here: as root, `bash scripts/slurm-local.sh up --nodes 2` brings up 2 nodes")
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    if len(set(nodes)) < NODES:
        pytest.skip(f"this Slurm has {len(set(nodes))} node(s); the tests need {NODES}")
    return sorted(set(nodes))


def _scontrol_job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _sacct(job_id: str, fields: str) -> list[list[str]]:
    """One row per attempt (-D: the requeued ones too)."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", fields], capture_output=True,
                         text=True).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


@pytest.mark.integration
def test_requeue_budget_on_a_real_two_node_job(slurm2, tmp_path, monkeypatch):
    """A step that fails on both nodes, slurm.max_requeues 1: requeued once by the script, then left FAILED with
    the message naming the budget, and Slurm told not to requeue it again."""
    from dsft.slurm.sbatch import render

    failing = tmp_path / "failing-launcher"
    ran = tmp_path / "ran"
    ran.mkdir()
    # a marker file, not stdout: srun may drop a task's last output when --kill-on-bad-exit ends the step
    failing.write_text('#!/bin/bash\n'
                       f'touch "{ran}/node$SLURM_NODEID.restart${{SLURM_RESTART_COUNT:-0}}"\nexit 7\n')
    failing.chmod(0o755)
    job_dir = tmp_path / "slurm"
    job_dir.mkdir()
    cfg = _cfg(max_requeues=1, job_name="budget", time_min=5)
    script = tmp_path / "job.sh"
    script.write_text(render(cfg, config_path=str(tmp_path / "unused.yaml"), launcher="torchrun",
                             job_dir=str(job_dir), workdir=str(tmp_path),
                             executables={"torchrun": str(failing), "deepspeed": str(failing),
                                          "python": "true"}))  # no `dsft validate` of the unused config
    t0 = time.time()
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], env=_env(), capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    state = _wait_for(job_id, timeout=180)
    log = (job_dir / f"budget-{job_id}.out").read_text()
    assert state == "FAILED", f"{state}\n{log}"
    job = _scontrol_job(job_id)
    # ExitCode: 7 from the failing launcher, or 143 when srun --kill-on-bad-exit ended the other node's task first
    assert job["Restarts"] == "1" and job["Requeue"] == "0" and job["ExitCode"] != "0:0", job
    assert job["NodeList"] == "n[1-2]"  # both nodes of this host
    assert re.search(r"dsft: the job step failed \(exit (7|143)\): requeue 1 of slurm.max_requeues=1", log), log
    assert "the requeue budget is used up (1 of slurm.max_requeues=1): the job is left failed" in log
    markers = sorted(p.name for p in ran.iterdir())
    for restart in (0, 1):  # the step ran in both attempts (on both nodes; one may be killed before it starts)
        assert any(m.endswith(f".restart{restart}") for m in markers), (markers, log)
    assert not any(m.endswith(".restart2") for m in markers), markers
    attempts = _sacct(job_id, "Start,End,State")
    gap = None
    if len(attempts) == 2:  # requeued attempt's end -> the next attempt's start
        gap = datetime.fromisoformat(attempts[1][0]).timestamp() - datetime.fromisoformat(attempts[0][1]).timestamp()
    print(f"requeue budget job: {time.time() - t0:.1f} s to FAILED; attempts {attempts}; requeue gap {gap} s")


def _run_config(path: Path, model_dir: Path, data: dict, out: Path, slurm: dict, steps: int = 4) -> Path:
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {"train": data["train"], "format": "prompt_completion", "max_seq_len": 64, "packing": True,
                 "cache_dir": data["cache"]},
        "train": {"output_dir": str(out), "learning_rate": 2e-3, "max_steps": steps, "per_device_train_batch_size": 2,
                  "gradient_accumulation_steps": 2, "logging_steps": 1, "seed": 0, "data_seed": 0,
                  "report_to": "none", "save_strategy": "no"},
        "deepspeed": "zero3_multinode",  # ZeRO-3 with hpZ "auto": the ranks per node, as each rank sees them
        "slurm": {"time_min": 5, "signal_delay_s": 30, **slurm},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data2(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("slurm2-data")
    return {"train": str(write_jsonl(d / "train.jsonl", copy_task_rows(128, seed=1))), "cache": str(d / "cache")}


def _run_info(out: Path) -> dict:
    return json.loads((out / "dsft_run_info.json").read_text())


@pytest.mark.integration
def test_two_node_submit_reports_slurm_node_ranks_and_trains_like_one_node(slurm2, tiny_model_dir, data2, tmp_path,
                                                                          monkeypatch):
    """(a) `dsft submit` with nodes 2 x tasks 1, ZeRO-3 (zero3_multinode): rank 0 on node 0, rank 1 on node 1 though
    both nodes have the same host name; hpZ = 1 rank per node on each rank; the losses equal a 1-node 2-rank job's."""
    monkeypatch.setenv("DSFT_CPU_THREADS", "1")  # the 2 nodes share 2 cores: one thread per rank
    runs = {}
    for name, slurm in (("two-nodes", {"nodes": 2, "tasks_per_node": 1}), ("one-node", {"nodes": 1,
                                                                                       "tasks_per_node": 2})):
        d = tmp_path / name
        config = _run_config(d / "run.yaml", tiny_model_dir, data2, d / "out", slurm)
        t0 = time.time()
        proc = _submit(config, cwd=d)
        job_id = _job_id(proc)
        _finish(proc)
        runs[name] = {"out": d / "out", "job_id": job_id, "seconds": time.time() - t0,
                      "results": _results(d / "out" / "slurm" / job_id, job_id, 2)}
    two, one = runs["two-nodes"], runs["one-node"]
    print(f"(a) 2-node submit -> completed {two['seconds']:.1f} s; 1-node 2-rank {one['seconds']:.1f} s")

    assert _scontrol_job(two["job_id"]).get("NodeList") == "n[1-2]"
    assert [(x["rank"], x["node"]) for x in two["results"]] == [(0, 0), (1, 1)]  # submitit's view of Slurm
    info = _run_info(two["out"])
    assert info["world_size"] == 2 and info["deepspeed_zero_stage"] == 3 and info["num_nodes"] == 2
    ranks = sorted(info["ranks"], key=lambda r: r["rank"])
    assert len({r["host"] for r in ranks}) == 1  # one host name for both nodes: it cannot tell them apart
    assert [(r["rank"], r["node_rank"], r["local_rank"], r["ranks_per_node"]) for r in ranks] == [(0, 0, 0, 1),
                                                                                                  (1, 1, 0, 1)]
    assert [r["zero_hpz_partition_size"] for r in ranks] == [1, 1]  # checked on each rank: its node's ranks

    ref = sorted(_run_info(one["out"])["ranks"], key=lambda r: r["rank"])
    assert [(r["node_rank"], r["local_rank"], r["ranks_per_node"], r["zero_hpz_partition_size"]) for r in ref] == \
        [(0, 0, 2, 2), (0, 1, 2, 2)]

    losses, ref_losses = _losses(two["out"]), _losses(one["out"])
    assert [s for s, _ in losses] == [s for s, _ in ref_losses] == [1, 2, 3, 4]
    worst = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(losses, ref_losses))
    print(f"(a) max rel loss diff 2 nodes x 1 vs 1 node x 2: {worst:.2e}")
    assert worst < 1e-3, (losses, ref_losses)


@pytest.mark.integration
def test_rendered_templates_run_across_two_nodes(slurm2, tiny_model_dir, data2, tmp_path, monkeypatch, capsys):
    """(b) both rendered scripts (torchrun: c10d rendezvous on n1; deepspeed launcher --no_ssh on each node), each
    submitted with sbatch to 2 nodes x 1 rank, at the same time (each takes one CPU of each node): each trains with
    a world of 2, one rank per node."""
    from dsft.cli import main

    monkeypatch.setenv("DSFT_CPU_THREADS", "1")  # the 2 nodes share 2 cores: one thread per rank
    jobs = {}
    t0 = time.time()
    for launcher in ("torchrun", "deepspeed"):
        d = tmp_path / launcher
        config = _run_config(d / "run.yaml", tiny_model_dir, data2, d / "out",
                             {"nodes": 2, "tasks_per_node": 1, "job_name": f"b2-{launcher}"}, steps=2)
        script = d / "job.sh"
        monkeypatch.chdir(d)
        assert main(["sbatch", str(config), "--launcher", launcher, "--port", str(free_port()),
                     "--out", str(script)]) == 0
        capsys.readouterr()
        submitted = subprocess.run(["sbatch", "--parsable", str(script)], env=_env(), capture_output=True, text=True)
        assert submitted.returncode == 0, submitted.stderr
        jobs[launcher] = (d, submitted.stdout.strip().split(";")[0])
    for launcher, (d, job_id) in jobs.items():
        state = _wait_for(job_id, timeout=300)
        log = d / "out" / "slurm" / f"b2-{launcher}-{job_id}.out"
        assert state == "COMPLETED", f"{state}\n{log.read_text()[-4000:] if log.is_file() else 'no log'}"
        assert _scontrol_job(job_id).get("NodeList") == "n[1-2]"
        info = _run_info(d / "out")
        assert info["world_size"] == 2 and info["num_nodes"] == 2
        assert sorted((r["rank"], r["node_rank"], r["local_rank"]) for r in info["ranks"]) == [(0, 0, 0), (1, 1, 0)]
        assert [s for s, _ in _losses(d / "out")] == [1, 2]
    print(f"(b) torchrun + deepspeed sbatch scripts on 2 nodes, side by side: {time.time() - t0:.1f} s")
