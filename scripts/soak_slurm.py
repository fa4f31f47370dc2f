"""Soak test (not part of the test suite): one `dsft submit` job preempted N times in a row on a real Slurm, then
left to finish; its final loss must equal an uninterrupted job's (fp32, rel 1e-3) with every step logged once.

    .venv/bin/python scripts/soak_slurm.py [--preemptions 3] [--steps 30] [--deepspeed zero2] [--keep DIR]

Needs Slurm: as root it brings up the repo's one-node cluster (scripts/slurm-local.sh up). Both jobs are 2-rank CPU
jobs on a tiny Llama (built locally, as in the tests). A preemption is what submitit sends (`job._interrupt()`:
SIGTERM, then USR2): dsft saves at the next step boundary and stops, submitit requeues the job, and the requeued
job resumes from the newest complete checkpoint (train.resume_from_checkpoint: auto). The script waits for the
requeued job to train past its resume point before the next preemption. Prints a markdown summary and writes
bench/results/soak_slurm.json. Exit code 0 only if every check held.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "tests"))


def ensure_slurm() -> None:
    if shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0:
        raise SystemExit("no Slurm here; as root, `bash scripts/slurm-local.sh up` brings up a one-node cluster")
    subprocess.run(["bash", str(REPO / "scripts" / "slurm-local.sh"), "up"], check=True)


def logged(out: Path) -> list[dict]:
    path = out / "dsft_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in logged(out) if "loss" in r]


def write_config(d: Path, model: Path, data: Path, steps: int, deepspeed: str | None) -> Path:
    raw = {
        "model": {"name_or_path": str(model), "dtype": "fp32"},
        "data": {"train": str(data), "format": "prompt_completion", "max_seq_len": 64, "packing": True,
                 "cache_dir": str(d.parent / "cache")},
        # a step takes a few tenths of a second here: long enough to be preempted in the middle of the run
        "train": {"output_dir": str(d / "out"), "learning_rate": 2e-3, "max_steps": steps,
                  "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4, "logging_steps": 1,
                  "seed": 0, "data_seed": 0, "report_to": "none", "save_strategy": "no"},
        # 30 min: a preemption is not counted as a time-out by submitit (it is for limits <= 10 min)
        "slurm": {"tasks_per_node": 2, "time_min": 30, "max_requeues": 10},
    }
    if deepspeed:
        raw["deepspeed"] = deepspeed
    d.mkdir(parents=True)
    (d / "run.yaml").write_text(yaml.safe_dump(raw))
    return d / "run.yaml"


def submit(config: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([str(BIN / "dsft"), "submit", str(config), "--wait"], env=env, cwd=config.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("submitted job"):
            return proc, line.split()[2].rstrip(":")
    raise SystemExit(f"dsft submit printed no job id (exit {proc.wait()})")


def finish(proc: subprocess.Popen) -> str:
    tail = proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"dsft submit --wait failed ({proc.returncode}):\n{tail[-4000:]}")
    return tail


def results(config: Path, job_id: str) -> list[dict]:
    import submitit

    return submitit.SlurmJob(folder=config.parent / "out" / "slurm" / job_id, job_id=job_id, tasks=[0, 1]).results()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preemptions", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--deepspeed", default="zero2", help="template name, or '' for plain DDP")
    p.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    a = p.parse_args()
    ensure_slurm()
    from conftest import copy_task_rows, write_jsonl, write_tiny_model

    import submitit

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="dsft-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    model = write_tiny_model(work / "model")
    data = write_jsonl(work / "train.jsonl", copy_task_rows(480, seed=1))
    t0 = time.time()

    ref_config = write_config(work / "reference", model, data, a.steps, a.deepspeed or None)
    proc, ref_job = submit(ref_config)
    finish(proc)
    reference = results(ref_config, ref_job)
    ref_seconds = time.time() - t0

    config = write_config(work / "soak", model, data, a.steps, a.deepspeed or None)
    out = config.parent / "out"
    t1 = time.time()
    proc, job_id = submit(config)
    # preempt after the run (first start or last requeue) has trained a few more steps than the last stop
    gap = max(2, a.steps // (a.preemptions + 2))
    preempted_at = []
    for k in range(1, a.preemptions + 1):
        target = gap * k
        while not any(step >= target for step, _ in losses(out)):
            if proc.poll() is not None:
                raise SystemExit(f"the job ended before preemption {k}:\n{proc.stdout.read()[-3000:]}")
            time.sleep(0.05)
        preempted_at.append(max(step for step, _ in losses(out)))
        submitit.SlurmJob(folder=out / "slurm" / job_id, job_id=job_id)._interrupt()
        print(f"preemption {k}: signalled after logged step {preempted_at[-1]}", flush=True)
    finish(proc)
    soak = results(config, job_id)
    soak_seconds = time.time() - t1

    attempts = soak[0]["attempts"]
    steps = [s for s, _ in losses(out)]
    ref_losses = dict(losses(ref_config.parent / "out"))
    worst = max(abs(loss - ref_losses[s]) / abs(ref_losses[s]) for s, loss in losses(out))
    final, final_ref = soak[0]["loss"], reference[0]["loss"]
    final_rel = abs(final - final_ref) / abs(final_ref)
    from dsft.checkpoint import is_complete, list_checkpoints

    checkpoints = list_checkpoints(out)
    checks = {
        f"requeued {a.preemptions} times": soak[0]["restart"] == a.preemptions,
        "every attempt resumed where the previous one stopped": all(
            nxt["start_step"] == cur["stopped_at_step"] for cur, nxt in zip(attempts, attempts[1:])),
        f"reached step {a.steps}": soak[0]["global_step"] == reference[0]["global_step"] == a.steps,
        "each step logged once": steps == list(range(1, a.steps + 1)),
        "final loss equals the uninterrupted job's (rel 1e-3)": final_rel < 1e-3,
        "every logged loss equals the uninterrupted job's (rel 1e-3)": worst < 1e-3,
        "all checkpoints complete": bool(checkpoints) and all(is_complete(c) for c in checkpoints),
        "finished run marked": (out / "dsft_done.json").is_file(),
    }
    summary = {
        "preemptions": a.preemptions, "steps": a.steps, "deepspeed": a.deepspeed or None,
        "signalled_after_logged_steps": preempted_at,
        "attempts": [{k: at.get(k) for k in ("start_step", "stopped_at_step")} for at in attempts],
        "checkpoints": [c.name for c in checkpoints], "final_loss": final, "reference_final_loss": final_ref,
        "final_loss_rel_diff": final_rel, "max_logged_loss_rel_diff": worst,
        "reference_job_s": round(ref_seconds, 1), "preempted_job_s": round(soak_seconds, 1), "checks": checks,
    }
    print(f"\n2 CPU ranks, tiny Llama, fp32, deepspeed={a.deepspeed or 'none'}, {a.steps} steps; "
          f"{a.preemptions} preemptions (submitit's interrupt) after logged steps {preempted_at}\n")
    print("| attempt | started at step | stopped at step |\n|---|---|---|")
    for i, at in enumerate(attempts):
        print(f"| {i} | {at.get('start_step')} | {at.get('stopped_at_step') or '(finished)'} |")
    print(f"\nfinal loss {final:.6f} vs uninterrupted {final_ref:.6f} (rel {final_rel:.1e}); max rel difference of "
          f"any logged step {worst:.1e}; uninterrupted job {ref_seconds:.0f} s, preempted job {soak_seconds:.0f} s")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    results_dir = REPO / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "soak_slurm.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
