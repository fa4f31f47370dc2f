"""Every rank checks, before the first step, that the launcher, the Trainer, accelerate, torch.distributed and
DeepSpeed agree on its place in the world (a disagreement silently duplicates data)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dsft.distributed import check_world_agreement, world_views
from dsft.errors import DsftError


def _args(index: int, count: int):
    return SimpleNamespace(process_index=index, world_size=count)


def test_agreeing_views_pass():
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    views = world_views(_args(1, 2), SimpleNamespace(process_index=1, num_processes=2), environ=env)
    assert set(views.values()) == {(1, 2)}
    check_world_agreement(views)


def test_accelerate_seeing_one_process_of_two_is_refused():
    """The trap seen on a CPU box: torchrun started rank 1 of 2, accelerate said process 0 of 1."""
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    views = world_views(_args(1, 2), SimpleNamespace(process_index=0, num_processes=1), environ=env)
    with pytest.raises(DsftError) as e:
        check_world_agreement(views)
    message = str(e.value)
    assert "accelerate: rank 0 of 1" in message and "TrainingArguments: rank 1 of 2" in message
    assert "duplicate data" in message and "\n" not in message


def test_same_count_but_different_index_is_refused():
    # both ranks would believe they are rank 0: same world size, different index
    views = {"launcher environment (RANK, WORLD_SIZE)": (1, 2), "torch.distributed": (0, 2)}
    with pytest.raises(DsftError, match="torch.distributed: rank 0 of 2"):
        check_world_agreement(views)


def test_single_process_views_from_a_real_environment_agree():
    views = world_views(_args(0, 1), environ={})
    assert views == {"launcher environment (RANK, WORLD_SIZE)": (0, 1), "TrainingArguments": (0, 1)}
    check_world_agreement(views)
