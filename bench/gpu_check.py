"""First-GPU readiness check (docs/gpu.md); run through ``bash bench/gpu_check.sh``. Writes one JSON summary.

On one CUDA GPU, in well under 10 minutes:
- bf16 ZeRO-0/2/3 on the demo model (SmolLM2-135M-Instruct, LoRA) against the CPU fp32 trajectory of the same run;
- QLoRA with CUDA bitsandbytes (a 4-bit layer's matmul on the GPU, then a short QLoRA run);
- packing with sdpa (fp32 and bf16) and flash_attention_2 when flash-attn is installed: packed = padded per-token loss;
- the chunked loss against the model's own loss (bf16 on the GPU), where this dsft has ``loss.impl``;
- tokens/s and MFU from dsft's log (MetricsCallback: ``tokens_per_second_per_device``, ``mfu``), and the peak
  ``torch.cuda.max_memory_allocated`` (logged as ``peak_memory_gb``) next to ``dsft plan CONFIG --json``'s prediction.

bf16 bound: a loss logged at step k (k = 1, 2, ...) may differ from the fp32 one by ``BF16_C * u * k`` relative, with
u = 2^-8 bf16's unit roundoff (8 significand bits): each step's forward/backward rounds at the u level and the
weights then carry that difference into every later step (counted as adding up, the conservative case), with
BF16_C = 4 for the few roundings per layer that do not cancel. It catches what breaks a run — wrong loss scaling,
accumulation or partitioning give errors of order 1 — not rounding noise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
U_BF16 = 2.0 ** -8
BF16_C = 4.0
NEEDS_GPU = "bench/gpu_check.sh: needs a CUDA GPU (torch.cuda.is_available() is false here); nothing was run"


def bf16_rel_bound(step: int, c: float = BF16_C) -> float:
    """Relative loss difference allowed at logged step ``step`` (1-based) between a bf16 and an fp32 run."""
    return c * U_BF16 * max(step, 1)


def compare_losses(reference: dict[int, float], losses: dict[int, float], c: float = BF16_C) -> dict:
    """Per-step relative differences of ``losses`` against ``reference`` and whether each is within the bf16 bound."""
    steps = sorted(set(reference) & set(losses))
    if not steps:
        return {"ok": False, "error": "no common logged steps", "steps": 0}
    rows = [(s, abs(losses[s] - reference[s]) / max(abs(reference[s]), 1e-12), bf16_rel_bound(s, c)) for s in steps]
    worst = max(rows, key=lambda r: r[1] / r[2])
    return {"ok": all(rel <= bound for _, rel, bound in rows) and len(steps) == len(reference), "steps": len(steps),
            "max_rel_diff": max(rel for _, rel, _ in rows), "worst_step": worst[0], "worst_rel_diff": worst[1],
            "worst_bound": worst[2], "bound": f"{c} * 2^-8 * step"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cpu: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    env.pop("DS_ACCELERATOR", None)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _entry() -> list[str]:
    """The launcher entry: the module dsft.run where this dsft has it, else the repo's launch/train.py."""
    if importlib.util.find_spec("dsft.run") is not None:
        return ["-m", "dsft.run"]
    return [str(REPO / "launch" / "train.py")]


class Check:
    def __init__(self, workdir: Path, budget_s: float) -> None:
        self.workdir = workdir
        self.deadline = time.monotonic() + budget_s
        self.summary: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], cpu: bool = False, timeout: float = 300) -> dict:
        timeout = min(timeout, max(self.left(), 1))
        start = time.monotonic()
        log = self.workdir / f"{name}.log"
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=_env(cpu), capture_output=True, text=True, timeout=timeout)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", str(e.stdout or ""), str(e.stderr or "")
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}")
        result = {"rc": rc, "seconds": round(time.monotonic() - start, 1), "log": str(log)}
        if rc != 0:
            tail = [line for line in err.strip().splitlines() if line.strip()][-3:]
            result["error"] = " | ".join(tail) or f"exit {rc}"
        print(f"gpu_check: {name}: {'ok' if rc == 0 else 'FAILED'} in {result['seconds']} s", flush=True)
        return result


def _write_config(path: Path, raw: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _logs(out: Path) -> list[dict]:
    log = out / "dsft_log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _logs(out) if "loss" in r}


def _metrics(out: Path) -> dict:
    train = [r for r in _logs(out) if "loss" in r]
    later = train[1:] or train  # the first window holds start-up (compilation, allocator warm-up)

    def median(key: str):
        values = [r[key] for r in later if r.get(key) is not None]
        return statistics.median(values) if values else None

    peaks = [r["peak_memory_gb"] for r in train if r.get("peak_memory_gb") is not None]
    return {"tokens_per_second_per_device": median("tokens_per_second_per_device"), "mfu": median("mfu"),
            "peak_memory_allocated_gib": max(peaks) if peaks else None,
            "first_loss": train[0]["loss"] if train else None, "last_loss": train[-1]["loss"] if train else None}


def _plan(check: Check, name: str, config: Path) -> dict:
    out = check.run(f"plan-{name}", [sys.executable, "-m", "dsft", "plan", str(config), "--json"], timeout=180)
    if out["rc"] != 0:
        return {"error": out.get("error")}
    text = (check.workdir / f"plan-{name}.log").read_text().split("--- stdout\n", 1)[1].split("\n--- stderr", 1)[0]
    mem = json.loads(text)["configured"]["memory"]
    return {"predicted_peak_gib": round(mem["peak"] / 2**30, 3),
            "predicted_overhead_gib": round(mem["overhead"] / 2**30, 3),
            "predicted_peak_without_cuda_context_gib": round((mem["peak"] - mem["overhead"]) / 2**30, 3),
            "predicted_peak_phase": mem["peak_phase"]}


def base_config(out: Path, cache: Path, steps: int, **train) -> dict:
    """The demo model and data, LoRA, no packing (bf16 weights change the packing probe's margin), 2 x 256 tokens."""
    return {
        "model": {"name_or_path": str(cache / "models" / "SmolLM2-135M-Instruct"), "dtype": "fp32",
                  "attn_implementation": "sdpa"},
        "data": {"train": str(cache / "data" / "humaneval" / "train.jsonl"), "format": "prompt_completion",
                 "max_seq_len": 256, "packing": False, "cache_dir": str(out.parent / "tokenized")},
        "peft": {"lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}},
        "train": {"output_dir": str(out), "learning_rate": 2e-4, "lr_scheduler_type": "constant", "max_steps": steps,
                  "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1,
                  "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "seed": 0, "data_seed": 0,
                  "gradient_checkpointing": False, "bf16": False, **train},
    }


def check_zero(check: Check, cache: Path, steps: int) -> dict:
    wd = check.workdir
    ref_out = wd / "cpu-fp32" / "out"
    ref_cfg = _write_config(wd / "cpu-fp32" / "run.yaml", base_config(ref_out, cache, steps))  # GPU hidden: CPU
    result: dict = {"cpu_fp32": check.run("cpu-fp32", [sys.executable, "-m", "dsft", "train", str(ref_cfg),
                                                        "--overwrite"], cpu=True, timeout=420)}
    reference = _step_losses(ref_out)
    result["cpu_fp32"]["losses"] = [reference[s] for s in sorted(reference)]
    runs = {}
    for template in ("zero0", "zero2", "zero3"):
        out = wd / f"bf16-{template}" / "out"
        raw = base_config(out, cache, steps, bf16=True)
        raw["deepspeed"] = template
        cfg = _write_config(wd / f"bf16-{template}" / "run.yaml", raw)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(_free_port()), *_entry(), "--config", str(cfg), "--overwrite"]
        r = check.run(f"bf16-{template}", cmd)
        losses = _step_losses(out)
        r["losses"] = [losses[s] for s in sorted(losses)]
        r["vs_cpu_fp32"] = compare_losses(reference, losses) if reference else {"ok": False, "error": "no reference"}
        r.update(_metrics(out))
        r["plan"] = _plan(check, f"bf16-{template}", cfg)
        runs[template] = losses
        result[template] = r
    result["ok"] = all(result[t]["rc"] == 0 and result[t]["vs_cpu_fp32"].get("ok") for t in ("zero0", "zero2", "zero3"))
    return result


def check_bnb_layer() -> dict:
    """One 4-bit NF4 linear on the GPU against the dequantized weight's matmul: bitsandbytes' CUDA kernels work."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    ref = torch.nn.Linear(512, 512, bias=False)
    q = bnb.nn.Linear4bit(512, 512, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.load_state_dict(ref.state_dict())
    q = q.cuda()
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).to(torch.float32)
        y = q(x).float()
        expected = x.float() @ w.t()
    rel = float((y - expected).norm() / expected.norm())
    return {"bitsandbytes": bnb.__version__, "weight_device": str(q.weight.device),
            "weight_class": type(q.weight).__name__, "rel_diff_vs_dequantized": rel, "ok": rel < 2e-2}


def check_qlora(check: Check, cache: Path, steps: int) -> dict:
    try:
        result = {"layer": check_bnb_layer()}
    except Exception as e:  # noqa: BLE001 - reported in the summary
        return {"ok": False, "layer": {"error": f"{type(e).__name__}: {e}"}}
    out = check.workdir / "qlora" / "out"
    raw = base_config(out, cache, steps, bf16=True, learning_rate=5e-4)
    raw["model"]["dtype"] = "bf16"
    raw["peft"]["quantization"] = {"bits": 4}
    cfg = _write_config(check.workdir / "qlora" / "run.yaml", raw)
    r = check.run("qlora", [sys.executable, "-m", "dsft", "train", str(cfg), "--overwrite"])
    r.update(_metrics(out))
    losses = list(_step_losses(out).values())
    r["losses"] = losses
    finite = bool(losses) and all(x == x and abs(x) != float("inf") for x in losses)
    result["run"] = r
    result["ok"] = result["layer"]["ok"] and r["rc"] == 0 and finite and len(losses) == steps
    return result


def _packing_samples(vocab: int, n: int = 8):
    import torch

    from dsft.data import IGNORE_INDEX

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        length = int(torch.randint(16, 96, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        prompt = length // 3
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def packed_vs_padded(model_dir: Path, impl: str, dtype: str, device: str = "cuda") -> dict:
    """Per-token loss of one packed batch against the same samples padded, on ``device``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from dsft.data import PackedCollator, PaddingCollator, pack_dataset

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=impl, dtype=torch_dtype)
    model.config.use_cache = False
    model = model.to(device).eval()
    samples = _packing_samples(model.config.vocab_size)
    padded = PaddingCollator(pad_token_id=0)(samples)
    rows = list(pack_dataset(Dataset.from_list(samples), max_len=256))
    packed = PackedCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        lp = model(**{k: v.to(device) for k, v in padded.items()}).loss.float().item()
        lk = model(**{k: v.to(device) for k, v in packed.items()}).loss.float().item()
    rel = abs(lk - lp) / abs(lp)
    bound = 1e-4 if dtype == "fp32" else BF16_C * U_BF16
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"padded_loss": lp, "packed_loss": lk, "rel_diff": rel, "bound": bound, "rows": len(rows),
            "samples": len(samples), "ok": rel <= bound}


def check_packing(cache: Path) -> dict:
    model_dir = cache / "models" / "SmolLM2-135M-Instruct"
    cases = [("sdpa", "fp32"), ("sdpa", "bf16")]
    if importlib.util.find_spec("flash_attn") is not None:
        cases.append(("flash_attention_2", "bf16"))
    result: dict = {} if len(cases) == 3 else {"flash_attention_2": {"skipped": "flash-attn is not installed"}}
    for impl, dtype in cases:
        try:
            result[f"{impl}_{dtype}"] = packed_vs_padded(model_dir, impl, dtype)
        except Exception as e:  # noqa: BLE001 - reported in the summary
            result[f"{impl}_{dtype}"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(f"gpu_check: packing {impl} {dtype}: {'ok' if result[f'{impl}_{dtype}'].get('ok') else 'FAILED'}",
              flush=True)
    result["ok"] = all(v.get("ok") for k, v in result.items() if isinstance(v, dict) and "skipped" not in v)
    return result


def check_chunked_loss(check: Check, cache: Path, steps: int) -> dict:
    from dsft import config as dsft_config

    if "loss" not in getattr(dsft_config.RunConfig, "__dataclass_fields__", {}):
        return {"skipped": "this dsft has no loss section"}
    result: dict = {}
    losses = {}
    for impl in ("stock", "chunked"):
        out = check.workdir / f"loss-{impl}" / "out"
        raw = base_config(out, cache, steps, bf16=True)
        raw["loss"] = {"impl": impl}
        cfg = _write_config(check.workdir / f"loss-{impl}" / "run.yaml", raw)
        r = check.run(f"loss-{impl}", [sys.executable, "-m", "dsft", "train", str(cfg), "--overwrite"])
        r.update(_metrics(out))
        losses[impl] = _step_losses(out)
        result[impl] = r
    # the same bf16 run with two loss implementations: only the loss's own rounding differs
    result["chunked_vs_stock"] = (compare_losses(losses["stock"], losses["chunked"]) if losses["stock"]
                                  else {"ok": False, "error": "the stock run logged no loss"})
    result["ok"] = all(result[i]["rc"] == 0 for i in ("stock", "chunked")) and result["chunked_vs_stock"].get("ok")
    return result


def check_throughput(check: Check, cache: Path) -> dict:
    """The demo run on the GPU in bf16 with larger batches: tokens/s, MFU, peak memory vs dsft plan."""
    out = check.workdir / "throughput" / "out"
    raw = base_config(out, cache, 30, bf16=True, per_device_train_batch_size=8, logging_steps=5)
    raw["data"].update({"max_seq_len": 512, "packing": True})
    cfg = _write_config(check.workdir / "throughput" / "run.yaml", raw)
    r = check.run("throughput", [sys.executable, "-m", "dsft", "train", str(cfg), "--overwrite"])
    r.update(_metrics(out))
    r["plan"] = _plan(check, "throughput", cfg)
    measured, predicted = r.get("peak_memory_allocated_gib"), r["plan"].get("predicted_peak_without_cuda_context_gib")
    if measured and predicted:
        r["measured_over_predicted"] = round(measured / predicted, 3)
    r["ok"] = r["rc"] == 0 and bool(r.get("tokens_per_second_per_device"))
    return r


def machine() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda, "torch": torch.__version__,
            "bf16_supported": torch.cuda.is_bf16_supported(), "host": platform.node(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"), help="the JSON summary")
    p.add_argument("--workdir", default=str(REPO / "runs" / "gpu_check"), help="configs, run dirs and logs")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps of the comparison runs")
    p.add_argument("--budget-s", type=float, default=540, help="parts not started by then are skipped")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "dsft"), help="demo model and data")
    a = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(NEEDS_GPU, file=sys.stderr)
        return 2
    workdir = Path(a.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    check = Check(workdir, a.budget_s)
    cache = Path(a.cache_dir).resolve()
    started = time.time()
    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "command": " ".join(["bench/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
                     "machine": machine(), "steps": a.steps}
    prep = check.run("prepare-demo", [sys.executable, "-m", "dsft", "prepare-demo", "--cache-dir", str(cache)],
                     timeout=300)
    summary["prepare_demo"] = prep
    parts = (("zero_bf16_vs_cpu_fp32", lambda: check_zero(check, cache, a.steps)),
             ("qlora_cuda_bitsandbytes", lambda: check_qlora(check, cache, a.steps)),
             ("packing_packed_equals_padded", lambda: check_packing(cache)),
             ("chunked_loss", lambda: check_chunked_loss(check, cache, a.steps)),
             ("throughput_and_memory", lambda: check_throughput(check, cache)))
    for name, fn in parts:
        if prep["rc"] != 0:
            summary[name] = {"skipped": "dsft prepare-demo failed"}
        elif check.left() < 30:
            summary[name] = {"skipped": f"time budget of {a.budget_s:.0f} s used up"}
        else:
            try:
                summary[name] = fn()
            except Exception as e:  # noqa: BLE001 - one part failing must not lose the others' results
                summary[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    summary["seconds"] = round(time.time() - started, 1)
    verdicts = {k: v.get("ok") for k, v in summary.items() if isinstance(v, dict) and "ok" in v}
    summary["ok"] = bool(verdicts) and all(verdicts.values())
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    failed = ", ".join(k for k, v in verdicts.items() if not v)
    print(f"gpu_check: {'all checks passed' if summary['ok'] else 'FAILED: ' + failed} in {summary['seconds']} s; "
          f"summary in {out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
