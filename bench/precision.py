"""fp32 vs bf16 LoRA training steps on this CPU (not a test): the figures behind `model.dtype: auto`.

    .venv/bin/python bench/precision.py [--model .cache/dsft/models/SmolLM2-135M-Instruct] [--steps 4] [--seq 512]

The demo's step (1 packed row of --seq tokens, LoRA r=16 all-linear, AdamW) in three precisions, interleaved
round by round so that other load on a shared machine hits each mode alike:
  fp32            model.dtype fp32, train.bf16 false (the demo before `auto`)
  bf16            model.dtype bf16, train.bf16 true  (bf16 frozen weights, autocast; what `auto` picks)
  fp32+autocast   model.dtype fp32, train.bf16 true  (fp32 weights cast to bf16 on every forward)
Reports the median wall time and process CPU time per step, and tokens per wall / CPU second. CPU time is the
fairer figure on a loaded machine (wall time counts the time other processes held the cores) -- with --threads 1:
with 2 threads on 2 busy cores, OpenMP's spin-waiting counted as CPU time and hid a 1.7x difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from dsft.config import LoraConfig, ModelConfig, PeftConfig
from dsft.model import apply_lora, load_model
from dsft.precision import cpu_flags, native_bf16


def build(model_dir: str, dtype: str):
    model = load_model(ModelConfig(name_or_path=model_dir, dtype=dtype))
    model = apply_lora(model, PeftConfig(lora=LoraConfig()), False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def step(model, opt, ids, positions, autocast: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=".cache/dsft/models/SmolLM2-135M-Instruct")
    p.add_argument("--steps", type=int, default=4, help="measured steps per mode (after 1 warm-up step)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    modes = {"fp32": ("fp32", False), "bf16": ("bf16", True), "fp32+autocast": ("fp32", True)}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (1, a.seq), generator=gen)
    positions = torch.arange(a.seq).unsqueeze(0)
    built = {name: build(a.model, dtype) for name, (dtype, _) in modes.items()}
    for name, (_, autocast) in modes.items():  # warm-up: first-call allocations, oneDNN kernel selection
        step(*built[name], ids, positions, autocast)
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(a.steps):
        for name, (_, autocast) in modes.items():
            w0, c0 = time.perf_counter(), time.process_time()
            step(*built[name], ids, positions, autocast)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
            print(f"{name}: {wall[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU", file=sys.stderr, flush=True)
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    out = {"cpu_flags": flags, "native_bf16": native_bf16(), "threads": torch.get_num_threads(), "seq": a.seq,
           "steps": a.steps, "modes": {}}
    for name in modes:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        out["modes"][name] = {"wall_s_per_step": round(w, 2), "cpu_s_per_step": round(c, 2),
                              "tokens_per_wall_s": round(a.seq / w, 1), "tokens_per_cpu_s": round(a.seq / c, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
