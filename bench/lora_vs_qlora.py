"""LoRA vs QLoRA on the same model (SmolLM2-135M-Instruct) on this CPU: step time, peak memory, weight bytes;
then merge parity of the QLoRA adapter. Prints markdown tables and writes bench/results/lora_vs_qlora.json.

    .venv/bin/python bench/lora_vs_qlora.py [--steps 6] [--seq 256] [--bf16] [--runs lora-fp32 qlora-nf4 ...]

Runs, one process each (torchrun, 1 rank, through bench/harness.py so the peak RSS covers the whole process):
  lora-fp32             LoRA r=16 on all linear layers of the fp32 model (what `make demo` trains; the reference)
  qlora-nf4             the same LoRA on the model loaded as 4-bit NF4 (double quantization; compute and storage
                        in the model dtype, fp32)
  qlora-nf4-bf16-compute  the same with compute_dtype bf16 (not run by default: slow on CPUs without native bf16)
The model dtype is fp32 in all of them: in bf16, SmolLM2's packed and unpacked logits differ by 2.7% (rounding)
and dsft's packing probe refuses the run. Same data (HumanEval, packed rows of --seq tokens, micro-batch 1), no
activation checkpointing, fp32 compute unless --bf16 (bf16 autocast for every run).
Step time: median of the logged steps after the first (tokens of the step / its tokens per second).
Weights: bytes counted from the tensors in this process (dsft.quant.weight_bytes): bf16 / fp32 / 4-bit bases as
loaded, and as trained (4-bit: after peft's k-bit preparation, which keeps the unquantized weights in fp32; plus
the LoRA matrices).
Merge: the QLoRA run's adapter merged (dsft.export.merge_adapter) into a freshly loaded fp32 / bf16 base, compared
with base + unmerged adapter in the same dtype; and, for contrast, merged INTO the 4-bit model (what dsft avoids).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

from harness import HUMANEVAL, SMOLLM2, machine, markdown_table, run_dsft, write_result

RUNS = {
    "lora-fp32": None,
    "qlora-nf4": {"bits": 4, "quant_type": "nf4", "double_quant": True},
    "qlora-nf4-bf16-compute": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"},
}
REFERENCE = "lora-fp32"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
MB = 1e6


def run_config(name: str, steps: int, seq: int, model: str, data: str, bf16: bool) -> dict:
    peft = {"lora": LORA, **({"quantization": RUNS[name]} if RUNS[name] else {})}
    return {
        "model": {"name_or_path": model, "dtype": "fp32"},
        "data": {"train": data, "format": "prompt_completion", "max_seq_len": seq, "packing": True},
        "peft": peft,
        "train": {"max_steps": steps, "per_device_train_batch_size": 1, "learning_rate": 5e-4, "logging_steps": 1,
                  "report_to": "none", "save_strategy": "no", "bf16": bf16, "gradient_checkpointing": False,
                  "seed": 0},
    }


def step_seconds(logs: list[dict]) -> list[float]:
    """Seconds of each logged step after the first: its tokens over its tokens per second."""
    out, seen = [], 0
    for r in logs:
        if "loss" not in r:
            continue
        tokens, seen = r["num_input_tokens_seen"] - seen, r["num_input_tokens_seen"]
        if r["step"] > 1 and r.get("tokens_per_second_per_device"):
            out.append(tokens / r["tokens_per_second_per_device"])
    return out


def weight_footprints(model_dir: str) -> dict:
    """Weight bytes of the model loaded in bf16, fp32 and 4-bit NF4 (model dtype bf16 and fp32), and of the two
    trained setups (LoRA on fp32; QLoRA on the fp32-dtype 4-bit model after k-bit preparation)."""
    from dsft.config import LoraConfig, ModelConfig, PeftConfig, QuantizationConfig
    from dsft.model import apply_lora, load_model
    from dsft.quant import weight_bytes

    q, lora = QuantizationConfig(), LoraConfig(**LORA)
    out = {}
    for label, dtype, quant, peft in (
        ("bf16 base", "bf16", None, None),
        ("fp32 base", "fp32", None, None),
        ("4-bit NF4 base (model dtype bf16)", "bf16", q, None),
        ("4-bit NF4 base (model dtype fp32)", "fp32", q, None),
        ("fp32 + LoRA, as trained (lora-fp32)", "fp32", None, PeftConfig(lora=lora)),
        ("4-bit NF4 + LoRA, as trained (qlora-nf4)", "fp32", q, PeftConfig(lora=lora, quantization=q)),
    ):
        model = load_model(ModelConfig(name_or_path=model_dir, dtype=dtype), quant)
        footprint = model.get_memory_footprint()
        if peft is not None:
            model = apply_lora(model, peft, False)
        out[label] = dict(weight_bytes(model), hf_memory_footprint=footprint)
        del model
    return out


def merge_parity(adapter_dir: Path, work: Path) -> dict:
    """Max abs logit difference, merged vs base + unmerged adapter, on held-out-style prompts."""
    import torch
    from peft import PeftModel

    from dsft.config import QuantizationConfig
    from dsft.export import base_model_config, load_for_inference, merge_adapter
    from dsft.model import load_model

    prompts = ["def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n",
               "from typing import List\n\ndef mean(numbers: List[float]) -> float:\n"]
    result, base_logits = {}, {}

    def logits(model, tok):
        ids = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            return model(**ids).logits.float()

    for dtype in ("fp32", "bf16"):
        unmerged, tok = load_for_inference(adapter_dir, dtype=dtype)
        a = logits(unmerged, tok)
        with unmerged.disable_adapter():
            base = base_logits[dtype] = logits(unmerged, tok)
        merged, _ = load_for_inference(merge_adapter(adapter_dir, work / f"merged-{dtype}", dtype=dtype), dtype=dtype)
        b = logits(merged, tok)
        result[f"into {dtype} base (dsft merge)"] = {"max_abs_logit_diff": (a - b).abs().max().item(),
                                                    "adapter_effect_max_abs": (a - base).abs().max().item(),
                                                    "max_abs_logit": a.abs().max().item()}
    # the scale of bf16 rounding: the base alone in bf16 vs fp32
    result["(no merge: bf16 base vs fp32 base)"] = {
        "max_abs_logit_diff": (base_logits["bf16"] - base_logits["fp32"]).abs().max().item(),
        "max_abs_logit": base_logits["fp32"].abs().max().item()}
    # contrast: merging into the 4-bit weights re-quantizes W + BA
    cfg = base_model_config(adapter_dir, dtype="fp32")  # the run's dtype
    quantized = PeftModel.from_pretrained(load_model(cfg, QuantizationConfig()), str(adapter_dir)).eval()
    a = logits(quantized, tok)
    b = logits(quantized.merge_and_unload(), tok)
    result["into the 4-bit model (not done by dsft)"] = {"max_abs_logit_diff": (a - b).abs().max().item(),
                                                         "max_abs_logit": a.abs().max().item()}
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq", type=int, default=256, help="tokens per packed row (micro-batch 1)")
    p.add_argument("--runs", nargs="+", default=["lora-fp32", "qlora-nf4"], choices=list(RUNS))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (train.bf16) in every run")
    p.add_argument("--model", default=str(SMOLLM2))
    p.add_argument("--data", default=str(HUMANEVAL))
    a = p.parse_args()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    at_start = machine()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in a.runs:
            rec = run_dsft(run_config(name, a.steps, a.seq, a.model, a.data, a.bf16), tmp, name, nproc=1)
            steps = step_seconds(rec.logs)
            losses = [r["loss"] for r in rec.logs if "loss" in r]
            after_load = rec.info["ranks"][0]["peak_memory_gb_after_load"] * 2**30
            results[name] = {"step_seconds_median": statistics.median(steps), "step_seconds": steps,
                             "peak_rss_bytes": rec.peak_rss_bytes[0], "peak_rss_after_load_bytes": after_load,
                             "wall_seconds": rec.seconds,
                             "first_loss": losses[0], "last_loss": losses[-1]}
        parity = merge_parity(tmp / "qlora-nf4", tmp) if "qlora-nf4" in results else {}
    weights = weight_footprints(a.model)

    ref = results.get(REFERENCE)
    rows = []
    for name, r in results.items():
        rows.append([name, f"{r['step_seconds_median']:.2f}",
                     f"{r['step_seconds_median'] / ref['step_seconds_median']:.2f}" if ref else "-",
                     f"{r['peak_rss_after_load_bytes'] / 1e9:.2f}", f"{r['peak_rss_bytes'] / 1e9:.2f}",
                     f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}" if ref else "-",
                     f"{r['first_loss']:.3f} → {r['last_loss']:.3f}"])
    print(f"\nLoRA vs QLoRA, SmolLM2-135M-Instruct, {a.steps} steps of 1 x {a.seq} packed tokens, 1 CPU process, "
          f"{'bf16 autocast' if a.bf16 else 'fp32 compute'}\n")
    print(markdown_table(["run", "step time (s, median)", f"step time / {REFERENCE}", "peak RSS after load (GB)",
                          "peak RSS (GB)",
                          f"peak RSS / {REFERENCE}", "loss first → last"], rows))
    wrows = [[name, f"{w['total'] / MB:.1f}", f"{w['quantized'] / MB:.1f}", f"{w['other'] / MB:.1f}",
              f"{w['total'] / weights['bf16 base']['total']:.2f}"] for name, w in weights.items()]
    print("\nWeight bytes counted from the tensors\n")
    print(markdown_table(["model", "total (MB)", "4-bit packed + quant state (MB)", "other tensors (MB)",
                          "total / bf16 base"], wrows))
    if parity:
        print("\nMerge parity of the QLoRA adapter (logits on 2 prompts)\n")
        prows = [[k, f"{v['max_abs_logit_diff']:.3g}",
                  f"{v['adapter_effect_max_abs']:.3g}" if "adapter_effect_max_abs" in v else "-",
                  f"{v['max_abs_logit']:.1f}"] for k, v in parity.items()]
        print(markdown_table(["merge", "max abs logit diff vs unmerged", "adapter's own effect (max abs)",
                              "max abs logit"], prows))
    path = write_result("lora_vs_qlora", {"machine": at_start, "steps": a.steps, "seq": a.seq, "bf16": a.bf16,
                                          "lora": LORA,
                                          "runs": results, "reference": REFERENCE, "weights_bytes": weights,
                                          "merge_parity": parity})
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
