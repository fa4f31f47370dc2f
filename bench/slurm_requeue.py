"""What a preemption costs under `dsft submit`: the requeue gap and the steps of work lost. Needs a Slurm
(as root: `bash scripts/slurm-local.sh up`). Prints a markdown table and writes bench/results/slurm_requeue.json.

    .venv/bin/python bench/slurm_requeue.py [--repeats 2] [--steps 30] [--interrupt-at 10] [--deepspeed zero2]

Each repeat submits one 2-rank CPU job (SmolLM2-135M architecture, random weights from its config, fp32, gloo),
waits until `--interrupt-at` steps are logged, sends what a preemption sends (submitit's `job._interrupt()`:
SIGTERM, then USR2), and lets it requeue and finish. From the ranks' results and sacct it reports: the step the
run saved and stopped at, the step the requeued job resumed from (their difference is the work lost), and the
time from the signal to the stop (step end + checkpoint save), to Slurm starting the requeued job, and to the
first step done after the resume (all seconds after the signal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def job_runs(job_id: str) -> list[tuple[float, float | None]]:
    """(start, end) of every run of the job (the first and each requeue) from sacct (1 s resolution)."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "Start,End"], capture_output=True,
                         text=True).stdout.split()

    def stamp(text: str) -> float | None:
        return None if text in ("", "Unknown") else datetime.fromisoformat(text).timestamp()

    return [(stamp(start), stamp(end)) for start, end in (line.split("|") for line in out)]


def one_run(tmp: Path, a: argparse.Namespace) -> dict:
    import submitit

    out = tmp / "out"
    cfg = {
        "model": {"name_or_path": a.model, "init": "from_config", "dtype": "fp32"},
        "data": {"train": a.data, "format": "prompt_completion", "max_seq_len": 128, "packing": True,
                 "cache_dir": str(tmp / "cache")},
        "train": {"output_dir": str(out), "max_steps": a.steps, "per_device_train_batch_size": 1,
                  "logging_steps": 1, "report_to": "none", "save_strategy": "no", "seed": 0, "data_seed": 0},
        "slurm": {"tasks_per_node": 2, "time_min": 30},
    }
    if a.deepspeed:
        cfg["deepspeed"] = a.deepspeed
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([str(BIN / "dsft"), "submit", str(config), "--wait"], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_id = next(line.split()[2].rstrip(":") for line in proc.stdout if line.startswith("submitted job"))
    log = out / "dsft_log.jsonl"
    while True:
        steps = [json.loads(x).get("step", 0) for x in log.read_text().splitlines()] if log.is_file() else []
        if steps and max(steps) >= a.interrupt_at:
            break
        if proc.poll() is not None:
            raise SystemExit("the job ended before it was interrupted:\n" + proc.stdout.read()[-3000:])
        time.sleep(0.05)
    folder = out / "slurm" / job_id
    submitit.SlurmJob(folder=folder, job_id=job_id)._interrupt()
    tail = proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"dsft submit --wait failed:\n{tail[-3000:]}")
    results = submitit.SlurmJob(folder=folder, job_id=job_id, tasks=[0, 1]).results()
    first, second = results[0]["attempts"]
    runs = job_runs(job_id)
    return {
        "job_id": job_id, "logged_step_when_signalled": a.interrupt_at,
        "stopped_at_step": first["stopped_at_step"], "resumed_at_step": second["start_step"],
        "steps_lost": first["stopped_at_step"] - second["start_step"], "final_step": results[0]["global_step"],
        # the first run ends when rank 0 requeues it: after the step in flight and the checkpoint save
        "stopped_and_requeued_s": round(runs[0][1] - first["signal_at"], 1) if len(runs) >= 2 else None,
        "requeued_job_started_s": round(runs[-1][0] - first["signal_at"], 1) if len(runs) >= 2 else None,
        "resumed_first_step_s": round(second["first_step_at"] - first["signal_at"], 1),
        "restarts": results[0]["restart"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--interrupt-at", type=int, default=10)
    p.add_argument("--deepspeed", default="zero2", help="template name, or '' for plain DDP")
    p.add_argument("--model", default=str(REPO / ".cache/dsft/models/SmolLM2-135M-Instruct"))
    p.add_argument("--data", default=str(REPO / ".cache/dsft/data/humaneval/train.jsonl"))
    a = p.parse_args()
    rows = []
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(one_run(Path(tmp), a))
    cred = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    cred_line = next((x.strip() for x in cred.splitlines() if x.startswith("AuthInfo")), "AuthInfo ?")
    print(f"2 CPU ranks, SmolLM2-135M architecture (random weights), fp32, deepspeed={a.deepspeed or 'none'}, "
          f"{a.steps} steps, interrupted once logged step {a.interrupt_at} was seen; {cred_line}\n")
    keys = ["stopped_at_step", "resumed_at_step", "steps_lost", "final_step", "stopped_and_requeued_s",
            "requeued_job_started_s", "resumed_first_step_s"]
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for i, r in enumerate(rows, start=1):
        print(f"| {i} | " + " | ".join(str(r[k]) for k in keys) + " |")
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "slurm_requeue.json").write_text(json.dumps(
        {"args": vars(a), "auth_info": cred_line, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
