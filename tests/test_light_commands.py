"""Commands that need neither torch nor transformers answer fast (issue: `dsft status` took 6.3 s, `dsft sbatch`
5.7 s, about what importing TrainingArguments costs). Checked by what a command imports, not by timing: each runs
in a fresh interpreter, which then reports whether any heavy library was loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, copy_task_rows, write_jsonl

HEAVY = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "accelerate", "datasets")
# at exit, so that commands argparse ends itself (--help) report too
_RUN = (
    "import atexit, sys\n"
    f"atexit.register(lambda: print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr))\n"
    "from dsft.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _heavy_imports(args: list[str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _RUN, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m]


def _job_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "dsft_log.jsonl").write_text(json.dumps({"step": 5, "loss": 1.25}) + "\n")
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "dsft_job.json").write_text(json.dumps({"job_id": "4242", "output_dir": str(out)}))
    return folder


@pytest.mark.parametrize("command", ["help", "reference", "status", "sbatch", "sbatch-zero3"])
def test_light_commands_import_neither_torch_nor_transformers(command, tmp_path):
    # the example's own data lives in .cache/dsft (made by make demo): point it at a file of its own
    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(4))
    config = tmp_path / "run.yaml"
    config.write_text((REPO / "examples" / "tiny-from-config.yaml").read_text()
                      .replace("output_dir: runs/", f"output_dir: {tmp_path}/runs/")
                      .replace("train: .cache/dsft/data/humaneval/train.jsonl", f"train: {data}")
                      + ("deepspeed: zero3\n" if command == "sbatch-zero3" else ""))
    args = {"help": ["--help"], "reference": ["reference"], "status": ["status", str(_job_folder(tmp_path))],
            "sbatch": ["sbatch", str(config)], "sbatch-zero3": ["sbatch", str(config)]}[command]
    heavy = _heavy_imports(args)
    assert heavy == [], f"dsft {' '.join(args)} imported {heavy}"


def test_training_args_snapshot_is_current():
    """dsft.config checks train keys against a snapshot of TrainingArguments' fields (no transformers import);
    it must say what the installed transformers says. After an upgrade: scripts/snapshot_training_args.py."""
    import transformers

    from dsft import training_args_fields
    from dsft.config import train_field_kinds, training_argument_fields

    assert training_args_fields.TRANSFORMERS_VERSION == transformers.__version__, \
        "run scripts/snapshot_training_args.py"
    assert training_args_fields.FIELDS == train_field_kinds(training_argument_fields()), \
        "run scripts/snapshot_training_args.py"
