"""Packing vs padding on the demo data's length mix: useful (non-pad) tokens/s, and the per-token loss both ways.

    .venv/bin/python bench/packing_vs_padding.py [--pairs 2] [--fraction 0.2] [--layers 4] [--batch 4]

Data: the two demo datasets `dsft prepare-demo` writes, mixed as chats: HumanEval (prompt -> solution as a
user/assistant turn, ~230 tokens) and ChatterBot conversations (~60 tokens); a seeded random ``--fraction`` of each
keeps the mix. The same dsft run config twice, only `data.packing` differs (max_seq_len 512, ``--batch`` rows or samples
per micro-batch, LoRA r=16 on all linear layers, fp32, seed 0), one epoch each, so both runs train on exactly the
same samples and useful tokens; padding is dynamic (to the longest sample of the batch). The model is
SmolLM2-135M's architecture cut to ``--layers`` layers with random weights, so that an epoch takes minutes on this
2-core machine. Runs alternate (packing, padding), (padding, packing), ... as fresh single-thread processes.

Per-token loss: the same weights evaluated on the same samples, packed and padded (token-weighted NLL).
Prints a markdown table and writes bench/results/packing_vs_padding.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (REPO, RESULTS, SMOLLM2, alternate, cpu_env, machine, markdown_table,  # noqa: E402
                     pair_ratios, train_one_process, write_result)

DEMO_DATA = REPO / ".cache/dsft/data"


def mixed_chats(out: Path, fraction: float, seed: int = 0) -> dict:
    """The demo's HumanEval and ChatterBot rows as one chat file (a seeded sample of each)."""
    rng = random.Random(seed)
    humaneval = [json.loads(x) for x in (DEMO_DATA / "humaneval/train.jsonl").read_text().splitlines()]
    chats = [json.loads(x) for x in (DEMO_DATA / "chatterbot/train.jsonl").read_text().splitlines()]
    he = rng.sample(humaneval, max(1, round(fraction * len(humaneval))))
    cb = rng.sample(chats, max(1, round(fraction * len(chats))))
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in he] + cb
    rng.shuffle(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"humaneval_rows": len(he), "chatterbot_rows": len(cb)}


def run_config(data: Path, out: Path, cache: Path, packing: bool, layers: int, batch: int) -> dict:
    return {"model": {"name_or_path": str(SMOLLM2), "init": "from_config", "dtype": "fp32",
                      "config_overrides": {"num_hidden_layers": layers}},
            "data": {"train": str(data), "format": "messages", "max_seq_len": 512, "packing": packing,
                     "cache_dir": str(cache)},
            "peft": {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
            "train": {"output_dir": str(out), "num_train_epochs": 1, "per_device_train_batch_size": batch,
                      "learning_rate": 2e-4, "logging_steps": 5, "report_to": "none", "save_strategy": "no",
                      "seed": 0, "bf16": False}}


def token_losses(cfg_dicts: dict[str, dict]) -> dict:
    """Token-weighted NLL of one set of weights over the same samples, batched packed and padded."""
    import torch
    from transformers import set_seed

    from dsft.callbacks import token_loss_sums
    from dsft.config import from_dict
    from dsft.data import make_collator, prepare_data
    from dsft.model import load_model, load_tokenizer

    torch.set_num_threads(1)
    out: dict = {}
    model = None
    for name, raw in cfg_dicts.items():
        cfg = from_dict(raw)
        tokenizer = load_tokenizer(cfg.model)
        if model is None:
            set_seed(0)
            model = load_model(cfg.model).eval()
        data = prepare_data(cfg.data, tokenizer)
        collate = make_collator(cfg.data, tokenizer.pad_token_id)
        micro = cfg.train["per_device_train_batch_size"]
        nll = count = pads = 0.0
        with torch.no_grad():
            for i in range(0, len(data.train), micro):
                batch = collate([data.train[j] for j in range(i, min(i + micro, len(data.train)))])
                labels = batch.pop("labels")
                sums = token_loss_sums(model(**batch).logits, labels)
                nll, count = nll + float(sums[:, 0].sum()), count + float(sums[:, 1].sum())
                pads += float((batch["attention_mask"] == 0).sum()) if "attention_mask" in batch else float(
                    sum(len(batch["input_ids"][0]) - len(data.train[j]["input_ids"])
                        for j in range(i, min(i + micro, len(data.train)))))
        stats = data.stats["train"]
        out[name] = {"token_nll": nll / count, "loss_tokens": int(count), "useful_tokens": stats.tokens,
                     "samples": stats.rows, "rows": len(data.train), "pad_tokens": int(pads)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size: rows (packing) or samples")
    a = p.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        mix = mixed_chats(tmp / "mix.jsonl", a.fraction)
        cfgs = {mode: run_config(tmp / "mix.jsonl", tmp / mode, tmp / "cache", mode == "packing", a.layers, a.batch)
                for mode in ("packing", "padding")}
        losses = token_losses(cfgs)  # also tokenizes (and caches) both datasets before anything is timed
        print(f"# per-token loss, same weights: {json.dumps(losses)}", file=sys.stderr, flush=True)

        def side(mode: str):
            def run(i: int) -> dict:
                cfg = json.loads(json.dumps(cfgs[mode]))
                cfg["train"]["output_dir"] = str(tmp / f"{mode}{i}")
                r = train_one_process(cfg, tmp, f"{mode}{i}", cpu_env(DSFT_CPU_THREADS="1"))
                return {**r, "useful_tokens": losses[mode]["useful_tokens"],
                        "useful_tokens_per_s": losses[mode]["useful_tokens"] / r["train_runtime"]}
            return run

        runs = alternate({"packing": side("packing"), "padding": side("padding")}, a.pairs, "useful_tokens_per_s")
    ratios = pair_ratios(runs, "packing", "padding", "useful_tokens_per_s")
    table = []
    for i, ratio in enumerate(ratios):
        pk, pd = (next(r for r in runs if r["pair"] == i and r["side"] == m) for m in ("packing", "padding"))
        table.append([i, "packing first" if i % 2 == 0 else "padding first", f"{pk['useful_tokens_per_s']:.1f}",
                      f"{pd['useful_tokens_per_s']:.1f}", f"{ratio:.2f}", f"{pk['steps']} / {pd['steps']}",
                      f"{pk['train_loss']:.4f} / {pd['train_loss']:.4f}"])
    print(markdown_table(["pair", "order", "packing useful tokens/s", "padding useful tokens/s", "ratio",
                          "optimizer steps (packing / padding)", "epoch train loss (packing / padding)"], table))
    pk_l, pd_l = losses["packing"], losses["padding"]
    rel = abs(pk_l["token_nll"] - pd_l["token_nll"]) / pd_l["token_nll"]
    pad_share = pd_l["pad_tokens"] / (pd_l["pad_tokens"] + pd_l["useful_tokens"])
    print(f"\nratio packing / padding (useful tokens/s): median {statistics.median(ratios):.2f} (goal >= 2.0); "
          f"{pk_l['useful_tokens']} useful tokens in {pk_l['samples']} samples ({mix['humaneval_rows']} HumanEval + "
          f"{mix['chatterbot_rows']} ChatterBot), {pk_l['rows']} packed rows; padding adds {pd_l['pad_tokens']} pad "
          f"tokens ({pad_share:.0%} of what it computes).\nper-token loss on the same weights: packed "
          f"{pk_l['token_nll']:.6f}, padded {pd_l['token_nll']:.6f} (relative difference {rel:.1e}, "
          f"{pk_l['loss_tokens']} vs {pd_l['loss_tokens']} loss tokens); load average "
          f"{min(r['loadavg'] for r in runs):.1f}-{max(r['loadavg'] for r in runs):.1f} on {info['cores']} cores")
    # one entry per micro-batch size: the ratio depends on it (more samples per padded batch, more padding)
    stored = RESULTS / "packing_vs_padding.json"
    by_batch = json.loads(stored.read_text()).get("by_micro_batch", {}) if stored.is_file() else {}
    by_batch[str(a.batch)] = {"machine": info, "settings": vars(a), "mix": mix, "token_losses": losses,
                              "runs": runs, "pair_ratios": ratios, "median_ratio": statistics.median(ratios),
                              "token_nll_relative_difference": rel}
    write_result("packing_vs_padding", {"by_micro_batch": by_batch})


if __name__ == "__main__":
    main()
