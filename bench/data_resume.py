"""Resume on a large dataset (issue 11, point 6): time from resuming to the first step at a late step, against
the time the same run takes to its first step from step 0, and against replaying the skipped batches.

    .venv/bin/python bench/data_resume.py                           # 1M rows, resume at step 50,000 (batch 8)
    .venv/bin/python bench/data_resume.py --rows 100000 --step 5000  # quick

transformers 5.23's Trainer resumes mid-epoch with accelerate's ``skip_first_batches``: a ``SkipBatchSampler``
that draws the skipped batches' indices from the batch sampler and drops them, so no skipped row is read or
collated. What this measures, each phase in a fresh process (data from the tokenized cache, never re-tokenized):

1. ``prepare``: 1M short prompt -> completion rows (SmolLM2 tokenizer, no packing) into dsft's cache.
2. ``checkpoint``: a tiny random model (SmolLM2's architecture, 2 layers) trains 1 step and saves checkpoint-1,
   which is then made a step-N checkpoint by setting ``global_step`` in its trainer_state.json (the model and
   optimizer states are irrelevant to where the data resumes; training 50k real steps would take hours here).
3. ``fresh`` and ``resume``: the same run from step 0 and from step N; seconds from the process start and from
   ``trainer.train()`` (on_train_begin) to the end of the first optimizer step.
4. ``replay``: what replaying would cost: the Trainer's train dataloader iterated (rows read and collated) for
   some batches, extrapolated to N batches.

Writes bench/results/data_resume.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO, machine, write_result  # noqa: E402

MODEL = REPO / ".cache/dsft/models/SmolLM2-135M-Instruct"
STARTED = time.monotonic()  # of this process: the children measure from their own start


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 10)))
            f.write(json.dumps({"prompt": f"copy {word}:", "completion": f" {word}"}) + "\n")


def write_config(work: Path, rows: int, name: str, max_steps: int, resume: str | None = None) -> Path:
    import yaml

    raw = {"model": {"name_or_path": str(MODEL), "init": "from_config", "dtype": "fp32",
                     "config_overrides": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                          "num_attention_heads": 4, "num_key_value_heads": 2}},
           "data": {"train": str(work / f"rows-{rows}.jsonl"), "format": "prompt_completion", "max_seq_len": 64,
                    "packing": False, "cache_dir": str(work / "cache")},
           "train": {"output_dir": str(work / f"out-{name}"), "per_device_train_batch_size": 8,
                     "max_steps": max_steps, "logging_steps": 1, "report_to": "none", "save_strategy": "steps",
                     "save_steps": 1_000_000, "seed": 0, "data_seed": 0}}
    if resume:
        raw["train"]["resume_from_checkpoint"] = resume
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def child(phase: str, config: Path, steps: int) -> dict:
    """One phase in this (fresh) process."""
    from transformers import TrainerCallback

    from dsft.config import load_config
    from dsft.run import quiet_libraries, setup_logging

    quiet_libraries()
    setup_logging()
    cfg = load_config(config)
    if phase == "prepare":
        from dsft.prepare import prepare, summary

        t0 = time.perf_counter()
        data = prepare(cfg)
        return {"seconds": round(time.perf_counter() - t0, 1), "rows": data.stats["train"].rows,
                "tokens": data.stats["train"].tokens, "from_cache": data.from_cache,
                "cache": summary(data, cfg)["cache_dir"]}
    if phase == "replay":
        from dsft.train import build_trainer, build_training_arguments

        trainer, _ = build_trainer(cfg, build_training_arguments(cfg))
        loader = trainer.get_train_dataloader()
        it = iter(loader)
        next(it)  # workers / first-batch setup out of the timing
        n = min(5000, len(loader) - 1)
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        per_batch = (time.perf_counter() - t0) / n
        return {"batches_timed": n, "seconds_per_batch": per_batch, "replay_estimate_s": round(per_batch * steps, 1)}

    marks: dict = {}

    class Clock(TrainerCallback):
        """on_train_begin -> end of the first optimizer step of this process; then stop (phase checkpoint:
        save it first)."""

        def on_train_begin(self, args, state, control, **kwargs):
            marks["train_begin"] = time.monotonic()
            marks["start_step"] = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            if "first_step" not in marks:
                marks["first_step"] = time.monotonic()
                marks["first_step_number"] = state.global_step
            control.should_training_stop = True
            control.should_save = phase == "checkpoint"
            return control

    from dsft.train import run

    run(cfg, [Clock()])
    return {"start_step": marks["start_step"], "first_step": marks["first_step_number"],
            "process_start_to_first_step_s": round(marks["first_step"] - STARTED, 2),
            "train_begin_to_first_step_s": round(marks["first_step"] - marks["train_begin"], 3)}


def main() -> int:
    machine_info = machine()  # the load before the runs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--step", type=int, default=50_000, help="the checkpoint's global step (batch 8, 1 rank)")
    p.add_argument("--workdir", default="/tmp/dsft-bench-data-resume")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), int(a.child[2]))))
        return 0
    if not MODEL.is_dir():
        print(f"no SmolLM2 at {MODEL}: run `.venv/bin/dsft prepare-demo --cache-dir .cache/dsft` first")
        return 1
    if a.step * 8 >= a.rows:
        print(f"--step {a.step} x batch 8 is past the first epoch of {a.rows} rows; lower --step")
        return 1
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"rows-{a.rows}.jsonl"
    if not data.exists():
        generate(data, a.rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def run_child(phase: str, config: Path) -> dict:
        proc = subprocess.run([sys.executable, __file__, "--child", phase, str(config), str(a.step)], env=env,
                              capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{phase}: {out}", flush=True)
        return out

    results: dict = {"rows": a.rows, "step": a.step, "batch": 8}
    total = a.step + 100
    results["prepare"] = run_child("prepare", write_config(work, a.rows, "fresh", total))
    import shutil

    for name in ("ckpt", "fresh", "resume"):
        shutil.rmtree(work / f"out-{name}", ignore_errors=True)
    run_child("checkpoint", write_config(work, a.rows, "ckpt", total))
    ckpt = work / "out-ckpt" / "checkpoint-1"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["global_step"] = a.step
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    from dsft.checkpoint import mark_complete

    mark_complete(ckpt)  # its marker lists file sizes: written again for the edited trainer_state.json
    late = work / f"checkpoint-{a.step}"
    shutil.rmtree(late, ignore_errors=True)
    shutil.move(str(ckpt), late)
    results["fresh"] = run_child("fresh", write_config(work, a.rows, "fresh", total))
    results["resume"] = run_child("resume", write_config(work, a.rows, "resume", total, resume=str(late)))
    results["replay"] = run_child("replay", write_config(work, a.rows, "fresh", total))
    assert results["resume"]["start_step"] == a.step and results["resume"]["first_step"] == a.step + 1
    results["machine"] = dict(machine_info, load_avg_at_end=os.getloadavg())
    print(f"wrote {write_result('data_resume', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
