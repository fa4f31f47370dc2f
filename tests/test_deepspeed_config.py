"""DeepSpeed templates, loading, "auto" resolution through the HF integration, the linter, and model-state bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dsft import deepspeed as dsd
from dsft.config import from_dict
from dsft.errors import ConfigError

HIDDEN = 64
EXPECTED = {"zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload", "zero3_multinode"}
TOP_AUTO = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "gradient_clipping", "bf16.enabled", "fp16.enabled")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A config-only model dir: enough for AutoConfig (hidden_size), no weights."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("cfg-only-llama")
    LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(str(path))
    return path


@pytest.fixture
def make_cfg(model_dir, tmp_path):
    def make(train: dict | None = None, dtype: str = "bf16", peft: dict | None = None, **top):
        raw = {"model": {"name_or_path": str(model_dir), "dtype": dtype}, "data": {"train": "train.jsonl"},
               "train": {"output_dir": str(tmp_path / "out"), **(train or {})}, **top}
        if peft is not None:
            raw["peft"] = peft
        return from_dict(raw)

    return make


def rules(findings, level=None):
    return {f.rule for f in findings if level is None or f.level == level}


# --------------------------------------------------------------------------------------------------
# templates


def test_all_templates_present():
    assert set(dsd.template_names()) == EXPECTED
    # the templates dsft reads are the repo's ds_configs/ (the one copy; an editable install reads it in place,
    # a wheel carries the same files as dsft.templates.ds_configs)
    repo = Path(__file__).resolve().parents[1] / "ds_configs"
    assert {p.name: p.read_bytes() for p in dsd.TEMPLATES_DIR.glob("*.json")} == {
        p.name: p.read_bytes() for p in repo.glob("*.json")}


def test_templates_dir_env_override(tmp_path, monkeypatch):
    from dsft import templates

    monkeypatch.setenv("DSFT_DS_CONFIGS", str(tmp_path))
    monkeypatch.setenv("DSFT_SLURM_TEMPLATES", str(tmp_path / "sb"))
    assert templates.directory("ds_configs") == tmp_path
    assert templates.directory("slurm") == tmp_path / "sb"
    monkeypatch.delenv("DSFT_DS_CONFIGS")
    assert (templates.directory("ds_configs") / "zero3.json").is_file()  # the packaged ones


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_json_uses_auto_for_trainer_keys(name):
    ds = json.loads((dsd.TEMPLATES_DIR / f"{name}.json").read_text())
    for key in TOP_AUTO:
        assert dsd.get_path(ds, key) == "auto", key
    assert "optimizer" not in ds and "scheduler" not in ds  # the Trainer builds them (dsft's param groups)
    z = ds["zero_optimization"]
    stage = z["stage"]
    assert stage == int(name[4])
    if stage >= 1:
        assert z["reduce_bucket_size"] == "auto"
    if stage == 3:
        assert z["stage3_prefetch_bucket_size"] == "auto"
        assert z["stage3_param_persistence_threshold"] == "auto"
        assert z["stage3_gather_16bit_weights_on_model_save"] is True
        assert z["stage3_max_live_parameters"] > 0
    off_opt, off_param = dsd.offloads(ds)
    assert off_opt == name.endswith("offload")
    assert off_param == (name == "zero3_offload")
    if off_opt:
        assert ds["zero_force_ds_cpu_optimizer"] is False
        assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    if off_param:
        assert z["offload_param"] == {"device": "cpu", "pin_memory": True}
    if name == "zero3_multinode":
        assert z["zero_hpz_partition_size"] == "auto"
        assert z["zero_quantized_weights"] is False and z["zero_quantized_gradients"] is False
    else:
        assert "zero_hpz_partition_size" not in z


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_resolve_template_fills_every_auto(name, make_cfg):
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    cfg = make_cfg({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3, "bf16": True})
    loaded = dsd.load_ds_config(name, {})
    before = json.dumps(loaded, sort_keys=True)
    ds = dsd.resolve_auto(loaded, cfg, world_size=2, hidden_size=None, devices_per_node=4)
    assert json.dumps(loaded, sort_keys=True) == before  # input untouched
    assert not is_deepspeed_zero3_enabled()  # HF's global weakref was restored
    assert dsd.find_auto(ds) == []
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 2
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    z = ds["zero_optimization"]
    if z["stage"] >= 1:
        assert z["reduce_bucket_size"] == HIDDEN * HIDDEN
    if z["stage"] == 3:
        assert z["stage3_prefetch_bucket_size"] == int(0.9 * HIDDEN * HIDDEN)
        assert z["stage3_param_persistence_threshold"] == 10 * HIDDEN
    if name == "zero3_multinode":
        assert z["zero_hpz_partition_size"] == 4
    assert dsd.lint(cfg, ds, world_size=2, devices_per_node=2, device_memory_bytes=80 * 10**9) == [] or \
        name == "zero3_multinode"


def test_resolved_templates_validate_with_deepspeed(make_cfg):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = make_cfg({"bf16": True})
    for name in sorted(EXPECTED):
        ds = dsd.resolve_auto(dsd.load_ds_config(name, {}), cfg, 16, HIDDEN, devices_per_node=8)
        zc = DeepSpeedZeroConfig(**ds["zero_optimization"])  # pydantic: rejects unknown keys and bad types
        assert int(zc.stage) == ds["zero_optimization"]["stage"]


def test_resolve_fp16_and_explicit_hidden_size(make_cfg):
    cfg = make_cfg({"fp16": True, "max_grad_norm": 0.5}, dtype="fp32")
    ds = dsd.resolve_auto(dsd.load_ds_config("zero3", {}), cfg, 4, hidden_size=128)
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.5
    assert ds["train_batch_size"] == 8 * 1 * 4  # TrainingArguments defaults
    assert ds["zero_optimization"]["reduce_bucket_size"] == 128 * 128


def test_resolve_reads_config_overrides_for_hidden_size(make_cfg, model_dir):
    cfg = make_cfg()
    cfg.model.config_overrides = {"hidden_size": 96}
    ds = dsd.resolve_auto(dsd.load_ds_config("zero2", {}), cfg, 1)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 96 * 96


def test_resolve_hpz_defaults_to_local_world_size(make_cfg, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    ds = dsd.resolve_auto(dsd.load_ds_config("zero3_multinode", {}), make_cfg(), 32, HIDDEN)
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 8
    assert dsd.fill_dsft_placeholders(dsd.load_ds_config("zero3_multinode", {}), 4)[
        "zero_optimization"]["zero_hpz_partition_size"] == 4


# --------------------------------------------------------------------------------------------------
# users' own JSON, overrides, errors

USER_JSON = {
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                       "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": "auto",
                          "allgather_bucket_size": 5e8},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "steps_per_print": 2000,
    "wall_clock_breakdown": False,
}


def test_user_json_with_optimizer_and_scheduler_is_accepted_unchanged(tmp_path, make_cfg):
    path = tmp_path / "ds_user.json"
    path.write_text(json.dumps(USER_JSON, indent=4))
    assert dsd.load_ds_config(str(path), {}) == USER_JSON
    cfg = make_cfg({"learning_rate": 3e-4, "weight_decay": 0.1, "warmup_steps": 10, "bf16": True})
    ds = dsd.resolve_auto(dsd.load_ds_config(str(path), {}), cfg, 2, HIDDEN)
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    params = ds["scheduler"]["params"]
    assert params["warmup_min_lr"] == 0 and params["warmup_max_lr"] == 3e-4
    # step counts are only known once the data is: they stay "auto" for the Trainer
    assert params["total_num_steps"] == "auto" and params["warmup_num_steps"] == "auto"
    assert dsd.find_auto(ds) == ["scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps"]
    ds = dsd.resolve_auto(dsd.load_ds_config(str(path), {}), cfg, 2, HIDDEN, num_training_steps=100)
    assert ds["scheduler"]["params"]["total_num_steps"] == 100
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 10
    assert dsd.find_auto(ds) == []


def test_overrides_deep_merge():
    ds = dsd.load_ds_config("zero3", {
        "zero_optimization": {"stage3_max_live_parameters": 5, "offload_param": {"device": "cpu"},
                              "sub_group_size": None},
        "steps_per_print": 10,
    })
    z = ds["zero_optimization"]
    assert z["stage3_max_live_parameters"] == 5
    assert z["offload_param"] == {"device": "cpu"}
    assert "sub_group_size" not in z  # None removes a key
    assert z["stage3_prefetch_bucket_size"] == "auto" and z["stage"] == 3  # siblings kept
    assert ds["steps_per_print"] == 10 and ds["bf16"] == {"enabled": "auto"}
    nested = dsd.load_ds_config("zero3_offload", {"zero_optimization": {"offload_param": {"pin_memory": False}}})
    assert nested["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}


def test_unknown_template_names_key_and_closest_match():
    with pytest.raises(ConfigError) as e:
        dsd.load_ds_config("zer2", {})
    msg = str(e.value)
    assert msg.startswith("deepspeed:") and "did you mean 'zero2'" in msg and "zero3_offload" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"deepspeed: file not found: .*nope\.json"):
        dsd.load_ds_config(str(tmp_path / "nope.json"), {})


def test_invalid_json_gives_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "zero_optimization": {\n    "stage": 2, // comment\n  }\n}\n')
    with pytest.raises(ConfigError, match=r"deepspeed: .*bad\.json: line 3, column \d+: invalid JSON"):
        dsd.load_ds_config(str(path), {})
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        dsd.load_ds_config(str(path), {})


def test_resolve_rejects_values_that_contradict_train(make_cfg):
    ds = dsd.load_ds_config("zero2", {"train_micro_batch_size_per_gpu": 4})
    with pytest.raises(ConfigError, match="deepspeed: .*train_micro_batch_size_per_gpu=4"):
        dsd.resolve_auto(ds, make_cfg({"per_device_train_batch_size": 2}), 2, HIDDEN)


def test_resolve_rejects_auto_the_trainer_does_not_fill(make_cfg):
    ds = dsd.load_ds_config("zero2", {"zero_optimization": {"allgather_bucket_size": "auto"}})
    with pytest.raises(ConfigError, match="zero_optimization.allgather_bucket_size"):
        dsd.resolve_auto(ds, make_cfg(), 2, HIDDEN)


# --------------------------------------------------------------------------------------------------
# lint: one positive and one clean negative per rule


def resolved(make_cfg, name, overrides=None, train=None, world=2, dpn=2, **kw):
    cfg = make_cfg(train or {"bf16": True}, **kw)
    return cfg, dsd.resolve_auto(dsd.load_ds_config(name, overrides or {}), cfg, world, HIDDEN, devices_per_node=dpn)


def test_lint_batch_arithmetic(make_cfg):
    cfg = make_cfg({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4})
    clean = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}
    assert dsd.lint(cfg, clean, 2, 2, None) == []
    bad_total = dsd.lint(cfg, {**clean, "train_batch_size": 12}, 2, 2, None)
    assert [(f.level, f.key, f.rule) for f in bad_total] == [("error", "deepspeed.train_batch_size", "batch")]
    assert "2 x accumulation 4 x world size 2 = 16" in bad_total[0].message
    bad_micro = dsd.lint(cfg, {"train_micro_batch_size_per_gpu": 3}, 2, 2, None)
    assert {f.key for f in bad_micro} == {"deepspeed.train_micro_batch_size_per_gpu"}
    bad_accum = dsd.lint(cfg, {"gradient_accumulation_steps": 1}, 2, 2, None)
    assert {f.key for f in bad_accum} == {"deepspeed.gradient_accumulation_steps"}
    assert dsd.lint(cfg, {"train_batch_size": 16}, 2, 2, None) == []  # micro/accum from the run config


def test_lint_max_live_parameters_zero(make_cfg):
    cfg, ds = resolved(make_cfg, "zero3", {"zero_optimization": {"stage3_max_live_parameters": 0}})
    assert rules(dsd.lint(cfg, ds, 2, 2, None), "warning") == {"max_live_parameters"}
    cfg, ds = resolved(make_cfg, "zero3")
    assert dsd.lint(cfg, ds, 2, 2, None) == []
    alias = dsd.load_ds_config("zero3", {"zero_optimization": {"stage3_max_live_parameters": None,
                                                                "max_live_parameters": 0}})
    assert "max_live_parameters" in rules(dsd.lint(cfg, alias, 2, 2, None))


def test_lint_hpz_single_node(make_cfg):
    cfg, ds = resolved(make_cfg, "zero3_multinode", world=8, dpn=8)
    found = dsd.lint(cfg, ds, 8, 8, None)
    assert [(f.level, f.rule) for f in found] == [("warning", "hpz")]
    cfg, ds = resolved(make_cfg, "zero3_multinode", world=16, dpn=8)
    assert dsd.lint(cfg, ds, 16, 8, None) == []
    unresolved = dsd.load_ds_config("zero3_multinode", {})  # "auto" is linted as devices per node
    assert rules(dsd.lint(cfg, unresolved, 8, 8, None)) == {"hpz"}
    assert dsd.lint(cfg, unresolved, 16, 8, None) == []
    bad = dsd.load_ds_config("zero3", {"zero_optimization": {"zero_hpz_partition_size": 3}})
    assert ("error", "hpz") in {(f.level, f.rule) for f in dsd.lint(cfg, bad, 16, 8, None)}


def test_lint_hpz_with_offload(make_cfg):
    cfg, ds = resolved(make_cfg, "zero3_offload", {"zero_optimization": {"zero_hpz_partition_size": 8}},
                       world=16, dpn=8)
    assert rules(dsd.lint(cfg, ds, 16, 8, None), "error") == {"hpz_offload"}
    cfg, ds = resolved(make_cfg, "zero3_offload", world=16, dpn=8)
    assert dsd.lint(cfg, ds, 16, 8, None) == []


def test_lint_8bit_with_zero3(make_cfg):
    cfg, ds = resolved(make_cfg, "zero3", peft={"quantization": {"bits": 8}})
    found = dsd.lint(cfg, ds, 2, 2, None)
    assert rules(found, "error") == {"quant_8bit_zero3"}
    assert found[0].key == "peft.quantization.bits" and "wrong losses" in found[0].message
    cfg2, ds2 = resolved(make_cfg, "zero2", peft={"quantization": {"bits": 8}})
    assert dsd.lint(cfg2, ds2, 2, 2, None) == []


def test_lint_qlora_zero3_needs_quant_storage_equal_to_model_dtype(make_cfg):
    for dtype, bad in (("bf16", "uint8"), ("bf16", "fp32"), ("fp32", "bf16")):
        cfg, ds = resolved(make_cfg, "zero3", dtype=dtype, peft={"quantization": {"quant_storage": bad}})
        found = dsd.lint(cfg, ds, 2, 2, None)
        assert rules(found, "error") == {"qlora_zero3_storage"}, (dtype, bad)
        assert found[0].key == "peft.quantization.quant_storage"
        assert f"quant_storage: {dtype}" in found[0].message
    for dtype, good in (("bf16", None), ("bf16", "bf16"), ("fp32", None), ("fp32", "fp32")):
        # unset defaults to the model dtype, which is what ZeRO-3 needs
        cfg, ds = resolved(make_cfg, "zero3", dtype=dtype, peft={"quantization": {"quant_storage": good}})
        assert dsd.lint(cfg, ds, 2, 2, None) == [], (dtype, good)
    cfg2, ds2 = resolved(make_cfg, "zero2", peft={"quantization": {"quant_storage": "uint8"}})
    assert dsd.lint(cfg2, ds2, 2, 2, None) == []  # ZeRO-2 does not partition weights


def test_lint_offload_optimizer_needs_an_offloadable_optimizer(make_cfg):
    # zero_force_ds_cpu_optimizer true (DeepSpeed's default): accelerate swaps any other optimizer for CPU Adam
    cfg, ds = resolved(make_cfg, "zero2_offload", {"zero_force_ds_cpu_optimizer": None},
                       train={"bf16": True, "optim": "adafactor"})
    found = dsd.lint(cfg, ds, 2, 2, None)
    assert rules(found, "error") == {"offload_optimizer"} and found[0].key == "train.optim"
    # the templates' false: any torch optimizer runs on the host, but not GPU-only bitsandbytes ones
    cfg, ds = resolved(make_cfg, "zero2_offload", train={"bf16": True, "optim": "adamw_8bit"})
    assert rules(dsd.lint(cfg, ds, 2, 2, None), "error") == {"offload_optimizer"}
    # a DeepSpeed optimizer section without a CPU kernel
    lamb = {"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}
    cfg, ds = resolved(make_cfg, "zero3_offload", lamb)
    assert rules(dsd.lint(cfg, ds, 2, 2, None), "error") == {"offload_optimizer"}
    # clean
    for name, over, optim in (("zero2_offload", None, "adamw_torch"), ("zero2_offload", None, "adafactor"),
                              ("zero2_offload", {"zero_force_ds_cpu_optimizer": None}, "adamw_torch_fused"),
                              ("zero3_offload", {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, "sgd")):
        cfg, ds = resolved(make_cfg, name, over, train={"bf16": True, "optim": optim})
        assert dsd.lint(cfg, ds, 2, 2, None) == [], (name, optim)
    cfg, ds = resolved(make_cfg, "zero2", train={"bf16": True, "optim": "adamw_8bit"})
    assert dsd.lint(cfg, ds, 2, 2, None) == []  # no offload: no constraint


def test_lint_fp16_and_bf16_both_enabled(make_cfg):
    cfg = make_cfg({"bf16": True})
    both = dsd.load_ds_config("zero2", {"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert "precision" in rules(dsd.lint(cfg, both, 2, 2, None), "error")
    assert any("both enabled" in f.message for f in dsd.lint(cfg, both, 2, 2, None))
    cfg_both = make_cfg({"bf16": True, "fp16": True})
    assert any("both enabled" in f.message for f in dsd.lint(cfg_both, dsd.load_ds_config("zero2", {}), 2, 2, None))
    assert dsd.lint(cfg, dsd.load_ds_config("zero2", {}), 2, 2, None) == []


def test_lint_precision_contradicts_train(make_cfg):
    cfg = make_cfg({"bf16": False}, dtype="fp32")
    ds = dsd.load_ds_config("zero2", {"bf16": {"enabled": True}})
    found = dsd.lint(cfg, ds, 2, 2, None)
    assert [(f.level, f.key) for f in found] == [("error", "deepspeed.bf16.enabled")]
    assert dsd.lint(make_cfg({"bf16": True}), ds, 2, 2, None) == []
    clip = dsd.load_ds_config("zero2", {"gradient_clipping": 0.3})
    assert [f.key for f in dsd.lint(cfg, clip, 2, 2, None)] == ["deepspeed.gradient_clipping"]
    assert dsd.lint(make_cfg({"max_grad_norm": 0.3}), clip, 2, 2, None) == []


def test_lint_overlap_comm_bucket_memory(make_cfg):
    big = {"zero_optimization": {"allgather_bucket_size": 5e8, "reduce_bucket_size": 5e8}}
    cfg, ds = resolved(make_cfg, "zero2", big)
    found = dsd.lint(cfg, ds, 2, 2, 16 * 10**9)  # 9 GB of buffers on a 16 GB device
    assert [(f.level, f.rule) for f in found] == [("warning", "overlap_comm")]
    assert "~9.0 GB" in found[0].message
    assert dsd.lint(cfg, ds, 2, 2, 141 * 10**9) == []  # 6% of an H200
    assert dsd.lint(cfg, ds, 2, 2, None) == []  # device size unknown
    no_overlap = dsd.deep_merge(ds, {"zero_optimization": {"overlap_comm": False}})
    assert dsd.lint(cfg, no_overlap, 2, 2, 16 * 10**9) == []
    cfg, ds = resolved(make_cfg, "zero2")  # the template: 2e8 + hidden^2
    assert dsd.lint(cfg, ds, 2, 2, 24 * 10**9) == []


def test_lint_zeropp_quantized_is_opt_in(make_cfg):
    cfg, ds = resolved(make_cfg, "zero3_multinode", {"zero_optimization": {"zero_quantized_weights": True}},
                       world=16, dpn=8)
    assert rules(dsd.lint(cfg, ds, 16, 8, None), "warning") == {"zeropp_quantized"}


def test_finding_str():
    f = dsd.Finding("error", "deepspeed.train_batch_size", "12 != 16", "batch")
    assert str(f) == "error: deepspeed.train_batch_size: 12 != 16"


# --------------------------------------------------------------------------------------------------
# model-state bytes


@pytest.mark.parametrize("psi,n", [(7_000_000_000, 8), (1_000_000_000, 2), (13_000_000_000, 4), (70_000_000_000, 64)])
def test_model_state_bytes_formulas(psi, n):
    def total(stage, **kw):
        return dsd.model_state_bytes(psi, stage, n, **kw)["total"]

    assert total(0) == 16 * psi
    assert total(1) == 4 * psi + 12 * psi // n
    assert total(2) == 2 * psi + 14 * psi // n
    assert total(3) == 16 * psi // n
    z2off = dsd.model_state_bytes(psi, 2, n, offload_optimizer=True)
    assert (z2off["total"], z2off["host_optimizer_states"]) == (2 * psi, 12 * psi // n)
    z3off = dsd.model_state_bytes(psi, 3, n, offload_optimizer=True, offload_params=True)
    assert z3off["total"] == 0 and z3off["host_weights"] == 2 * psi // n
    assert z3off["host_total"] == 18 * psi // n


def test_model_state_bytes_lora_and_errors():
    psi, lora = 7_000_000_000, 40_000_000
    m = dsd.model_state_bytes(psi, 3, 8, trainable_params=lora)
    assert m == {**m, "weights": 2 * psi // 8, "gradients": 2 * lora // 8, "optimizer_states": 12 * lora // 8}
    assert dsd.model_state_bytes(psi, 0, 8, trainable_params=lora)["total"] == 2 * psi + 14 * lora
    with pytest.raises(ValueError):
        dsd.model_state_bytes(psi, 2, 8, offload_params=True)
    with pytest.raises(ValueError):
        dsd.model_state_bytes(psi, 4, 8)


@pytest.mark.parametrize("psi,gpus,nodes", [(7_000_000_000, 8, 1), (1_000_000_000, 2, 1), (13_000_000_000, 4, 1),
                                            (70_000_000_000, 8, 4)])
def test_model_state_bytes_match_deepspeed_estimators(psi, gpus, nodes):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = gpus * nodes
    buffer = 1.5  # DeepSpeed's additional_buffer_factor on host memory
    close = pytest.approx

    _, gpu = estimate_zero2_model_states_mem_needs(psi, gpus, nodes, cpu_offload=False)
    assert dsd.model_state_bytes(psi, 2, n)["total_deepspeed"] == close(gpu, abs=2)
    cpu, gpu = estimate_zero2_model_states_mem_needs(psi, gpus, nodes, cpu_offload=True)
    m = dsd.model_state_bytes(psi, 2, n, offload_optimizer=True)
    assert m["total_deepspeed"] == close(gpu, abs=2)
    if n <= 4:  # above that the estimator's host term is the per-process fp32 load at init (4 bytes x N)
        assert m["host_total"] * gpus * buffer == close(cpu, rel=1e-9)

    largest = 100_000_000  # ZeRO-3 adds the gather buffer of the largest layer (4 bytes/param)
    for off_opt, off_param in ((False, False), (True, False), (True, True)):
        cpu, gpu, layer = estimate_zero3_model_states_mem_needs(psi, largest, gpus, nodes, cpu_offload=off_opt,
                                                                cpu_offload_params=off_param, zero_init=True)
        m = dsd.model_state_bytes(psi, 3, n, offload_optimizer=off_opt, offload_params=off_param)
        assert m["total_deepspeed"] + layer == close(gpu, abs=2), (off_opt, off_param)
        if off_opt:
            assert m["host_total"] * gpus * buffer == close(cpu, rel=1e-9), (off_opt, off_param)


def test_template_file_name_given_as_path_hints_the_template(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="did you mean the template 'zero2'"):
        dsd.load_ds_config("zero2.json", {})
    assert dsd.load_ds_config(str(dsd.TEMPLATES_DIR / "zero2.json"), {}) == dsd.load_ds_config("zero2", {})
