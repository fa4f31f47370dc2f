"""Trainer callbacks that protect a run's saved work.

``CompleteCheckpointCallback`` marks a checkpoint complete once every rank has written it (and applies
``save_total_limit`` over complete checkpoints only). ``NonFiniteGuard`` stops a run whose loss or gradient
norm stays NaN/inf, without saving the broken weights, and leaves diagnostics behind.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from pathlib import Path

import torch
from transformers import TrainerCallback

from dsft.checkpoint import finish_saved_checkpoint, latest_complete_checkpoint
from dsft.errors import DsftError
from dsft.fsutil import atomic_write_text

logger = logging.getLogger("dsft")

NONFINITE_REPORT_NAME = "dsft_nonfinite.json"


class NonFiniteError(DsftError):
    """The run diverged (NaN/inf loss or gradient norm); exit code 3 tells it apart from bad input."""

    exit_code = 3


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


class CompleteCheckpointCallback(TrainerCallback):
    """After the Trainer has written ``checkpoint-N`` (``on_save`` runs on every rank once its
    ``_save_checkpoint`` returned), wait for all ranks, then the saving process copies the resolved config
    into the checkpoint and writes ``dsft_complete.json`` atomically (files fsynced first): the bookkeeping is
    ``dsft.checkpoint.finish_saved_checkpoint``; this class only ties it to the Trainer's events.

    ``save_total_limit`` is applied here instead of by the Trainer (dsft takes it out of TrainingArguments):
    the Trainer rotates before this marker exists, so with a limit of 1 a crash right after its rotation
    would leave no complete checkpoint at all. Here only complete checkpoints count, and the best one is kept.
    """

    def __init__(self, save_total_limit: int | None = None) -> None:
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank's shards, RNG states and trainer state are on disk
        if args.should_save:
            finish_saved_checkpoint(args.output_dir, state.global_step,
                                    {"world_size": args.world_size, "epoch": state.epoch},
                                    self.save_total_limit, best=state.best_model_checkpoint)


def _finite(value) -> bool:
    return value is None or math.isfinite(float(value))


class NonFiniteGuard(TrainerCallback):
    """Stop after ``max_steps`` consecutive optimizer steps whose training loss (on any rank) or gradient
    norm is NaN/inf.

    The Trainer logs only every ``logging_steps`` and by default hides non-finite losses
    (``logging_nan_inf_filter``), so the guard measures each step itself: a forward hook on the model records
    every training micro-batch's loss, and ``on_pre_optimizer_step`` reads the gradient norm the step uses
    (DeepSpeed's global norm; otherwise the norm of the clipped gradients, which stay NaN when the norm was).
    One small all-reduce per step makes every rank take the same decision. A checkpoint is never written for
    a non-finite step; when the limit is reached, training stops, ``dsft_nonfinite.json`` records the recent
    steps and logs, and ``run`` raises ``NonFiniteError``.
    """

    def __init__(self, max_steps: int, history: int = 50) -> None:
        self.max_steps = max_steps
        self.records: deque[dict] = deque(maxlen=history)
        self.streak = 0
        self.first_bad_step: int | None = None
        self.tripped: str | None = None  # the error message once the guard stopped the run
        self.accelerator = None  # set by build_trainer: DeepSpeed's gradient norm is read through it
        self._losses: list[torch.Tensor] = []
        self._grad_norm: float | None = None
        self._hook = None

    # measurements ------------------------------------------------------------------------------

    def _record_loss(self, module, inputs, output) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else output[0] if isinstance(output, tuple) else None
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach().float().reshape(-1)[:1])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._record_loss)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.streak:
            control.should_save = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16:  # the loss scaler owns gradient overflow: it skips such steps and lowers the scale
            self._grad_norm = None
            return
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is not None:  # DeepSpeed has already stepped; its global norm is what the Trainer logs
            self._grad_norm = wrapped.get_global_grad_norm()
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        self._grad_norm = torch.nn.utils.get_total_norm(grads).item() if grads else None

    # decision ----------------------------------------------------------------------------------

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        losses = torch.cat(self._losses).cpu() if self._losses else torch.zeros(0)
        self._losses = []
        world, rank = max(args.world_size, 1), max(args.process_index, 0)
        flags = torch.zeros(world, 2, device=args.device)
        flags[rank, 0] = float(not bool(torch.isfinite(losses).all()))
        flags[rank, 1] = float(not _finite(self._grad_norm))
        if _distributed():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        flags = flags.cpu()
        loss_ranks = [r for r in range(world) if flags[r, 0] > 0]
        grad_bad = bool(flags[:, 1].max() > 0)
        lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else None
        self.records.append({"step": state.global_step, "loss": losses.tolist(), "grad_norm": self._grad_norm,
                             "learning_rate": lr, "nonfinite_loss_ranks": loss_ranks, "nonfinite_grad_norm": grad_bad})
        if not loss_ranks and not grad_bad:
            self.streak, self.first_bad_step = 0, None
            return
        self.streak += 1
        self.first_bad_step = self.first_bad_step or state.global_step
        what = " and ".join(([f"loss on rank{'s' if len(loss_ranks) > 1 else ''} "
                              f"{', '.join(map(str, loss_ranks))}"] if loss_ranks else [])
                            + ([f"gradient norm ({self._grad_norm})"] if grad_bad else []))
        # never persist weights from a non-finite step: the last good checkpoint stays the newest one
        control.should_save = False
        if self.streak < self.max_steps:
            logger.warning("step %d: non-finite %s (%d of %d allowed in a row); no checkpoint for this step",
                           state.global_step, what, self.streak, self.max_steps)
            return
        control.should_training_stop = True
        control.should_evaluate = False
        out = Path(args.output_dir)
        last, _ = latest_complete_checkpoint(out)
        report = out / NONFINITE_REPORT_NAME
        self.tripped = (
            f"training stopped at step {state.global_step}: non-finite {what} for {self.streak} consecutive steps "
            f"(since step {self.first_bad_step}; guard.max_nonfinite_steps={self.max_steps}); no checkpoint was "
            f"written for those steps, the last complete one is {last.name if last else 'none'}; "
            f"diagnostics in {report}"
        )
        if state.is_world_process_zero:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(report, json.dumps({
                "stopped_at_step": state.global_step, "first_nonfinite_step": self.first_bad_step,
                "consecutive_nonfinite_steps": self.streak, "max_nonfinite_steps": self.max_steps,
                "last_complete_checkpoint": str(last) if last else None, "message": self.tripped,
                "recent_steps": list(self.records), "recent_logs": state.log_history[-20:],
            }, indent=1, default=str))

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.streak:
            control.should_save = False
