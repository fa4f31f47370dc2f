"""Summaries of a run from its own log (``dsft_log.jsonl``): text, a PNG of its curves, a markdown page."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from pathlib import Path

from dsft.config import LOG_FILE_NAME
from dsft.errors import DsftError


def read_log(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / LOG_FILE_NAME
    if not path.is_file():
        raise DsftError(f"{output_dir}: no {LOG_FILE_NAME}; is this a dsft output dir?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# eval_loss (one eval set) or eval_<name>_loss (named data.eval sources: one per source, no eval_loss)
_EVAL_LOSS = re.compile(r"^eval_(?:(.+)_)?loss$")


def eval_losses(row: dict) -> dict[str, float]:
    """The eval losses of one log row by eval set: {"": eval_loss} or {name: eval_<name>_loss, ...}."""
    return {(m.group(1) or ""): v for k, v in row.items() if (m := _EVAL_LOSS.match(k)) and v is not None}


def summary(output_dir: str | os.PathLike) -> dict:
    logs = read_log(output_dir)
    train = [r for r in logs if "loss" in r]
    evals = [r for r in logs if "eval_loss" in r]
    per_source: dict[str, list[float]] = {}
    for r in logs:
        for name, value in eval_losses(r).items():
            if name:
                per_source.setdefault(name, []).append(value)
    final = next((r for r in reversed(logs) if "train_runtime" in r and "train_loss" in r), {})
    speeds = [r["tokens_per_second_per_device"] for r in train if "tokens_per_second_per_device" in r]
    out = {
        "steps": train[-1]["step"] if train else 0,
        "first_loss": train[0]["loss"] if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "first_eval_loss": evals[0]["eval_loss"] if evals else None,
        "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_per_second_per_device": sum(speeds) / len(speeds) if speeds else None,
        "mfu": _mean([r["mfu"] for r in train if "mfu" in r]),
        "peak_memory_gb": max((r.get("peak_memory_gb", 0) for r in train), default=None),
        "train_runtime_s": final.get("train_runtime"),
        # named eval sources: (first, last) eval loss of each
        "eval_losses_by_source": {name: (v[0], v[-1]) for name, v in sorted(per_source.items())},
    }
    return out


def format_summary(output_dir: str | os.PathLike) -> str:
    s = summary(output_dir)
    lines = [f"run: {output_dir}", f"steps: {s['steps']}"]
    if s["first_loss"] is not None:
        lines.append(f"train loss: {s['first_loss']:.4f} (first log) -> {s['last_loss']:.4f} (last log)")
    if s["first_eval_loss"] is not None:
        lines.append(f"eval loss: {s['first_eval_loss']:.4f} (first eval) -> {s['last_eval_loss']:.4f} (last eval)")
    for name, (first, last) in s["eval_losses_by_source"].items():
        lines.append(f"eval loss {name} (eval_{name}_loss): {first:.4f} (first eval) -> {last:.4f} (last eval)")
    if s["tokens_per_second_per_device"] is not None:
        lines.append(f"tokens/s per device (non-pad, mean of logs): {s['tokens_per_second_per_device']:.1f}")
    if s["mfu"] is not None:
        lines.append(f"MFU (mean of logs): {s['mfu']:.1%}")
    if s["peak_memory_gb"] is not None:
        lines.append(f"peak memory: {s['peak_memory_gb']:.2f} GB")
    if s["train_runtime_s"] is not None:
        lines.append(f"train time: {s['train_runtime_s']:.1f} s")
    return "\n".join(lines)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


REPORT_PNG = "dsft_report.png"
REPORT_MD = "dsft_report.md"
# (log key, panel title); a panel is drawn when the log has the key
CURVES = (("loss", "train loss"), ("learning_rate", "learning rate"), ("grad_norm", "gradient norm"),
          ("tokens_per_second_per_device", "tokens/s per device (non-pad)"), ("mfu", "MFU"),
          ("peak_memory_gb", "peak memory (GB)"),
          # preference tuning (method dpo / kto: TRL's log keys)
          ("rewards/chosen", "reward of chosen (beta x log-ratio)"),
          ("rewards/rejected", "reward of rejected (beta x log-ratio)"),
          ("rewards/margins", "reward margin (chosen - rejected)"), ("rewards/accuracies", "reward accuracy"),
          ("kl", "KL estimate (KTO)"))


def plot_curves(logs: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """One PNG with a panel per logged curve (eval loss drawn with the train loss), against the optimizer step."""
    # deferred: the optional `report` extra (~1 s). No pyplot: no global state, no GUI backend
    from matplotlib.figure import Figure
    panels = [(key, label) for key, label in CURVES if any(key in r for r in logs)]
    if not panels:
        raise DsftError("dsft report: the log has no training curves to plot")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    for n, (key, label) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, n + 1)
        points = [(r["step"], r[key]) for r in logs if key in r and not eval_losses(r)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None,
                label="train" if key == "loss" else None)
        if key == "loss":  # one eval curve per eval set (eval_loss, or each named source's eval_<name>_loss)
            names = sorted({name for r in logs for name in eval_losses(r)})
            for name in names:
                evals = [(r["step"], eval_losses(r)[name]) for r in logs if name in eval_losses(r)]
                ax.plot([p[0] for p in evals], [p[1] for p in evals], marker="o",
                        label=f"eval {name}" if name else "eval")
            ax.legend()
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def markdown_summary(output_dir: str | os.PathLike, png_name: str | None = REPORT_PNG) -> str:
    s = summary(output_dir)

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [("optimizer steps", s["steps"]),
            ("train loss (first -> last log)", f"{fmt(s['first_loss'], '.4f')} -> {fmt(s['last_loss'], '.4f')}"),
            ("eval loss (first -> last eval)", None if s["first_eval_loss"] is None else
             f"{fmt(s['first_eval_loss'], '.4f')} -> {fmt(s['last_eval_loss'], '.4f')}"),
            *((f"eval loss {name} (first -> last eval)", f"{first:.4f} -> {last:.4f}")
              for name, (first, last) in s["eval_losses_by_source"].items()),
            ("tokens/s per device (non-pad, mean of logs)", fmt(s["tokens_per_second_per_device"], ".1f")),
            ("MFU (mean of logs)", fmt(s["mfu"], ".1%")),
            ("peak memory (GB)", fmt(s["peak_memory_gb"], ".2f")),
            ("train time (s)", fmt(s["train_runtime_s"], ".1f"))]
    lines = [f"# dsft run: {Path(output_dir).name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    if png_name:
        lines += ["", f"![training curves]({png_name})"]
    return "\n".join(lines) + "\n"


def write_report(output_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """Write ``dsft_report.png`` (the curves) and ``dsft_report.md`` (summary + the image) to ``out``
    (default: the run's output dir). Returns the paths. Without matplotlib (``pip install 'dsft[report]'``)
    only the markdown is written."""
    logs = read_log(output_dir)
    target = Path(out) if out else Path(output_dir)
    written = []
    if importlib.util.find_spec("matplotlib") is not None:
        written.append(plot_curves(logs, target / REPORT_PNG, title=Path(output_dir).name))
    else:
        logging.getLogger(__name__).warning("matplotlib is not installed: no %s (pip install 'dsft[report]')",
                                            REPORT_PNG)
    md = target / REPORT_MD
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(markdown_summary(output_dir, written[0].name if written else None), encoding="utf-8")
    return [*written, md]
