"""dsft vs a plain hand-written HF Trainer script (bench/plain_trainer.py) doing the same fine-tune: tokens/s ratio.

    .venv/bin/python bench/vs_plain_trainer.py [--pairs 3] [--steps 8] [--batch 4] [--max-len 512]

Job: LoRA r=16 (alpha 32, dropout 0.05, all linear layers) on SmolLM2-135M-Instruct (the demo model), HumanEval
prompt -> completion, dynamic padding (dsft `packing: false`, so both see the same padded batches), fp32, AdamW,
seed 0, same batch and steps. Each run is a fresh single process with one thread (OMP_NUM_THREADS=1, DSFT_CPU_THREADS=1: on a busy shared machine two spinning OpenMP threads per run slowed both sides erratically); runs alternate A B, B A, A B, ...
in one invocation so that load from other processes on the machine hits both sides alike. Throughput is each
run's own measurement of its training loop: non-pad tokens seen / the Trainer's train_runtime (startup excluded).
Prints a markdown table and writes bench/results/vs_plain_trainer.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (HUMANEVAL, REPO, SMOLLM2, alternate, cpu_env, machine, markdown_table,  # noqa: E402
                     pair_ratios, train_one_process, write_result)

# one thread per run: on a busy shared machine two spinning OpenMP threads per run slowed both sides erratically
ENV = cpu_env(DSFT_CPU_THREADS="1")


def run_dsft(tmp: Path, name: str, a: argparse.Namespace) -> dict:
    cfg = {"model": {"name_or_path": str(SMOLLM2), "dtype": "fp32"},
           "data": {"train": str(HUMANEVAL), "format": "prompt_completion", "max_seq_len": a.max_len,
                    "packing": False, "cache_dir": str(tmp / "cache")},
           "peft": {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
           "train": {"output_dir": str(tmp / name), "max_steps": a.steps, "per_device_train_batch_size": a.batch,
                     "learning_rate": 2e-4, "logging_steps": 1, "report_to": "none", "save_strategy": "no",
                     "seed": 0, "bf16": False}}
    r = train_one_process(cfg, tmp, name, ENV)
    return {**r, "tokens": r["num_input_tokens_seen"], "tokens_per_s": r["num_input_tokens_seen"] / r["train_runtime"]}


def run_plain(tmp: Path, name: str, a: argparse.Namespace) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "plain_trainer.py"), "--model", str(SMOLLM2),
                           "--data", str(HUMANEVAL), "--out", str(tmp / name), "--steps", str(a.steps),
                           "--batch", str(a.batch), "--max-len", str(a.max_len)],
                          cwd=REPO, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"plain Trainer run failed:\n{proc.stderr[-3000:]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"train_runtime": m["train_runtime"], "tokens": m["num_input_tokens_seen"], "losses": m["losses"],
            "steps": len(m["losses"]), "wall_s": wall, "tokens_per_s": m["num_input_tokens_seen"] / m["train_runtime"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    a = p.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        runs = alternate({"dsft": lambda i: run_dsft(tmp, f"dsft{i}", a),
                          "plain": lambda i: run_plain(tmp, f"plain{i}", a)}, a.pairs, "tokens_per_s")
    ratios = pair_ratios(runs, "dsft", "plain", "tokens_per_s")
    table = []
    for i, ratio in enumerate(ratios):
        d, q = (next(r for r in runs if r["pair"] == i and r["side"] == side) for side in ("dsft", "plain"))
        table.append([i, "dsft first" if i % 2 == 0 else "plain first", f"{d['tokens_per_s']:.1f}",
                      f"{q['tokens_per_s']:.1f}", f"{ratio:.3f}", f"{d['tokens']} / {q['tokens']}",
                      f"{d['losses'][0]:.4f} / {q['losses'][0]:.4f}", f"{d['wall_s']:.0f} / {q['wall_s']:.0f}"])
    d_mean = statistics.mean(r["tokens_per_s"] for r in runs if r["side"] == "dsft")
    q_mean = statistics.mean(r["tokens_per_s"] for r in runs if r["side"] == "plain")
    print(markdown_table(["pair", "order", "dsft tokens/s", "plain Trainer tokens/s", "ratio",
                          "tokens dsft / plain", "first loss dsft / plain", "wall s dsft / plain"], table))
    median = statistics.median(ratios)
    print(f"\nratio dsft / plain Trainer: median of pairs {median:.3f}, ratio of means {d_mean / q_mean:.3f} "
          f"(goal >= 0.98); load average during the runs {min(r['loadavg'] for r in runs):.1f}-"
          f"{max(r['loadavg'] for r in runs):.1f} on {info['cores']} cores")
    write_result("vs_plain_trainer", {"machine": info, "settings": vars(a), "runs": runs, "pair_ratios": ratios,
                                      "median_ratio": median, "ratio_of_means": d_mean / q_mean})


if __name__ == "__main__":
    main()
