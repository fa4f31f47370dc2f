"""ZeRO memory and speed per rank on this machine: 2 CPU ranks under torchrun, a SmolLM2-135M-shaped model
(random weights from its config), every template, a few steps each. Prints a markdown table and writes
bench/results/zero_memory.json.

    .venv/bin/python bench/zero_memory.py [--templates zero0 zero3 ...] [--steps 3] [--seq 256]

Per rank: model-state bytes held, counted from the tensors (dsft.memory: weights + everything the optimizer
holds between steps), next to DeepSpeed's model-state formula (dsft.deepspeed.model_state_bytes); the parameter
share held right after loading (ZeRO-3 partitions inside zero.Init); peak RSS; tokens/s per device (mean of
the logged steps after the first). On CPU, RSS also holds the process baseline, activations and DeepSpeed's
buffers, so it falls less than the model states do. With offload on CPU, "device" and host are the same RAM.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from harness import BIN, HUMANEVAL, REPO, SMOLLM2, cpu_env, free_port, machine, markdown_table, write_result

TEMPLATES = ["zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload", "zero3_multinode"]


def run_template(template: str, tmp: Path, steps: int, seq: int, model: str, data: str) -> dict:
    out = tmp / template
    cfg = {
        "model": {"name_or_path": model, "init": "from_config", "dtype": "fp32"},
        "data": {"train": data, "format": "prompt_completion", "max_seq_len": seq, "packing": True,
                 "cache_dir": str(tmp / "cache")},
        "train": {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 1, "logging_steps": 1,
                  "report_to": "none", "save_strategy": "no", "bf16": True, "gradient_checkpointing": True},
        "deepspeed": template,
    }
    path = tmp / f"{template}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests/run_configs.py"), str(path), "--model-states"]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{template}: run failed")
    info = json.loads((out / "dsft_run_info.json").read_text())
    logs = [json.loads(x) for x in (out / "dsft_log.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_second_per_device"] for r in logs if "loss" in r and r["step"] > 1]
    states = {0: json.loads((out / "dsft_model_states.json").read_text()),
              1: json.loads((out / "dsft_model_states.json.rank1").read_text())}
    return {"info": info, "states": states, "tokens_per_second_per_device": sum(speeds) / max(len(speeds), 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--templates", nargs="+", default=TEMPLATES)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=256, help="tokens per packed row (micro-batch 1)")
    p.add_argument("--model", default=str(SMOLLM2))
    p.add_argument("--data", default=str(HUMANEVAL))
    a = p.parse_args()
    from dsft.deepspeed import load_ds_config, model_state_bytes, offloads, zero_stage

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for template in a.templates:
            result = run_template(template, Path(tmp), a.steps, a.seq, a.model, a.data)
            ds = load_ds_config(template)
            off_opt, off_param = offloads(ds)
            by_ranks = {r["rank"]: r for r in result["info"]["ranks"]}
            total = by_ranks[0]["param_elements_total"]
            formula = model_state_bytes(total, zero_stage(ds), 2, off_opt, off_param)
            for rank in (0, 1):
                held = result["states"][rank]
                rows.append({
                    "template": template, "rank": rank, "params": total,
                    "param_share_held_after_load": by_ranks[rank]["param_elements_held"] / total,
                    "model_states_held_bytes": held["total"],
                    "weights_held_bytes": held["weights"],
                    "optimizer_side_held_bytes": held["optimizer_states"] + held["gradients"],
                    "formula_device_bytes": formula["total"],
                    "formula_host_bytes": formula["host_total"],
                    "peak_rss_bytes": held["peak_memory_bytes"],
                    "tokens_per_second_per_device": result["tokens_per_second_per_device"],
                })
            print(f"{template}: done", file=sys.stderr)
    gb = 2**30
    print(markdown_table(
        ["template", "rank", "params held after load", "model states held (GB)", "of which weights (GB)",
         "formula device (GB)", "formula host (GB)", "peak RSS (GB)", "tokens/s per device"],
        [[r["template"], r["rank"], f"{r['param_share_held_after_load']:.0%}",
          f"{r['model_states_held_bytes'] / gb:.3f}", f"{r['weights_held_bytes'] / gb:.3f}",
          f"{r['formula_device_bytes'] / gb:.3f}", f"{r['formula_host_bytes'] / gb:.3f}",
          f"{r['peak_rss_bytes'] / gb:.2f}", f"{r['tokens_per_second_per_device']:.0f}"] for r in rows]))
    held = {(r["template"], r["rank"]): r["model_states_held_bytes"] for r in rows}
    ratios = {}
    if ("zero0", 0) in held and ("zero3", 0) in held:
        ratios = {rank: held[("zero3", rank)] / held[("zero0", rank)] for rank in (0, 1)}
        print(f"\nZeRO-3 / ZeRO-0 model-state bytes held per rank: "
              + ", ".join(f"rank {k}: {v:.3f}" for k, v in ratios.items()))
    path = write_result("zero_memory", {"machine": machine(), "steps": a.steps, "seq": a.seq, "rows": rows,
                                        "zero3_over_zero0_held": ratios})
    print(f"results: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
