"""Save and stop at the next step boundary when Slurm announces the end of a job (preemption or time limit).

Slurm signals every task of a job shortly before it ends it (``--signal=USR2@90`` in the scripts submitit writes;
``scancel --signal`` for a preemption). The handler installed by :func:`arm` only records the signal; the
:class:`PreemptionCallback` then, at the next optimizer-step boundary, makes all ranks agree (one tiny
all_reduce per step), save a checkpoint and stop, and finally raises :class:`Preempted` out of
``Trainer.train`` so that the run neither saves a "final" model nor evaluates. ``dsft.slurm`` catches it and
lets submitit requeue the job; the requeued job resumes from the newest checkpoint
(``train.resume_from_checkpoint: auto``).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

logger = logging.getLogger("dsft")


class Preempted(Exception):
    """Training saved a checkpoint at ``step`` and stopped because the job is about to end."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped at step {step} on the job's end signal; checkpoint-{step} saved")
        self.step = step


@dataclass
class _Watch:
    signum: int | None = None  # the signal armed, None when not armed
    armed_at: float | None = None  # wall time the task armed (its first action after submitit started it)
    signal_at: float | None = None  # wall time the signal arrived in this process
    stopped_at_step: int | None = None  # step at which all ranks agreed to save and stop
    train_begin_at: float | None = None
    start_step: int | None = None  # global step when training (re)started in this process
    first_step_at: float | None = None  # wall time the first step of this process ended


_watch = _Watch()


def arm(signum: int):
    """Record ``signum`` instead of acting on it; returns the handler that was installed before (submitit's)."""
    previous = signal.getsignal(signum)

    def record(sig, frame):
        if _watch.signal_at is None:
            _watch.signal_at = time.time()
        # logging from a signal handler can deadlock on the handler's lock: print is enough here
        print(f"dsft: caught {signal.Signals(sig).name}: saving and stopping at the next step boundary", flush=True)

    signal.signal(signum, record)
    _watch.signum, _watch.armed_at = signum, time.time()
    return previous


def armed() -> bool:
    return _watch.signum is not None


def signal_received_at() -> float | None:
    return _watch.signal_at


def timeline() -> dict:
    """What this process saw: when the signal came, where training stopped and (re)started (for the job's
    result: the requeue gap and the steps lost are computed from it)."""
    return {"armed_at": _watch.armed_at, "signal_at": _watch.signal_at, "stopped_at_step": _watch.stopped_at_step,
            "train_begin_at": _watch.train_begin_at, "start_step": _watch.start_step,
            "first_step_at": _watch.first_step_at}


def _agreed(requested: bool, device) -> bool:
    """True on every rank if any rank saw the signal (a rank may get it a step later than another)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return requested
    if torch.distributed.get_world_size() == 1:
        return requested
    flag = torch.tensor([1 if requested else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


class PreemptionCallback(TrainerCallback):
    """At each step boundary: if the end signal arrived (on any rank), save a checkpoint and stop; at the end of
    ``train()`` raise :class:`Preempted`. Add it last, so that the other callbacks' ``on_train_end`` (TensorBoard
    closes its writer there) still runs."""

    def on_train_begin(self, args, state, control, **kwargs):
        _watch.train_begin_at = time.time()
        _watch.start_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if _watch.first_step_at is None:
            _watch.first_step_at = time.time()
        if not armed():
            return control
        # the last step needs no checkpoint to be resumed from: the run finishes (saves and evaluates) now
        if _agreed(_watch.signal_at is not None, args.device) and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            _watch.stopped_at_step = state.global_step
            logger.warning("end-of-job signal: saving checkpoint-%d and stopping", state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if _watch.stopped_at_step is None:
            return
        # every rank has written its part of the checkpoint (optimizer shards, RNG state) before any rank
        # goes on to requeue the job, which kills all of them
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        raise Preempted(_watch.stopped_at_step)
