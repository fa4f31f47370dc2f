"""Security: trust_remote_code off unless the config turns it on (and a warning when it does); model weights
written as safetensors only (Trainer checkpoints, the final save, LoRA adapters, merge; consolidate is checked
in tests/test_reliability.py on a real ZeRO checkpoint); no torch.load without weights_only and no pickle in
dsft's own code; hostile values quoted in the scripts dsft has Slurm run (its sbatch templates: also
tests/test_properties.py; submitit's submission script for dsft submit)."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_task_rows, write_jsonl
from dsft.config import ModelConfig, from_dict

PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
NOT_WEIGHTS = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|rng_state(_\d+)?\.pth)$")  # Trainer state


def pickled_weight_files(root: Path, deepspeed_state: bool = False) -> list[Path]:
    """Files under root that could hold pickled weights. Not counted: the Trainer's optimizer/scheduler/RNG/args
    files (it reads them back with weights_only=True) and, with ``deepspeed_state``, DeepSpeed's own engine state
    in checkpoint-N/global_stepN/ (its format, read by DeepSpeed; dsft consolidate turns it into safetensors)."""
    found = [p for pattern in PICKLED_WEIGHTS for p in root.rglob(pattern) if not NOT_WEIGHTS.match(p.name)]
    if deepspeed_state:
        found = [p for p in found if not p.parent.name.startswith("global_step")]
    return found


def test_trust_remote_code_is_off_unless_turned_on_and_warns_then(tiny_model_dir):
    from dsft.model import load_tokenizer

    assert ModelConfig().trust_remote_code is False
    assert from_dict({"model": {"name_or_path": "m"}, "train": {"output_dir": "o"}}).model.trust_remote_code is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all with the default
        load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    with pytest.warns(UserWarning, match="model.trust_remote_code is on: Python code shipped with .* will run"):
        load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), trust_remote_code=True))


def _calls(tree: ast.AST, dotted: str):
    owner, name = dotted.rsplit(".", 1)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
            if isinstance(node.func.value, ast.Name) and node.func.value.id == owner:
                yield node


def test_no_torch_load_without_weights_only_and_no_pickle_loads():
    sources = [p for d in ("dsft", "launch", "bench", "scripts") for p in (REPO / d).rglob("*.py")]
    assert len(sources) > 20
    problems = []
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for call in _calls(tree, "torch.load"):
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                problems.append(f"{path.relative_to(REPO)}:{call.lineno}: torch.load without weights_only=True")
        for dotted in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
            for call in _calls(tree, dotted):
                problems.append(f"{path.relative_to(REPO)}:{call.lineno}: {dotted}")
    assert not problems, "\n".join(problems)


def test_adapter_checkpoints_and_merge_are_safetensors(tmp_path, tiny_model_dir):
    """A LoRA run with checkpoints (one process), then a merge. The full fine-tune's checkpoints, final save and
    consolidate are checked on the ZeRO-2 run of tests/test_reliability.py."""
    from dsft.config import load_config
    from dsft.export import merge_adapter
    from dsft.train import run

    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(24))
    raw = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "fp32"},
           "data": {"train": str(data), "format": "prompt_completion", "max_seq_len": 64,
                    "cache_dir": str(tmp_path / "cache")},
           "peft": {"lora": {"r": 4, "alpha": 8}},
           "train": {"output_dir": str(tmp_path / "lora"), "max_steps": 2, "save_strategy": "steps",
                     "save_steps": 1, "report_to": "none", "per_device_train_batch_size": 4}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    lora = Path(run(load_config(tmp_path / "run.yaml")).output_dir)
    merged = merge_adapter(lora, tmp_path / "merged")

    assert (lora / "adapter_model.safetensors").is_file()
    assert all((lora / f"checkpoint-{s}" / "adapter_model.safetensors").is_file() for s in (1, 2))
    assert (merged / "model.safetensors").is_file()
    for root in (lora, merged):
        assert pickled_weight_files(root) == [], pickled_weight_files(root)


def test_submitit_submission_script_keeps_hostile_values_in_their_directive(tmp_path):
    """dsft submit goes through submitit's own script: values with quotes, $, backticks, spaces, ; stay one
    #SBATCH word each and the script parses (bash -n)."""
    from dsft.slurm.submit import make_executor

    hostile = {"job_name": "ft $(id) `x` it's \"q\"; rm -rf ~", "partition": "gpu $PART", "account": "a;b c",
               "qos": "q'os", "constraint": "a100&`x`"}
    cfg = from_dict({"model": {"name_or_path": "/m"}, "data": {"train": "/t.jsonl"},
                     "train": {"output_dir": str(tmp_path)}, "slurm": {"nodes": 1, **hostile}})
    script = make_executor(cfg, tmp_path / "jobs")._make_submission_file_text("python -m job", "uid")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    read = {}
    for line in script.split("\n"):
        if line.startswith("#SBATCH --"):
            words = shlex.split(line[len("#SBATCH "):])
            assert len(words) == 1, line
            key, _, value = words[0].partition("=")
            read[key[2:].replace("-", "_")] = value
    for key, value in hostile.items():
        assert read[key] == value, key
