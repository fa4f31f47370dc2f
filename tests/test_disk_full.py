"""A full disk under output_dir (issue 14, point 5): a failed checkpoint save is one ``dsft: error:`` line naming the
checkpoint, the free space and the last complete checkpoint; a warning names the shortfall before the save; after
the disk grows, ``resume_from_checkpoint: auto`` finishes the run and its log holds each step once."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_task_rows, write_jsonl
from dsft.callbacks import drop_records_after
from dsft.checkpoint import COMPLETE_MARKER, PARTIAL_DIR, is_complete
from dsft.disk import save_failure


def _raise_in_save_checkpoint(exc: BaseException) -> BaseException:
    def _save_checkpoint():  # the Trainer's frame name: save_failure attributes the error to checkpoint-<step>
        raise exc

    try:
        _save_checkpoint()
    except BaseException as e:  # noqa: BLE001 -- returned for inspection
        return e
    raise AssertionError("unreachable")


def test_write_failures_become_one_error_naming_checkpoint_space_and_last_complete(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / COMPLETE_MARKER).write_text(json.dumps({"files": {}}))
    (tmp_path / "checkpoint-6").mkdir()  # the partial one being written
    for exc in (OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
                OSError(errno.EIO, "Input/output error"),
                # safetensors and torch.save raise errno-less errors; their text is all there is
                RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                             'space left on device" })'),
                RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")):
        err = save_failure(_raise_in_save_checkpoint(exc), tmp_path, 6)
        assert err is not None, exc
        msg = str(err)
        assert "\n" not in msg and err.exit_code == 2
        assert f"checkpoint {tmp_path / 'checkpoint-6'}" in msg and " free on " in msg
        assert f"last complete checkpoint is {tmp_path / 'checkpoint-4'}" in msg
    # a write failure outside a save names the directory, not a checkpoint
    assert "a file in" in str(save_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path, 6))
    # anything else is not a disk problem and stays as it was
    assert save_failure(_raise_in_save_checkpoint(ValueError("bad shape")), tmp_path, 6) is None
    assert save_failure(_raise_in_save_checkpoint(OSError(errno.EACCES, "Permission denied")), tmp_path, 6) is None


def test_resumed_log_drops_records_after_the_resume_step(tmp_path):
    log = tmp_path / "dsft_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    assert drop_records_after(log, 5) == 3  # steps 6, 7 and the line torn by the full disk
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert drop_records_after(log, 5) == 0


# --------------------------------------------------------------------------------------------------
# for real: a 1 MB tmpfs (~5 LoRA checkpoints of the tiny model fit), then the same tmpfs grown to 16 MB


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _train(config: Path, log: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DSFT_CPU_THREADS": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "dsft", "train", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    log.write_text(proc.stdout + proc.stderr)
    return proc


def _write_config(tmp_path: Path, model_dir: Path, out: Path) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(160, seed=1))
    raw = {"model": {"name_or_path": str(model_dir), "dtype": "fp32"},
           "data": {"train": str(data), "format": "prompt_completion", "max_seq_len": 64, "packing": True,
                    "cache_dir": str(tmp_path / "cache")},
           "peft": {"lora": {"r": 4, "alpha": 8}},
           "train": {"output_dir": str(out), "learning_rate": 2e-3, "per_device_train_batch_size": 2,
                     "logging_steps": 1, "seed": 0, "data_seed": 0, "report_to": "none", "max_steps": 20,
                     "save_strategy": "steps", "save_steps": 2, "resume_from_checkpoint": "auto"}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def _errors(stderr: str) -> list[str]:
    # the progress bar shares the line (it ends in \r, not \n): take the error from where it starts
    return [line[line.index("dsft: error:"):] for line in stderr.splitlines() if "dsft: error:" in line]


@pytest.mark.integration
def test_a_full_disk_fails_with_one_line_and_resume_logs_each_step_once(tmp_path, tiny_model_dir, small_tmpfs):
    out = small_tmpfs / "out"
    config = _write_config(tmp_path, tiny_model_dir, out)

    full = _train(config, tmp_path / "full.log")
    errors = _errors(full.stderr)
    assert full.returncode == 2, full.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    complete = [p for p in out.glob("checkpoint-*") if is_complete(p)]
    partial = [p for p in out.glob("checkpoint-*") if not is_complete(p)]
    assert complete and len(partial) == 1, sorted(p.name for p in out.iterdir())
    last = max(complete, key=lambda p: int(p.name.split("-")[1]))
    assert f"could not write checkpoint {partial[0]}:" in errors[0]
    assert f"the last complete checkpoint is {last}" in errors[0] and " free on " in errors[0]
    # the check before the failing save saw it coming
    assert f"{partial[0].name} will need about" in full.stderr and "short by" in full.stderr

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)  # the disk grows
    resumed = _train(config, tmp_path / "resumed.log")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping {partial[0]}" in resumed.stderr  # set aside, not resumed from, not deleted
    assert list((out / PARTIAL_DIR).glob(f"{partial[0].name}-*"))
    steps = [json.loads(line)["step"] for line in (out / "dsft_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 21))  # each step once: the failed attempt's steps after `last` were dropped
    assert (out / "dsft_done.json").is_file()


@pytest.mark.integration
def test_a_full_disk_under_two_ranks_is_one_line_on_each_rank(tmp_path, tiny_model_dir, small_tmpfs):
    """torchrun, 2 ranks: rank 0's save fails: one line; rank 1, whose small part was written, loses rank 0 in the
    checkpoint barrier and says what happened too instead of a gloo traceback (if torchrun has not ended it first)."""
    from conftest import free_port

    out = small_tmpfs / "out"
    config = _write_config(tmp_path, tiny_model_dir, out)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update({"HF_HUB_OFFLINE": "1", "DSFT_CPU_THREADS": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                "TOKENIZERS_PARALLELISM": "false"})
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "-m", "dsft.run", "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / "torchrun.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode != 0
    errors = _errors(proc.stderr)
    partial = [p for p in out.glob("checkpoint-*") if not is_complete(p)]
    assert len(partial) == 1 and 1 <= len(errors) <= 2, proc.stderr[-4000:]
    # usually rank 1's small RNG file fits and rank 0's save fails (both may run out of room: then both say so);
    # rank 1 says its line only if it sees rank 0 gone before torchrun, which saw it first, ends rank 1 (a race)
    own = [e for e in errors if f"could not write checkpoint {partial[0]}:" in e]
    peer = [e for e in errors if e.startswith(f"dsft: error: rank 1: checkpoint {partial[0]} was not written")]
    assert own and len(own) + len(peer) == len(errors), errors
    assert "[rank1]: Traceback" not in proc.stderr and "[rank0]: Traceback" not in proc.stderr
