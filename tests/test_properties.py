"""Property-based tests (hypothesis).

- The config loader: any YAML document, any nested mapping (keys mostly real section / field names so the
  checks deep inside are reached), any ``--set`` item gives a valid config or a ``ConfigError`` — never another
  exception (a traceback for the user).
- The sbatch renderer: any single-line value (job name, partition, account, ..., config path, overrides, job dir)
  survives quoting: ``bash -n`` accepts the script, every ``#SBATCH`` value reads back unchanged the way sbatch
  parses it, and the launcher receives exactly the intended arguments when the script runs (stub srun/scontrol).
  A value with a line break is refused with a ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from dsft.config import (
    DataConfig,
    EarlyStoppingConfig,
    GuardConfig,
    LoraConfig,
    ModelConfig,
    PeftConfig,
    QuantizationConfig,
    RunConfig,
    SlurmConfig,
    apply_override,
    from_dict,
    load_config,
    validate,
)
from dsft.errors import ConfigError

# example counts sized for CI (the whole module ~15 s here); raise them locally to search harder
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
SCRIPT_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------------------------------
# config loader

SECTIONS = {
    "model": ModelConfig, "data": DataConfig, "peft": PeftConfig, "early_stopping": EarlyStoppingConfig,
    "guard": GuardConfig, "slurm": SlurmConfig,
}
NESTED = {"lora": LoraConfig, "quantization": QuantizationConfig}
TRAIN_KEYS = ["output_dir", "learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
              "eval_strategy", "save_strategy", "save_steps", "bf16", "fp16", "logging_steps", "warmup_steps",
              "lr_scheduler_type", "resume_from_checkpoint", "use_cache", "deepspeed", "warmup_ratio",
              "save_total_limit", "ddp_timeout", "optim", "seed"]


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _literals(cls) -> list:
    out = []
    for tp in typing.get_type_hints(cls).values():
        for arg in [tp, *typing.get_args(tp)]:
            if typing.get_origin(arg) is typing.Literal:
                out += list(typing.get_args(arg))
    return out


ALL_LITERALS = sorted({str(v) for cls in [*SECTIONS.values(), *NESTED.values()] for v in _literals(cls)})
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(ALL_LITERALS + ["auto", "no", "steps", "1e-4", "zero2", "/nonexistent"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def _section(cls) -> st.SearchStrategy:
    names = _field_names(cls)
    # mostly real names, so that the checks behind the unknown-key check are reached too
    keys = st.one_of(*[st.sampled_from(names)] * 8, st.sampled_from(names).map(lambda k: k + "s"), st.text(max_size=8))
    nested = {n: _section(NESTED[n]) for n in names if n in NESTED}
    value = st.one_of(values, *nested.values()) if nested else values
    return st.dictionaries(keys, value, max_size=5)


raw_configs = st.fixed_dictionaries(
    {},
    optional={
        **{name: st.one_of(_section(cls), values) for name, cls in SECTIONS.items()},
        "train": st.one_of(st.dictionaries(st.sampled_from(TRAIN_KEYS), values, max_size=6), values),
        "deepspeed": st.one_of(st.sampled_from(["zero0", "zero2", "zero3", "zero9", "/x.json"]), values),
        "deepspeed_overrides": values,
    },
)


VALID = {"model": {"name_or_path": "m", "init": "from_config"}, "data": {"train": "hub/dataset"},
         "train": {"output_dir": "/runs/x"}}
FIELDS = [(section, name) for section, cls in SECTIONS.items() for name in _field_names(cls) if name not in NESTED]
FIELDS += [("peft", f"{n}.{f}") for n, cls in NESTED.items() for f in _field_names(cls)]
FIELDS += [("train", k) for k in TRAIN_KEYS]


def _mutate(changes: list) -> dict:
    raw = json.loads(json.dumps(VALID))
    for (section, dotted), value in changes:
        node = raw.setdefault(section, {})
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


# a valid config with a few fields set to anything: reaches every check (and is sometimes still valid)
mutated_configs = st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=3).map(_mutate)


def _valid_or_config_error(fn) -> None:
    try:
        cfg = fn()
    except ConfigError as e:
        assert str(e).strip(), "an empty error message"
        return
    assert isinstance(cfg, RunConfig)


@SETTINGS
@given(st.one_of(raw_configs, mutated_configs))
@example(_mutate([(("train", "learning_rate"), None)]))  # found by this test: a TypeError in validate
@example(_mutate([(("train", "ddp_timeout"), None)]))  # found by this test: a TypeError building the process group
def test_any_nested_mapping_gives_a_config_or_a_config_error(raw):
    """... and for a valid one, TrainingArguments' own checks and the DeepSpeed linter (what dsft validate runs)
    raise nothing but ConfigError either."""
    from dsft.distributed import Topology
    from dsft.train import build_training_arguments

    def load():
        cfg = from_dict(raw)
        validate(cfg)
        build_training_arguments(cfg, Topology())
        return cfg

    _valid_or_config_error(load)


@SETTINGS
@given(st.one_of(st.text(max_size=200), raw_configs.map(lambda r: yaml.safe_dump(r, allow_unicode=True))),
       st.lists(st.text(max_size=30), max_size=3))
def test_any_yaml_file_and_set_items_give_a_config_or_a_config_error(tmp_path, text, sets):
    path = tmp_path / "run.yaml"
    try:
        path.write_text(text, encoding="utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be written as UTF-8 at all
        assume(False)
    _valid_or_config_error(lambda: load_config(path, sets))


@SETTINGS
@given(st.text(max_size=40))
def test_any_set_item_is_applied_or_refused_with_a_config_error(item):
    raw = {"model": {"name_or_path": "m"}, "train": {"output_dir": "o"}}
    try:
        apply_override(raw, item)
    except ConfigError:
        return
    assert isinstance(raw, dict)


# ---------------------------------------------------------------------------------------------------------------
# sbatch renderer

line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n\r"), min_size=1,
                    max_size=24).filter(lambda s: s.strip())
path_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n\r/\\"), min_size=1,
                    max_size=16).filter(lambda s: s.strip() and s not in (".", ".."))


def _cfg(job_name: str, partition: str, account: str, output_dir: str = "/runs/x") -> RunConfig:
    return from_dict({"model": {"name_or_path": "/models/m"}, "data": {"train": "/data/t.jsonl"},
                      "train": {"output_dir": output_dir},
                      "slurm": {"nodes": 2, "tasks_per_node": 2, "job_name": job_name, "partition": partition,
                                "account": account}})


def _sbatch_values(script: str) -> dict[str, str]:
    """#SBATCH --key=value lines read the way sbatch does: shell-like words, a backslash escapes the next char."""
    out = {}
    for line in script.split("\n"):  # not splitlines(): \x1c-\x1e, \x85, \u2028 do not end a line for sbatch/bash
        if line.startswith("#SBATCH --"):
            words = shlex.split(line[len("#SBATCH "):])
            assert len(words) == 1, line
            key, _, value = words[0].partition("=")
            out[key[2:]] = value.replace("\\\\", "\\")
    return out


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
@SCRIPT_SETTINGS
@given(job_name=line_text, partition=line_text, account=line_text, config_dir=path_text, job_sub=path_text,
       override=line_text)
def test_any_value_survives_sbatch_quoting(launcher, job_name, partition, account, config_dir, job_sub, override):
    from dsft.slurm.sbatch import render

    job_dir = f"/scratch/{job_sub}"
    script = render(_cfg(job_name, partition, account), f"/work/{config_dir}/run.yaml", launcher,
                    overrides=[f"data.eval={override}"], job_dir=job_dir, workdir="/w",
                    executables={"torchrun": "/opt/bin/torchrun", "deepspeed": "/opt/bin/deepspeed"})
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    got = _sbatch_values(script)
    assert got["job-name"] == job_name and got["partition"] == partition and got["account"] == account
    assert got["output"] == job_dir.replace("%", "%%") + "/%x-%j.out"  # % doubled: sbatch reads patterns there


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    """scontrol / srun stand-ins and a launcher that records its argv (as in tests/test_slurm.py)."""
    d = tmp_path_factory.mktemp("stubs")
    (d / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    (d / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n')
    (d / "launcher").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                "json.dump(sys.argv[1:], open(os.environ['ARGV_RECORD'], 'w'))\n")
    for stub in d.iterdir():
        stub.chmod(0o755)
    return d


@SCRIPT_SETTINGS
@given(config_dir=path_text, override=line_text, job_sub=path_text)
def test_the_launcher_receives_any_value_unchanged(stubs, tmp_path_factory, config_dir, override, job_sub):
    from dsft.slurm.sbatch import render

    work = tmp_path_factory.mktemp("job")
    job_dir = work / job_sub
    job_dir.mkdir()
    config = f"/work/{config_dir}/run.yaml"
    script = render(_cfg("j", "p", "a"), config, "torchrun", overrides=[f"data.eval={override}"],
                    job_dir=str(job_dir), workdir=str(work),
                    executables={"torchrun": str(stubs / "launcher"), "deepspeed": str(stubs / "launcher"),
                                 "python": "true"})  # `dsft validate` of the (absent) config: skipped
    record = work / "argv.json"
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="7", ARGV_RECORD=str(record))
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=work)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(record.read_text())
    assert argv[-8:] == ["-m", "dsft.run", "--config", config, "--set", f"data.eval={override}",
                         "--set", "train.resume_from_checkpoint=auto"]


@SETTINGS
@given(before=line_text, after=line_text, key=st.sampled_from(["job_name", "partition", "account", "qos", "mem"]),
       newline=st.sampled_from(["\n", "\n#SBATCH --uid=0\n"]))
def test_a_line_break_in_a_slurm_value_is_refused(before, after, key, newline):
    raw = {"model": {"name_or_path": "m", "init": "from_config"}, "data": {"train": "hub/dataset"},
           "train": {"output_dir": "/o"}, "slurm": {key: before + newline + after}}
    with pytest.raises(ConfigError, match=f"slurm.{key}: must be a non-empty single line"):
        validate(from_dict(raw))
