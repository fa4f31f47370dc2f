"""``dsft prepare-preference``: DPO pairs from the demo's HumanEval data (written by ``dsft prepare-demo``).

Each row keeps the HumanEval prompt (a function signature and docstring); ``chosen`` is the canonical solution,
``rejected`` the base model's own greedy continuation of the same prompt, cut where the function ends (HumanEval's
usual stop sequences). The rejected code is not executed (it is model output): it is "what the model writes now",
not a checked wrong answer, which is what a first DPO round on one's own model's outputs uses. Pairs whose two
answers come out equal carry no preference and are skipped (counted).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from dsft.assets import AssetError, AssetMissingError, _jsonl
from dsft.fsutil import write_if_changed

logger = logging.getLogger("dsft")

# where a HumanEval completion ends: the next top-level statement (the usual HumanEval stop sequences)
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "\n```")
MANIFEST = "pairs.json"


def cut_at_stop(text: str) -> str:
    """``text`` up to the first stop sequence (the function body only), trailing blank space dropped + one
    newline, like the canonical solutions."""
    end = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    body = text[:end].rstrip()
    return body + "\n" if body else ""


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """The model's greedy continuation of each prompt (plain text, no chat template: HumanEval prompts are code to
    continue), generated in left-padded batches."""
    import torch

    tokenizer.padding_side = "left"  # generation appends on the right: pad before the prompt
    # longest first: batches of similar length waste less compute on padding
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: dict[int, str] = {}
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        inputs = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
        with torch.no_grad():
            # use_cache: dsft.model turns the KV cache off for training; without it every new token re-runs the
            # whole sequence (~40x slower here)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                       pad_token_id=tokenizer.pad_token_id)
        new = generated[:, inputs["input_ids"].shape[1]:]
        for i, row in zip(idx, new):
            texts[i] = tokenizer.decode(row, skip_special_tokens=True)
        logger.info("generated %d / %d completions (%.0f s)", len(texts), len(prompts), time.perf_counter() - t0)
    return [texts[i] for i in range(len(prompts))]


def build_pairs(rows: list[dict], completions: list[str]) -> tuple[list[dict], int]:
    """{prompt, chosen: canonical solution, rejected: cut greedy completion}; returns (pairs, skipped) where a
    skipped row's completion was empty or equal to the canonical solution."""
    pairs, skipped = [], 0
    for row, text in zip(rows, completions, strict=True):
        rejected = cut_at_stop(text)
        if not rejected.strip() or rejected.strip() == row["completion"].strip():
            skipped += 1
            continue
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected})
    return pairs, skipped


def _read_rows(path: Path, limit: int | None) -> list[dict]:
    if not path.is_file():
        raise AssetMissingError(f"{path} is missing; write the HumanEval data first with: dsft prepare-demo "
                                f"--cache-dir {path.parent.parent.parent}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit is not None else rows


def prepare_preference(cache_dir: str | os.PathLike = ".cache/dsft", model: str | os.PathLike | None = None,
                       out_dir: str | os.PathLike | None = None, max_new_tokens: int = 128, batch_size: int = 8,
                       limit: int | None = None) -> dict[str, Any]:
    """Write ``train.jsonl`` / ``eval.jsonl`` preference pairs from ``cache_dir/data/humaneval`` (train / eval
    split as prepare-demo made it) into ``out_dir`` (default ``cache_dir/data/humaneval-dpo``). Skips the
    generation when ``out_dir`` already holds pairs made with the same model and settings."""
    if max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise AssetError("--max-new-tokens, --batch-size and --limit must be at least 1")
    cache = Path(cache_dir).expanduser()
    src = cache / "data" / "humaneval"
    model_dir = Path(model).expanduser() if model else cache / "models" / "SmolLM2-135M-Instruct"
    if not (model_dir / "config.json").is_file():
        raise AssetMissingError(f"{model_dir}: no model there (config.json); prepare it with: dsft prepare-demo "
                                f"--cache-dir {cache}, or name one with --model")
    out = Path(out_dir).expanduser() if out_dir else cache / "data" / "humaneval-dpo"
    splits = {name: _read_rows(src / f"{name}.jsonl", limit) for name in ("train", "eval")}
    settings = {"model": str(model_dir.resolve()), "max_new_tokens": max_new_tokens, "limit": limit,
                "source_rows": {k: len(v) for k, v in splits.items()}, "stop_sequences": list(STOP_SEQUENCES)}
    manifest = out / MANIFEST
    if manifest.is_file():
        done = json.loads(manifest.read_text(encoding="utf-8"))
        if done.get("settings") == settings and all((out / f"{n}.jsonl").is_file() for n in splits):
            return dict(done["summary"], up_to_date=True)
    from dsft.export import load_for_inference

    summary: dict[str, Any] = {"out_dir": str(out), "model": str(model_dir)}
    t0 = time.perf_counter()
    model, tokenizer = load_for_inference(model_dir, dtype="fp32")
    for name, rows in splits.items():
        completions = greedy_completions(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
        pairs, skipped = build_pairs(rows, completions)
        write_if_changed(out / f"{name}.jsonl", _jsonl(pairs))
        summary[name] = str(out / f"{name}.jsonl")
        summary[f"{name}_pairs"] = f"{len(pairs)} ({skipped} skipped: empty or equal to the canonical solution)"
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_if_changed(manifest, json.dumps({"settings": settings, "summary": summary}, indent=2) + "\n")
    return summary
