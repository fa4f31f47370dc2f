"""Sequence parallelism (``parallel.sequence``): DeepSpeed Ulysses / ALST through transformers' Trainer and
accelerate's ``ParallelismConfig(sp_size, sp_backend="deepspeed")``.

How the pieces fit (transformers 5.23, accelerate 1.15, DeepSpeed 0.19.8): the ranks form groups of ``sp``
consecutive ranks; the train DataLoader is still sharded over ALL ranks, and DeepSpeed's
``UlyssesSPDataLoaderAdapter`` gathers the ``sp`` batches of a group and feeds them one after another, each split
along the sequence so that every rank of the group holds 1/sp of its tokens. An optimizer step therefore sees
micro x accumulation x (world / sp) rows: world = data-parallel x sequence-parallel. Inside attention an
all-to-all swaps the sequence split for a head split, so each rank attends over the whole row for 1/sp of the
heads. The attention mask is dropped (a 4D mask at full length would be O(n^2)): causality comes from
position_ids alone, which is why eager attention is refused and why packing is exact only with flash attention
(its varlen kernel separates samples by position_ids; sdpa without a mask attends across packed samples).

Everything here is imported lazily by the training path; config checks live in ``dsft.config``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import ParallelismConfig
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DeepSpeedSequenceParallelConfig

from dsft.errors import ConfigError, DsftError

logger = logging.getLogger("dsft")

IGNORE_INDEX = -100


def data_parallel_size(world_size: int, sequence: int) -> int:
    """Ranks that read different data in one optimizer step: world / sequence-parallel size."""
    return max(1, world_size // max(1, sequence))


def check_world(world_size: int, sequence: int) -> None:
    """The world must split into whole sequence-parallel groups."""
    if sequence > 1 and world_size % sequence:
        raise ConfigError(f"parallel.sequence: {sequence} does not divide the {world_size} ranks of this launch "
                          "(world = data-parallel x sequence-parallel); launch a multiple of it, or change it")


@dataclass(frozen=True)
class SequenceParallelPlace:
    """Where a rank sits in the data-parallel x sequence-parallel grid (DeepSpeed groups consecutive ranks)."""

    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int

    @classmethod
    def of(cls, rank: int, world_size: int, sequence: int) -> SequenceParallelPlace:
        sp = max(1, sequence)
        return cls(sp_size=sp, sp_rank=rank % sp, dp_size=data_parallel_size(world_size, sp), dp_rank=rank // sp)


def place_views(rank: int, world_size: int, sequence: int) -> dict[str, tuple[int, int]]:
    """(rank, size) of this process in the sequence-parallel group and in the data-parallel world, as dsft expects
    it and as DeepSpeed built it (its groups exist once the engine is up: at train begin). Empty without SP."""
    if sequence <= 1:
        return {}
    expected = SequenceParallelPlace.of(rank, world_size, sequence)
    views = {"dsft sequence-parallel group": (expected.sp_rank, expected.sp_size),
             "dsft data-parallel world": (expected.dp_rank, expected.dp_size)}
    try:  # deferred: DeepSpeed is optional, and its import logs an accelerator banner
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
        from deepspeed import comm as dist
    except ImportError:
        return views
    if mpu._SEQUENCE_PARALLEL_GROUP is not None:
        group = mpu.get_sequence_parallel_group()
        views["DeepSpeed sequence-parallel group"] = (dist.get_rank(group=group), dist.get_world_size(group=group))
        seq_dp = mpu.get_sequence_data_parallel_group()
        # the gradient-reduction group spans dp x sp ranks; its data-parallel share is size / sp
        size = dist.get_world_size(group=seq_dp)
        views["DeepSpeed data-parallel world"] = (dist.get_rank(group=seq_dp) // expected.sp_size,
                                                  size // expected.sp_size)
    return views


def check_place(views: dict[str, tuple[int, int]]) -> None:
    """Refuse to train when DeepSpeed's sequence-parallel groups disagree with dsft's layout."""
    groups: dict[str, set] = {}
    for name, value in views.items():
        groups.setdefault(name.split(" ", 1)[1], set()).add(value)
    bad = [kind for kind, values in groups.items() if len(values) > 1]
    if bad:
        seen = "; ".join(f"{name}: rank {i} of {n}" for name, (i, n) in views.items())
        raise DsftError(f"sequence parallelism: the {' and '.join(bad)} disagree ({seen}); ranks would read the "
                        "wrong share of the data")


def parallelism_config(sequence: int, world_size: int, attn_implementation: str):
    """accelerate's ParallelismConfig for Ulysses SP; None without SP."""
    if sequence <= 1:
        return None
    # sp_attn_implementation is left empty by accelerate unless set (despite its docs): name the model's kernel.
    # dp_replicate_size: accelerate computes DeepSpeed's train_batch_size as micro x accumulation x dp from it.
    handler = DeepSpeedSequenceParallelConfig(sp_attn_implementation=attn_implementation,
                                              sp_seq_length_is_variable=True)
    return ParallelismConfig(sp_size=sequence, sp_backend="deepspeed", sp_handler=handler,
                             dp_replicate_size=data_parallel_size(world_size, sequence))


def configure_state(use_cpu: bool) -> dict:
    """Set up accelerate's process state for DeepSpeed SP before TrainingArguments; returns the
    ``accelerator_config`` entries the TrainingArguments need.

    Why: on a CPU-only machine accelerate's DeepSpeed state picks no backend, so both ranks report process index 0
    (ZeRO-3 then fails in zero.Init, ZeRO-2 silently trains every sample twice). Creating the state first with
    gloo, marked as DeepSpeed, and telling the Trainer to use it keeps the ranks apart. On accelerators the
    Trainer's own state is right and nothing is done.
    """
    if not use_cpu:
        return {}
    # a fresh state per run, as TrainingArguments does without use_configured_state (a second run in one process
    # would otherwise meet the first run's DeepSpeed plugin); the process group itself is kept
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return {"use_configured_state": True}


def row_width(max_seq_len: int, sequence: int) -> int:
    """The fixed row width under SP: max_seq_len rounded up to a multiple of the sequence-parallel size."""
    return -(-max_seq_len // sequence) * sequence


@dataclass
class SequenceParallelCollator:
    """Wraps a collator for Ulysses: every row padded to one fixed width (``row_width``), and position_ids in
    every batch (DeepSpeed gathers them to rebuild causality without a mask).

    Why a fixed width rather than the longest row of the batch: DeepSpeed's data adapter all-gathers the batches of
    the SP group before splitting them, and gloo refuses an all_gather of unequal shapes ("invalid tensor size",
    measured here with dynamic padding). Right padding with label -100 changes no loss: causal attention keeps it
    out of the real tokens' context."""

    inner: Any
    width: int
    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.inner(features)
        rows, width = batch["input_ids"].shape
        if "position_ids" not in batch:
            batch["position_ids"] = torch.arange(width).unsqueeze(0).expand(rows, width).contiguous()
        pad = max(0, self.width - width)
        if pad:
            fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
            for key, value in list(batch.items()):
                if not torch.is_tensor(value) or value.dim() != 2 or value.shape[1] != width:
                    continue
                if key == "position_ids":  # padding continues the last sample's positions (its own tail)
                    tail = value[:, -1:] + torch.arange(1, pad + 1).unsqueeze(0)
                    batch[key] = torch.cat([value, tail], dim=1)
                else:
                    batch[key] = torch.nn.functional.pad(value, (0, pad), value=fill.get(key, 0))
        return batch


def release_groups() -> None:
    """Forget DeepSpeed's SP groups so another run in the same process can build them again (they are
    process-wide globals asserted to be unset; tests and benchmarks run several configs per launch)."""
    try:  # deferred: DeepSpeed is optional (see place_views)
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
    except ImportError:
        return
    mpu._release_sequence_parallel_groups()
