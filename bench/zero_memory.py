"""ZeRO memory per rank on this machine: 2 CPU ranks under torchrun, SmolLM2-135M-shaped model
(random weights from its config), ZeRO 0-3, a few steps each. Prints a markdown table and writes
bench/results/zero_memory.json.

    .venv/bin/python bench/zero_memory.py [--templates zero0 zero2 zero3] [--steps 3]

Per rank it reports the parameter elements held after loading (ZeRO-3 partitions them inside
zero.Init, so no rank ever holds the whole model), peak RSS after loading and after training, next to
DeepSpeed's model-state formula (dsft.deepspeed.model_state_bytes). On CPU, RSS includes the process
baseline, activations and DeepSpeed's buffers, so it falls less than the model states do.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--templates", nargs="+", default=["zero0", "zero1", "zero2", "zero3"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--model", default=str(REPO / ".cache/dsft/models/SmolLM2-135M-Instruct"))
    p.add_argument("--data", default=str(REPO / ".cache/dsft/data/humaneval/train.jsonl"))
    a = p.parse_args()
    from dsft.deepspeed import model_state_bytes

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for template in a.templates:
            out = Path(tmp) / template
            cfg = {
                "model": {"name_or_path": a.model, "init": "from_config", "dtype": "fp32"},
                "data": {"train": a.data, "format": "prompt_completion", "max_seq_len": 256, "packing": True},
                "train": {"output_dir": str(out), "max_steps": a.steps, "per_device_train_batch_size": 1,
                          "logging_steps": 1, "report_to": "none", "save_strategy": "no", "bf16": True,
                          "gradient_checkpointing": True},
                "deepspeed": template,
            }
            path = Path(tmp) / f"{template}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
            cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                   str(REPO / "launch/train.py"), "--config", str(path)]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{template}: run failed")
            info = json.loads((out / "dsft_run_info.json").read_text())
            logs = [json.loads(x) for x in (out / "dsft_log.jsonl").read_text().splitlines()]
            peak_train = max(r.get("peak_memory_gb", 0) for r in logs)  # rank 0's log
            total = info["ranks"][0]["param_elements_total"]
            states = model_state_bytes(total, int(template[-1]), 2)
            for r in sorted(info["ranks"], key=lambda r: r["rank"]):
                rows.append({
                    "template": template, "rank": r["rank"],
                    "param_share_held": r["param_elements_held"] / total,
                    "peak_rss_after_load_gb": r["peak_memory_gb_after_load"],
                    "peak_rss_train_gb_rank0": peak_train if r["rank"] == 0 else None,
                    "model_states_formula_gb": states["total"] / 2**30,
                    "params": total,
                })
    print("| template | rank | params held | peak RSS after load (GB) | peak RSS in training, rank 0 (GB) "
          "| model states by formula (GB/rank) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        train = f"{r['peak_rss_train_gb_rank0']:.2f}" if r["peak_rss_train_gb_rank0"] is not None else "-"
        print(f"| {r['template']} | {r['rank']} | {r['param_share_held']:.0%} | {r['peak_rss_after_load_gb']:.2f} "
              f"| {train} | {r['model_states_formula_gb']:.2f} |")
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "zero_memory.json").write_text(json.dumps({"machine": os.uname().nodename, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
