"""Faults of 2-node jobs on the real 2-node Slurm on this machine (issue 14, tests 3(c)-(e)): (c) preemption of a
2-node `dsft submit` job; (d) one node's training rank killed mid-run under the rendered torchrun sbatch script;
(e) a sweep whose points are 2-node jobs. Each rank gets one thread (DSFT_CPU_THREADS=1): the 2 nodes share 2 cores."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import free_port
from dsft.checkpoint import is_complete, latest_complete_checkpoint
from test_slurm import _env, _finish, _job_id, _losses, _results, _submit, _wait_for, _write_config
from test_slurm_multinode import _sacct, _scontrol_job, data2, slurm2  # noqa: F401 -- fixtures

pytestmark = pytest.mark.integration


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("DSFT_CPU_THREADS", "1")


@pytest.fixture(scope="module")
def data_eval(tmp_path_factory) -> dict:
    from conftest import copy_task_rows, write_jsonl

    d = tmp_path_factory.mktemp("slurm2-faults-data")
    return {"train": str(write_jsonl(d / "train.jsonl", copy_task_rows(480, seed=1))),
            "eval": str(write_jsonl(d / "eval.jsonl", copy_task_rows(16, seed=2))), "cache": str(d / "cache")}


def test_c_preempted_two_node_job_saves_on_both_nodes_requeues_and_matches(slurm2, tiny_model_dir, data_eval,
                                                                          tmp_path, one_thread):
    """(c) `dsft submit` nodes 2 x tasks 1: the end-of-job signal makes both nodes save at the next step boundary,
    the job is requeued once, resumes at that step and ends with the uninterrupted job's losses. The uninterrupted
    reference runs at the same time (each job takes one CPU of each node)."""
    import submitit

    two_nodes = {"nodes": 2, "tasks_per_node": 1}
    procs = {}
    for name in ("reference", "interrupted"):
        config = _write_config(tmp_path / name / "run.yaml", tiny_model_dir, data_eval, tmp_path / name / "out",
                               steps=16, slurm=two_nodes)
        proc = _submit(config, cwd=tmp_path / name)
        procs[name] = (proc, _job_id(proc))
    proc, job_id = procs["interrupted"]
    out = tmp_path / "interrupted" / "out"
    folder = out / "slurm" / job_id
    deadline = time.time() + 300
    while not any(step >= 3 for step, _ in _losses(out)):  # interrupt mid-training
        assert time.time() < deadline and proc.poll() is None, "training did not reach step 3"
        time.sleep(0.05)
    submitit.SlurmJob(folder=folder, job_id=job_id)._interrupt()  # what a preemption sends: SIGTERM, then USR2
    _finish(proc)
    _finish(procs["reference"][0])
    results = _results(folder, job_id, 2)
    reference = _results(tmp_path / "reference" / "out" / "slurm" / procs["reference"][1], procs["reference"][1], 2)

    assert [(x["rank"], x["node"]) for x in results] == [(0, 0), (1, 1)]  # one rank on each node
    assert _scontrol_job(job_id).get("NodeList") == "n[1-2]"
    assert {x["restart"] for x in results} == {1}, "the job was not requeued exactly once"
    first, second = results[0]["attempts"]
    stopped, resumed = first["stopped_at_step"], second["start_step"]
    checkpoint = out / f"checkpoint-{stopped}"
    assert 3 <= stopped < 16 and is_complete(checkpoint)
    # both nodes wrote their part of the step-boundary checkpoint (the Trainer saves one RNG state per rank)
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert resumed == stopped  # no step of work lost
    assert results[0]["global_step"] == results[1]["global_step"] == reference[0]["global_step"] == 16
    losses, ref_losses = _losses(out), _losses(tmp_path / "reference" / "out")
    assert [s for s, _ in losses] == [s for s, _ in ref_losses] == list(range(1, 17))  # each step logged once
    worst = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(losses, ref_losses))
    assert worst < 1e-3, (losses, ref_losses)
    starts = [row[0] for row in _sacct(job_id, "Start")]
    restarted = datetime.fromisoformat(starts[-1]).timestamp() - first["signal_at"] if len(starts) > 1 else None
    print(f"(c) 2-node job preempted after step 3: saved at step {stopped} on both nodes, resumed at {resumed}; "
          f"requeue gap: signal -> Slurm restarted the job {restarted if restarted is None else round(restarted, 1)} "
          f"s, -> first resumed step {second['first_step_at'] - first['signal_at']:.1f} s; "
          f"max rel loss diff vs uninterrupted {worst:.2e}")


def _rank_pid(out: Path, rank: int, not_pid: int | None = None) -> int | None:
    """The pid rank ``rank`` recorded in dsft_run_info.json (written when training starts), if it is a new one."""
    try:
        ranks = json.loads((out / "dsft_run_info.json").read_text())["ranks"]
    except (OSError, ValueError, KeyError):
        return None
    pid = next((r["pid"] for r in ranks if r["rank"] == rank), None)
    return pid if pid != not_pid else None


def _wait(condition, what: str, timeout: float = 240, job_id: str | None = None):
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}" + (
            f": {_scontrol_job(job_id)}" if job_id else "")
        time.sleep(0.1)


def test_d_a_dead_node_task_ends_the_job_fast_requeues_resumes_then_fails_at_the_budget(
        slurm2, tiny_model_dir, data_eval, tmp_path, monkeypatch, capsys, one_thread):
    """(d) torchrun template, 2 nodes x 1 rank, slurm.max_requeues 1. Rank 1 (node n2) is SIGKILLed mid-run: the
    step ends within seconds (srun --kill-on-bad-exit, no wait for a collective timeout), the script requeues the job
    (1 of 1), the next attempt resumes from the newest complete checkpoint; rank 1 killed again: the budget is used
    up and the job is left FAILED with a message naming it."""
    from dsft.cli import main

    out = tmp_path / "out"
    config = _write_config(tmp_path / "run.yaml", tiny_model_dir, data_eval, out, steps=200,
                           slurm={"nodes": 2, "tasks_per_node": 1, "max_requeues": 1, "job_name": "d2"},
                           save_strategy="steps", save_steps=3, ddp_timeout=600)
    script = tmp_path / "job.sh"
    monkeypatch.chdir(tmp_path)
    assert main(["sbatch", str(config), "--launcher", "torchrun", "--port", str(free_port()),
                 "--out", str(script)]) == 0
    capsys.readouterr()
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], env=_env(), capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    log = out / "slurm" / f"d2-{job_id}.out"
    detections, resumed_from, pid = [], None, None
    try:
        for attempt in (0, 1):
            # a complete checkpoint newer than the one this attempt started from, and a step past it
            floor = int(resumed_from.name.split("-")[1]) if resumed_from else 0

            def ready():
                last, _ = latest_complete_checkpoint(out)
                steps = [s for s, _ in _losses(out)]
                return last is not None and int(last.name.split("-")[1]) > floor and steps and \
                    steps[-1] > int(last.name.split("-")[1])

            pid = _wait(lambda: _rank_pid(out, 1, not_pid=pid), f"rank 1 of attempt {attempt}", job_id=job_id)
            _wait(ready, f"a new complete checkpoint in attempt {attempt}", job_id=job_id)
            newest, _ = latest_complete_checkpoint(out)
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)  # rank 1 runs on this host (node n2 is a slurmd here)
            # the job leaves RUNNING once the step has ended on both nodes (requeued or failed)
            _wait(lambda: _scontrol_job(job_id).get("JobState") not in ("RUNNING",) or
                  _scontrol_job(job_id).get("Restarts") != str(attempt), "the job step to end", timeout=120)
            detections.append(time.time() - killed_at)
            if attempt == 0:
                resumed_from = newest
        state = _wait_for(job_id, timeout=180)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    text = log.read_text()
    assert state == "FAILED", f"{state}\n{text[-4000:]}"
    job = _scontrol_job(job_id)
    assert job["Restarts"] == "1" and job["Requeue"] == "0", job
    assert re.search(r"dsft: the job step failed \(exit \d+\): requeue 1 of slurm.max_requeues=1", text), text[-4000:]
    assert "the requeue budget is used up (1 of slurm.max_requeues=1): the job is left failed" in text, text[-4000:]
    # the second attempt continued from the newest complete checkpoint at the time of the first kill
    assert f"resuming from {resumed_from}" in text, text[-4000:]
    steps = [s for s, _ in _losses(out)]
    assert steps == list(range(1, len(steps) + 1))  # each step once across both attempts
    assert all(d < 30 for d in detections), detections  # seconds, not the 600 s collective timeout
    attempts = _sacct(job_id, "Start,End,State")
    gap = None
    if len(attempts) == 2:
        gap = datetime.fromisoformat(attempts[1][0]).timestamp() - datetime.fromisoformat(attempts[0][1]).timestamp()
    print(f"(d) rank 1 killed: job step ended {', '.join(f'{d:.1f}' for d in detections)} s after the kill "
          f"(attempt 0, attempt 1); resumed from {resumed_from.name}; requeue gap {gap} s; attempts {attempts}")


def test_e_a_sweep_whose_points_are_two_node_jobs(slurm2, tiny_model_dir, data_eval, tmp_path, one_thread):
    """(e) a 2-point sweep, each point a 2-node x 1-rank job, both at once (each takes one CPU of each node): one job
    array, each point trained across n1 and n2 with node ranks 0 and 1, and the table ranks them."""
    import csv
    import sys

    config = _write_config(tmp_path / "run.yaml", tiny_model_dir, data_eval, tmp_path / "sweep", steps=4,
                           slurm={"nodes": 2, "tasks_per_node": 1})
    t0 = time.time()
    proc = subprocess.run([str(Path(sys.executable).parent / "dsft"), "sweep", str(config), "--grid",
                           "train.learning_rate=1e-3,1e-2", "--parallel", "2", "--wait"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((tmp_path / "sweep" / "dsft_sweep.json").read_text())
    array = info["array_job_id"]
    assert [p["job_id"] for p in info["points"]] == [f"{array}_{i}" for i in range(2)]  # one job array
    with open(tmp_path / "sweep" / "sweep_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == ["1", "2"] and {r["state"] for r in rows} == {"COMPLETED"}
    for point in info["points"]:
        assert _sacct(point["job_id"], "NodeList")[0][0] == "n[1-2]"
    for r in rows:
        run_info = json.loads((Path(r["output_dir"]) / "dsft_run_info.json").read_text())
        assert run_info["world_size"] == 2 and run_info["num_nodes"] == 2
        assert sorted((x["rank"], x["node_rank"]) for x in run_info["ranks"]) == [(0, 0), (1, 1)]
        assert [s for s, _ in _losses(Path(r["output_dir"]))] == [1, 2, 3, 4]
    print(f"(e) 2-point sweep of 2-node jobs, both at once: {time.time() - t0:.1f} s")
