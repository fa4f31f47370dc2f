"""Which checkpoint a run resumes from (train.resume_from_checkpoint), and which checkpoints count as
complete (dsft_complete.json, written once every rank has finished writing)."""

from __future__ import annotations

import logging

import pytest

from dsft.checkpoint import (
    COMPLETE_MARKER,
    PARTIAL_DIR,
    is_complete,
    latest_complete_checkpoint,
    mark_complete,
    rotate_complete,
    set_aside_incomplete,
)
from dsft.config import from_dict
from dsft.errors import ConfigError
from dsft.checkpoint import resolve_resume


def _cfg(tmp_path, value):
    return from_dict({"model": {"name_or_path": "x"}, "data": {"train": "x.jsonl"},
                      "train": {"output_dir": str(tmp_path / "out"), "resume_from_checkpoint": value}})


def _checkpoint(out, step, complete=True, trainer_state=True):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * step)
    if trainer_state:
        (path / "trainer_state.json").write_text("{}")
    if complete:
        mark_complete(path)
    return path


def test_auto_starts_fresh_without_checkpoints_and_resumes_the_newest(tmp_path):
    assert resolve_resume(_cfg(tmp_path, "auto")) is None  # no output dir yet
    (tmp_path / "out").mkdir()
    assert resolve_resume(_cfg(tmp_path, "auto")) is None  # empty output dir
    for step in (5, 10):
        _checkpoint(tmp_path / "out", step)
    assert resolve_resume(_cfg(tmp_path, "auto")).endswith("checkpoint-10")
    assert resolve_resume(_cfg(tmp_path, "last")).endswith("checkpoint-10")
    assert resolve_resume(_cfg(tmp_path, True)).endswith("checkpoint-10")


def test_last_without_checkpoints_and_a_missing_path_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint-"):
        resolve_resume(_cfg(tmp_path, "last"))
    with pytest.raises(ConfigError, match="is not a directory"):
        resolve_resume(_cfg(tmp_path, str(tmp_path / "nope")))
    assert resolve_resume(_cfg(tmp_path, False)) is None


def test_a_newer_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    _checkpoint(out, 5)
    _checkpoint(out, 10, complete=False)  # the run was killed while writing it
    with caplog.at_level(logging.WARNING, logger="dsft"):
        for mode in ("auto", "last"):
            assert resolve_resume(_cfg(tmp_path, mode)).endswith("checkpoint-5")
    assert "skipping" in caplog.text and "checkpoint-10" in caplog.text and "incomplete" in caplog.text


def test_only_incomplete_checkpoints(tmp_path):
    _checkpoint(tmp_path / "out", 10, complete=False, trainer_state=False)
    assert resolve_resume(_cfg(tmp_path, "auto")) is None  # a fresh start
    with pytest.raises(ConfigError, match=r"only incomplete ones: checkpoint-10"):
        resolve_resume(_cfg(tmp_path, "last"))


def test_explicit_path_to_an_incomplete_checkpoint(tmp_path, caplog):
    cut = _checkpoint(tmp_path / "out", 10, complete=False, trainer_state=False)
    with pytest.raises(ConfigError, match="incomplete .*no dsft_complete.json and no trainer_state.json"):
        resolve_resume(_cfg(tmp_path, str(cut)))
    foreign = _checkpoint(tmp_path / "out", 20, complete=False)  # e.g. written by a plain Trainer
    with caplog.at_level(logging.WARNING, logger="dsft"):
        assert resolve_resume(_cfg(tmp_path, str(foreign))) == str(foreign)
    assert "no dsft_complete.json" in caplog.text


def test_a_marker_whose_files_changed_is_not_complete(tmp_path):
    path = _checkpoint(tmp_path / "out", 4)
    assert is_complete(path)
    (path / "model.safetensors").write_bytes(b"w")  # truncated after the fact
    assert not is_complete(path)
    with pytest.raises(ConfigError, match="damaged"):
        resolve_resume(_cfg(tmp_path, str(path)))
    (path / "model.safetensors").unlink()
    assert not is_complete(path)
    (path / COMPLETE_MARKER).write_text("{not json")
    assert not is_complete(path)


def test_rotation_counts_complete_checkpoints_only(tmp_path):
    out = tmp_path / "out"
    for step in (2, 4, 6):
        _checkpoint(out, step)
    _checkpoint(out, 8, complete=False)
    deleted = rotate_complete(out, 1, protect=(str(out / "checkpoint-2"),))  # checkpoint-2: the best one
    assert [p.name for p in deleted] == ["checkpoint-4"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert latest_complete_checkpoint(out)[0].name == "checkpoint-6"  # the incomplete 8 never displaced it
    assert rotate_complete(out, None) == []


def test_incomplete_checkpoints_are_set_aside_not_deleted(tmp_path):
    out = tmp_path / "out"
    _checkpoint(out, 3)
    _checkpoint(out, 6, complete=False)
    moved = set_aside_incomplete(out, keep=None)
    assert len(moved) == 1 and moved[0].parent == out / PARTIAL_DIR and moved[0].name.startswith("checkpoint-6-")
    assert (moved[0] / "model.safetensors").read_bytes() == b"w" * 6
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", PARTIAL_DIR]


def test_a_field_added_since_the_checkpoint_was_written_is_not_a_change(tmp_path):
    """The checkpoint's dsft_config.yaml from an older dsft lacks a newer field: it compares as its default."""
    import yaml

    from dsft.config import RESOLVED_CONFIG_NAME, resolved_dict
    from dsft.resume_check import check_resume_matches

    cfg = _cfg(tmp_path, "last")
    path = _checkpoint(tmp_path / "out", 5)
    old = resolved_dict(cfg)
    del old["data"]["seed"], old["peft"]  # as if written before these existed
    (path / RESOLVED_CONFIG_NAME).write_text(yaml.safe_dump(old))
    check_resume_matches(cfg, str(path))  # no error
    old["data"]["max_seq_len"] = 7
    (path / RESOLVED_CONFIG_NAME).write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"changed: data.max_seq_len: 7 -> 1024"):
        check_resume_matches(cfg, str(path))
