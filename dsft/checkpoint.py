"""Checkpoint bookkeeping, in one place: which checkpoints are complete (a marker written after every rank
finished), listing them, choosing the one a run resumes from (train.resume_from_checkpoint), setting aside
partial ones, rotation over complete ones; and ZeRO checkpoints → plain HF model directories (DeepSpeed's
zero_to_fp32 does the gathering) or DeepSpeed's universal format.

Light on purpose (torch, transformers and DeepSpeed are imported inside the functions that convert): commands
that only look at checkpoints stay fast. The Trainer callback that calls ``finish_saved_checkpoint`` is
``dsft.guards.CompleteCheckpointCallback`` (a TrainerCallback subclass needs transformers at import).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dsft.config import RESOLVED_CONFIG_NAME, RunConfig
from dsft.errors import ConfigError, DsftError
from dsft.fsutil import atomic_write_text, fsync_path

logger = logging.getLogger("dsft")


def consolidate(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Gather a ZeRO (stage 1-3) checkpoint's partitioned fp32 weights into an HF model dir (safetensors)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not checkpoint_dir.is_dir():
        raise DsftError(f"{checkpoint_dir}: no such checkpoint directory")
    if (checkpoint_dir / "adapter_config.json").is_file():
        raise DsftError(f"{checkpoint_dir}: a LoRA checkpoint; its adapter_model.safetensors is already complete "
                        "(use dsft merge to fold it into the base)")
    if not (checkpoint_dir / "latest").is_file() and not list(checkpoint_dir.glob("global_step*")):
        raise DsftError(f"{checkpoint_dir}: not a DeepSpeed ZeRO checkpoint (no 'latest' file or global_step* dir)")
    if not (checkpoint_dir / "config.json").is_file():
        raise DsftError(f"{checkpoint_dir}: no config.json to rebuild the model from")
    from dsft.export import check_output_dir, write_model_dir  # deferred: dsft.export imports torch

    check_output_dir(out_dir, overwrite)

    # deferred: torch, DeepSpeed and transformers only for the conversion itself
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    config = AutoConfig.from_pretrained(str(checkpoint_dir))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise DsftError(f"{checkpoint_dir}: checkpoint does not match its config.json "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    tokenizer = None
    if (checkpoint_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    write_model_dir(model, tokenizer, out_dir)
    return out_dir


def checkpoint_tag(checkpoint_dir: Path) -> str | None:
    """The DeepSpeed tag (global_stepN) a checkpoint dir holds: from its 'latest' file, else the newest."""
    latest = checkpoint_dir / "latest"
    if latest.is_file():
        return latest.read_text().strip()
    steps = sorted(checkpoint_dir.glob("global_step*"), key=lambda p: p.stat().st_mtime)
    return steps[-1].name if steps else None


def saved_world_size(checkpoint_dir: str | os.PathLike) -> int | None:
    """How many data-parallel ranks wrote a ZeRO (stage 1-3) checkpoint: one optimizer partition per rank.
    None for checkpoints without partitions (no DeepSpeed, or ZeRO-0)."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = checkpoint_tag(checkpoint_dir)
    if tag is None:
        return None
    count = len(list((checkpoint_dir / tag).glob("*zero_pp_rank_*_optim_states.pt")))
    return count or None


def to_universal(checkpoint_dir: str | os.PathLike, is_main: bool, timeout_s: float = 1800) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (ds_to_universal), once: the main process
    converts, the others wait for the ``latest_universal`` file DeepSpeed writes last."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = checkpoint_tag(checkpoint_dir)
    marker = checkpoint_dir / "latest_universal"
    out = checkpoint_dir / f"{tag}_universal"
    if is_main and not marker.is_file():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(checkpoint_dir / tag), "--output_folder", str(out), "--num_extract_workers", "1",
               "--num_merge_workers", "1",
               # the HF Trainer does not record universal_checkpoint_info; DeepSpeed injects the default
               "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not marker.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DsftError(f"{checkpoint_dir}: conversion to a universal checkpoint failed: {' | '.join(tail)}")
    deadline = time.monotonic() + timeout_s
    while not marker.is_file():
        if time.monotonic() > deadline:
            raise DsftError(f"{checkpoint_dir}: timed out waiting for the universal checkpoint conversion")
        time.sleep(1)
    return out


# --------------------------------------------------------------------------------------------------
# completeness: a checkpoint counts only once every rank has written it and it is marked complete

COMPLETE_MARKER = "dsft_complete.json"
PARTIAL_DIR = "dsft_partial"  # where checkpoints found incomplete are moved (not matched by checkpoint-*)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for a ``checkpoint-N`` directory name, else None."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint-N dirs of an output dir, oldest step first (complete or not)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def mark_complete(checkpoint_dir: str | os.PathLike, info: dict | None = None) -> Path:
    """Flush every file of a fully written checkpoint to disk, then record it complete (atomically) with
    a manifest of its files and sizes. Call only after all ranks have finished writing it."""
    checkpoint_dir = Path(checkpoint_dir)
    files = {}
    for p in sorted(checkpoint_dir.rglob("*")):
        if p.is_file() and p.name != COMPLETE_MARKER:
            fsync_path(p)
            files[str(p.relative_to(checkpoint_dir))] = p.stat().st_size
    for d in {p.parent for p in checkpoint_dir.rglob("*")} | {checkpoint_dir}:
        fsync_path(d)
    record = {"step": checkpoint_step(checkpoint_dir), "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **(info or {}), "files": files}
    return atomic_write_text(checkpoint_dir / COMPLETE_MARKER, json.dumps(record, indent=1))


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    """True if the checkpoint carries a valid completeness marker and every file it lists is still there
    with its recorded size (a later partial copy or deletion makes it incomplete again)."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        record = json.loads((checkpoint_dir / COMPLETE_MARKER).read_text(encoding="utf-8"))
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for rel, size in files.items():
        try:
            if (checkpoint_dir / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """(the newest complete checkpoint or None, the incomplete checkpoint dirs newer than it)."""
    skipped: list[Path] = []
    for path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path, skipped
        skipped.append(path)
    return None, skipped


def set_aside_incomplete(output_dir: str | os.PathLike, keep: str | os.PathLike | None = None) -> list[Path]:
    """Move every incomplete checkpoint-N dir (except ``keep``) to output_dir/dsft_partial/, so neither a
    resume nor the Trainer's writes and rotation ever mistake it for a real checkpoint. Not deleted: a
    person may want to look at it. Returns the new locations."""
    keep_path = Path(keep).resolve() if keep else None
    moved = []
    for path in list_checkpoints(output_dir):
        if is_complete(path) or (keep_path is not None and path.resolve() == keep_path):
            continue
        target_dir = Path(output_dir) / PARTIAL_DIR
        target_dir.mkdir(exist_ok=True)
        target = target_dir / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.replace(path, target)
        moved.append(target)
    return moved


def rotate_complete(output_dir: str | os.PathLike, limit: int | None, protect: tuple = ()) -> list[Path]:
    """``save_total_limit`` counted over COMPLETE checkpoints only: keep the newest ``limit`` of them plus
    ``protect`` (e.g. the best checkpoint); delete older complete ones. Incomplete dirs are never counted
    and never make a complete one go."""
    if not limit or limit <= 0:
        return []
    complete = [p for p in list_checkpoints(output_dir) if is_complete(p)]
    protected = {Path(p).resolve() for p in protect if p}
    keep = set(complete[-limit:])
    deleted = []
    for path in complete:
        if path in keep or path.resolve() in protected:
            continue
        (path / COMPLETE_MARKER).unlink()  # first, so a half-deleted dir is never taken for a complete one
        shutil.rmtree(path)
        deleted.append(path)
    return deleted


def finish_saved_checkpoint(output_dir: str | os.PathLike, global_step: int, info: dict,
                            save_total_limit: int | None, best: str | None = None) -> Path | None:
    """On the saving process, once every rank has written ``checkpoint-<global_step>``: copy the resolved config
    into it (a resume from it compares against the config that wrote it), mark it complete, then apply
    ``save_total_limit`` over complete checkpoints (keeping ``best`` and this one). None if there is no such dir."""
    checkpoint = Path(output_dir) / f"checkpoint-{global_step}"
    if not checkpoint.is_dir():
        return None
    resolved = Path(output_dir) / RESOLVED_CONFIG_NAME
    if resolved.is_file():
        shutil.copyfile(resolved, checkpoint / RESOLVED_CONFIG_NAME)
    mark_complete(checkpoint, info)
    for path in rotate_complete(output_dir, save_total_limit, protect=(best, str(checkpoint))):
        logger.info("deleted %s (save_total_limit=%s)", path, save_total_limit)
    return checkpoint


# --------------------------------------------------------------------------------------------------
# choice of the resume point


def pick_complete_checkpoint(output_dir: str | os.PathLike, required: bool) -> str | None:
    """The newest complete checkpoint in output_dir (train.resume_from_checkpoint last/auto), warning about
    every newer incomplete one it skips; None if there is none and ``required`` is false."""
    last, skipped = latest_complete_checkpoint(output_dir)
    for path in skipped:
        logger.warning("skipping %s: it is incomplete (no valid %s; the run stopped while writing it)",
                       path, COMPLETE_MARKER)
    if last is None and required:
        found = f" (only incomplete ones: {', '.join(p.name for p in skipped)})" if skipped else ""
        raise ConfigError(f"train.resume_from_checkpoint: no complete checkpoint-* directory in {output_dir}{found}")
    return str(last) if last else None


def check_explicit_checkpoint(path: str | os.PathLike) -> None:
    """A checkpoint named by path: refuse one that was visibly cut short; warn about one without a marker
    (written by another tool or an older dsft)."""
    path = Path(path)
    if is_complete(path):
        return
    if (path / COMPLETE_MARKER).is_file():
        raise ConfigError(f"train.resume_from_checkpoint: {path} is damaged: files listed in its {COMPLETE_MARKER} "
                          "are missing or have changed size")
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"train.resume_from_checkpoint: {path} is incomplete (no {COMPLETE_MARKER} and no "
                          "trainer_state.json: the run stopped while writing it); resume from an earlier checkpoint")
    logger.warning("%s has no %s (not written by this dsft); resuming from it anyway", path, COMPLETE_MARKER)


def resolve_resume(cfg: RunConfig) -> str | None:
    """The checkpoint dir train.resume_from_checkpoint names, or None (fresh start).

    ``true``/``last``: the newest COMPLETE checkpoint in output_dir (an error if there is none). ``auto``: the
    newest complete one if there is any, else a fresh start: what a requeued job (Slurm) or a restarted launcher
    wants. Newer incomplete checkpoints (a run stopped while writing them) are skipped with a warning.
    """
    value = cfg.train.get("resume_from_checkpoint")
    if value in (None, False, "") or str(value).lower() in ("false", "no", "none"):
        return None
    mode = "last" if value is True else str(value).lower()
    if mode in ("last", "true", "auto"):
        return pick_complete_checkpoint(cfg.train["output_dir"], required=mode != "auto")
    if not Path(value).is_dir():
        raise ConfigError(f"train.resume_from_checkpoint: {value} is not a directory")
    check_explicit_checkpoint(value)
    return str(value)
