"""Before a run touches its output_dir: is it resuming a checkpoint written with the same model, data and
adapter? Does the dir hold a finished run, or checkpoints a fresh start would overwrite? (Which checkpoint a
run resumes from, and which ones are complete, is dsft.checkpoint's.)

Everything here runs before any heavy work and raises ``ConfigError`` (exit code 2, one line) when the run
would mix two runs or overwrite saved work; ``--force`` / ``--overwrite`` are the explicit ways past it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path

from dsft.checkpoint import (COMPLETE_MARKER, PARTIAL_DIR, checkpoint_step, is_complete, list_checkpoints,
                             set_aside_incomplete)
from dsft.config import RESOLVED_CONFIG_NAME, RunConfig, from_dict, read_yaml, resolved_dict
from dsft.data_formats import CHAT_DEFAULTS
from dsft.errors import ConfigError
from dsft.fsutil import atomic_write_text

logger = logging.getLogger("dsft")

DONE_MARKER = "dsft_done.json"
# Sections that must match for a resume to continue the same run. train.* (batch size, accumulation, steps,
# DeepSpeed settings, ...) may legitimately change, e.g. when the world size changes.
RESUME_SECTIONS = ("model", "data", "peft")
# where the tokenized cache lives, and how many processes tokenize it, do not change the data
RESUME_IGNORED = ("data.cache_dir", "data.num_proc")
# what a finished run leaves that --overwrite removes before training again
_RUN_MARKERS = (DONE_MARKER, "dsft_nonfinite.json")


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    return {prefix: value}


def config_diff(saved: dict, current: dict, sections=RESUME_SECTIONS, ignored=RESUME_IGNORED) -> list[str]:
    """``key: old -> new`` for every leaf of ``sections`` that differs."""
    old = {k: v for k, v in _flatten({s: saved.get(s) for s in sections}).items() if k not in ignored}
    new = {k: v for k, v in _flatten({s: current.get(s) for s in sections}).items() if k not in ignored}
    lines = []
    for key in sorted(set(old) | set(new), key=lambda k: (k.split(".")[0] not in sections, k)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


def effective_data(config: dict) -> dict:
    """``config`` with every chat key left to its format's default filled in (data section and each source
    mapping). messages_field / role_key / content_key changed their default from "messages"/"role"/"content" to
    "this format's default" (null) when sharegpt arrived: a checkpoint saved with ``messages_field: messages``
    reads the same rows as today's null under format messages, so compare what each config resolves to."""
    data = config.get("data")
    if not isinstance(data, dict):
        return config
    out = copy.deepcopy(config)
    data = out["data"]

    # as dsft.data_formats.resolve_format: the source's own key, else the section's, else its format's default
    section = {k: data.get(k) for k in CHAT_DEFAULTS["messages"]}

    def fill(entry: dict, fmt, inherit: dict) -> None:
        defaults = CHAT_DEFAULTS.get(fmt, CHAT_DEFAULTS["messages"])
        for key, value in defaults.items():
            if entry.get(key) is None:
                entry[key] = inherit.get(key) if inherit.get(key) is not None else value

    fill(data, data.get("format"), {})
    for key in ("train", "eval"):
        entries = data.get(key) if isinstance(data.get(key), list) else [data.get(key)]
        for entry in entries:
            if isinstance(entry, dict):
                fill(entry, entry.get("format") or data.get("format"), section)
    return out


def saved_config(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> tuple[dict | None, Path | None]:
    """The resolved config that wrote a checkpoint: its own copy, else its run's (same output_dir)."""
    checkpoint = Path(checkpoint)
    candidates = [checkpoint / RESOLVED_CONFIG_NAME]
    if checkpoint.resolve().parent == Path(output_dir).resolve():
        candidates.append(Path(output_dir) / RESOLVED_CONFIG_NAME)
    for path in candidates:
        if path.is_file():
            try:
                data = read_yaml(path)
            except ConfigError as e:
                logger.warning("cannot read the config that wrote %s: %s", checkpoint, e)
                return None, None
            return data, path
    return None, None


def check_resume_matches(cfg: RunConfig, resume: str, force: bool = False) -> None:
    """Refuse to resume a checkpoint written with a different model, data or adapter config (unless force),
    naming every key that changed."""
    saved, source = saved_config(resume, cfg.train["output_dir"])
    if saved is None:
        logger.warning("%s: no %s with it, so dsft cannot check that this run uses the same model and data",
                       resume, RESOLVED_CONFIG_NAME)
        return
    try:  # through the current dataclasses: a field added since the checkpoint was written shows its default
        saved = resolved_dict(from_dict(saved))
    except ConfigError:
        pass  # a key that no longer exists: compare as written
    changes = config_diff(effective_data(saved), effective_data(resolved_dict(cfg)))
    if not changes:
        return
    summary = "; ".join(changes)
    if force:
        logger.warning("resuming %s with a changed config (--force): %s", resume, summary)
        return
    raise ConfigError(f"train.resume_from_checkpoint: {resume} was written with a different config ({source}); "
                      f"changed: {summary}. Resuming would mix two runs; use another train.output_dir, or pass "
                      "--force to resume anyway")


def finished_run(output_dir: str | os.PathLike) -> dict | None:
    """The done record of a finished run in output_dir, or None."""
    path = Path(output_dir) / DONE_MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def check_output_dir(cfg: RunConfig, resume: str | None, overwrite: bool = False) -> None:
    """Unless ``overwrite``: a finished run is only ever continued (resumed with steps left to train), never
    trained over from scratch, and a fresh start never writes over an earlier run's checkpoints."""
    if overwrite:
        return
    out = cfg.train["output_dir"]
    done = finished_run(out)
    if done is not None:
        finished = f"{out} holds a finished run (completed{_at_step(done)}, {DONE_MARKER})"
        if resume is None:
            raise ConfigError(f"train.output_dir: {finished}; choose another output_dir, or pass --overwrite to "
                              "train there from scratch")
        step, max_steps = checkpoint_step(resume), cfg.train.get("max_steps", -1)
        if step is not None and isinstance(max_steps, int) and 0 < max_steps <= step:
            raise ConfigError(f"train.output_dir: {finished}; resuming {Path(resume).name} with train.max_steps="
                              f"{max_steps} leaves nothing to train: raise train.max_steps to continue it, or pass "
                              "--overwrite to start over")
    if resume is None:
        complete = [p.name for p in list_checkpoints(out) if is_complete(p)]
        if complete:
            raise ConfigError(f"train.output_dir: {out} already holds checkpoints ({', '.join(complete[-3:])}) of "
                              "an unfinished run; continue it with train.resume_from_checkpoint: auto, or pass "
                              "--overwrite to start over")


def _at_step(done: dict) -> str:
    return f" at step {done['global_step']}" if "global_step" in done else ""


def clear_for_overwrite(output_dir: str | os.PathLike) -> list[Path]:
    """--overwrite: remove the previous run's checkpoints and markers so nothing of it can be resumed or
    mistaken for this run's. Everything else is overwritten by the new run as it goes."""
    out = Path(output_dir)
    removed = []
    for path in list_checkpoints(out) + [out / PARTIAL_DIR]:
        if path.is_dir():
            (path / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(path)
            removed.append(path)
    for name in _RUN_MARKERS:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(out / name)
    return removed


def prepare_output_dir(output_dir: str | os.PathLike, resume: str | None, overwrite: bool) -> None:
    """On the main process, right before training: apply --overwrite, and move incomplete checkpoints
    out of the way so the Trainer never writes into or rotates against one. A finished run being continued
    loses its done marker until it finishes again (a crash meanwhile leaves it resumable, not "finished")."""
    if overwrite:
        for path in clear_for_overwrite(output_dir):
            logger.warning("--overwrite: removed %s", path)
        return
    done = finished_run(output_dir)
    if done is not None:
        logger.info("continuing the finished run in %s (completed%s)", output_dir, _at_step(done))
        (Path(output_dir) / DONE_MARKER).unlink()
    for path in set_aside_incomplete(output_dir, keep=resume):
        logger.warning("moved the incomplete checkpoint to %s (it was being written when a run stopped)", path)


def mark_finished(output_dir: str | os.PathLike, info: dict) -> Path:
    """Record that the run in output_dir finished (final model saved); later runs refuse to train over it."""
    record = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    return atomic_write_text(Path(output_dir) / DONE_MARKER, json.dumps(record, indent=1, default=str))
