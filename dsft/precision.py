"""Which precision trains faster on this machine: native bf16 detection and ``model.dtype: auto``.

On a CPU, bf16 is only fast with native bf16 instructions (AVX512-BF16 or AMX-BF16); without them torch emulates
bf16 matmuls and a bf16 step ran 3-10x slower than fp32 (docs/precision.md has the figures). GPUs with bf16
(compute capability >= 8.0: A100, H100, ...) train in bf16.

Imports nothing heavy at module level: ``dsft validate`` and ``dsft plan`` use it too.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsft.config import RunConfig

logger = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # Linux /proc/cpuinfo names


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (or of ``cpuinfo`` text); empty where there is no such file."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):  # x86 / arm64 spelling; all cores list the same
            return set(value.split())
    return set()


def cpu_has_native_bf16(flags: Iterable[str]) -> bool:
    """True if these CPU flags include a native bf16 matmul instruction set."""
    flags = set(flags)
    return any(f in flags for f in NATIVE_BF16_FLAGS)


@functools.lru_cache(maxsize=1)
def _local_cpu_native_bf16() -> bool:
    flags = cpu_flags()
    if flags:
        return cpu_has_native_bf16(flags)
    # no /proc/cpuinfo (macOS, some containers): ask torch's private CPU probes if this version has them
    import torch  # deferred: torch (~1 s); dsft plan and validate read CPU flags without it

    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(p()) for p in probes if p is not None)


def native_bf16(device: str | None = None) -> bool:
    """Whether the device this process trains on computes bf16 natively. ``device``: "cpu" or "cuda"; default:
    the local accelerator (CUDA/XPU when torch sees one, else the CPU)."""
    if device is None:
        device = "cpu" if _accelerator_is_cpu() else "gpu"
    if device == "cpu":
        return _local_cpu_native_bf16()
    import torch  # deferred: torch (see _local_cpu_native_bf16)

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return True  # other accelerators dsft knows (XPU, HPU) train in bf16


def _accelerator_is_cpu() -> bool:
    # deferred: dsft.distributed imports torch (~1.5 s), which reading CPU flags does not need
    from dsft.distributed import accelerator_is_cpu

    return accelerator_is_cpu()


def auto_dtype(device: str | None = None) -> str:
    """The value ``model.dtype: auto`` takes here: bf16 with native bf16, else fp32."""
    return "bf16" if native_bf16(device) else "fp32"


def resolve_auto_dtype(cfg: RunConfig, dtype: str | None = None) -> RunConfig:
    """Replace ``model.dtype: auto`` by ``dtype`` (default: this machine's faster precision), in model.dtype and,
    unless set, train.bf16. Unchanged when model.dtype is not auto.

    The training process calls it itself (not at submit time: a login node is not the machine that trains), so the
    resolved config written next to the outputs records what ran. dsft plan passes the planned hardware's pick."""
    if cfg.model.dtype != "auto":
        return cfg
    local = dtype is None
    dtype = dtype or auto_dtype()
    train = dict(cfg.train)
    if "bf16" not in train and "fp16" not in train:
        # bf16 weights train under bf16 autocast: the LoRA adapters (fp32, peft's default) then also compute in bf16
        train["bf16"] = dtype == "bf16"
    if local:
        logger.info("model.dtype: auto -> %s, train.bf16: %s (%s)", dtype, train.get("bf16"), describe())
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype), train=train)


def describe() -> str:
    """One line on what the detection saw, for logs and docs."""
    if not _accelerator_is_cpu():
        return f"accelerator with{'' if native_bf16('gpu') else 'out'} bf16 support"
    flags = sorted(cpu_flags() & {*NATIVE_BF16_FLAGS, "avx2", "avx512f"})
    kind = "native bf16" if _local_cpu_native_bf16() else "no native bf16"
    return f"CPU with {kind} (flags: {', '.join(flags) or 'unknown'})"
