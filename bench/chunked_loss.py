"""Chunked loss vs the model's own loss: peak RSS and step time of one training step at a few sequence lengths.

    .venv/bin/python bench/chunked_loss.py [--lengths 1024 2048 4096] [--layers 2] [--chunk 1024] [--steps 3]

Model: SmolLM2-135M's architecture (vocab 49,152, hidden 576) cut to ``--layers`` decoder layers, random weights
(only its config.json is read), fp32, sdpa, full fine-tune, no activation checkpointing, batch 1. Each (length,
loss) point runs in a fresh single-thread process: ``--steps`` forward+backward steps on random tokens; the
reported step time is the median of the steps after the first; peak RSS is the process's ``ru_maxrss`` at the
end (the whole process: interpreter, model, grads, activations, logits). It also checks the two losses agree.
Points run one after another: their step times compare only on an otherwise idle machine.
Prints a markdown table and writes bench/results/chunked_loss.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SMOLLM2, cpu_env, machine, markdown_table, write_result  # noqa: E402


def one(length: int, impl: str, layers: int, chunk: int, steps: int) -> dict:
    """Runs in the child process."""
    import resource
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsft.loss import enable_chunked_loss

    config = AutoConfig.from_pretrained(str(SMOLLM2))
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    if impl == "chunked":
        assert enable_chunked_loss(model, chunk)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        model.zero_grad(set_to_none=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"length": length, "impl": impl, "peak_rss_mb": round(rss / 1e6), "step_s": round(statistics.median(
        times[1:] or times), 3), "loss": losses[0]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one(int(a.child[0]), a.child[1], a.layers, a.chunk, a.steps)))
        return
    rows = []
    for length in a.lengths:
        for impl in ("stock", "chunked"):
            proc = subprocess.run([sys.executable, __file__, "--child", str(length), impl, "--layers", str(a.layers),
                                   "--chunk", str(a.chunk), "--steps", str(a.steps)], env=cpu_env(),
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    table = []
    for length in a.lengths:
        stock, chunked = (next(r for r in rows if r["length"] == length and r["impl"] == i)
                          for i in ("stock", "chunked"))
        assert abs(stock["loss"] - chunked["loss"]) <= 1e-5 * abs(stock["loss"]), (stock, chunked)
        table.append({"tokens": length, "stock peak MB": stock["peak_rss_mb"],
                      "chunked peak MB": chunked["peak_rss_mb"],
                      "peak ratio": round(chunked["peak_rss_mb"] / stock["peak_rss_mb"], 2),
                      "stock step s": stock["step_s"], "chunked step s": chunked["step_s"]})
    print(markdown_table(list(table[0]), [list(r.values()) for r in table]))
    path = write_result("chunked_loss", {"machine": machine(), "settings": vars(a), "runs": rows, "table": table})
    print(f"written {path}")


if __name__ == "__main__":
    main()
