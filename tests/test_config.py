"""Run-config loading and validation: every bad config fails fast with one clear line and exit code 2.

No model or data is loaded; ``tiny_model_dir`` only gives ``model.name_or_path`` a real directory.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import copy_task_rows, early_dsft_process, write_jsonl
from dsft.cli import main
from dsft.config import (
    RESOLVED_CONFIG_NAME,
    DataConfig,
    ModelConfig,
    from_dict,
    load_config,
    reference_markdown,
    resolved_dict,
    training_arguments_kwargs,
    validate,
    write_resolved,
)
from dsft.errors import ConfigError

DROP = object()  # in a patch: remove this key from the base config


@pytest.fixture
def env(tmp_path, tiny_model_dir):
    """A valid minimal config (as a dict) and the paths it points at."""
    train_file = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(4))
    base = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(train_file), "format": "prompt_completion", "max_seq_len": 64},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2},
    }
    return {"tmp": tmp_path, "base": base, "train_file": train_file, "out": tmp_path / "out"}


def _subst(value, env):
    if isinstance(value, str):
        return value.format(tmp=env["tmp"], train=env["train_file"])
    if isinstance(value, list):
        return [_subst(v, env) for v in value]
    return value


def merge(base: dict, patch: dict, env) -> dict:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, env)
        elif isinstance(value, dict):
            out[key] = merge({}, value, env)
        else:
            out[key] = _subst(value, env)
    return out


def write_config(env, patch: dict | None = None, name: str = "run.yaml") -> Path:
    path = env["tmp"] / name
    path.write_text(yaml.safe_dump(merge(env["base"], patch or {}, env), sort_keys=False), encoding="utf-8")
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --------------------------------------------------------------------------------------------------
# bad configs: (id, patch dict | raw YAML text | None for "no file", --set items, substrings in stderr)

BAD = [
    # unknown keys, with the closest-key suggestion
    ("unknown-top-level-section", {"modle": {"name_or_path": "x"}}, [],
     ["unknown key 'modle'", "the top level", "did you mean 'model'?"]),
    ("unknown-model-key", {"model": {"name_or_pth": "x"}}, [],
     ["unknown key 'name_or_pth'", "section 'model'", "did you mean 'name_or_path'?"]),
    ("unknown-data-key", {"data": {"max_seq_length": 128}}, [],
     ["unknown key 'max_seq_length'", "section 'data'", "did you mean 'max_seq_len'?"]),
    ("unknown-train-key", {"train": {"learning_rat": 1e-4}}, [],
     ["unknown key 'learning_rat'", "section 'train'", "did you mean 'learning_rate'?", "TrainingArguments"]),
    ("unknown-nested-peft-lora-key", {"peft": {"lora": {"lora_alpha": 16}}}, [],
     ["unknown key 'lora_alpha'", "section 'peft.lora'", "did you mean 'alpha'?"]),
    ("unknown-early-stopping-key", {"early_stopping": {"patiense": 2}}, [],
     ["unknown key 'patiense'", "section 'early_stopping'", "did you mean 'patience'?"]),
    ("unknown-key-without-close-match", {"model": {"zzz": 1}}, [],
     ["unknown key 'zzz'", "section 'model'", "valid keys: name_or_path,"]),
    # wrong types and literals
    ("bool-as-string", {"model": {"trust_remote_code": "yes"}}, [],
     ["model.trust_remote_code", "expected true or false", "'yes'"]),
    ("int-as-word", {"data": {"max_seq_len": "long"}}, [],
     ["data.max_seq_len", "expected an integer", "'long'"]),
    ("bad-literal-dtype", {"model": {"dtype": "fp16"}}, [],
     ["model.dtype", "must be one of bf16, fp32", "'fp16'"]),
    ("bad-literal-format", {"data": {"format": "chat"}}, [],
     ["data.format", "must be one of text, prompt_completion, messages", "'chat'"]),
    ("nested-wrong-type-lora-alpha", {"peft": {"lora": {"alpha": "big"}}}, [],
     ["peft.lora.alpha", "expected a number", "'big'"]),
    ("section-not-a-mapping", {"model": ["x"]}, [],
     ["model: expected a mapping", "list"]),
    ("learning-rate-not-a-number", {"train": {"learning_rate": "fast"}}, [],
     ["train.learning_rate", "expected a number", "'fast'"]),
    ("learning-rate-negative", {"train": {"learning_rate": -1e-4}}, [],
     ["train.learning_rate", "must be a positive number"]),
    ("train-bool-as-string", {"train": {"gradient_checkpointing": "yes"}}, [],
     ["train.gradient_checkpointing", "expected true or false", "'yes'"]),
    ("train-int-as-float-string", {"train": {"max_steps": "1e3"}}, [],
     ["train.max_steps", "expected an integer", "'1e3'"]),
    # precision
    ("bf16-and-fp16", {"train": {"bf16": True, "fp16": True}}, [],
     ["train.bf16 and train.fp16 are both true", "keep one"]),
    ("bf16-weights-with-fp16", {"model": {"dtype": "bf16"}, "train": {"fp16": True}}, [],
     ["train.fp16 with model.dtype=bf16", "needs fp32 weights", "use train.bf16"]),
    # data
    ("packing-without-max-seq-len", {"data": {"packing": True, "max_seq_len": None}}, [],
     ["data.packing needs data.max_seq_len", "set data.max_seq_len"]),
    ("packing-with-use-cache", {"data": {"packing": True}, "train": {"use_cache": True}}, [],
     ["train.use_cache", "attend to each other", "remove it"]),
    ("max-seq-len-1", {"data": {"max_seq_len": 1}}, [],
     ["data.max_seq_len", "must be at least 2", "got 1"]),
    ("eval-strategy-without-eval-data", {"train": {"eval_strategy": "steps", "eval_steps": 1}}, [],
     ["train.eval_strategy=steps", "no eval data", "set data.eval or data.eval_fraction"]),
    ("eval-and-eval-fraction", {"data": {"eval": "{train}", "eval_fraction": 0.2}}, [],
     ["data.eval and data.eval_fraction are both set", "keep one"]),
    ("eval-fraction-1.5", {"data": {"eval_fraction": 1.5}}, [],
     ["data.eval_fraction", "must be in [0, 1)", "1.5"]),
    ("missing-data-train", {"data": {"train": DROP}}, [],
     ["data.train: required", "data file"]),
    ("data-train-file-not-found", {"data": {"train": "{tmp}/nope.jsonl"}}, [],
     ["data.train: file not found", "nope.jsonl", "relative paths resolve from the current directory"]),
    ("data-eval-file-not-found", {"data": {"eval": ["{train}", "{tmp}/held_out.jsonl"]}}, [],
     ["data.eval[1]: file not found", "held_out.jsonl"]),
    # model
    ("missing-model-name-or-path", {"model": {"name_or_path": DROP}}, [],
     ["model.name_or_path: required", "local model dir or a hub id"]),
    ("model-dir-not-found", {"model": {"name_or_path": "{tmp}/no-such-model"}}, [],
     ["model.name_or_path", "no-such-model does not exist"]),
    ("config-overrides-torch-dtype", {"model": {"config_overrides": {"torch_dtype": "float16"}}}, [],
     ["model.config_overrides.torch_dtype", "set model.dtype instead"]),
    # peft
    ("lora-r-0", {"peft": {"lora": {"r": 0}}}, [],
     ["peft.lora.r", "must be at least 1", "got 0"]),
    ("lora-dropout-1.0", {"peft": {"lora": {"dropout": 1.0}}}, [],
     ["peft.lora.dropout", "must be in [0, 1)", "got 1.0"]),
    ("lr-ratio-negative", {"peft": {"lr_ratio": -2}}, [],
     ["peft.lr_ratio", "must be positive", "-2"]),
    # early stopping
    ("early-stopping-without-eval", {"early_stopping": {"patience": 2}}, [],
     ["early_stopping needs evaluation", "train.eval_strategy: steps"]),
    ("early-stopping-save-strategy-mismatch",
     {"early_stopping": {}, "data": {"eval_fraction": 0.25},
      "train": {"eval_strategy": "steps", "eval_steps": 1, "save_strategy": "epoch"}}, [],
     ["early_stopping", "train.save_strategy=epoch must match train.eval_strategy=steps"]),
    ("early-stopping-patience-0",
     {"early_stopping": {"patience": 0}, "data": {"eval_fraction": 0.25}, "train": {"eval_strategy": "epoch"}}, [],
     ["early_stopping.patience", "must be at least 1"]),
    # train
    ("missing-train-output-dir", {"train": {"output_dir": DROP}}, [],
     ["train.output_dir: required", "directory for checkpoints"]),
    ("train-deepspeed", {"train": {"deepspeed": "ds.json"}}, [],
     ["train.deepspeed", "top-level 'deepspeed:' key"]),
    ("per-device-batch-size-0", {"train": {"per_device_train_batch_size": 0}}, [],
     ["train.per_device_train_batch_size", "must be a positive integer", "got 0"]),
    ("max-steps-0", {"train": {"max_steps": 0}}, [],
     ["train.max_steps", "0 trains nothing", "-1"]),
    ("trainingarguments-own-check", {"train": {"logging_steps": 0}}, [],
     ["train:", "logging_steps"]),
    # the file itself
    ("broken-yaml",
     "model:\n  name_or_path: x\ndata:\n  train: [a.jsonl, b.jsonl\ntrain:\n  output_dir: out\n", [],
     ["run.yaml", "line 5", "broken YAML"]),
    ("top-level-is-a-list", "- model\n- data\n", [],
     ["run.yaml", "top level must be a mapping", "got list"]),
    ("empty-file", "", [],
     ["run.yaml", "the config is empty", "model, data and train"]),
    ("empty-file-only-comments", "# nothing yet\n", [],
     ["run.yaml", "the config is empty"]),
    ("config-file-not-found", None, [],
     ["run.yaml", "config file not found"]),
    # --set
    ("set-without-equals", {}, ["foo"],
     ["--set 'foo'", "expected section.key=value", "--set train.learning_rate=1e-4"]),
    ("set-empty-key-part", {}, ["model..dtype=fp32"],
     ["--set 'model..dtype=fp32'", "expected section.key=value"]),
    ("set-unknown-model-key", {}, ["model.nme_or_path=x"],
     ["unknown key 'nme_or_path'", "section 'model'", "did you mean 'name_or_path'?"]),
    ("set-unknown-train-key", {}, ["train.learning_rat=1e-4"],
     ["unknown key 'learning_rat'", "did you mean 'learning_rate'?"]),
    ("set-into-a-scalar", {}, ["model.name_or_path.x=1"],
     ["--set 'model.name_or_path.x=1'", "name_or_path is not a section"]),
    ("set-bad-value-type", {}, ["data.packing=maybe"],
     ["data.packing", "expected true or false", "'maybe'"]),
]


def test_bad_table_is_large_and_distinct():
    ids = [case[0] for case in BAD]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 22


@pytest.mark.parametrize("patch, sets, expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_fails_with_clear_message(env, capsys, patch, sets, expected):
    path = env["tmp"] / "run.yaml"
    if isinstance(patch, dict):
        write_config(env, patch)
    elif isinstance(patch, str):
        path.write_text(patch, encoding="utf-8")
    argv = ["validate", str(path)] + [x for item in sets for x in ("--set", item)]

    rc, out, err = run_cli(capsys, *argv)

    assert rc == 2, err
    assert err.startswith("dsft: error: "), err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no log noise
    assert out == ""  # nothing resolved is printed
    assert not env["out"].exists()  # a failed validate creates no output_dir


@pytest.fixture(scope="module", autouse=True)
def real_process(request, tmp_path_factory):
    """``python -m dsft validate bad.yaml`` in a real process, started when this module starts (its import of
    torch/transformers takes ~10 s; it runs alongside the in-process tests instead of after them)."""
    tmp = tmp_path_factory.mktemp("real-process")
    bad = tmp / "bad.yaml"
    bad.write_text(yaml.safe_dump({"modle": {"name_or_path": "x"}, "data": {"train": "t.jsonl"},
                                   "train": {"output_dir": str(tmp / "out")}}), encoding="utf-8")
    with early_dsft_process(request, "test_bad_config_exits_2_in_a_real_process", "validate", str(bad)) as proc:
        yield proc, tmp / "out"


@pytest.mark.integration
def test_bad_config_exits_2_in_a_real_process(real_process):
    proc, out_dir = real_process
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "dsft: error: unknown key 'modle' in the top level: did you mean 'model'?" in stderr
    assert stdout == ""
    assert not out_dir.exists()


# --------------------------------------------------------------------------------------------------
# good paths


def test_set_learning_rate_parses_to_float(env):
    cfg = load_config(write_config(env), ["train.learning_rate=1e-4"])
    assert cfg.train["learning_rate"] == 1e-4
    assert type(cfg.train["learning_rate"]) is float


def test_yaml_exponent_without_dot_becomes_float(env):
    # PyYAML (YAML 1.1) reads 2e-4 as a string; dsft accepts it as the number it spells.
    assert yaml.safe_load("x: 2e-4")["x"] == "2e-4"
    path = env["tmp"] / "run.yaml"
    path.write_text(
        f"model: {{name_or_path: {env['base']['model']['name_or_path']}}}\n"
        f"data: {{train: {env['train_file']}, eval_fraction: 5e-1}}\n"
        f"peft: {{lora: {{alpha: 1e1}}}}\n"
        f"train: {{output_dir: {env['out']}, learning_rate: 2e-4, weight_decay: 1e-2}}\n",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert cfg.train["learning_rate"] == 2e-4 and type(cfg.train["learning_rate"]) is float
    assert cfg.train["weight_decay"] == 1e-2 and type(cfg.train["weight_decay"]) is float
    assert cfg.data.eval_fraction == 0.5 and cfg.peft.lora.alpha == 10.0


def test_set_creates_the_peft_section(env):
    assert load_config(write_config(env)).peft is None  # absent section: full fine-tune
    cfg = load_config(write_config(env), ["peft.lora.r=4"])
    assert cfg.peft is not None
    assert cfg.peft.lora.r == 4
    assert cfg.peft.lora.alpha == 32 and cfg.peft.lr_ratio == 1.0  # the rest are defaults


def test_set_overrides_the_file_and_parses_yaml_values(env):
    cfg = load_config(write_config(env), ["data.packing=true", "data.max_seq_len=null", "data.max_seq_len=32",
                                          "data.train=[{train}, {train}]".format(train=env["train_file"])])
    assert cfg.data.packing is True
    assert cfg.data.max_seq_len == 32
    assert cfg.data.train == [str(env["train_file"])] * 2


def test_validate_prints_the_resolved_config(env, capsys):
    from dsft.train import accelerator_is_cpu

    rc, out, err = run_cli(capsys, "validate", str(write_config(env)))
    assert rc == 0, err
    assert "config OK" in err and "Traceback" not in err
    resolved = yaml.safe_load(out)
    assert resolved["model"]["name_or_path"] == env["base"]["model"]["name_or_path"]
    assert resolved["model"]["dtype"] == "bf16"
    assert resolved["data"]["packing"] is False
    assert resolved["data"]["max_seq_len"] == 64
    assert resolved["peft"] is None and resolved["early_stopping"] is None
    assert resolved["train"]["report_to"] == "tensorboard"
    assert resolved["train"]["logging_steps"] == 10
    assert resolved["train"]["remove_unused_columns"] is False
    assert resolved["train"].get("use_cpu", False) is accelerator_is_cpu()
    if accelerator_is_cpu():
        assert resolved["train"]["use_cpu"] is True
    assert not env["out"].exists()  # validate loads and writes nothing


def test_bare_yaml_no_means_the_string_no_for_strategies(env, capsys):
    # YAML 1.1 reads `eval_strategy: no` as false; it must mean "no", not fail on "False".
    text = yaml.safe_dump(env["base"]).replace("train:\n", "train:\n  eval_strategy: no\n  save_strategy: no\n")
    assert yaml.safe_load(text)["train"]["eval_strategy"] is False
    path = env["tmp"] / "run.yaml"
    path.write_text(text, encoding="utf-8")
    cfg = load_config(path)
    assert cfg.train["eval_strategy"] == "no" and cfg.train["save_strategy"] == "no"
    rc, out, err = run_cli(capsys, "validate", str(path))
    assert rc == 0, err
    assert yaml.safe_load(out)["train"]["eval_strategy"] == "no"
    path.write_text(text + "early_stopping: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="early_stopping needs evaluation"):
        load_config(path)


def test_write_resolved_reloads_to_an_equal_config(env):
    patch = {
        "model": {"config_overrides": {"num_hidden_layers": 1}},
        "data": {"eval_fraction": 0.25, "packing": True},
        "peft": {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "lr_ratio": 4},
        "early_stopping": {"patience": 2},
        "train": {"learning_rate": "2e-4", "eval_strategy": "steps", "eval_steps": 1, "gradient_checkpointing": True},
    }
    cfg = load_config(write_config(env, patch))
    target = write_resolved(cfg, env["out"], use_cpu=True)
    assert target == env["out"] / RESOLVED_CONFIG_NAME
    assert sorted(p.name for p in env["out"].iterdir()) == [RESOLVED_CONFIG_NAME]  # no temp file left

    reloaded = from_dict(yaml.safe_load(target.read_text(encoding="utf-8")))
    assert reloaded == from_dict(resolved_dict(cfg, use_cpu=True))
    for section in ("model", "data", "peft", "early_stopping", "deepspeed", "deepspeed_overrides"):
        assert getattr(reloaded, section) == getattr(cfg, section), section
    validate(reloaded)  # the resolved file is itself a valid config ...
    assert resolved_dict(reloaded, use_cpu=True) == resolved_dict(cfg, use_cpu=True)  # ... and a fixed point


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_becomes_activation_checkpointing(env, reentrant):
    cfg = load_config(write_config(env, {"model": {"gradient_checkpointing_reentrant": reentrant},
                                         "train": {"gradient_checkpointing": True}}))
    kw = training_arguments_kwargs(cfg, use_cpu=True)
    assert "gradient_checkpointing" not in kw and "gradient_checkpointing_kwargs" not in kw
    assert kw["activation_checkpointing"] is True
    assert kw["activation_checkpointing_kwargs"] == {"use_reentrant": reentrant}
    assert cfg.train["gradient_checkpointing"] is True  # the config itself is not mutated


def test_explicit_checkpointing_kwargs_are_kept(env):
    cfg = load_config(write_config(env, {"train": {"gradient_checkpointing": True,
                                                   "gradient_checkpointing_kwargs": {"use_reentrant": True}}}))
    kw = training_arguments_kwargs(cfg, use_cpu=False)
    assert kw["activation_checkpointing_kwargs"] == {"use_reentrant": True}
    assert "use_cpu" not in kw


def test_early_stopping_fills_best_model_settings(env):
    cfg = load_config(write_config(env, {"early_stopping": {}, "data": {"eval_fraction": 0.25},
                                         "train": {"eval_strategy": "steps", "eval_steps": 5}}))
    kw = training_arguments_kwargs(cfg, use_cpu=True)
    assert kw["load_best_model_at_end"] is True
    assert kw["metric_for_best_model"] == "eval_loss"
    assert kw["greater_is_better"] is False
    assert kw["save_strategy"] == "steps" and kw["save_steps"] == 5


def test_early_stopping_higher_is_better_metric_and_user_values_win(env):
    cfg = load_config(write_config(env, {"early_stopping": {"metric": "eval_accuracy"},
                                         "data": {"eval_fraction": 0.25},
                                         "train": {"eval_strategy": "epoch", "save_strategy": "epoch",
                                                   "load_best_model_at_end": False}}))
    kw = training_arguments_kwargs(cfg, use_cpu=True)
    assert kw["metric_for_best_model"] == "eval_accuracy"
    assert kw["greater_is_better"] is True
    assert kw["load_best_model_at_end"] is False


def test_early_stopping_save_strategy_defaults_to_eval_strategy(env, capsys):
    # save_strategy unset: the resolver fills it from eval_strategy, so validate must not reject it.
    path = write_config(env, {"early_stopping": {}, "data": {"eval_fraction": 0.25},
                              "train": {"eval_strategy": "epoch"}})
    rc, out, err = run_cli(capsys, "validate", str(path))
    assert rc == 0, err
    assert yaml.safe_load(out)["train"]["save_strategy"] == "epoch"


def test_reference_mentions_every_model_and_data_field():
    md = reference_markdown()
    for cls in (ModelConfig, DataConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in md, f"{cls.__name__}.{f.name} missing from the reference"
            assert f.metadata["help"] and f.metadata["help"] in md
    for heading in ("`model`", "`data`", "`peft`", "`peft.lora`", "`early_stopping`", "`train`"):
        assert f"### {heading}" in md


def test_from_dict_error_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown key 'modle' in the top level: did you mean 'model'\?"):
        from_dict({"modle": {}})


def test_validate_runs_the_deepspeed_linter(env, capsys):
    path = write_config(env, {"deepspeed": "zero3_multinode", "train": {"bf16": True}})
    # hpZ partition (devices per node) does not divide the world: an error naming the key, exit 2
    code, out, err = run_cli(capsys, "validate", str(path), "--world-size", "3", "--devices-per-node", "2")
    assert code == 2 and "zero_hpz_partition_size" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "validate", str(path), "--world-size", "4", "--devices-per-node", "2")
    assert code == 0, err


def test_ds_config_prints_resolved_json(env, capsys):
    import json

    path = write_config(env, {"deepspeed": "zero2", "train": {"per_device_train_batch_size": 3,
                                                              "gradient_accumulation_steps": 2}})
    code, out, err = run_cli(capsys, "ds-config", str(path), "--world-size", "4")
    assert code == 0, err
    ds = json.loads(out)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert "auto" not in out


@pytest.mark.parametrize("short, bits", [("4bit", 4), ("8bit", 8), ("4-bit", 4), ("8BIT", 8), (4, 4), (8, 8)])
def test_quantization_short_form(short, bits):
    q = from_dict({"peft": {"quantization": short}}).peft.quantization
    assert q == from_dict({"peft": {"quantization": {"bits": bits}}}).peft.quantization


@pytest.mark.parametrize("bad", ["nf4", "16bit", True, False, 3, ["4bit"]])
def test_quantization_bad_short_form_names_the_forms(bad):
    # `true` is refused, not read as 4bit: it would hide which of two methods (NF4 QLoRA, LLM.int8) runs
    with pytest.raises(ConfigError) as e:
        from_dict({"peft": {"quantization": bad}})
    msg = str(e.value)
    assert msg.startswith("peft.quantization: expected 4bit, 8bit or a mapping") and repr(bad) in msg
