"""Integration: real (tiny) training runs through the stock Trainer, saving, reloading, merging."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, copy_task_rows, write_jsonl
from dsft.config import RESOLVED_CONFIG_NAME, from_dict, validate
from dsft.train import run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("copy-data")
    rows = copy_task_rows(240)
    return {"train": str(write_jsonl(d / "train.jsonl", rows[:200])),
            "eval": str(write_jsonl(d / "eval.jsonl", rows[200:]))}


def _cfg(tmp_path, model_dir, data, **sections) -> object:
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {"train": data["train"], "eval": data["eval"], "format": "prompt_completion", "max_seq_len": 64,
                 "packing": True, "cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "out"), "learning_rate": 3e-3, "max_steps": 20,
                  "per_device_train_batch_size": 8, "logging_steps": 5, "seed": 0, "report_to": "tensorboard",
                  "save_strategy": "no"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def _train_logs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "dsft_log.jsonl").read_text().splitlines()]


def test_full_finetune_loss_falls_and_reloads(tmp_path, tiny_model_dir, copy_data):
    cfg = _cfg(tmp_path, tiny_model_dir, copy_data, model={"init": "from_config"},
               train={"gradient_checkpointing": True, "eval_strategy": "no"})
    result = run(cfg)
    out = Path(result.output_dir)
    losses = [r["loss"] for r in _train_logs(out) if "loss" in r]
    assert len(losses) == 4
    assert losses[-1] < 0.7 * losses[0], losses
    assert (out / "model.safetensors").is_file() and not list(out.glob("pytorch_model*.bin"))
    assert (out / RESOLVED_CONFIG_NAME).is_file()
    logged = [r for r in _train_logs(out) if "loss" in r]
    assert all(r["peak_memory_gb"] > 0 for r in logged)
    assert all(r["tokens_per_second_per_device"] > 0 for r in logged if r["step"] > 2)  # after the warm-up steps
    # TensorBoard sees dsft's metrics (reporting callbacks run after dsft's)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "runs").iterdir())))
    events.Reload()
    assert "train/tokens_per_second_per_device" in events.Tags()["scalars"]

    # the saved model reloads and gives the eval loss the in-memory model gave
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    reloaded_cfg = from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "name_or_path": str(out),
                                                            "init": "pretrained"},
                              "train": {**cfg.train, "output_dir": str(tmp_path / "out2"), "max_steps": 1}})
    from dsft.train import build_trainer

    trainer, _ = build_trainer(reloaded_cfg)
    for (n1, p1), (n2, p2) in zip(reloaded.named_parameters(), trainer.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(result.eval_metrics["eval_loss"], rel=1e-6)
    # perplexity is token-weighted over the whole eval set; eval_loss is the Trainer's mean over batches
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_token_nll"]).exp().item(), rel=1e-6)
    assert metrics["eval_token_nll"] == pytest.approx(metrics["eval_loss"], rel=0.05)


def test_lora_reentrant_checkpointing_merge_matches_adapter(tmp_path, tiny_model_dir, copy_data):
    from dsft.export import load_for_inference, merge_adapter

    cfg = _cfg(tmp_path, tiny_model_dir, copy_data,
               model={"gradient_checkpointing_reentrant": True},
               peft={"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "lr_ratio": 4},
               train={"gradient_checkpointing": True, "max_steps": 10, "report_to": "none"})
    result = run(cfg)
    out = Path(result.output_dir)
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    losses = [r["loss"] for r in _train_logs(out) if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses)))

    adapter_model, tok = load_for_inference(out, dtype="fp32")
    # training moved the adapters: LoRA B starts at zero
    assert any(p.abs().sum() > 0 for n, p in adapter_model.named_parameters() if "lora_B" in n)
    merged_dir = merge_adapter(out, tmp_path / "merged")
    merged, _ = load_for_inference(merged_dir, dtype="fp32")
    ids = tok("copy abcdef: abcdef", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = adapter_model(input_ids=ids).logits
        b = merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # a second merge into the same dir is refused, nothing is lost
    from dsft.errors import DsftError

    with pytest.raises(DsftError, match="not empty"):
        merge_adapter(out, tmp_path / "merged")


def test_early_stopping_stops(tmp_path, tiny_model_dir, copy_data):
    cfg = _cfg(tmp_path, tiny_model_dir, copy_data,
               train={"learning_rate": 1e-9, "max_steps": 60, "eval_strategy": "steps", "eval_steps": 2,
                      "save_strategy": "steps", "save_steps": 2, "report_to": "none", "save_total_limit": 1},
               early_stopping={"patience": 2, "threshold": 0.01})
    result = run(cfg)
    steps = [r["step"] for r in result.log_history if "eval_loss" in r]
    assert steps and max(steps) <= 10, steps


def test_cli_train_and_generate(tmp_path, tiny_model_dir, copy_data):
    """`dsft train` as a user runs it: a quiet console (no library warnings, no DeepSpeed banner on a run without
    DeepSpeed, each data summary once), model.dtype: auto resolved by the training process; then generate."""
    import yaml

    from dsft.precision import auto_dtype

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "auto"},
        "data": {"train": copy_data["train"], "eval": copy_data["eval"], "format": "prompt_completion",
                 "max_seq_len": 64, "cache_dir": str(tmp_path / "cache")},
        "peft": {"lora": {"r": 4}},
        "train": {"output_dir": str(tmp_path / "cli-out"), "max_steps": 3, "report_to": "none"},
    }))
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dsft", "train", str(config), "--set", "train.max_steps=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "saved to" in proc.stdout
    console = proc.stdout + proc.stderr
    for noise in ("FutureWarning", "DeprecationWarning", "Setting accelerator to CPU"):
        assert noise not in console, console[-3000:]
    assert console.count("data train:") == 1 and console.count("data eval:") == 1, console[-3000:]
    resolved_text = (tmp_path / "cli-out" / RESOLVED_CONFIG_NAME).read_text()
    assert "max_steps: 2" in resolved_text
    resolved = yaml.safe_load(resolved_text)
    picked = auto_dtype("cpu")  # bf16 on a CPU with AVX512-BF16/AMX, else fp32
    assert resolved["model"]["dtype"] == picked and resolved["train"]["bf16"] == (picked == "bf16")
    gen = subprocess.run([sys.executable, "-m", "dsft", "generate", str(tmp_path / "cli-out"), "--prompt", "copy ab:",
                          "--max-new-tokens", "5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert len(gen.stdout.strip("\n")) > 0
