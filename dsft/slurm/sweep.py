"""``dsft sweep``: a grid or random search over config values, as ONE Slurm job array (one element per point,
at most ``slurm.array_parallelism`` running at once), and its results table (final eval loss per point, best
first) as markdown and CSV. With named eval sources (no eval_loss, one eval_<name>_loss each) a point's eval loss
is the mean of theirs; the eval_metric column says which.

Layout (``<base>`` is the config's ``train.output_dir``)::

    <base>/point-000/ ...              each point's own output_dir (checkpoints, logs, final model)
    <base>/slurm/                      submitted configs, submitit's folders and per-rank logs
    <base>/dsft_sweep.json             the points, their values and job ids (what `dsft status` reads)
    <base>/sweep_results.md / .csv     the table, written when the sweep ends (and by `dsft status`)
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from dsft.errors import ConfigError, DsftError
from dsft.slurm.submit import (Submitted, effective_config, job_dir_of, job_state, last_logged, make_executor,
                               require_slurm, sbatch_refused, wait, write_job_info, write_submitted_config)

SWEEP_INFO_NAME = "dsft_sweep.json"
RESULTS_NAME = "sweep_results"


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key or not value or any(not part for part in key.split(".")):
        raise ConfigError(f"{flag} {item!r}: expected section.key=VALUES, e.g. {flag} train.learning_rate=1e-5,3e-5")
    if key == "train.output_dir":
        raise ConfigError(f"{flag} {item!r}: each point gets its own output_dir under train.output_dir")
    return key, value


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``key=v1,v2,...`` -> {key: [v1, v2, ...]} (values stay YAML text, parsed like --set values)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, value = _key_value(item, "--grid")
        values = [v.strip() for v in value.split(",")]
        if any(not v for v in values):
            raise ConfigError(f"--grid {item!r}: an empty value between commas")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; list all its values in one --grid")
        grid[key] = values
    return grid


def parse_ranges(items: list[str]) -> dict[str, tuple[float, float, bool]]:
    """``key=LOW:HIGH`` (uniform) or ``key=LOW:HIGH:log`` (log-uniform) -> {key: (low, high, log)}."""
    ranges = {}
    for item in items:
        key, value = _key_value(item, "--range")
        parts = value.split(":")
        log = len(parts) == 3 and parts[2] == "log"
        try:
            if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
                raise ValueError
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise ConfigError(f"--range {item!r}: expected key=LOW:HIGH or key=LOW:HIGH:log") from None
        if not low < high or (log and low <= 0):
            raise ConfigError(f"--range {item!r}: need LOW < HIGH (and LOW > 0 for :log)")
        ranges[key] = (low, high, log)
    return ranges


def points(grid: dict[str, list[str]], ranges: dict[str, tuple[float, float, bool]], random_n: int | None,
           seed: int = 0) -> list[dict[str, str]]:
    """Every combination of the grid; or, with ``random_n``, that many draws (grid values chosen uniformly,
    ranges sampled uniformly or log-uniformly, 4 significant digits), reproducible with ``seed``."""
    if random_n is None:
        if ranges:
            raise ConfigError("--range needs --random N (a grid takes lists: --grid key=v1,v2)")
        if not grid:
            raise ConfigError("dsft sweep: give at least one --grid key=v1,v2 (or --random N with --range)")
        keys = list(grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    if random_n < 1:
        raise ConfigError(f"--random {random_n}: must be at least 1")
    if not grid and not ranges:
        raise ConfigError("--random N needs --range key=LOW:HIGH[:log] or --grid key=v1,v2 to draw from")
    rng = random.Random(seed)
    out = []
    for _ in range(random_n):
        point = {k: rng.choice(v) for k, v in grid.items()}
        for key, (low, high, log) in ranges.items():
            x = math.exp(rng.uniform(math.log(low), math.log(high))) if log else rng.uniform(low, high)
            point[key] = f"{x:.4g}"
        out.append(point)
    return out


def submit_sweep(config: str, overrides: list[str], slurm_flags: dict[str, Any], grid: list[str],
                 ranges: list[str], random_n: int | None, seed: int = 0) -> dict:
    """Check every point's config, then submit them all as one job array. Returns the sweep info."""
    require_slurm("dsft sweep")
    todo = points(parse_grid(grid), parse_ranges(ranges), random_n, seed)
    _, base_cfg = effective_config(config, overrides, slurm_flags)
    base = Path(base_cfg.train["output_dir"]).absolute()
    job_dir = job_dir_of(base_cfg)
    prepared = []
    for i, point in enumerate(todo):  # all points are checked before anything is submitted
        out = base / f"point-{i:03d}"
        sets = [*overrides, *(f"{k}={v}" for k, v in point.items()), f"train.output_dir={out}"]
        raw, cfg = effective_config(config, sets, slurm_flags)
        if not (cfg.data.eval or cfg.data.eval_fraction):
            raise ConfigError("dsft sweep ranks points by eval loss: set data.eval or data.eval_fraction")
        prepared.append((i, point, out, raw, cfg))
    # deferred: submitit (the optional `slurm` extra) and transformers (see dsft.slurm.submit.submit)
    from dsft.slurm.job import SlurmTraining
    from submitit.core.utils import FailedJobError

    executor = make_executor(base_cfg, job_dir / "%j")
    try:
        with executor.batch():
            jobs = [executor.submit(SlurmTraining(str(write_submitted_config(raw, job_dir, f"point-{i:03d}.yaml")),
                                                  cfg.slurm.max_requeues))
                    for i, _, _, raw, cfg in prepared]
    except FailedJobError as e:
        raise sbatch_refused(e) from None
    info = {"array_job_id": jobs[0].job_id.split("_")[0], "submitted_at": time.time(),
            "parameters": list(todo[0]), "points": []}
    for job, (i, point, out, _, cfg) in zip(jobs, prepared):
        folder = Path(job.paths.folder)
        write_job_info(folder, {"job_id": job.job_id, "config": str(job_dir / f"point-{i:03d}.yaml"),
                                "output_dir": str(out), "nodes": cfg.slurm.nodes, "tasks": job.num_tasks,
                                "submitted_at": info["submitted_at"]})
        info["points"].append({"index": i, "params": point, "output_dir": str(out), "job_id": job.job_id,
                               "folder": str(folder)})
    (base / SWEEP_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    info["jobs"] = jobs
    return info


def read_sweep_info(path: str | Path) -> dict:
    p = Path(path) / SWEEP_INFO_NAME
    if not p.is_file():
        raise DsftError(f"{path}: not a sweep directory (no {SWEEP_INFO_NAME})")
    return json.loads(p.read_text(encoding="utf-8"))


def collect(info: dict) -> list[dict]:
    """One row per point: its values, final (latest) eval loss, last step, Slurm state; best eval loss first,
    points without an eval loss last."""
    rows = []
    for p in info["points"]:
        logged = last_logged(p["output_dir"])
        rows.append({"point": p["index"], **p["params"], "eval_loss": logged.get("eval_loss"),
                     "eval_metric": logged.get("eval_metric"),  # eval_loss, or the mean of the named sources'
                     "step": logged.get("step"), "state": job_state(p["job_id"]), "job_id": p["job_id"],
                     "output_dir": p["output_dir"]})
    return sorted(rows, key=lambda r: (r["eval_loss"] is None, r["eval_loss"] or 0.0, r["point"]))


def write_results(base: str | Path, rows: list[dict]) -> tuple[Path, Path]:
    base = Path(base)
    columns = list(rows[0]) if rows else []
    md = ["| rank | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for rank, row in enumerate(rows, start=1):
        cells = [f"{v:.4f}" if isinstance(v, float) and k == "eval_loss" else ("-" if v is None else str(v))
                 for k, v in row.items()]
        md.append(f"| {rank} | " + " | ".join(cells) + " |")
    md_path, csv_path = base / f"{RESULTS_NAME}.md", base / f"{RESULTS_NAME}.csv"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", *columns])
        writer.writeheader()
        for rank, row in enumerate(rows, start=1):
            writer.writerow({"rank": rank, **{k: "" if v is None else v for k, v in row.items()}})
    return md_path, csv_path


def wait_sweep(info: dict) -> bool:
    """Block until every point's job has ended; True if all of them succeeded."""
    ok = True
    for job in info["jobs"]:
        ok = wait(Submitted(job, Path(job.paths.folder), {}))[0] and ok
    return ok
