"""Which checkpoint a run resumes from (train.resume_from_checkpoint)."""

from __future__ import annotations

import pytest

from dsft.config import from_dict
from dsft.errors import ConfigError
from dsft.train import resolve_resume


def _cfg(tmp_path, value):
    return from_dict({"model": {"name_or_path": "x"}, "data": {"train": "x.jsonl"},
                      "train": {"output_dir": str(tmp_path / "out"), "resume_from_checkpoint": value}})


def test_auto_starts_fresh_without_checkpoints_and_resumes_the_newest(tmp_path):
    assert resolve_resume(_cfg(tmp_path, "auto")) is None  # no output dir yet
    (tmp_path / "out").mkdir()
    assert resolve_resume(_cfg(tmp_path, "auto")) is None  # empty output dir
    for step in (5, 10):
        (tmp_path / "out" / f"checkpoint-{step}").mkdir()
    assert resolve_resume(_cfg(tmp_path, "auto")).endswith("checkpoint-10")
    assert resolve_resume(_cfg(tmp_path, "last")).endswith("checkpoint-10")
    assert resolve_resume(_cfg(tmp_path, True)).endswith("checkpoint-10")


def test_last_without_checkpoints_and_a_missing_path_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint-"):
        resolve_resume(_cfg(tmp_path, "last"))
    with pytest.raises(ConfigError, match="is not a directory"):
        resolve_resume(_cfg(tmp_path, str(tmp_path / "nope")))
    assert resolve_resume(_cfg(tmp_path, False)) is None
