"""Sequence parallelism (parallel.sequence, DeepSpeed Ulysses through transformers + accelerate): config checks,
batch arithmetic, the ZeRO-1/2 gradient-scale fix, the collator, and 2 ranks sp=2 vs 1 rank sp=1 under ZeRO-2/3."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dsft import deepspeed as dsd
from dsft.config import from_dict, validate
from dsft.errors import ConfigError, DsftError
from dsft.sequence_parallel import (SequenceParallelCollator, SequenceParallelPlace, check_place, check_world,
                                    row_width)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("sp-cfg-llama")
    LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(str(path))
    return path


def _cfg(model_dir, tmp_path, sequence=2, deepspeed="zero3", attn="sdpa", packing=False, train=None, **top):
    raw = {"model": {"name_or_path": str(model_dir), "attn_implementation": attn},
           "data": {"train": "train.jsonl", "packing": packing, "max_seq_len": 64},
           "train": {"output_dir": str(tmp_path / "out"), **(train or {})},
           "parallel": {"sequence": sequence}, **top}
    if deepspeed:
        raw["deepspeed"] = deepspeed
    return from_dict(raw)


# ---------------------------------------------------------------- config checks (dsft validate)


def test_eager_attention_is_refused_with_the_reason(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="drops the attention mask") as e:
        validate(_cfg(model_dir, tmp_path, attn="eager"), data_sources=False)
    assert "parallel.sequence" in str(e.value) and "\n" not in str(e.value)


def test_packing_with_sdpa_is_refused_but_flash_is_accepted(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="packed samples attend to each other"):
        validate(_cfg(model_dir, tmp_path, packing=True), data_sources=False)
    validate(_cfg(model_dir, tmp_path, packing=True, attn="flash_attention_2"), data_sources=False)


@pytest.mark.parametrize("change, message", [
    ({"deepspeed": None}, "runs in DeepSpeed"),
    ({"sequence": 0}, "at least 1"),
])
def test_other_refusals(model_dir, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(model_dir, tmp_path, **change), data_sources=False)


def test_sequence_one_is_off_and_needs_nothing(model_dir, tmp_path):
    validate(_cfg(model_dir, tmp_path, sequence=1, deepspeed=None, attn="eager", packing=True), data_sources=False)


def test_world_must_divide():
    check_world(4, 2)
    with pytest.raises(ConfigError, match="does not divide the 3 ranks"):
        check_world(3, 2)


# ---------------------------------------------------------------- batch arithmetic, linter, ds-config


def test_lint_counts_the_data_parallel_size(model_dir, tmp_path):
    cfg = _cfg(model_dir, tmp_path, train={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3},
               deepspeed_overrides={"train_batch_size": 24})  # 2 x 3 x world 4: right without SP, wrong with sp=2
    ds = dsd.load_ds_config(cfg.deepspeed, cfg.deepspeed_overrides)
    findings = dsd.lint(cfg, ds, world_size=4, devices_per_node=4)
    bad = [f for f in findings if f.key == "deepspeed.train_batch_size"]
    assert bad and "data-parallel size 2 (world 4 / sequence 2) = 12" in bad[0].message
    assert [f for f in dsd.lint(cfg, ds, 3, 3) if f.key == "parallel.sequence" and f.level == "error"]


def test_zero0_is_refused(model_dir, tmp_path):
    cfg = _cfg(model_dir, tmp_path, deepspeed="zero0")
    with pytest.raises(ConfigError, match="needs ZeRO stage 1, 2 or 3"):
        dsd.prepare_for_run(cfg, 2, 2)


def test_ds_config_batch_and_zero2_gradient_fix(model_dir, tmp_path):
    """What `dsft ds-config` prints: train_batch_size = micro x accumulation x (world / sp); ZeRO-2 gets the
    gradient pre-division by the world (reduce_scatter off), ZeRO-3 is left as it is."""
    train = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3}
    for name in ("zero2", "zero3"):
        cfg = _cfg(model_dir, tmp_path, deepspeed=name, train=train)
        ds = dsd.resolve_auto(dsd.prepare_for_run(cfg, 4, 4), cfg, 4, devices_per_node=4)
        assert ds["train_batch_size"] == 2 * 3 * 2
        if name == "zero2":
            assert ds["gradient_predivide_factor"] == 4.0 and ds["zero_optimization"]["reduce_scatter"] is False
        else:
            assert "gradient_predivide_factor" not in ds
    no_sp = _cfg(model_dir, tmp_path, sequence=1, deepspeed="zero2", train=train)
    ds = dsd.prepare_for_run(no_sp, 4, 4)
    assert "gradient_predivide_factor" not in ds and ds["zero_optimization"]["reduce_scatter"] is True


def test_explicit_reduce_scatter_override_is_refused(model_dir, tmp_path):
    cfg = _cfg(model_dir, tmp_path, deepspeed="zero2", deepspeed_overrides={"zero_optimization": {"reduce_scatter": True}})
    with pytest.raises(ConfigError, match="reduce_scatter"):
        dsd.prepare_for_run(cfg, 2, 2)


# ---------------------------------------------------------------- pieces


def test_collator_pads_to_the_fixed_width_with_positions():
    from dsft.data import PaddingCollator

    collate = SequenceParallelCollator(PaddingCollator(0), row_width(7, 2), 0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [1, 2], "labels": [1, 2]}])
    assert row_width(7, 2) == 8 and batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 5
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * 6
    assert batch["position_ids"][1].tolist() == list(range(8))


def test_place_and_disagreement():
    assert SequenceParallelPlace.of(rank=3, world_size=4, sequence=2) == SequenceParallelPlace(2, 1, 2, 1)
    check_place({"dsft sequence-parallel group": (1, 2), "DeepSpeed sequence-parallel group": (1, 2)})
    with pytest.raises(DsftError, match="sequence-parallel group disagree"):
        check_place({"dsft sequence-parallel group": (1, 2), "DeepSpeed sequence-parallel group": (0, 1)})


def test_chunked_loss_gives_zero_not_nan_for_a_slice_without_counted_tokens():
    """Under SP a rank's slice may hold prompt tokens only; transformers weights each rank's mean by its counted
    tokens, so that rank must contribute 0 (0/0 = nan would reach every rank's gradients)."""
    from dsft.loss import chunked_causal_lm_loss

    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    shift = torch.full((1, 6), -100)
    loss, _ = chunked_causal_lm_loss(hidden, shift, head, 4, shift_labels=shift)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(hidden.grad).all()


# ---------------------------------------------------------------- 2 ranks sp=2 vs 1 rank sp=1 (real launches)


STEPS = 6


def _run_config(root: Path, name: str, model_dir: Path, data: Path, ds: str, sequence: int) -> Path:
    d = root / name
    d.mkdir(parents=True)
    raw = {"model": {"name_or_path": str(model_dir), "dtype": "fp32"},
           # short prompt_completion rows padded to 64: the first half of a row is often prompt only, so one SP
           # rank has no counted tokens (the weighted-loss path) while the other has them all
           "data": {"train": str(data), "format": "prompt_completion", "max_seq_len": 64,
                    "cache_dir": str(root / "cache")},
           "train": {"output_dir": str(d / "out"), "learning_rate": 2e-3, "max_steps": STEPS,
                     "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1,
                     "seed": 0, "data_seed": 0, "report_to": "none", "save_strategy": "no"},
           "deepspeed": ds, "parallel": {"sequence": sequence}}
    (d / "run.yaml").write_text(yaml.safe_dump(raw))
    return d / "run.yaml"


def _launch(configs: list[Path], nproc: int) -> None:
    from conftest import REPO, free_port
    from test_distributed import BIN, _run

    _run([str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
          str(free_port()), "tests/run_configs.py", *map(str, configs)], timeout=900)
    assert REPO


def _steps(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "dsft_log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def sp_runs(tmp_path_factory, tiny_model_dir) -> Path:
    """A 2-rank launch per stage at sp=2, one 1-rank launch for both sp=1 references (tests/run_configs.py); same
    seed, data and global batch (2 rows per step: dp = 2 / 2 = 1). One SP run per process: a second one in the
    same process fails in DeepSpeed's attention wrapper (process-wide Ulysses state; dsft's entries run one)."""
    from conftest import copy_task_rows, write_jsonl

    root = tmp_path_factory.mktemp("sp")
    data = write_jsonl(root / "train.jsonl", copy_task_rows(64, seed=1))
    two = [_run_config(root, f"{ds}-sp2", tiny_model_dir, data, ds, 2) for ds in ("zero2", "zero3")]
    one = [_run_config(root, f"{ds}-sp1", tiny_model_dir, data, ds, 1) for ds in ("zero2", "zero3")]
    for config in two:
        _launch([config], 2)
    _launch(one, 1)
    return root


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_ranks_sp2_equal_one_rank_at_the_same_global_batch(sp_runs, stage):
    """Loss AND gradient norm per step within 1e-5 rel (fp32): the norm catches a gradient-scale error that AdamW
    with clipping would hide from the losses (ZeRO-2 without dsft's fix: 2x)."""
    sp2, sp1 = _steps(sp_runs / f"{stage}-sp2" / "out"), _steps(sp_runs / f"{stage}-sp1" / "out")
    assert len(sp2) == len(sp1) == STEPS
    for a, b in zip(sp2, sp1):
        assert math.isfinite(a["loss"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a, b)
    assert sp2[-1]["loss"] < sp2[0]["loss"]
    info = json.loads((sp_runs / f"{stage}-sp2" / "out" / "dsft_run_info.json").read_text())
    assert info["world_size"] == 2 and info["sequence_parallel_size"] == 2 and info["data_parallel_size"] == 1
    assert sorted((r["rank"], r["sequence_parallel_rank"], r["data_parallel_rank"]) for r in info["ranks"]) == [
        (0, 0, 0), (1, 1, 0)]
