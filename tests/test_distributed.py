"""Multi-process training on CPU with gloo: real torchrun and deepspeed launchers, 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_task_rows, free_port, write_jsonl

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dist_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("dist-data")
    rows = copy_task_rows(160, seed=1)
    return {"train": str(write_jsonl(d / "train.jsonl", rows))}


def _config(tmp_path: Path, model_dir: Path, data: dict, deepspeed: str | None, dtype: str, steps: int = 10,
            **train) -> Path:
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {"train": data["train"], "format": "prompt_completion", "max_seq_len": 64, "packing": True,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "out"), "learning_rate": 2e-3, "max_steps": steps,
                  "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1,
                  "seed": 0, "data_seed": 0, "report_to": "none", "save_strategy": "no",
                  "gradient_checkpointing": True, "bf16": dtype == "bf16", **train},
    }
    if deepspeed:
        raw["deepspeed"] = deepspeed
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    return env


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def _losses(out: Path) -> list[float]:
    logs = [json.loads(line) for line in (out / "dsft_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in logs if "loss" in r]


def _run_info(out: Path) -> dict:
    return json.loads((out / "dsft_run_info.json").read_text())


def torchrun(config: Path, nproc: int = 2) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "launch/train.py", "--config", str(config)]


def deepspeed_launcher(config: Path, nproc: int = 2) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "launch/train.py", "--config", str(config)]


@pytest.mark.parametrize("launcher, template, dtype", [
    ("torchrun", "zero3", "bf16"),
    ("deepspeed", "zero2", "fp32"),
])
def test_two_ranks_train_in_one_world(tmp_path, tiny_model_dir, dist_data, launcher, template, dtype):
    config = _config(tmp_path, tiny_model_dir, dist_data, template, dtype)
    _run(torchrun(config) if launcher == "torchrun" else deepspeed_launcher(config))
    out = tmp_path / "out"
    info = _run_info(out)
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert sorted(r["rank"] for r in info["ranks"]) == [0, 1]
    assert len({r["pid"] for r in info["ranks"]}) == 2
    assert all(r["threads"] == 1 for r in info["ranks"])  # cores / local ranks on this 2-core machine
    assert info["deepspeed_zero_stage"] == int(template[-1])
    losses = _losses(out)
    assert len(losses) == 10 and losses[-1] < losses[0], losses
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))  # ZeRO-3 gathered 16-bit weights on save
    assert sum(p.numel() for p in model.parameters()) > 0
