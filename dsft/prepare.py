"""``dsft prepare CONFIG``: tokenize (and pack) a run's data once, into the cache ``dsft train`` then reads as is.

On a login node, or as a CPU-only Slurm job with one task (``--submit``, through submitit as ``dsft submit``), so
that the GPU job starts training at once instead of tokenizing while its nodes idle. The cache key is the one
``dsft train`` computes (data settings, the tokenizer as ``dsft train`` loads it, the files' size and mtime), so
a prepared config trains from the cache with "using the tokenized cache ... (no tokenization)" in its log; any
change to those makes ``dsft train`` prepare again, as it would without ``dsft prepare``.

Layering: above dsft.config / dsft.data / dsft.model and dsft.slurm.submit; nothing in dsft.slurm imports this
module (the job callable is pickled by reference to it).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from dsft.config import RunConfig, apply_override, from_dict, read_yaml, validate
from dsft.errors import ConfigError
from dsft.run import quiet_libraries, setup_logging
from dsft.slurm.resources import tasks_per_node, with_overrides
from dsft.slurm.submit import (Submitted, job_dir_of, make_executor, require_slurm, sbatch_refused, write_job_info,
                               write_submitted_config)

logger = logging.getLogger(__name__)


def _check_method(cfg: RunConfig) -> None:
    if cfg.method != "sft":
        raise ConfigError(f"method: {cfg.method} data is tokenized by TRL's trainer when training starts, not into "
                          "dsft's cache; dsft prepare is for method: sft")


def prepare(cfg: RunConfig):
    """Tokenize (and pack) ``cfg``'s data into its cache; a complete cache is only read. Returns PreparedData."""
    # deferred: dsft.data and dsft.model load torch (and datasets, transformers when called); the CLI imports this
    # module for every command
    from dsft.data import prepare_data
    from dsft.model import load_tokenizer

    _check_method(cfg)
    tokenizer = load_tokenizer(cfg.model)  # exactly as dsft train loads it: its fingerprint is in the cache key
    return prepare_data(cfg.data, tokenizer)


def summary(data, cfg: RunConfig) -> dict:
    """What was prepared, as JSON-able data: per split the totals, the packing fill rate and each source."""
    max_len = cfg.data.max_seq_len
    out: dict[str, Any] = {"cache_dir": str(data.cache_dir), "already_prepared": bool(data.from_cache),
                           "max_seq_len": max_len, "splits": {}}
    for split, st in data.stats.items():
        comp = data.composition.get(split, {})
        sources = comp.get("sources", [])
        # named eval sets are packed one by one: their packed rows are per source
        packed = st.packed_rows or sum(e.get("packed_rows", 0) for e in sources)
        row = dataclasses.asdict(st) | {"packed_rows": packed}
        if packed and max_len:
            # share of the packed rows' token slots holding a real token (the rest is padding)
            row["fill_rate"] = st.tokens / (packed * max_len)
        row["sources"] = sources
        out["splits"][split] = row
    return out


def format_summary(info: dict) -> str:
    max_seq_len = info["max_seq_len"]
    lines = [f"cache: {info['cache_dir']}" + (" (already prepared: nothing was tokenized)"
                                               if info["already_prepared"] else "")]
    for split, s in info["splits"].items():
        lines.append(f"{split}: {s['rows']} samples, {s['tokens']} tokens ({s['target_tokens']} with loss), "
                     f"{s['truncated']} truncated at max_seq_len {max_seq_len}, {s['dropped_no_target']} dropped "
                     "(no loss tokens left)")
        if s["packed_rows"]:
            lines.append(f"{split}: packed into {s['packed_rows']} rows of {max_seq_len} tokens, fill rate "
                         f"{100 * s['fill_rate']:.1f}% (tokens / (rows x max_seq_len))")
        for e in s["sources"]:
            lines.append(f"  {e['name']} ({e['path']}, {e['format']}, {e['selection']}): {e['selected']} of "
                         f"{e['rows_available']} rows -> {e['rows']} samples ({100 * e['share_rows']:.1f}%), "
                         f"{e['tokens']} tokens ({100 * e['share_tokens']:.1f}%), {e['truncated']} truncated, "
                         f"{e['dropped_no_target']} dropped")
    return "\n".join(lines)


def _load(config: str | Path, overrides: list[str]) -> tuple[dict, RunConfig]:
    raw = read_yaml(config)
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw)
    validate(cfg)
    _check_method(cfg)
    return raw, cfg


def prepare_here(config: str | Path, overrides: list[str]) -> tuple[dict, str]:
    """``dsft prepare CONFIG`` in this process: (summary, its text)."""
    _, cfg = _load(config, overrides)
    t0 = time.perf_counter()
    data = prepare(cfg)
    info = summary(data, cfg)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info, format_summary(info)


class PrepareJob:
    """The callable of a ``dsft prepare --submit`` job (one task): prepare, print the summary into the job's log
    and return it (submitit pickles it for ``--wait``)."""

    def __init__(self, config: str) -> None:
        self.config = config

    def __call__(self) -> dict:
        quiet_libraries()
        setup_logging()
        info, text = prepare_here(self.config, [])
        print(text, flush=True)
        return info


# --submit: one task, no GPU. The job gets the CPUs of one training node's ranks (data.num_proc defaults to the
# cores the process may use), unless --cpus-per-task says otherwise.
def submit_prepare(config: str | Path, overrides: list[str], slurm_flags: dict[str, Any]):
    """Submit ``dsft prepare`` as a CPU-only Slurm job with 1 task through submitit. Returns dsft.slurm.submit's
    Submitted (job, folder, info)."""
    require_slurm("dsft prepare --submit")
    raw, cfg = _load(config, overrides)
    s = cfg.slurm
    cpus = (s.cpus_per_task or 1) * tasks_per_node(s) if s is not None else None
    flags = {"cpus_per_task": cpus, **{k: v for k, v in slurm_flags.items() if v is not None}}
    flags.update(nodes=1, tasks_per_node=1, gpus_per_node=0)
    slurm = with_overrides(s, **flags)
    slurm = dataclasses.replace(slurm, job_name=f"{slurm.job_name}-prepare")
    cfg = dataclasses.replace(cfg, slurm=slurm)
    job_dir = job_dir_of(cfg)
    submitted = write_submitted_config(raw, job_dir, f"prepare-{time.strftime('%Y%m%d-%H%M%S')}-"
                                                     f"{time.time_ns() % 1_000_000:06d}.yaml")
    executor = make_executor(cfg, job_dir / "%j")
    from submitit.core.utils import FailedJobError  # deferred: the optional `slurm` extra

    try:
        job = executor.submit(PrepareJob(str(submitted)))
    except FailedJobError as e:
        raise sbatch_refused(e) from None
    folder = Path(job.paths.folder)
    info = {"job_id": job.job_id, "config": str(submitted), "source_config": str(Path(config).absolute()),
            "output_dir": str(Path(cfg.train["output_dir"]).absolute()), "nodes": 1, "tasks": 1,
            "kind": "prepare", "submitted_at": time.time()}
    write_job_info(folder, info)
    return Submitted(job, folder, info)
