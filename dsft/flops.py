"""FLOPs per trained token, device peaks and what MFU divides by: used by training (MFU in the logs,
``dsft.callbacks.MetricsCallback``) and by the planner's step-time estimate (``dsft.plan``).

Light at import (torch is imported inside the functions that need a device or a model), so ``dsft plan`` and
other commands that only read configs can use it.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path

from dsft.fsutil import atomic_write_json

GiB = 2**30

# Dense bf16 peak FLOP/s (vendor datasheets, SXM/OAM parts, no sparsity) and device memory.
ACCELERATORS: dict[str, dict[str, float]] = {
    "A100": {"peak_flops": 312e12, "memory_bytes": 80 * GiB},
    "H100": {"peak_flops": 989e12, "memory_bytes": 80 * GiB},
    "H200": {"peak_flops": 989e12, "memory_bytes": 141e9},
    "MI300X": {"peak_flops": 1307e12, "memory_bytes": 192 * GiB},
}


def train_flops_per_token(matmul_params: int, trainable_matmul_params: int, layers: int = 0, attn_width: int = 0,
                          seq_len: int | None = None, checkpointing: bool = False) -> dict:
    """FLOPs per trained token. ``model``: forward 2 per matmul weight, backward 2 for the activation gradients and
    2 for the weight gradients of trainable weights only (frozen LoRA/QLoRA bases skip them), plus attention
    scores (12·layers·seq·width, the PaLM count) when ``seq_len`` is given. ``hardware`` adds the forward recompute
    of activation checkpointing. MFU divides the ``model`` figure."""
    attn = 12 * layers * seq_len * attn_width if seq_len else 0
    model = 4 * matmul_params + 2 * trainable_matmul_params + attn
    recompute = (2 * matmul_params + attn / 3) if checkpointing else 0
    return {"model": float(model), "hardware": float(model + recompute)}


def model_matmul_params(model) -> tuple[int, int]:
    """(matmul weights, trainable matmul weights) of a live model: every nn.Linear (LoRA's A/B, bitsandbytes
    layers and a tied lm_head included), counting ZeRO-3 partitioned weights at their full size."""
    import torch  # deferred: dsft plan and the commands that import this module need no torch

    total = trainable = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n = int(getattr(module.weight, "ds_numel", module.weight.numel()))
            total += n
            trainable += n if module.weight.requires_grad else 0
    return total, trainable


def accelerator_name(device_name: str) -> str | None:
    """The ACCELERATORS key a device name ("NVIDIA H100 80GB HBM3", "AMD Instinct MI300X") belongs to."""
    upper = device_name.upper()
    return next((key for key in sorted(ACCELERATORS, key=len, reverse=True) if key in upper), None)


def device_peak_flops(dtype: str) -> float | None:
    """Peak FLOP/s of the device this process trains on: $DSFT_PEAK_TFLOPS if set; the CPU's measured matmul
    rate in ``dtype``; a known accelerator's dense 16-bit peak (16-bit training only); else None (unknown)."""
    if os.environ.get("DSFT_PEAK_TFLOPS"):
        return float(os.environ["DSFT_PEAK_TFLOPS"]) * 1e12
    from dsft.distributed import accelerator_is_cpu  # deferred: dsft.distributed imports torch

    if accelerator_is_cpu():
        import torch  # deferred: dsft plan and the commands that import this module need no torch

        return cpu_peak_flops(dtype, torch.get_num_threads(), refresh=False)
    if dtype not in ("bf16", "fp16"):
        return None
    name = accelerator_name(local_device_name() or "")
    return ACCELERATORS[name]["peak_flops"] if name else None


def local_device_name() -> str | None:
    """Product name of the local accelerator (torch.cuda / torch.xpu ... get_device_name), None on the CPU."""
    import torch  # deferred: dsft plan and the commands that import this module need no torch

    if not torch.accelerator.is_available():
        return None
    backend = getattr(torch, torch.accelerator.current_accelerator().type, None)
    getter = getattr(backend, "get_device_name", None)
    return str(getter()) if getter else None


@functools.lru_cache(maxsize=4)
def measure_cpu_peak_flops(dtype: str = "fp32", threads: int | None = None) -> float:
    """FLOP/s of ``torch.nn.functional.linear`` (the op every linear layer runs; on the CPU it is faster than a
    plain matmul) on 1024x1024 operands in ``dtype`` with ``threads`` threads (default: torch's setting): best of
    three ~0.05 s windows. CPUs without native bf16 run bf16 linears several times slower than fp32."""
    import torch  # deferred: dsft plan and the commands that import this module need no torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dt = torch.bfloat16 if dtype == "bf16" else torch.float16 if dtype == "fp16" else torch.float32
        n = 1024
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        torch.nn.functional.linear(a, b)
        best = 0.0
        for _ in range(3):
            start, count = time.perf_counter(), 0
            while time.perf_counter() - start < 0.05:
                torch.nn.functional.linear(a, b)
                count += 1
            best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(old)


def cpu_peak_flops(dtype: str, threads: int, refresh: bool = True) -> float:
    """This CPU's linear-layer peak: the best measurement seen on this machine (kept in
    ``$DSFT_CACHE/cpu_peak_flops.json``), after a fresh one unless ``refresh`` is off and one is known. On a shared
    machine one measurement can catch the cores busy; the best seen is the closer to the hardware's peak, which
    keeps MFU from being inflated by a low peak. Training passes refresh=False (no time taken from the run once
    the machine is known); `dsft plan` measures again."""
    path = Path(os.environ.get("DSFT_CACHE", Path.home() / ".cache" / "dsft")) / "cpu_peak_flops.json"
    key = f"{platform.node()}/{dtype}/{threads}"
    try:
        seen = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        seen = {}
    if not refresh and seen.get(key):
        return float(seen[key])
    now = measure_cpu_peak_flops(dtype, threads)
    best = max(now, float(seen.get(key, 0.0)))
    if best > float(seen.get(key, 0.0)):
        try:
            atomic_write_json(path, {**seen, key: best}, indent=1)
        except OSError:
            pass  # a read-only cache only costs the remembered best
    return best
