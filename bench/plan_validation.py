"""Planner validation on CPU: `dsft plan`'s predicted peak memory per rank vs the measured peak RSS of real runs.

    .venv/bin/python bench/plan_validation.py [--rows NAME ...] [--steps 2] [--allocators fixed default] [--reuse]

Rows: a tiny model (2 layers, hidden 128, SmolLM2's 49k vocabulary) and the SmolLM2-135M architecture with random
weights (`model.init: from_config`), fp32, 1 and 2 ranks under torchrun, no DeepSpeed / ZeRO 0-3, activation
checkpointing on and off, LoRA and full fine-tuning; 2 x 256 packed tokens per rank and step; plus `make demo`'s
config file unchanged (SmolLM2-135M-Instruct, LoRA, dtype auto, 16 steps with 3 evaluations: run
`dsft prepare-demo --cache-dir .cache/dsft` first) and a long sequence (SmolLM2-135M cut to 2 layers, LoRA,
activation checkpointing, 1 x 8,192 packed tokens, chunked loss). Each rank's peak RSS comes from the kernel over
the rank's whole life (bench/rank_peak.py); the prediction is the planner's per-rank peak on this machine
(`Hardware(accelerator="cpu")`), whose fixed part is the process baseline measured here first (peak RSS of a
process importing what a training process imports).

Default conditions (``default``: glibc's own malloc settings, as every user runs) are what the planner predicts,
including its allowance for freed heap blocks glibc keeps resident (dsft.plan.GLIBC_RETAINED_FRACTION).
``--allocators fixed`` also runs with glibc's mmap threshold fixed at 128 KiB (freed tensors leave RSS, so RSS is
what the run holds plus the libraries), compared with the planner's prediction without retention; the ratio of
the two measurements is where the retained fraction comes from. Prints a markdown table and writes
bench/results/plan_validation.json; ``--reuse`` re-predicts every row from its stored config against the
measurements stored there without running anything (for changes to the planner). A run records, per row and
allocator, the Trainer's logged peak RSS per step and an RSS timeline sampled every second with the log record
and checkpoints present (``rss_timeline``: where RSS grows -- training, evaluation, save); a re-measured row keeps
its earlier figures under ``earlier_runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (FIXED_MMAP_THRESHOLD, HUMANEVAL, RESULTS, SMOLLM2, cpu_env, machine,  # noqa: E402
                     markdown_table, run_dsft, write_result)

TINY = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2}
# name: (model, ranks, deepspeed template or None, activation checkpointing, LoRA)
ROWS = {
    "tiny-1r": ("tiny", 1, None, False, False),
    "tiny-2r-zero2": ("tiny", 2, "zero2", False, False),
    "135m-1r": ("135m", 1, None, False, False),
    "135m-1r-ac": ("135m", 1, None, True, False),
    "135m-1r-lora": ("135m", 1, None, False, True),
    "135m-2r-ddp": ("135m", 2, None, False, False),
    "135m-2r-zero0-ac": ("135m", 2, "zero0", True, False),
    "135m-2r-zero1-ac": ("135m", 2, "zero1", True, False),
    "135m-2r-zero2": ("135m", 2, "zero2", False, False),
    "135m-2r-zero2-ac": ("135m", 2, "zero2", True, False),
    "135m-2r-zero3-ac": ("135m", 2, "zero3", True, False),
    "135m-2r-zero3-lora": ("135m", 2, "zero3", False, True),
    # `make demo`'s config file unchanged (bf16 on CPUs with AVX512-BF16/AMX, eval before and during training)
    "demo": ("demo", 1, None, False, True),
    # the demo with the stock loss, one step: the evaluation before training (8 rows x 512 tokens of full logits)
    # is its peak -- the phase the planner missed before (issue 12: 5.04 GB measured vs 2.67 GB planned)
    "demo-stock-loss-1step": ("demo", 1, None, False, True),
    # a long sequence: SmolLM2-135M cut to 2 layers, 1 x 8,192 packed tokens, chunked loss (the default)
    "135m-2L-8k-1r-ac-lora": ("135m-2L", 1, None, True, True),
}
# where the tiny / 135m rows were measured (2026-11-22, before the machine and baseline were stored per row)
LEGACY = {"machine": {"host": "vm", "cpu": "AMD EPYC", "cores": 2, "memory_gib": 23.5,
                      "loadavg_at_start": [3.57, 6.43, 7.26], "python": "3.11.7"},
          "process_baseline_bytes": 579395584}
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo-smollm2-lora.yaml"
LONG_SEQ = 8192
SEQ, MICRO = 256, 2


def run_config(row: str, steps: int) -> dict:
    model, _ranks, ds, ac, lora = ROWS[row]
    if model == "demo":  # as `make demo` runs it: all 16 steps and 3 evaluations (the eval phase is the point)
        import yaml

        cfg = yaml.safe_load(DEMO.read_text())
        if row == "demo-stock-loss-1step":
            cfg["loss"] = {"impl": "stock"}
            cfg["train"]["max_steps"] = 1
        return cfg
    if model == "135m-2L":
        return {
            "model": {"name_or_path": str(SMOLLM2), "init": "from_config", "dtype": "auto",
                      "config_overrides": {"num_hidden_layers": 2}},
            "data": {"train": str(HUMANEVAL), "format": "prompt_completion", "max_seq_len": LONG_SEQ,
                     "packing": True},
            "peft": {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
            "train": {"output_dir": "unused", "max_steps": steps, "per_device_train_batch_size": 1,
                      "logging_steps": 1, "report_to": "none", "save_strategy": "no",
                      "gradient_checkpointing": ac, "seed": 0},
        }
    cfg = {
        "model": {"name_or_path": str(SMOLLM2), "init": "from_config", "dtype": "fp32",
                  "config_overrides": TINY if model == "tiny" else {}},
        "data": {"train": str(HUMANEVAL), "format": "prompt_completion", "max_seq_len": SEQ, "packing": True},
        # the stock loss: these rows were first measured (2026-11-22) before the chunked loss existed
        "loss": {"impl": "stock"},
        "train": {"output_dir": "unused", "max_steps": steps, "per_device_train_batch_size": MICRO,
                  "logging_steps": 1, "report_to": "none", "save_strategy": "no", "bf16": False,
                  "gradient_checkpointing": ac, "seed": 0},
    }
    if ds:
        cfg["deepspeed"] = ds
    if lora:
        cfg["peft"] = {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}}
    return cfg


class RssTimeline(threading.Thread):
    """Samples, every ``interval`` seconds, the RSS of the largest process under this one (the training process),
    with the number of records in the run's dsft_log.jsonl, the last record's kind (train / eval) and step, and the
    checkpoints present: where in the run RSS grows (training, evaluation, save). Keeps a sample when RSS moved by
    at least 8 MiB or the log / checkpoints changed."""

    def __init__(self, output_dir: Path, interval: float = 1.0):
        super().__init__(daemon=True)
        self.output_dir, self.interval = output_dir, interval
        self.samples: list[dict] = []
        self.stop = threading.Event()

    @staticmethod
    def _descendants() -> list[int]:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                continue
        out, todo = [], [os.getpid()]
        while todo:
            for c in children.get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def run(self) -> None:
        start, last = time.monotonic(), None
        while not self.stop.wait(self.interval):
            rss = max((self._rss(pid) for pid in self._descendants()), default=0)
            log = self.output_dir / "dsft_log.jsonl"
            try:
                records = [line for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
            except OSError:
                records = []
            last_rec = json.loads(records[-1]) if records else {}
            kind = "eval" if any(k.startswith("eval_") for k in last_rec) else ("train" if last_rec else "-")
            ckpts = sorted(p.name for p in self.output_dir.glob("checkpoint-*")) if self.output_dir.is_dir() else []
            key = (len(records), tuple(ckpts))
            if last is None or key != last[0] or abs(rss - last[1]) >= 8 * 2**20:
                self.samples.append({"t": round(time.monotonic() - start, 1), "rss_gib": round(rss / 2**30, 3),
                                     "log_records": len(records), "last": f"{kind}@{last_rec.get('step', '-')}",
                                     "checkpoints": ckpts})
                last = (key, rss)


def predict(cfg_dict: dict, ranks: int, baseline: int, retained: float | None = None) -> dict:
    """The planner's per-rank memory; ``retained``: glibc's retained share (None: the planner's default, for
    default-malloc runs; 0 for runs with a fixed mmap threshold)."""
    from dsft.config import from_dict, validate
    from dsft.plan import Hardware, configured_setup, ds_config_of, memory, model_shape

    cfg = from_dict(cfg_dict)
    validate(cfg)
    if cfg.model.dtype == "auto":  # as the training process resolves it on this CPU
        from dsft.precision import auto_dtype, resolve_auto_dtype

        cfg = resolve_auto_dtype(cfg, auto_dtype("cpu"))
    hw = Hardware(nodes=1, devices_per_node=ranks, accelerator="cpu",
                  host_memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                  device_memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                  process_baseline_bytes=baseline, malloc_retained_fraction=retained)
    ds = ds_config_of(cfg)
    shape = model_shape(cfg)
    mem = memory(cfg, shape, hw, configured_setup(cfg, ds), ds)
    return {"params": shape.params, "trainable": shape.trainable, **mem.as_dict()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--steps", type=int, default=2)
    # default conditions (glibc's own mmap threshold) are what the planner predicts; "fixed" shows what the run holds
    p.add_argument("--allocators", nargs="+", default=["default"], choices=["fixed", "default"])
    p.add_argument("--reuse", action="store_true", help="re-predict against bench/results/plan_validation.json")
    a = p.parse_args()
    from dsft.plan import process_baseline_bytes

    stored = RESULTS / "plan_validation.json"
    previous = json.loads(stored.read_text()) if stored.is_file() else {"rows": []}
    measured = {r["row"]: r for r in previous["rows"] if r["row"] in ROWS}
    for r in measured.values():  # stored before the loss section existed: measured with the stock loss
        if ROWS[r["row"]][0] in ("tiny", "135m"):
            r["config"].setdefault("loss", {"impl": "stock"})
            for key, value in LEGACY.items():
                r.setdefault(key, value)
    if a.reuse:
        baseline, info = previous["process_baseline_bytes"], previous["machine"]
    else:
        # rows measured now replace the stored ones; the others stay
        baseline, info = process_baseline_bytes(), machine()
        with tempfile.TemporaryDirectory() as tmp:
            for row in a.rows:
                cfg = run_config(row, a.steps)
                entry = measured.get(row) if measured.get(row, {}).get("config") == cfg else None
                entry = entry or {"row": row, "config": cfg, "seconds": {}, "peak_rss_bytes": {}}
                # each row is predicted with the baseline of the machine it ran on
                entry.update(machine=info, process_baseline_bytes=baseline)
                measured[row] = entry
                for alloc in a.allocators:
                    env = cpu_env(**(FIXED_MMAP_THRESHOLD if alloc == "fixed" else {}))
                    timeline = RssTimeline(Path(tmp) / f"{row}-{alloc}")
                    timeline.start()
                    try:
                        rec = run_dsft(cfg, Path(tmp), f"{row}-{alloc}", nproc=ROWS[row][1], env=env)
                    finally:
                        timeline.stop.set()
                    if alloc in entry["peak_rss_bytes"]:  # the earlier measurement stays on record
                        entry.setdefault("earlier_runs", []).append(
                            {"allocator": alloc, "peak_rss_bytes": entry["peak_rss_bytes"][alloc],
                             "seconds": entry["seconds"].get(alloc),
                             "peak_memory_gb_by_step": entry.get("peak_memory_gb_by_step", {}).get(alloc),
                             "rss_timeline": entry.get("rss_timeline", {}).get(alloc),
                             "machine": entry.get("machine_of_run", {}).get(alloc)})
                    entry.setdefault("machine_of_run", {})[alloc] = info
                    # the Trainer's logged peak RSS (GiB, since the process started) after each logged step
                    entry.setdefault("peak_memory_gb_by_step", {})[alloc] = [
                        [r["step"], r["peak_memory_gb"]] for r in rec.logs if "peak_memory_gb" in r]
                    entry.setdefault("rss_timeline", {})[alloc] = timeline.samples
                    entry["seconds"][alloc] = round(rec.seconds, 1)
                    entry["peak_rss_bytes"][alloc] = {str(k): v for k, v in sorted(rec.peak_rss_bytes.items())}
                    print(f"# {row} ({alloc} malloc): {rec.seconds:.0f} s, peak RSS per rank "
                          f"{[round(v / 2**30, 3) for v in rec.peak_rss_bytes.values()]} GiB", file=sys.stderr,
                          flush=True)
                    write_result("plan_validation", {"machine": info, "process_baseline_bytes": baseline,
                                                     "rows": list(measured.values())})

    rows_out, table = [], []
    for row in [r for r in ROWS if r in measured]:
        m = measured[row]
        base = m.get("process_baseline_bytes", baseline)
        pred = predict(m["config"], ROWS[row][1], base)  # default conditions: glibc's retention planned
        live = predict(m["config"], ROWS[row][1], base, retained=0.0)  # what the run holds
        fixed, default = m["peak_rss_bytes"].get("fixed", {}), m["peak_rss_bytes"].get("default", {})
        errors, errors_fixed = {}, {}
        for rank in sorted(set(fixed) | set(default)):
            meas, fix = default.get(rank), fixed.get(rank)
            errors[rank] = (pred["peak"] - meas) / meas if meas else None
            errors_fixed[rank] = (live["peak"] - fix) / fix if fix else None
            err = errors[rank]
            model, ranks, ds, ac, lora = ROWS[row]
            table.append([row, f"{model} ({pred['params'] / 1e6:.1f}M)", ranks, ds or "none", "on" if ac else "off",
                          "LoRA" if lora else "full", rank, f"{pred['peak'] / 2**30:.2f}", pred["peak_phase"],
                          f"{meas / 2**30:.2f}" if meas else "-", f"{err:+.1%}" if err is not None else "-",
                          ("yes" if abs(err) <= 0.15 else "NO") if err is not None else "-",
                          f"{live['peak'] / 2**30:.2f}", f"{fix / 2**30:.2f}" if fix else "-",
                          f"{errors_fixed[rank]:+.1%}" if fix else "-",
                          f"{(meas - fix) / (fix - base):+.0%}" if meas and fix else "-",
                          m.get("machine", {}).get("cpu", "-")])
        rows_out.append({**m, "predicted": pred, "predicted_without_retention": live,
                         "relative_error_default_malloc": errors, "relative_error_fixed_malloc": errors_fixed})
    headers = ["row", "model", "ranks", "ZeRO", "act. ckpt", "tuning", "rank", "predicted peak (GiB)",
               "predicted peak phase", "measured peak RSS (GiB)", "error", "within 15%",
               "predicted without retention (GiB)", "peak RSS, fixed malloc threshold (GiB)", "error vs fixed",
               "retained (default - fixed) / (fixed - baseline)", "CPU"]
    print(markdown_table(headers, table))
    errs = [abs(e) for r in rows_out for e in r["relative_error_default_malloc"].values() if e is not None]
    worst = max(errs, default=0.0)
    print(f"\nprocess baseline (measured): {baseline / 2**30:.3f} GiB; default malloc: worst |pred - meas| / meas: "
          f"{worst:.1%} ({sum(e <= 0.15 for e in errs)}/{len(errs)} rank rows within 15%); machine: {info.get('cpu')}, "
          f"{info.get('cores')} cores, {info.get('memory_gib')} GiB")
    write_result("plan_validation", {"machine": info, "process_baseline_bytes": baseline, "seq_len": SEQ,
                                     "micro_batch": MICRO, "steps": a.steps, "rows": rows_out,
                                     "worst_relative_error": worst})


if __name__ == "__main__":
    main()
