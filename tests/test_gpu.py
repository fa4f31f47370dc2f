"""The GPU tier (marker ``gpu``, skipped without CUDA) and the checks of bench/gpu_check.sh that run anywhere.

    pytest -m gpu tests/test_gpu.py        # on a CUDA machine

bf16 bound (``bench/gpu_check.py``): a loss logged at step k may differ from the fp32 trajectory by
4 * 2^-8 * k relative — bf16's unit roundoff u = 2^-8 per step, the difference carried into the weights and
counted as adding up over the k steps. It separates rounding from real faults (loss scaling, accumulation,
partitioning), which are of order 1.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, copy_task_rows, free_port, write_jsonl

SCRIPT = REPO / "bench" / "gpu_check.sh"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- anywhere -------------------------------------------------------------------------------------------------------

def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert os.access(SCRIPT, os.X_OK)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run")
def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    out = tmp_path / "summary.json"
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2, proc
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], lines
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_python_part_refuses_without_cuda_too(capsys):
    assert _gpu_check().main(["--out", "/nonexistent/x.json"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bf16_bound_grows_with_steps_and_flags_a_real_fault():
    g = _gpu_check()
    assert g.bf16_rel_bound(1) == pytest.approx(4 * 2 ** -8)
    assert g.bf16_rel_bound(10) == pytest.approx(10 * g.bf16_rel_bound(1))
    reference = {s: 3.0 - 0.1 * s for s in range(1, 11)}
    rounding = {s: v * (1 + 0.5 * g.bf16_rel_bound(s)) for s, v in reference.items()}
    assert g.compare_losses(reference, rounding)["ok"]
    doubled = {s: 2 * v for s, v in reference.items()}  # e.g. a loss not divided by the accumulation steps
    assert not g.compare_losses(reference, doubled)["ok"]
    missing = {s: v for s, v in reference.items() if s < 5}  # a run that stopped early
    assert not g.compare_losses(reference, missing)["ok"]


def test_gpu_checks_packing_comparison_runs_on_the_cpu_too(tiny_model_dir):
    result = _gpu_check().packed_vs_padded(tiny_model_dir, "sdpa", "fp32", device="cpu")
    assert result["rows"] < result["samples"] and result["ok"], result


# --- on a GPU -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("gpu-data")
    return {"train": str(write_jsonl(d / "train.jsonl", copy_task_rows(200)))}


def _config(root: Path, model_dir: Path, data: dict, bf16: bool, deepspeed: str | None = None, steps: int = 10,
            **sections) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {"train": data["train"], "format": "prompt_completion", "max_seq_len": 64, "packing": True,
                 "cache_dir": str(root / "cache")},
        "train": {"output_dir": str(root / "out"), "learning_rate": 2e-3, "max_steps": steps,
                  "per_device_train_batch_size": 4, "logging_steps": 1, "seed": 0, "data_seed": 0,
                  "report_to": "none", "save_strategy": "no", "bf16": bf16},
    }
    if deepspeed:
        raw["deepspeed"] = deepspeed
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(cpu: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.pop("DS_ACCELERATOR", None)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(cmd: list[str], cpu: bool = False) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(cpu), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr\n{proc.stderr[-5000:]}")


def _step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "dsft_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def cpu_fp32_reference(tmp_path_factory, tiny_model_dir, gpu_data) -> dict[int, float]:
    root = tmp_path_factory.mktemp("cpu-fp32")
    _run([sys.executable, "-m", "dsft", "train", str(_config(root, tiny_model_dir, gpu_data, bf16=False))], cpu=True)
    losses = _step_losses(root / "out")
    assert len(losses) == 10
    return losses


@pytest.mark.gpu
@pytest.mark.integration
@needs_cuda
@pytest.mark.parametrize("template", ["zero0", "zero2", "zero3"])
def test_bf16_zero_follows_the_cpu_fp32_trajectory(tmp_path, tiny_model_dir, gpu_data, cpu_fp32_reference, template):
    cfg = _config(tmp_path, tiny_model_dir, gpu_data, bf16=True, deepspeed=template)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
          "-m", "dsft.run", "--config", str(cfg)])
    result = _gpu_check().compare_losses(cpu_fp32_reference, _step_losses(tmp_path / "out"))
    assert result["ok"], result
    info = json.loads((tmp_path / "out" / "dsft_run_info.json").read_text())
    assert info["backend"] == "nccl" and info["deepspeed_zero_stage"] == int(template[-1]), info


@pytest.mark.gpu
@needs_cuda
def test_bitsandbytes_4bit_layer_runs_on_cuda():
    pytest.importorskip("bitsandbytes")
    layer = _gpu_check().check_bnb_layer()
    assert layer["ok"] and layer["weight_device"].startswith("cuda") and layer["weight_class"] == "Params4bit", layer


@pytest.mark.gpu
@pytest.mark.integration
@needs_cuda
def test_qlora_trains_on_cuda(tmp_path, tiny_model_dir, gpu_data):
    pytest.importorskip("bitsandbytes")
    from dsft.config import load_config
    from dsft.train import run

    cfg = _config(tmp_path, tiny_model_dir, gpu_data, bf16=True, steps=30,
                  peft={"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "quantization": {"bits": 4}})
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["dtype"] = "bf16"
    raw["train"]["learning_rate"] = 2e-2
    cfg.write_text(yaml.safe_dump(raw))
    result = run(load_config(cfg))
    losses = [r["loss"] for r in result.log_history if "loss" in r]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.93 * losses[0], losses  # the adapters learn through the 4-bit layers


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl, dtype", [("sdpa", "fp32"), ("sdpa", "bf16"), ("flash_attention_2", "bf16")])
def test_packed_equals_padded_per_token_loss_on_cuda(tiny_model_dir, impl, dtype):
    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    result = _gpu_check().packed_vs_padded(tiny_model_dir, impl, dtype)
    assert result["rows"] < result["samples"]  # several samples really share a row
    assert result["ok"], result
