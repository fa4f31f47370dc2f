"""A full (or failing) disk under a run's output_dir: a warning before a checkpoint that may not fit, and one clear
error instead of a library traceback when a save fails.

A checkpoint save that runs out of space (ENOSPC), quota (EDQUOT) or hits an I/O error reaches ``dsft.train.run``
as whatever the writing library raises: an OSError from ``open``/``json.dump``, safetensors' ``SafetensorError``
("IoError(Os { code: 28, ...})") or torch.save's ``RuntimeError`` ("file write failed") -- the last two carry no
errno. :func:`save_failure` turns those into :class:`CheckpointSaveError` (exit code 2, one ``dsft: error:`` line)
naming the checkpoint, the free space and the last complete checkpoint. The half-written checkpoint is left as it
is: it has no completeness marker, so a resume sets it aside (``dsft.checkpoint.set_aside_incomplete``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import traceback
from pathlib import Path

from transformers import TrainerCallback

from dsft.checkpoint import COMPLETE_MARKER, latest_complete_checkpoint
from dsft.errors import DsftError

logger = logging.getLogger("dsft")

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}
# how the errno-less errors of safetensors (Rust io::Error) and torch.save (PytorchStreamWriter) read
_WRITE_FAILURE_TEXT = re.compile(r"No space left|Disk quota|Input/output error|File too large|StorageFull|"
                                 r"QuotaExceeded|Os \{ code: (28|122|5|27)\b|file write failed|unexpected pos", re.I)
# frames of a checkpoint save in the Trainer (and dsft's marker-writing callback)
_SAVE_FRAMES = {"_save_checkpoint", "on_save", "_save", "save_model", "_save_optimizer_and_scheduler",
                "_save_rng_state", "save_checkpoint"}


class CheckpointSaveError(DsftError):
    """A checkpoint (or the final model) could not be written: disk full, quota or I/O error."""


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def free_bytes(path: str | Path) -> int | None:
    """Free bytes for an unprivileged writer on the filesystem holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def checkpoint_bytes(checkpoint: Path) -> int:
    """Size of a complete checkpoint: from its marker's manifest (written by ``mark_complete``), else by walking."""
    try:
        return sum(json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())


def _is_write_failure(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:  # the error itself or anything it was raised from
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return True
        if not isinstance(exc, OSError) and _WRITE_FAILURE_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _in_save(exc: BaseException) -> bool:
    return any(frame.name in _SAVE_FRAMES for frame in traceback.extract_tb(exc.__traceback__))


def save_failure(exc: BaseException, output_dir: str | Path, step: int | None,
                 what: str | None = None) -> CheckpointSaveError | None:
    """The :class:`CheckpointSaveError` for ``exc`` if it is a failed write (no space, quota, I/O error) under
    ``output_dir``, else None. ``step``: the step being saved (names ``checkpoint-<step>``); ``what`` overrides."""
    out = Path(output_dir)
    if not _is_write_failure(exc):
        return _peer_save_failure(exc, out, step)
    if what is None:
        what = f"checkpoint {out / f'checkpoint-{step}'}" if step is not None and _in_save(exc) else f"a file in {out}"
    free = free_bytes(out)
    last, _ = latest_complete_checkpoint(out)
    # torch.save's own text ("unexpected pos 64 vs 0") says little: the error type names the writer at least
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    cause = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return CheckpointSaveError(
        f"could not write {what}: {cause[:160]}; {_mb(free) if free is not None else 'unknown'} free on "
        f"{out}; the last complete checkpoint is {last or 'none'} (a resume with resume_from_checkpoint: auto "
        "continues from it once there is room)")


# what a rank sees when a peer died in the middle of a collective (gloo / NCCL)
_PEER_LOST_TEXT = re.compile(r"Connection closed by peer|Connection reset by peer|remote worker crash|"
                             r"NCCL communicator was aborted|Broken pipe", re.I)


def _peer_save_failure(exc: BaseException, out: Path, step: int | None) -> CheckpointSaveError | None:
    """On a rank whose own part of checkpoint-<step> was written: the checkpoint barrier failed because a peer died.
    When the disk under output_dir has less room than the last complete checkpoint took, that peer's save is what
    failed (the peer's own line says so); this rank says the same instead of a collective's traceback."""
    if step is None or not _in_save(exc) or not _PEER_LOST_TEXT.search(str(exc)):
        return None
    last, _ = latest_complete_checkpoint(out)
    free = free_bytes(out)
    if last is None or free is None or free >= checkpoint_bytes(last):
        return None
    return CheckpointSaveError(
        f"rank {os.environ.get('RANK', '?')}: checkpoint {out / f'checkpoint-{step}'} was not written: another rank's "
        f"save failed while only {_mb(free)} is free on {out} (the last checkpoint took {_mb(checkpoint_bytes(last))}); "
        f"the last complete checkpoint is {last}")


class DiskSpaceCallback(TrainerCallback):
    """Before each checkpoint save, compares the free space under output_dir with the size of the newest complete
    checkpoint (the next one is about as large) and warns with the shortfall; records which step is being saved,
    so a failed save names its checkpoint (:func:`save_failure`)."""

    def __init__(self) -> None:
        self.saving_step: int | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.saving_step = None

    def _before_save(self, args, state, control) -> None:
        if not control.should_save:
            return
        self.saving_step = state.global_step
        if not args.should_save:  # the saving process checks; the filesystem is the same for the others or not
            return
        last, _ = latest_complete_checkpoint(args.output_dir)
        free = free_bytes(args.output_dir)
        if last is None or free is None:
            return
        need = checkpoint_bytes(last)
        if free < need:
            logger.warning("step %d: checkpoint-%d will need about %s (the size of %s) but only %s is free on %s: "
                           "short by %s; the save will likely fail", state.global_step, state.global_step, _mb(need),
                           last.name, _mb(free), args.output_dir, _mb(need - free))

    def on_step_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)
