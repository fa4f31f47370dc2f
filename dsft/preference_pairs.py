"""``dsft prepare-preference``: DPO pairs from the demo's HumanEval data (written by ``dsft prepare-demo``).

Each row keeps the HumanEval prompt (a function signature and docstring); ``chosen`` is the canonical solution,
``rejected`` a body the model writes itself for that function (greedy; see rejected_answer). The rejected code is
not executed (it is model output): it is "what the model writes now", not a checked wrong answer, which is what a
first DPO round on one's own model's outputs uses. Pairs whose rejected answer comes out empty or equal to the
solution carry no preference and are skipped (counted).

How the model is asked: an instruct model (its tokenizer has a chat template) continued on the bare prompt treats
the function as finished after its docstring. Measured with SmolLM2-135M-Instruct on the first 16 + 16 prompts: 18
of 32 continuations began a new top-level statement (a test ``print``, ``# Example usage``, another ``def``), cut to
nothing, 13 closed a code fence and wrote prose, 1 wrote the function again from its ``def`` line; pre-filling its
chat answer with the open code block and the prompt did no better (31 of 32 closed the block at once or began a new
statement). Asked in a user turn to complete the function, it writes the whole function in a code block, from its
``def`` line (28 of 32 with a body): the body of that restatement (docstring dropped) is the rejected answer. So a
tokenizer with a chat template gets that request, and generation stops where the answer's code block closes;
without one (a base model) the bare prompt is continued.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from dsft.assets import AssetError, AssetMissingError, _jsonl
from dsft.fsutil import write_if_changed

logger = logging.getLogger("dsft")

# where a HumanEval completion ends: the next top-level statement (the usual HumanEval stop sequences)
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "\n```")
MANIFEST = "pairs.json"


# the user turn that asks an instruct model for the function (see generation_prompt); its answer's code block ends
# at CHAT_STOP, where generation stops (the explanation after it is not needed)
CHAT_REQUEST = "Complete this Python function:\n```python\n{prompt}```"
CHAT_STOP = "\n```\n"


def cut_at_stop(text: str) -> str:
    """``text`` up to the first stop sequence (the function body only), trailing blank space dropped + one
    newline, like the canonical solutions. A stop sequence at the very start counts too (a continuation that
    opens with ``def`` or closes the code block right away has no body)."""
    text = "\n" + text
    end = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    body = text[1:end].rstrip() if end > 0 else ""
    return body + "\n" if body.strip() else ""


def function_name(prompt: str) -> str | None:
    """The prompt's last top-level function: the one HumanEval asks for (helpers come before it)."""
    names = re.findall(r"^def\s+(\w+)\s*\(", prompt, flags=re.MULTILINE)
    return names[-1] if names else None


def restated_body(text: str, name: str) -> str:
    """When the model writes the function again (``def name(...)``, often with its docstring): that definition's
    body with the docstring dropped, indented as under a top-level ``def``; "" if the text has no such definition
    or it has no body."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(rf"\s*def\s+{re.escape(name)}\s*\(", line)), None)
    if start is None:
        return ""
    indent = len(lines[start]) - len(lines[start].lstrip())
    i = start
    while i < len(lines) and not lines[i].split("#")[0].rstrip().endswith(":"):  # a signature over several lines
        i += 1
    body: list[str] = []
    for line in lines[i + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break  # back at the def's level: the function ended
        body.append(line[indent:] if line.strip() else "")
    first = next((j for j, line in enumerate(body) if line.strip()), None)
    if first is not None:
        head = body[first].strip()
        quote = head[:3] if head[:3] in ('"""', "'''") else None
        if quote is not None:  # drop the docstring: up to the line that closes it
            end = first if head.count(quote) >= 2 else next(
                (j for j in range(first + 1, len(body)) if quote in body[j]), len(body) - 1)
            body = body[end + 1:]
    text = "\n".join(body).strip("\n").rstrip()
    return text + "\n" if text.strip() else ""


def rejected_answer(text: str, prompt: str) -> str:
    """The function body the model wrote: its continuation of the prompt up to the first stop sequence; when that
    is empty because the model started the function over (``def name(``), the body of that restatement."""
    body = cut_at_stop(text)
    name = function_name(prompt)
    if not body and name is not None:
        body = cut_at_stop(restated_body(text, name))
    return body


def generation_prompt(tokenizer, prompt: str) -> str:
    """What the model continues: with a chat template, a user turn asking it to complete the function (CHAT_REQUEST;
    its answer restates the function: see rejected_answer); without one, the bare prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    turn = [{"role": "user", "content": CHAT_REQUEST.format(prompt=prompt)}]
    return tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                       chat: bool = False) -> list[str]:
    """The model's greedy continuation of each prompt text (see generation_prompt), generated in left-padded
    batches. ``chat``: the texts come from the chat template (they hold their special tokens) and each answer
    stops once its code block closes (CHAT_STOP)."""
    import torch  # deferred: torch; the CLI imports this module

    tokenizer.padding_side = "left"  # generation appends on the right: pad before the prompt
    # longest first: batches of similar length waste less compute on padding
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: dict[int, str] = {}
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        inputs = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=not chat)
        stop = {"stop_strings": [CHAT_STOP], "tokenizer": tokenizer} if chat else {}
        with torch.no_grad():
            # use_cache: dsft.model turns the KV cache off for training; without it every new token re-runs the
            # whole sequence (~40x slower here)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                       pad_token_id=tokenizer.pad_token_id, **stop)
        new = generated[:, inputs["input_ids"].shape[1]:]
        for i, row in zip(idx, new):
            texts[i] = tokenizer.decode(row, skip_special_tokens=True)
        logger.info("generated %d / %d completions (%.0f s)", len(texts), len(prompts), time.perf_counter() - t0)
    return [texts[i] for i in range(len(prompts))]


def build_pairs(rows: list[dict], completions: list[str]) -> tuple[list[dict], int]:
    """{prompt, chosen: canonical solution, rejected: the body the model wrote (rejected_answer)}; returns (pairs,
    skipped) where a skipped row's answer was empty or equal to the canonical solution."""
    pairs, skipped = [], 0
    for row, text in zip(rows, completions, strict=True):
        rejected = rejected_answer(text, row["prompt"])
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
                "source_rows": {k: len(v) for k, v in splits.items()}, "stop_sequences": list(STOP_SEQUENCES),
                "chat_request": CHAT_REQUEST, "chat_stop": CHAT_STOP}  # how an instruct model is asked
    manifest = out / MANIFEST
    if manifest.is_file():
        done = json.loads(manifest.read_text(encoding="utf-8"))
        if done.get("settings") == settings and all((out / f"{n}.jsonl").is_file() for n in splits):
            return dict(done["summary"], up_to_date=True)
    from dsft.export import load_for_inference  # deferred: torch and transformers; the CLI imports this module

    summary: dict[str, Any] = {"out_dir": str(out), "model": str(model_dir)}
    t0 = time.perf_counter()
    model, tokenizer = load_for_inference(model_dir, dtype="fp32")
    for name, rows in splits.items():
        chat = bool(getattr(tokenizer, "chat_template", None))
        completions = greedy_completions(model, tokenizer, [generation_prompt(tokenizer, r["prompt"]) for r in rows],
                                         max_new_tokens, batch_size, chat=chat)
        pairs, skipped = build_pairs(rows, completions)
        write_if_changed(out / f"{name}.jsonl", _jsonl(pairs))
        summary[name] = str(out / f"{name}.jsonl")
        summary[f"{name}_pairs"] = f"{len(pairs)} ({skipped} skipped: empty or equal to the canonical solution)"
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_if_changed(manifest, json.dumps({"settings": settings, "summary": summary}, indent=2) + "\n")
    return summary
