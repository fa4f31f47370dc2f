"""Shared launching code for the benchmarks: write a run config, start `dsft` under torchrun with N CPU ranks,
and collect what the run left behind (its log, its run info, every rank's peak RSS).

Each rank runs `bench/rank_peak.py`, which starts the real entry point (`launch/train.py`) as its only child
and records that child's peak RSS from the kernel (``RUSAGE_CHILDREN``) after it exits, so the figure covers
the whole life of the rank (loading, training, saving), however the rank exits.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = REPO / "bench" / "results"
SMOLLM2 = REPO / ".cache/dsft/models/SmolLM2-135M-Instruct"
HUMANEVAL = REPO / ".cache/dsft/data/humaneval/train.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# glibc's malloc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which most tensors
# come from the heap, where freed blocks stay resident (RSS) until reused. A fixed threshold keeps every block of
# 128 KiB or more in its own mapping, returned to the OS when freed: RSS then follows what the program holds.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def cpu_env(**extra: str) -> dict:
    """Environment for CPU ranks: DeepSpeed's CPU accelerator, one thread per rank, offline."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


@dataclass
class RunRecord:
    name: str
    output_dir: Path
    seconds: float
    logs: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    peak_rss_bytes: dict[int, int] = field(default_factory=dict)  # rank -> peak RSS of the whole rank


def run_dsft(cfg: dict, workdir: Path, name: str, nproc: int = 2, env: dict | None = None) -> RunRecord:
    """Train ``cfg`` (a run-config dict; train.output_dir is set here) on ``nproc`` CPU ranks under torchrun
    (one rank: a plain process)."""
    workdir = Path(workdir)
    out = workdir / name
    cfg = {**cfg, "train": {**cfg.get("train", {}), "output_dir": str(out)}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    peaks = workdir / f"{name}.peaks"
    peaks.mkdir(parents=True, exist_ok=True)
    entry = [str(REPO / "bench" / "rank_peak.py"), str(peaks), "--config", str(path)]
    # one rank: a plain process, as `dsft train` runs it (under torchrun the Trainer would wrap even a single
    # process in DistributedDataParallel, whose buckets hold a second copy of the gradients)
    cmd = ([sys.executable, *entry] if nproc == 1 else
           [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *entry])
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env or cpu_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{name}: run failed (exit {proc.returncode})")
    rec = RunRecord(name=name, output_dir=out, seconds=seconds)
    log = out / "dsft_log.jsonl"
    if log.is_file():
        rec.logs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    if (out / "dsft_run_info.json").is_file():
        rec.info = json.loads((out / "dsft_run_info.json").read_text())
    for f in peaks.glob("rank*.json"):
        r = json.loads(f.read_text())
        rec.peak_rss_bytes[int(r["rank"])] = int(r["peak_rss_bytes"])
    return rec


def train_one_process(cfg: dict, workdir: Path, name: str, env: dict) -> dict:
    """``dsft train`` of ``cfg`` as one fresh process; returns the final Trainer record of its log (train_runtime,
    train_loss, num_input_tokens_seen), the logged losses, the last step and the wall time."""
    path = Path(workdir) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "dsft"), "train", str(path)], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    logs = [json.loads(x) for x in (Path(cfg["train"]["output_dir"]) / "dsft_log.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(logs) if "train_runtime" in r and "train_loss" in r)
    return {**final, "losses": [r["loss"] for r in logs if "loss" in r], "steps": max(r["step"] for r in logs),
            "wall_s": wall}


def alternate(sides: dict[str, Callable[[int], dict]], pairs: int, rate_key: str) -> list[dict]:
    """Run every side once per pair, the order alternating (A B, B A, A B, ...) so that load from other processes
    on the machine hits all sides alike. ``sides[name](pair)`` returns a dict holding ``rate_key``."""
    runs = []
    names = list(sides)
    for i in range(pairs):
        for name in names if i % 2 == 0 else names[::-1]:
            r = dict(sides[name](i), side=name, pair=i, loadavg=os.getloadavg()[0])
            runs.append(r)
            print(f"# pair {i} {name}: {r[rate_key]:.1f} {rate_key} ({r.get('steps', '?')} steps, "
                  f"{r.get('train_runtime', 0):.0f} s training, {r.get('wall_s', 0):.0f} s wall)", file=sys.stderr,
                  flush=True)
    return runs


def pair_ratios(runs: list[dict], a: str, b: str, rate_key: str) -> list[float]:
    """Per pair: side a's rate over side b's."""
    by = {(r["pair"], r["side"]): r[rate_key] for r in runs}
    return [by[(i, a)] / by[(i, b)] for i in sorted({r["pair"] for r in runs})]


def machine() -> dict:
    """What the figures were measured on (CPU model, cores, memory, load when the bench started)."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = sorted({f for f in ("avx2", "avx512_bf16", "amx_bf16") if f in text})  # native bf16 or not
    return {"host": platform.node(), "cpu": model, "cpu_flags": flags, "cores": os.cpu_count(),
            "memory_gib": round(mem / 2**30, 1), "loadavg_at_start": os.getloadavg(),
            "python": platform.python_version()}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
