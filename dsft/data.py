"""Data: load rows, render the three formats, tokenize with loss masks, cache, pack, collate.

Every tokenized sample is ``{input_ids, labels}``; ``labels`` is -100 where no loss is taken (prompt,
user and system tokens unless ``train_on_prompt``, and always the first token, which nothing predicts).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.config import DATA_SUFFIXES, DataConfig
from dsft.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump when tokenized output changes for the same inputs, so old caches are not reused.
CACHE_FORMAT_VERSION = 1
ROLES = ("system", "user", "assistant", "tool")


# --------------------------------------------------------------------------------------------------
# loading raw rows


def _specs(value: str | list[str] | None) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _builder_for(path: str) -> str:
    name = path.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    raise DataError(f"{path}: unsupported data file type; use one of {', '.join(DATA_SUFFIXES)}")


def check_utf8(path: Path) -> None:
    """Reject text data with bytes that are not UTF-8 (the json/csv readers would replace them silently)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line = lines + chunk[: max(e.start, 0)].count(b"\n") + 1
                raise DataError(f"{path}: line {line}: bytes that are not UTF-8 (byte offset {offset + e.start})") from None
            offset += len(chunk)
            lines += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}: ends inside a truncated UTF-8 character") from None


def _explain_load_failure(path: Path, key: str, spec: str) -> None:
    """After a failed load, say why where datasets cannot: the file has no rows (datasets: "StopIteration"), or
    the first line of a JSONL file that is not a JSON object ("An error occurred while generating the dataset")."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if not any(line.strip() for line in f):
            raise DataError(f"data.{key}: {spec} has no rows")
    if path.suffix != ".jsonl":
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")


def load_rows(specs: str | list[str], key: str):
    """Load one split from file(s), a save_to_disk dir, or a hub dataset name."""
    import datasets

    # datasets' JSON builder logs a traceback before it raises on a malformed line; dsft reports the line instead
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    parts = []
    for spec in _specs(specs):
        path = Path(spec).expanduser()
        try:
            if path.is_dir():
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if "train" not in loaded:
                        raise DataError(f"data.{key}: {spec} holds splits {list(loaded)}, none named train")
                    loaded = loaded["train"]
            elif path.is_file():
                if path.suffix in (".jsonl", ".json", ".csv"):
                    check_utf8(path)
                loaded = datasets.load_dataset(_builder_for(str(path)), data_files=str(path), split="train")
            else:
                loaded = datasets.load_dataset(spec, split="train")
        except DataError:
            raise
        except Exception as e:  # pyarrow/json errors carry no file name; add it
            if path.is_file():
                _explain_load_failure(path, key, spec)  # an empty file, or the first line that is not a JSON object
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"data.{key}: cannot read {spec}: {first}") from None
        if len(loaded) == 0:
            raise DataError(f"data.{key}: {spec} has no rows")
        parts.append(loaded)
    if not parts:
        raise DataError(f"data.{key}: no data given")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# --------------------------------------------------------------------------------------------------
# formatting + tokenization of one row


def _field(row: dict, name: str, where: str, allow_empty: bool = False) -> str:
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _alpaca_prompt(row: dict) -> str:
    instruction, extra = row["instruction"], row.get("input") or ""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def tokenize_row(row: dict, cfg: DataConfig, tokenizer, where: str) -> dict:
    """Turn one raw row into {input_ids, labels} (untruncated)."""
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    if cfg.format == "text":
        ids = _encode(tokenizer, _field(row, cfg.text_field, where), True) + eos
        labels = list(ids)
    elif cfg.format == "prompt_completion":
        if cfg.prompt_field not in row and "instruction" in row and "output" in row:
            prompt, completion = _alpaca_prompt(row), _field(row, "output", where)
            _field(row, "instruction", where)
        else:
            prompt = _field(row, cfg.prompt_field, where)
            completion = _field(row, cfg.completion_field, where)
        # Tokenized separately so the prompt/completion boundary is exact.
        prompt_ids = _encode(tokenizer, prompt, True)
        completion_ids = _encode(tokenizer, completion, False) + eos
        ids = prompt_ids + completion_ids
        labels = (list(prompt_ids) if cfg.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + completion_ids
    else:
        ids, labels = _tokenize_messages(row, cfg, tokenizer, where)
    if ids:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token (matters when samples are packed)
    return {"input_ids": ids, "labels": labels}


def _check_messages(row: dict, cfg: DataConfig, where: str) -> list[dict]:
    messages = row.get(cfg.messages_field)
    if messages is None:
        raise DataError(f"{where}: missing field '{cfg.messages_field}'")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{cfg.messages_field}' must be a non-empty list of {{role, content}}")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(f"{where}: message {i} must have role and content")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {msg['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(msg["content"], str):
            raise DataError(f"{where}: message {i} content must be a string, got {type(msg['content']).__name__}")
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise DataError(f"{where}: message {i} (assistant) is empty")
        clean.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{where}: the chat has no assistant turn, so there is nothing to learn")
    return clean


def _tokenize_messages(row: dict, cfg: DataConfig, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Render with the chat template; label the characters each assistant turn adds."""
    messages = _check_messages(row, cfg, where)
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = render(messages[: i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(
                f"{where}: the tokenizer's chat template renders turns differently depending on what follows, "
                "so assistant tokens cannot be located; use format: prompt_completion or another template"
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if cfg.train_on_prompt:
        return list(ids), list(ids)
    labels = []
    for tok, (start, _end) in zip(ids, offsets):
        inside = any(a <= start < b for a, b in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return list(ids), labels


# --------------------------------------------------------------------------------------------------
# whole datasets


@dataclass
class DataStats:
    """What happened to the rows on their way to the model; logged and saved with the cache."""

    rows: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    packed_rows: int = 0

    def summary(self, split: str) -> str:
        text = (f"{split}: {self.rows} samples, {self.tokens} tokens ({self.target_tokens} with loss), "
                f"{self.truncated} truncated, {self.dropped_no_target} dropped (no loss tokens left)")
        return text + (f", packed into {self.packed_rows} rows" if self.packed_rows else "")


def _split_label(cfg: DataConfig, key: str) -> str:
    specs = _specs(getattr(cfg, key))
    return f"{specs[0]}" if len(specs) == 1 else f"data.{key}"


def tokenize_dataset(ds, cfg: DataConfig, tokenizer, key: str):
    """Tokenize, truncate and drop samples with nothing to learn; return (dataset, DataStats)."""
    source = _split_label(cfg, key)
    max_len = cfg.max_seq_len

    def fn(batch: dict, indices: list[int]) -> dict:
        out = {"input_ids": [], "labels": [], "truncated": [], "n_targets": [], "n_tokens": []}
        n = len(indices)
        for j in range(n):
            row = {k: v[j] for k, v in batch.items()}
            sample = tokenize_row(row, cfg, tokenizer, f"{source} row {indices[j] + 1}")
            ids, labels = sample["input_ids"], sample["labels"]
            cut = max_len is not None and len(ids) > max_len
            if cut:
                ids, labels = ids[:max_len], labels[:max_len]
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(cut)
            out["n_targets"].append(sum(1 for t in labels if t != IGNORE_INDEX))
            out["n_tokens"].append(len(ids))
        return out

    tokenized = ds.map(fn, batched=True, with_indices=True, remove_columns=ds.column_names,
                       desc=f"tokenizing {key}", load_from_cache_file=False)
    # the counts come from the map above: no second pass over the tokens
    n_targets, n_tokens = list(tokenized["n_targets"]), list(tokenized["n_tokens"])
    stats = DataStats(truncated=int(sum(tokenized["truncated"])), dropped_no_target=n_targets.count(0))
    tokenized = tokenized.filter(lambda n: n > 0, input_columns="n_targets")
    if len(tokenized) == 0:
        raise DataError(f"data.{key}: no sample has a token to learn from after formatting and truncation")
    stats.rows = len(tokenized)
    stats.target_tokens = int(sum(n_targets))
    stats.tokens = sum(n for n, t in zip(n_tokens, n_targets) if t > 0)
    tokenized = tokenized.remove_columns(["truncated", "n_targets", "n_tokens"])
    return tokenized, stats


def pack_dataset(ds, max_len: int):
    """Best-fit-decreasing packing of samples into rows of at most max_len tokens."""

    def fn(batch: dict) -> dict:
        lengths = [len(x) for x in batch["input_ids"]]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        bins: list[list[int]] = []
        space: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
        for i in order:
            pos = bisect.bisect_left(space, (lengths[i], -1))
            if pos < len(space):
                cap, b = space.pop(pos)
            else:
                cap, b = max_len, len(bins)
                bins.append([])
            bins[b].append(i)
            bisect.insort(space, (cap - lengths[i], b))
        out = {"input_ids": [], "labels": [], "position_ids": []}
        for members in bins:
            ids, labels, pos_ids = [], [], []
            for i in members:
                ids += batch["input_ids"][i]
                labels += batch["labels"][i]
                pos_ids += list(range(lengths[i]))
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["position_ids"].append(pos_ids)
        return out

    return ds.map(fn, batched=True, batch_size=10_000, remove_columns=ds.column_names, desc="packing",
                  load_from_cache_file=False)


def _source_fingerprint(specs: list[str]) -> list:
    """Cheap identity of the inputs: path, size and mtime of every local file; the name of hub datasets."""
    out = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            st = path.stat()
            out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        else:
            out.append(spec)
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()


def cache_key(cfg: DataConfig, tokenizer) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k != "cache_dir"}
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "settings": settings,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "train": _source_fingerprint(_specs(cfg.train)),
        "eval": _source_fingerprint(_specs(cfg.eval)),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("DSFT_CACHE", Path.home() / ".cache" / "dsft")) / "tokenized"


@dataclass
class PreparedData:
    train: Any
    eval: Any | None
    stats: dict[str, DataStats] = field(default_factory=dict)
    cache_dir: Path | None = None
    from_cache: bool = False


def prepare_data(cfg: DataConfig, tokenizer, main_process_first=None) -> PreparedData:
    """Tokenized (and packed) train/eval sets, built once and cached; other ranks wait and load the cache.

    ``main_process_first`` is TrainingArguments.main_process_first when several processes run.
    """
    import contextlib

    target = cache_root(cfg) / cache_key(cfg, tokenizer)
    ctx = main_process_first(desc="dataset tokenization") if main_process_first else contextlib.nullcontext()
    with ctx:
        if (target / "complete").exists():
            return _load_cached(target)
        train_raw = load_rows(cfg.train, "train")
        eval_raw = load_rows(cfg.eval, "eval") if cfg.eval else None
        if eval_raw is None and cfg.eval_fraction > 0:
            if len(train_raw) < 2:
                raise DataError("data.eval_fraction: train has fewer than 2 rows to split")
            split = train_raw.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
            train_raw, eval_raw = split["train"], split["test"]
        splits = {"train": train_raw, "eval": eval_raw}
        out: dict[str, Any] = {}
        stats: dict[str, DataStats] = {}
        for key, raw in splits.items():
            if raw is None:
                continue
            tokenized, st = tokenize_dataset(raw, cfg, tokenizer, key)
            if cfg.packing:
                tokenized = pack_dataset(tokenized, cfg.max_seq_len)
                st.packed_rows = len(tokenized)
            out[key], stats[key] = tokenized, st
        _save_cache(target, out, stats)
        for key, st in stats.items():
            logger.info("data %s", st.summary(key))
        loaded = _load_cached(target)
        loaded.from_cache = False
        return loaded


def _save_cache(target: Path, splits: dict, stats: dict[str, DataStats]) -> None:
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    for key, ds in splits.items():
        ds.save_to_disk(str(tmp / key))
    (tmp / "stats.json").write_text(json.dumps({k: asdict(v) for k, v in stats.items()}, indent=2))
    (tmp / "complete").write_text("ok\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another node's main process finished first; its cache is equivalent
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(target: Path) -> PreparedData:
    import datasets

    stats = {k: DataStats(**v) for k, v in json.loads((target / "stats.json").read_text()).items()}
    train = datasets.load_from_disk(str(target / "train"))
    eval_ds = datasets.load_from_disk(str(target / "eval")) if (target / "eval").exists() else None
    return PreparedData(train=train, eval=eval_ds, stats=stats, cache_dir=target, from_cache=True)


# --------------------------------------------------------------------------------------------------
# collators


@dataclass
class PaddingCollator:
    """Dynamic padding to the longest sample in the batch (right side), with an attention mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def _width(self, features: list[dict]) -> int:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = self._width(features)
        ids, labels, mask = [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * (width - n))
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * (width - n))
            mask.append([1] * n + [0] * (width - n))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


@dataclass
class PackedCollator(PaddingCollator):
    """Packed rows: position_ids restart per sample and no attention_mask is passed, which makes
    transformers' mask builder confine attention to each sample. Padding forms its own segment."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = self._width(features)
        ids, labels, positions = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            positions.append(list(f["position_ids"]) + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


def make_collator(cfg: DataConfig, pad_token_id: int) -> PaddingCollator:
    return PackedCollator(pad_token_id) if cfg.packing else PaddingCollator(pad_token_id)
