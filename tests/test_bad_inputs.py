"""Bad input, tried systematically through the real CLI (``dsft train`` / ``dsft sbatch``, in process with the
output captured): each case must give exactly one ``dsft: error:`` line naming the file, key or row, exit code 2,
no traceback, and leave no output_dir behind.

The 53 bad configs of tests/test_config.py (checked there through ``dsft validate``) run here through
``dsft train``, the command that creates the output dir; the cases below add data, model files, DeepSpeed batch
arithmetic, resume paths, the guard section and Slurm values.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import copy_task_rows, early_dsft_process, write_jsonl
from dsft.cli import main
from test_config import BAD as CONFIG_BAD
from test_config import merge

ROWS = copy_task_rows(6)
LONG_PROMPT = "p" * 80  # > data.max_seq_len 64: nothing of the completion is left


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# (id, what to set up, dsft arguments after the config, substrings of the error line)
# setup keys: patch (config dict merged into the base) | yaml (raw config text/bytes); rows / raw (the train file
# content, written as data/<file>); file (its name); prepare (name of a helper making files)
CASES = [
    # ---- config: sections, types, batch arithmetic, files ----
    ("guard-negative", {"patch": {"guard": {"max_nonfinite_steps": -1}}}, [],
     ["guard.max_nonfinite_steps", "must be 0 (off) or more", "-1"]),
    ("guard-not-an-integer", {"patch": {"guard": {"max_nonfinite_steps": "three"}}}, [],
     ["guard.max_nonfinite_steps", "expected an integer", "'three'"]),
    ("guard-unknown-key", {"patch": {"guard": {"max_nan_steps": 2}}}, [],
     ["unknown key 'max_nan_steps'", "section 'guard'", "did you mean 'max_nonfinite_steps'?"]),
    ("gradient-accumulation-0", {"patch": {"train": {"gradient_accumulation_steps": 0}}}, [],
     ["train.gradient_accumulation_steps", "must be a positive integer", "got 0"]),
    ("deepspeed-batch-arithmetic", {"patch": {"deepspeed": "zero2", "deepspeed_overrides": {"train_batch_size": 7}}},
     [], ["deepspeed.train_batch_size", "7 != micro batch 2 x accumulation 1 x world size 1 = 2"]),
    ("deepspeed-accumulation-mismatch",
     {"patch": {"deepspeed": "zero2", "deepspeed_overrides": {"gradient_accumulation_steps": 4}}}, [],
     ["deepspeed.gradient_accumulation_steps", "4 but train.gradient_accumulation_steps is 1"]),
    ("deepspeed-unknown-template", {"patch": {"deepspeed": "zero9"}}, [],
     ["deepspeed: unknown template 'zero9'"]),
    ("deepspeed-json-not-found", {"patch": {"deepspeed": "{tmp}/ds/missing.json"}}, [],
     ["deepspeed", "missing.json"]),
    ("deepspeed-json-broken", {"patch": {"deepspeed": "{tmp}/ds.json"}, "prepare": "broken_ds_json"}, [],
     ["deepspeed", "ds.json"]),
    ("config-not-utf8", {"yaml": b"model:\n  name_or_path: caf\xe9\n"}, [],
     ["run.yaml", "not UTF-8"]),
    ("yaml-tab-indentation", {"yaml": "model:\n\tname_or_path: m\n"}, [],
     ["run.yaml", "broken YAML", "line 2"]),
    ("set-unknown-section", {}, ["--set", "trian.max_steps=3"],
     ["unknown key 'trian'", "did you mean 'train'?"]),
    ("model-config-override-unknown-field", {"patch": {"model": {"config_overrides": {"num_hiden_layers": 1}}}}, [],
     ["model.config_overrides.num_hiden_layers", "LlamaConfig has no field"]),
    ("model-dir-without-tokenizer", {"patch": {"model": {"name_or_path": "{tmp}/no-tokenizer"}},
                                     "prepare": "model_without_tokenizer"}, [],
     ["model.name_or_path", "cannot load the tokenizer from", "no-tokenizer"]),
    ("model-dir-without-weights", {"patch": {"model": {"name_or_path": "{tmp}/no-weights"}},
                                   "prepare": "model_without_weights"}, [],
     ["model.name_or_path", "cannot load the weights from", "no-weights", "model.safetensors"]),
    # ---- resume ----
    ("resume-path-missing", {"patch": {"train": {"resume_from_checkpoint": "{tmp}/gone/checkpoint-5"}}}, [],
     ["train.resume_from_checkpoint", "checkpoint-5 is not a directory"]),
    ("resume-last-without-checkpoints", {"patch": {"train": {"resume_from_checkpoint": "last"}}}, [],
     ["train.resume_from_checkpoint", "no complete checkpoint-* directory"]),
    ("resume-incomplete-checkpoint", {"patch": {"train": {"resume_from_checkpoint": "{tmp}/old/checkpoint-8"}},
                                      "prepare": "incomplete_checkpoint"}, [],
     ["train.resume_from_checkpoint", "checkpoint-8 is incomplete", "no dsft_complete.json"]),
    # ---- data ----
    ("data-missing-field", {"rows": [*ROWS[:2], {"prompt": "copy ab:"}]}, [],
     ["train.jsonl: line 3", "missing field 'completion'"]),
    ("data-empty-completion", {"rows": [*ROWS[:3], {"prompt": "copy ab:", "completion": "  "}]}, [],
     ["train.jsonl: line 4", "field 'completion' is empty"]),
    ("data-wrong-type", {"rows": [{"text": "ok"}, {"text": 5}], "patch": {"data": {"format": "text"}}}, [],
     ["train.jsonl: line 2", "field 'text' must be a string, got int"]),
    ("data-non-utf8", {"raw": b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n'}, [],
     ["train.jsonl", "line 2", "not UTF-8"]),
    ("data-all-rows-longer-than-max-seq-len",
     {"rows": [{"prompt": LONG_PROMPT, "completion": " x"}] * 3}, [],
     ["data.train", "no sample has a token to learn from after formatting and truncation"]),
    ("data-empty-file", {"raw": b""}, [],
     ["data.train", "train.jsonl has no rows"]),
    ("data-chat-without-assistant",
     {"rows": [chat(("user", "hi"), ("assistant", "yo")), chat(("system", "S"), ("user", "hi"))],
      "patch": {"data": {"format": "messages"}}}, [],
     ["train.jsonl: line 2", "no assistant turn"]),
    ("data-messages-not-a-list", {"rows": [{"messages": "hi"}], "patch": {"data": {"format": "messages"}}}, [],
     ["train.jsonl: line 1", "'messages' must be a non-empty list"]),
    ("data-unknown-role",
     {"rows": [chat(("user", "hi"), ("robot", "beep"))], "patch": {"data": {"format": "messages"}}}, [],
     ["train.jsonl: line 1", "message 1 has role 'robot'"]),
    ("data-message-content-null",
     {"rows": [{"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}],
      "patch": {"data": {"format": "messages"}}}, [],
     ["train.jsonl: line 1", "message 0 content must be a string, got NoneType"]),
    ("data-broken-json-line", {"raw": b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n'}, [],
     ["train.jsonl: line 2", "not valid JSON", "column 31"]),
    ("data-json-line-not-an-object", {"raw": b'{"prompt": "a", "completion": "b"}\n"just a string"\n'}, [],
     ["train.jsonl", "line 2"]),
    ("data-unsupported-extension", {"raw": b"prompt\tcompletion\n", "file": "train.tsv"}, [],
     ["train.tsv", "unsupported data file type"]),
    ("data-csv-missing-column", {"raw": b"prompt,answer\ncopy a:, a\n", "file": "train.csv"}, [],
     ["train.csv: row 1", "missing field 'completion'"]),
    ("data-alpaca-empty-output", {"rows": [{"instruction": "Do", "input": "", "output": ""}]}, [],
     ["train.jsonl: line 1", "field 'output' is empty"]),
    ("data-eval-bad-row", {"patch": {"data": {"eval": "{tmp}/eval.jsonl"}}, "prepare": "bad_eval_file"}, [],
     ["eval.jsonl: line 2", "missing field 'prompt'"]),
    ("data-dir-not-a-dataset", {"patch": {"data": {"train": "{tmp}/not-a-dataset"}}, "prepare": "not_a_dataset"}, [],
     ["data.train: cannot read", "not-a-dataset", "neither a `Dataset` directory"]),
    # ---- Slurm values (dsft sbatch renders the job script; metacharacters are quoted, line breaks refused) ----
    ("slurm-job-name-directive-injection", {"patch": {"slurm": {"job_name": "ft\n#SBATCH --account=other"}}},
     ["sbatch"], ["slurm.job_name", "must be a non-empty single line"]),
    ("slurm-partition-empty", {"patch": {"slurm": {"partition": " "}}}, ["sbatch"],
     ["slurm.partition", "must be a non-empty single line"]),
    ("slurm-mem-newline", {"patch": {"slurm": {"mem": "64G\nsrun rm -rf ~"}}}, ["sbatch"],
     ["slurm.mem", "must be a non-empty single line"]),
    ("slurm-flag-newline", {}, ["sbatch", "--account", "lab\n#SBATCH --qos=high"],
     ["slurm.account", "must be a non-empty single line"]),
    ("slurm-time-0", {"patch": {"slurm": {"time_min": 0}}}, ["sbatch"],
     ["slurm.time_min", "must be at least 1"]),
    ("slurm-signal-after-the-limit", {"patch": {"slurm": {"time_min": 1, "signal_delay_s": 30}}}, ["sbatch"],
     ["slurm.signal_delay_s", "leaves less than 60 s"]),
    ("slurm-nodes-not-an-integer", {"patch": {"slurm": {"nodes": "two"}}}, ["sbatch"],
     ["slurm.nodes", "expected an integer", "'two'"]),
]


# ---- helpers that make files for some cases ----

def broken_ds_json(tmp: Path, model_dir: Path) -> None:
    (tmp / "ds.json").write_text('{"zero_optimization": {"stage": 2,}}')


def model_without_tokenizer(tmp: Path, model_dir: Path) -> None:
    target = tmp / "no-tokenizer"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, target / name)


def model_without_weights(tmp: Path, model_dir: Path) -> None:
    shutil.copytree(model_dir, tmp / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))


def incomplete_checkpoint(tmp: Path, model_dir: Path) -> None:
    path = tmp / "old" / "checkpoint-8"
    path.mkdir(parents=True)
    shutil.copy(model_dir / "model.safetensors", path / "model.safetensors")  # killed before the rest


def bad_eval_file(tmp: Path, model_dir: Path) -> None:
    write_jsonl(tmp / "eval.jsonl", [ROWS[0], {"completion": " x"}])


def not_a_dataset(tmp: Path, model_dir: Path) -> None:
    (tmp / "not-a-dataset").mkdir()
    (tmp / "not-a-dataset" / "notes.txt").write_text("hello")


def _config_case(tmp: Path, model_dir: Path, setup: dict) -> Path:
    data_dir = tmp / "data"
    data_dir.mkdir()
    train = data_dir / setup.get("file", "train.jsonl")
    if "raw" in setup:
        train.write_bytes(setup["raw"])
    else:
        write_jsonl(train, setup.get("rows", ROWS))
    if "prepare" in setup:
        globals()[setup["prepare"]](tmp, model_dir)
    path = tmp / "run.yaml"
    if "yaml" in setup:
        raw = setup["yaml"]
        path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
        return path
    base = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {"train": str(train), "format": "prompt_completion", "max_seq_len": 64,
                 "cache_dir": str(tmp / "cache")},
        "train": {"output_dir": str(tmp / "out"), "max_steps": 2, "per_device_train_batch_size": 2,
                  "report_to": "none"},
    }
    path.write_text(yaml.safe_dump(merge(base, setup.get("patch", {}), {"tmp": tmp, "train_file": train})))
    return path


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def _assert_one_clear_error(rc: int, err: str, expected: list[str], out_dir: Path) -> None:
    assert rc == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("dsft: error:")]
    assert len(errors) == 1, err[-3000:]
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    assert "Traceback" not in err
    assert not out_dir.exists(), "a failed run left an output_dir behind"


def test_the_table_is_large_and_distinct():
    ids = [c[0] for c in CONFIG_BAD] + [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 30 and len(ids) >= 80


@pytest.mark.parametrize("case_id, setup, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_through_the_cli(tmp_path, tiny_model_dir, capsys, case_id, setup, args, expected):
    config = _config_case(tmp_path, tiny_model_dir, setup)
    command, extra = (args[0], args[1:]) if args and args[0] == "sbatch" else ("train", args)
    rc, err = _run(capsys, [command, str(config), *extra])
    _assert_one_clear_error(rc, err, expected, tmp_path / "out")


@pytest.mark.parametrize("patch, sets, expected", [c[1:] for c in CONFIG_BAD], ids=[c[0] for c in CONFIG_BAD])
def test_bad_config_through_dsft_train(tmp_path, tiny_model_dir, capsys, patch, sets, expected):
    """The bad configs of test_config.py, through `dsft train` instead of `dsft validate`."""
    env = {"tmp": tmp_path, "train_file": write_jsonl(tmp_path / "train.jsonl", ROWS)}
    base = {"model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(env["train_file"]), "format": "prompt_completion", "max_seq_len": 64},
            "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2}}
    path = tmp_path / "run.yaml"
    if isinstance(patch, dict):
        path.write_text(yaml.safe_dump(merge(base, patch, env), sort_keys=False), encoding="utf-8")
    elif isinstance(patch, str):
        path.write_text(patch, encoding="utf-8")
    rc, err = _run(capsys, ["train", str(path), *[x for item in sets for x in ("--set", item)]])
    _assert_one_clear_error(rc, err, expected, tmp_path / "out")


@pytest.fixture(scope="module", autouse=True)
def real_process(request, tmp_path_factory, tiny_model_dir):
    """``python -m dsft train`` on a chat without an assistant turn, in a fresh interpreter started when this
    module starts."""
    tmp = tmp_path_factory.mktemp("bad-input-process")
    config = _config_case(tmp, tiny_model_dir, next(c[1] for c in CASES if c[0] == "data-chat-without-assistant"))
    with early_dsft_process(request, "test_a_data_error_in_a_real_process", "train", str(config)) as proc:
        yield proc, tmp / "out"


@pytest.mark.integration
def test_a_data_error_in_a_real_process(real_process):
    proc, out_dir = real_process
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    assert "dsft: error: " in stderr and "train.jsonl: line 2: the chat has no assistant turn" in stderr
    assert "Traceback" not in stderr and not out_dir.exists()
