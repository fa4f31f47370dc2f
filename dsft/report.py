"""Summaries of a run from its own log (``dsft_log.jsonl``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dsft.callbacks import LOG_FILE_NAME
from dsft.errors import DsftError


def read_log(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / LOG_FILE_NAME
    if not path.is_file():
        raise DsftError(f"{output_dir}: no {LOG_FILE_NAME}; is this a dsft output dir?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summary(output_dir: str | os.PathLike) -> dict:
    logs = read_log(output_dir)
    train = [r for r in logs if "loss" in r]
    evals = [r for r in logs if "eval_loss" in r]
    final = next((r for r in reversed(logs) if "train_runtime" in r and "train_loss" in r), {})
    speeds = [r["tokens_per_second_per_device"] for r in train if "tokens_per_second_per_device" in r]
    out = {
        "steps": train[-1]["step"] if train else 0,
        "first_loss": train[0]["loss"] if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "first_eval_loss": evals[0]["eval_loss"] if evals else None,
        "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_per_second_per_device": sum(speeds) / len(speeds) if speeds else None,
        "peak_memory_gb": max((r.get("peak_memory_gb", 0) for r in train), default=None),
        "train_runtime_s": final.get("train_runtime"),
    }
    return out


def format_summary(output_dir: str | os.PathLike) -> str:
    s = summary(output_dir)
    lines = [f"run: {output_dir}", f"steps: {s['steps']}"]
    if s["first_loss"] is not None:
        lines.append(f"train loss: {s['first_loss']:.4f} (first log) -> {s['last_loss']:.4f} (last log)")
    if s["first_eval_loss"] is not None:
        lines.append(f"eval loss: {s['first_eval_loss']:.4f} (first eval) -> {s['last_eval_loss']:.4f} (last eval)")
    if s["tokens_per_second_per_device"] is not None:
        lines.append(f"tokens/s per device (non-pad, mean of logs): {s['tokens_per_second_per_device']:.1f}")
    if s["peak_memory_gb"] is not None:
        lines.append(f"peak memory: {s['peak_memory_gb']:.2f} GB")
    if s["train_runtime_s"] is not None:
        lines.append(f"train time: {s['train_runtime_s']:.1f} s")
    return "\n".join(lines)
