"""LoRA wrapping and the layered learning rate / weight-decay parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import copy_task_rows, write_jsonl
from dsft.config import LoraConfig, ModelConfig, PeftConfig, from_dict
from dsft.model import apply_lora, load_model, parameter_groups


def _groups_by_name(groups):
    return {name: (g["lr"], g["weight_decay"]) for g in groups for name in g["names"]}


def test_lr_ratio_boosts_lora_b_and_new_modules_only(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="fp32"))
    peft = PeftConfig(lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
                      lr_ratio=8)
    model = apply_lora(model, peft, gradient_checkpointing_reentrant=False)
    by_name = _groups_by_name(parameter_groups(model, learning_rate=1e-3, weight_decay=0.1, lr_ratio=8))
    lora_a = [n for n in by_name if "lora_A" in n]
    lora_b = [n for n in by_name if "lora_B" in n]
    new = [n for n in by_name if "modules_to_save" in n]
    assert lora_a and lora_b and new
    assert len(lora_a) == len(lora_b) == 2 * model.config.num_hidden_layers  # q_proj and v_proj only
    assert all(by_name[n] == (1e-3, 0.1) for n in lora_a)
    assert all(by_name[n] == (8e-3, 0.1) for n in lora_b + new)
    # frozen base weights are in no group
    assert not any("base_layer" in n for n in by_name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(by_name) == trainable


def test_full_finetune_no_decay_on_bias_and_norms(tmp_path, tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), init="from_config", dtype="fp32",
                                   config_overrides={"attention_bias": True}))
    by_name = _groups_by_name(parameter_groups(model, learning_rate=1e-3, weight_decay=0.1, lr_ratio=1.0))
    assert len(by_name) == sum(1 for _ in model.named_parameters())
    for name, (lr, wd) in by_name.items():
        assert lr == 1e-3
        expect_decay = not (name.endswith("bias") or "norm" in name)
        assert (wd == 0.1) == expect_decay, name
    assert any(n.endswith("q_proj.bias") for n in by_name) and any("input_layernorm" in n for n in by_name)


def test_rslora_and_dora_reach_peft(tiny_model_dir):
    base = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="fp32"))
    rs = apply_lora(base, PeftConfig(lora=LoraConfig(r=4, alpha=8, use_rslora=True)), False)
    layer = rs.base_model.model.model.layers[0].self_attn.q_proj
    assert math.isclose(layer.scaling["default"], 8 / math.sqrt(4))
    base = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="fp32"))
    dora = apply_lora(base, PeftConfig(lora=LoraConfig(r=4, alpha=8, use_dora=True)), False)
    assert any("lora_magnitude_vector" in n for n, p in dora.named_parameters() if p.requires_grad)


def test_trainer_optimizer_uses_dsft_groups(tmp_path, tiny_model_dir):
    from dsft.train import build_trainer

    train = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(16))
    cfg = from_dict({
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "fp32"},
        "data": {"train": str(train), "format": "prompt_completion", "max_seq_len": 32,
                 "cache_dir": str(tmp_path / "cache")},
        "peft": {"lora": {"r": 4, "alpha": 8}, "lr_ratio": 16},
        "train": {"output_dir": str(tmp_path / "out"), "learning_rate": 1e-3, "weight_decay": 0.01,
                  "report_to": "none", "max_steps": 1},
    })
    trainer, _ = build_trainer(cfg)
    optimizer = trainer.create_optimizer()
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    assert lrs == [pytest.approx(1e-3), pytest.approx(16e-3)]
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.01}
    n_in_groups = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_in_groups == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer")
