#!/usr/bin/env bash
# First-GPU readiness check (docs/gpu.md): on one CUDA GPU, in under 10 minutes, bf16 ZeRO-0/2/3 against the CPU
# fp32 trajectory, QLoRA with CUDA bitsandbytes, packing with sdpa / flash-attention-2, the chunked loss, tokens/s,
# MFU and peak memory next to `dsft plan`. Writes one JSON summary (default bench/results/gpu_check.json).
#   bash bench/gpu_check.sh [--out FILE] [--steps N] [--budget-s S] [--workdir DIR]
# Needs the README's install first (GPU: your CUDA torch, then TORCH_SPEC=skip bash scripts/install.sh).
# Exit: 0 all checks passed, 1 a check failed (see the JSON), 2 cannot run here (no CUDA GPU, no install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
    echo "bench/gpu_check.sh: $PY not found: install first (bash scripts/install.sh, see docs/gpu.md)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "bench/gpu_check.sh: needs a CUDA GPU (torch.cuda.is_available() is false here); nothing was run" >&2
    exit 2
fi
exec "$PY" bench/gpu_check.py "$@"
