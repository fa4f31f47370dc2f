"""Data: load sources, select a mixture, render the five formats, tokenize with loss masks, cache, pack, collate.

Every tokenized sample is ``{input_ids, labels}``; ``labels`` is -100 where no loss is taken (prompt,
user and system tokens unless ``train_on_prompt``, and always the first token, which nothing predicts).

Each source of ``data.train`` / ``data.eval`` is loaded, split (``eval_fraction``), selected (weight / samples /
fraction) and tokenized on its own with its own format, then the sources are concatenated. A hidden column
(``__dsft_line``) carries every row's line in its file (JSON lines) or its row number (other files) through the
split and the selection, so an error names the file and line the row came from; it is dropped by tokenization.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import socket
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.config import DATA_SUFFIXES, DataConfig
from dsft.data_cache import is_complete, preparing, wait_for_cache
from dsft.data_formats import (
    RowFormat,
    Source,
    alpaca_prompt,
    as_format,
    chat_messages,
    legacy_alpaca,
    missing_path_hint,
    resolve_sources,
    text_field,
)
from dsft.errors import DataError
from dsft.fsutil import atomic_write_json

try:  # the compiled-template cache apply_chat_template uses (transformers 5); chat_renderer falls back without it
    from transformers.utils.chat_template_utils import _compile_jinja_template
except ImportError:  # pragma: no cover - other transformers versions
    _compile_jinja_template = None

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump when tokenized output or the cache layout changes for the same inputs, so old caches are not reused.
# 2: mixtures (per-source selection), sharegpt/alpaca formats, per-source eval sets, composition.json.
CACHE_FORMAT_VERSION = 2
LINE_COLUMN = "__dsft_line"
COMPOSITION_NAME = "dsft_data_composition.json"


# --------------------------------------------------------------------------------------------------
# loading raw rows


def _specs(value) -> list[str]:
    """The paths of data.train / data.eval (strings or source mappings)."""
    if not value:
        return []
    items = value if isinstance(value, list) else [value]
    return [item if isinstance(item, str) else item.path for item in items]


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
            raise DataError(f"{key}: {spec} has no rows")
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


def _row_lines(path: Path):
    """The 1-based line of every row of a JSON-lines file, or None for other files (rows are then numbered).

    datasets' JSON reader skips blank (whitespace-only) lines; they still count as lines of the file.
    """
    import gzip

    import numpy as np

    name = path.name.lower()
    if not name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return None
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4096).lstrip()
        if head.startswith(b"["):  # one JSON array, not JSON lines: rows are array items
            return None
        f.seek(0)
        return np.fromiter((n for n, line in enumerate(f, start=1) if line.strip()), dtype=np.int64)


def load_source(src: Source):
    """One source's rows with the hidden line column; returns (dataset, "line" | "row")."""
    import datasets
    import numpy as np

    # datasets' JSON builder logs a traceback before it raises on a malformed line; dsft reports the line instead
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    spec, lines = src.path, None
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise DataError(f"{src.where}: {spec} holds splits {list(loaded)}, none named train")
                loaded = loaded["train"]
        elif path.is_file():
            if path.suffix in (".jsonl", ".json", ".csv"):
                check_utf8(path)
            loaded = datasets.load_dataset(_builder_for(str(path)), data_files=str(path), split="train")
            lines = _row_lines(path)
        else:
            loaded = datasets.load_dataset(spec, split="train")
    except DataError:
        raise
    except Exception as e:  # pyarrow/json errors carry no file name; add it
        if path.is_file():
            _explain_load_failure(path, src.where, spec)  # an empty file, or the first line that is not a JSON object
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if path.exists() else f" (not a local file or dir: {missing_path_hint(spec)}; else a hub dataset)"
        raise DataError(f"{src.where}: cannot read {spec}{hint}: {first}") from None
    if len(loaded) == 0:
        raise DataError(f"{src.where}: {spec} has no rows")
    if lines is not None and len(lines) == len(loaded):
        kind, numbers = "line", lines
    else:  # parquet / csv (header not counted) / save_to_disk / hub: the 1-based row number
        kind, numbers = "row", np.arange(1, len(loaded) + 1, dtype=np.int64)
    if LINE_COLUMN in loaded.column_names:
        loaded = loaded.remove_columns(LINE_COLUMN)
    return loaded.add_column(LINE_COLUMN, numbers), kind


def load_rows(specs, key: str):
    """Rows of data.<key> (every source, all rows, concatenated), with the hidden line column."""
    import datasets

    d = DataConfig(train=specs) if key == "train" else DataConfig(train="", eval=specs)
    parts = [load_source(s)[0] for s in resolve_sources(d, key)]
    if not parts:
        raise DataError(f"data.{key}: no data given")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# --------------------------------------------------------------------------------------------------
# formatting + tokenization of one row


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def tokenize_row(row: dict, cfg: DataConfig | RowFormat, tokenizer, where: str) -> dict:
    """Turn one raw row into {input_ids, labels} (untruncated). ``where`` prefixes errors (file and line)."""
    fmt = as_format(cfg)
    eos = [tokenizer.eos_token_id] if fmt.add_eos and tokenizer.eos_token_id is not None else []
    if fmt.format == "text":
        ids = _encode(tokenizer, text_field(row, fmt.text_field, where), True) + eos
        labels = list(ids)
    elif fmt.format == "prompt_completion":
        if legacy_alpaca(row, fmt):
            prompt = alpaca_prompt(row, fmt, where)
            completion = text_field(row, fmt.output_field, where)
        else:
            prompt = text_field(row, fmt.prompt_field, where)
            completion = text_field(row, fmt.completion_field, where)
        # Tokenized separately so the prompt/completion boundary is exact.
        prompt_ids = _encode(tokenizer, prompt, True)
        completion_ids = _encode(tokenizer, completion, False) + eos
        ids = prompt_ids + completion_ids
        labels = (list(prompt_ids) if fmt.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + completion_ids
    else:
        ids, labels = _tokenize_messages(chat_messages(row, fmt, where), fmt, tokenizer, where)
    if ids:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token (matters when samples are packed)
    return {"input_ids": ids, "labels": labels}


def _tokenize_messages(messages: list[dict], fmt: RowFormat, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Render with the chat template; label the characters each assistant turn adds."""
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
    if fmt.train_on_prompt:
        return list(ids), list(ids)
    return list(ids), labels_by_offsets(ids, offsets, spans)


def labels_by_offsets(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """The definition: a token takes loss when it starts inside an assistant turn's characters [a, b)."""
    return [tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX for tok, (start, _end) in zip(ids, offsets)]


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

    def add(self, other: DataStats) -> None:
        for name in ("rows", "truncated", "dropped_no_target", "tokens", "target_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self, split: str) -> str:
        text = (f"{split}: {self.rows} samples, {self.tokens} tokens ({self.target_tokens} with loss), "
                f"{self.truncated} truncated, {self.dropped_no_target} dropped (no loss tokens left)")
        return text + (f", packed into {self.packed_rows} rows" if self.packed_rows else "")


def default_num_proc() -> int:
    """The cores this process may run on (its affinity mask: Slurm's and taskset's limits), else the CPU count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# Fewer rows per worker than this and a worker costs more (start, pickled tokenizer) than it saves.
MIN_ROWS_PER_WORKER = 1000


def workers_for(rows: int, num_proc: int | None) -> int | None:
    """datasets.map's num_proc for ``rows`` rows: None (in this process) when one worker is enough."""
    n = min(num_proc or default_num_proc(), rows // MIN_ROWS_PER_WORKER)
    return n if n > 1 else None


def _backend(tokenizer):
    """The Rust tokenizer of a fast tokenizer when calling it directly gives what ``tokenizer(texts)`` gives
    (no truncation or padding set on it; transformers clears those per call), else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        return None
    if getattr(backend, "truncation", None) is not None or getattr(backend, "padding", None) is not None:
        return None
    return backend


def _encodings(tokenizer, texts: list[str], special: bool):
    """(Rust encodings or None, token ids) of many texts in one call of the tokenizer; the encodings (ids and
    character <-> token lookups) exist for fast tokenizers only.

    The Rust tokenizer is called directly: transformers' ``__call__`` on a batch spends about a quarter of its
    time building its BatchEncoding (measured on SmolLM2's tokenizer), and the ids are the same (tested)."""
    backend = _backend(tokenizer)
    if backend is not None:
        encs = backend.encode_batch(texts, add_special_tokens=special)
        return encs, [e.ids for e in encs]
    enc = tokenizer(texts, add_special_tokens=special)
    return enc.encodings, enc["input_ids"]


def encode_batch(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of many texts in one call of the tokenizer."""
    return _encodings(tokenizer, texts, special)[1] if texts else []


def _first_token_from(enc, pos: int, n_chars: int, n_tokens: int) -> int:
    """Index of the first token of ``enc`` that starts at or after character ``pos``.

    Token offsets are ordered and do not overlap, so the token holding ``pos`` is that token when it starts at
    ``pos`` and its successor when it starts before; characters no token covers (dropped by a normalizer) are
    stepped over."""
    while pos < n_chars:
        t = enc.char_to_token(pos)
        if t is not None:
            return t if enc.token_to_chars(t)[0] >= pos else t + 1
        pos += 1
    return n_tokens


def chat_renderer(tokenizer):
    """``render(chats, add_generation_prompt=False) -> texts``: the strings ``tokenizer.apply_chat_template(chats,
    tokenize=False)`` gives, for the plain ``{role, content}`` string messages dsft builds.

    The compiled template is called the way ``apply_chat_template`` calls it, without that function's per-chat
    copy of every message into plain JSON types (a no-op for these messages): rendering takes half the time
    (measured on SmolLM2's template, the prefixes of 10k bench chats: 0.81 -> 0.39 CPU-s). The first chat of each
    call is also rendered by ``apply_chat_template``; if a transformers version renders it differently, that
    call is rendered by ``apply_chat_template`` throughout."""

    def stock(chats: list, add_generation_prompt: bool = False) -> list[str]:
        if not chats:
            return []
        return tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=add_generation_prompt)

    template = getattr(tokenizer, "chat_template", None)
    if _compile_jinja_template is None or not isinstance(template, str):  # other versions; named templates
        return stock
    compiled = _compile_jinja_template(template)
    variables = dict(tokenizer.special_tokens_map)  # what apply_chat_template passes to every template

    def render(chats: list, add_generation_prompt: bool = False) -> list[str]:
        texts = [compiled.render(messages=chat, tools=None, documents=None,
                                 add_generation_prompt=add_generation_prompt, **variables) for chat in chats]
        if texts and texts[0] != stock(chats[:1], add_generation_prompt)[0]:
            return stock(chats, add_generation_prompt)
        return texts

    return render


def _chat_batch(chats: list[list[dict]], fmt: RowFormat, tokenizer, wheres: list[str]):
    """Batched ``_tokenize_messages``: render every chat (and, for label location, the prefixes before and
    through each assistant turn) with the chat template in a few batched calls, tokenize the full texts in one
    call, and label the tokens that start inside an assistant turn's characters."""
    render = chat_renderer(tokenizer)
    texts = render(chats)
    if fmt.train_on_prompt:  # loss on every token: where the turns start does not matter
        ids = encode_batch(tokenizer, texts, False)
        return ids, [list(x) for x in ids]
    # (row, turn) of every assistant turn; the prefix before turn 0 is empty and the one through the last
    # turn of a chat is the chat itself: neither needs rendering
    turns = [(r, i) for r, chat in enumerate(chats) for i, m in enumerate(chat) if m["role"] == "assistant"]
    need_before = [(r, i) for r, i in turns if i > 0]
    need_through = [(r, i) for r, i in turns if i + 1 < len(chats[r])]
    before = dict(zip(need_before, render([chats[r][:i] for r, i in need_before], add_generation_prompt=True)))
    through = dict(zip(need_through, render([chats[r][: i + 1] for r, i in need_through])))
    spans: list[list[tuple[int, int]]] = [[] for _ in chats]
    for r, i in turns:
        text, b = texts[r], before.get((r, i), "")
        t = through.get((r, i), text)
        if not (text.startswith(t) and t.startswith(b)):
            raise DataError(
                f"{wheres[r]}: the tokenizer's chat template renders turns differently depending on what follows, "
                "so assistant tokens cannot be located; use format: prompt_completion or another template"
            )
        spans[r].append((len(b), len(t)))
    # the tokens starting inside a span, found by the Rust encodings' char -> token lookup at the span ends:
    # a few calls per row instead of a Python tuple per token's offsets (measured: label location 2.1 s -> 0.2 s
    # per 10k bench chats)
    encs, ids = _encodings(tokenizer, texts, False)
    if encs is None:  # a Python ("slow") tokenizer keeps no character offsets
        raise DataError(f"{wheres[0]}: locating assistant turns needs a fast tokenizer (with character offsets); "
                        f"{type(tokenizer).__name__} is a Python tokenizer: load the model's tokenizer.json, "
                        "or set train_on_prompt: true")
    labels = []
    for enc, row_ids, text, row_spans in zip(encs, ids, texts, spans):
        n = len(row_ids)
        row_labels = [IGNORE_INDEX] * n
        for a, b in row_spans:
            i, j = _first_token_from(enc, a, len(text), n), _first_token_from(enc, b, len(text), n)
            row_labels[i:j] = row_ids[i:j]
        labels.append(row_labels)
    # the lookup assumes the tokenizer's offsets ascend; the first row of each batch is checked against the
    # definition, and a tokenizer for which they differ gets the definition on every row
    if labels and labels[0] != labels_by_offsets(ids[0], encs[0].offsets, spans[0]):
        labels = [labels_by_offsets(x, e.offsets, sp) for x, e, sp in zip(ids, encs, spans)]
    return ids, labels


def tokenize_batch(batch: dict, fmt: RowFormat, tokenizer, path: str, kind: str, max_len: int | None) -> dict:
    """``datasets.map(batched=True)`` function: rows of one source -> {input_ids, labels} plus per-row counts
    (truncated, n_targets, n_tokens) for the statistics. Same samples as ``tokenize_row`` row by row (tested)."""
    numbers = batch[LINE_COLUMN]
    columns = [k for k in batch if k != LINE_COLUMN]
    wheres = [f"{path}: {kind} {n}" for n in numbers]
    values = [batch[k] for k in columns]  # one lookup per column: each one of datasets' LazyBatch is a call
    rows = [dict(zip(columns, row)) for row in zip(*values)] if columns else [{} for _ in numbers]
    eos = [tokenizer.eos_token_id] if fmt.add_eos and tokenizer.eos_token_id is not None else []
    if fmt.format == "text":
        ids = encode_batch(tokenizer, [text_field(r, fmt.text_field, w) for r, w in zip(rows, wheres)], True)
        ids = [x + eos for x in ids]
        labels = [list(x) for x in ids]
    elif fmt.format == "prompt_completion":
        prompts, completions = [], []
        for r, w in zip(rows, wheres):
            if legacy_alpaca(r, fmt):
                prompts.append(alpaca_prompt(r, fmt, w))
                completions.append(text_field(r, fmt.output_field, w))
            else:
                prompts.append(text_field(r, fmt.prompt_field, w))
                completions.append(text_field(r, fmt.completion_field, w))
        # prompt and completion tokenized separately, so the boundary is exact
        p_ids = encode_batch(tokenizer, prompts, True)
        c_ids = encode_batch(tokenizer, completions, False)
        ids, labels = [], []
        for p, c in zip(p_ids, c_ids):
            c = c + eos
            ids.append(p + c)
            labels.append((list(p) if fmt.train_on_prompt else [IGNORE_INDEX] * len(p)) + c)
    else:
        chats = [chat_messages(r, fmt, w) for r, w in zip(rows, wheres)]
        ids, labels = _chat_batch(chats, fmt, tokenizer, wheres)
    out = {"input_ids": [], "labels": [], "truncated": [], "n_targets": [], "n_tokens": []}
    for x, y in zip(ids, labels):
        if x:
            y[0] = IGNORE_INDEX  # nothing predicts the first token (matters when samples are packed)
        cut = max_len is not None and len(x) > max_len
        if cut:
            x, y = x[:max_len], y[:max_len]
        out["input_ids"].append(x)
        out["labels"].append(y)
        out["truncated"].append(cut)
        out["n_targets"].append(len(y) - y.count(IGNORE_INDEX))
        out["n_tokens"].append(len(x))
    return out


class Scratch:
    """The Arrow files of one preparation's steps (tokenize, filter, pack), in a folder of their own beside the
    cache entry, removed once the entry is saved.

    Named explicitly because datasets otherwise writes them beside the source's files (inside a user's
    save_to_disk folder, or the HF cache, where they stay), and a same-named file left there by an earlier run
    makes ``datasets.map`` keep that run's shard count: ``num_proc`` was silently ignored on a second preparation."""

    def __init__(self, root: Path):
        self.root, self.count = root, 0

    def file(self, step: str) -> str:
        if self.count == 0:
            shutil.rmtree(self.root, ignore_errors=True)  # left by a killed run whose pid this process reuses
            self.root.mkdir(parents=True)
        self.count += 1
        return str(self.root / f"{self.count:03d}-{step}.arrow")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def tokenize_dataset(ds, fmt: RowFormat, tokenizer, src: Source, kind: str, max_len: int | None,
                     num_proc: int | None = None, scratch: Scratch | None = None):
    """Tokenize one source's rows, truncate and drop samples with nothing to learn; return (dataset, DataStats).

    Batches go through ``datasets.map`` in ``num_proc`` worker processes; every batch is written to an Arrow
    file on disk as it is done, so memory holds a few batches, not the dataset. The statistics are summed by
    Arrow over the count columns, without building Python lists of the whole dataset."""
    import pyarrow.compute as pc

    workers = workers_for(len(ds), num_proc)
    tokenized = ds.map(tokenize_batch, batched=True, batch_size=1000, num_proc=workers,
                       fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "path": src.path, "kind": kind,
                                  "max_len": max_len},
                       remove_columns=ds.column_names, desc=f"tokenizing {src.name}", load_from_cache_file=False,
                       cache_file_name=scratch and scratch.file(f"tokenized-{kind}-{src.name}"),
                       new_fingerprint=_fingerprint("tokenize", ds._fingerprint, src.name, kind, max_len, fmt,
                                                    getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                                                    getattr(tokenizer, "chat_template", None)))
    table = tokenized.data  # memory-mapped Arrow: summing a column reads it, it builds no Python objects

    def total(column: str, where=None) -> int:
        col = table.column(column)
        if where is not None:
            col = pc.filter(col, where)
        return int(pc.sum(pc.cast(col, "int64")).as_py() or 0)

    keep = pc.greater(table.column("n_targets"), 0)
    stats = DataStats(truncated=total("truncated"), target_tokens=total("n_targets"), tokens=total("n_tokens", keep))
    stats.dropped_no_target = len(tokenized) - int(pc.sum(pc.cast(keep, "int64")).as_py() or 0)
    if stats.dropped_no_target:
        tokenized = tokenized.filter(lambda n: [x > 0 for x in n], input_columns="n_targets", batched=True,
                                     num_proc=workers, load_from_cache_file=False,
                                     cache_file_name=scratch and scratch.file(f"kept-{kind}-{src.name}"))
    if len(tokenized) == 0:
        raise DataError(f"{src.where} ({src.path}): no sample has a token to learn from after formatting and "
                        f"truncation (max_seq_len {max_len})")
    stats.rows = len(tokenized)
    tokenized = tokenized.remove_columns(["truncated", "n_targets", "n_tokens"])
    return tokenized, stats


def _fingerprint(*parts) -> str:
    # given explicitly: otherwise datasets hashes the map function with its arguments (the whole tokenizer)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def pack_dataset(ds, max_len: int, scratch: Scratch | None = None):
    """Best-fit-decreasing packing of samples into rows of at most max_len tokens, per batch of 10,000 samples.

    In one process on purpose: worker processes would each start their batches at their own shard's start,
    so the rows would depend on data.num_proc (which must not change the data). Packing costs a few percent
    of tokenizing (bench/data_prep.py)."""

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
                  load_from_cache_file=False, cache_file_name=scratch and scratch.file("packed"))


# --------------------------------------------------------------------------------------------------
# mixtures


def selection_counts(sources: list[Source], sizes: list[int]) -> list[int]:
    """Rows to take from each source (see DataSource.weight / samples / fraction for the rules)."""
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    total_weight = sum(sources[i].weight for i in weighted)
    limits = [sizes[i] * total_weight / sources[i].weight for i in weighted if not sources[i].replace]
    total = min(limits) if limits else 0.0  # config validation guarantees a limit when anything is weighted
    counts = []
    for s, size in zip(sources, sizes):
        if s.weight is not None:
            n = max(1, round(total * s.weight / total_weight))
            counts.append(n if s.replace else min(n, size))
        elif s.samples is not None:
            if s.samples > size and not s.replace:
                raise DataError(f"{s.where} ({s.path}): samples: {s.samples} but the source has {size} rows; "
                                "lower samples or set replace: true to repeat rows")
            counts.append(s.samples)
        elif s.fraction is not None:
            counts.append(max(1, round(s.fraction * size)))
        else:
            counts.append(size)
    return counts


def selection_indices(size: int, n: int, seed: int, key: str, name: str):
    """Sorted row indices: every row n // size times, plus a random n % size of them (no row twice unless
    n > size). Seeded by data.seed and the source's name, so adding a source does not reshuffle the others."""
    import numpy as np

    reps, rest = divmod(n, size)
    parts = [np.tile(np.arange(size, dtype=np.int64), reps)] if reps else []
    if rest:
        rng = np.random.default_rng([seed, zlib.crc32(f"{key}:{name}".encode())])
        parts.append(rng.choice(size, rest, replace=False).astype(np.int64))
    return np.sort(np.concatenate(parts))


def _check_chat_template(sources: list[Source], tokenizer) -> None:
    for s in sources:
        if s.fmt.is_chat and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{s.where} ({s.path}): format {s.fmt.format} is rendered with the tokenizer's chat "
                            "template and this tokenizer has none; use format: prompt_completion (or text), or a "
                            "tokenizer with a chat template")


def _warn_legacy_alpaca(src: Source, ds) -> None:
    fmt = src.fmt
    if fmt.format == "prompt_completion" and legacy_alpaca(dict.fromkeys(ds.column_names), fmt):
        logger.warning("%s: rows have %s/%s and no %s column: read as plain-text alpaca (instruction + input -> "
                       "output, no chat template); format: alpaca renders them as a chat", src.path,
                       fmt.instruction_field, fmt.output_field, fmt.prompt_field)


def _entry(src: Source, available: int, selected: int, st: DataStats, selection: str | None = None) -> dict:
    return {"name": src.name, "path": src.path, "format": src.fmt.format, "selection": selection or src.selection,
            "rows_available": available, "selected": selected, "rows": st.rows, "truncated": st.truncated,
            "dropped_no_target": st.dropped_no_target, "tokens": st.tokens, "target_tokens": st.target_tokens}


def _finish_split(entries: list[dict], total: DataStats) -> dict:
    for e in entries:
        e["share_rows"] = round(e["rows"] / max(total.rows, 1), 6)
        e["share_tokens"] = round(e["tokens"] / max(total.tokens, 1), 6)
    return {"sources": entries, **asdict(total)}


def _concat(parts: list):
    import datasets

    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _build_splits(cfg: DataConfig, tokenizer, scratch: Scratch | None = None) -> tuple[dict, dict[str, DataStats], dict]:
    """Load, split, select and tokenize every source: (datasets by split, stats by split, composition)."""
    max_len = cfg.max_seq_len
    train_sources = resolve_sources(cfg, "train")
    eval_sources = resolve_sources(cfg, "eval")
    _check_chat_template(train_sources + eval_sources, tokenizer)
    loaded = [load_source(s) for s in train_sources]
    held_out: list[tuple[Source, Any, str]] = []
    if not eval_sources and cfg.eval_fraction > 0:
        for i, (s, (ds, kind)) in enumerate(zip(train_sources, loaded)):
            if len(ds) < 2:
                raise DataError(f"data.eval_fraction: {s.path} has fewer than 2 rows to split")
            try:
                split = ds.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
            except ValueError as e:
                raise DataError(f"data.eval_fraction: cannot split {s.path}: {str(e).splitlines()[0]}") from None
            loaded[i] = (split["train"], kind)
            held_out.append((s, split["test"], kind))

    out: dict[str, Any] = {}
    stats: dict[str, DataStats] = {}
    composition: dict[str, Any] = {}

    def tokenize_sources(key: str, sources: list[Source], parts: list[tuple[Any, str]]):
        counts = selection_counts(sources, [len(ds) for ds, _ in parts])
        tokenized, entries, total = [], [], DataStats()
        for s, (ds, kind), n in zip(sources, parts, counts):
            _warn_legacy_alpaca(s, ds)
            picked = ds if n == len(ds) else ds.select(selection_indices(len(ds), n, cfg.seed, key, s.name))
            tok, st = tokenize_dataset(picked, s.fmt, tokenizer, s, kind, max_len, cfg.num_proc, scratch)
            tokenized.append(tok)
            entries.append(_entry(s, len(ds), n, st))
            total.add(st)
        return tokenized, entries, total

    parts, entries, total = tokenize_sources("train", train_sources, loaded)
    train = _concat(parts)
    if cfg.packing:
        train = pack_dataset(train, max_len, scratch)
        total.packed_rows = len(train)
    out["train"], stats["train"], composition["train"] = train, total, _finish_split(entries, total)

    if eval_sources:
        parts, entries, total = tokenize_sources("eval", eval_sources, [load_source(s) for s in eval_sources])
        if all(s.named for s in eval_sources):  # one eval set per source: the Trainer reports eval_<name>_*
            evals = {}
            for s, ds, e in zip(eval_sources, parts, entries):
                if cfg.packing:
                    ds = pack_dataset(ds, max_len, scratch)
                    e["packed_rows"] = len(ds)
                evals[s.name] = ds
            out["eval"] = evals
        else:
            out["eval"] = _concat(parts)
        stats["eval"], composition["eval"] = total, _finish_split(entries, total)
        composition["eval"]["per_source"] = isinstance(out["eval"], dict)
    elif held_out:
        parts, entries, total = [], [], DataStats()
        for s, ds, kind in held_out:
            tok, st = tokenize_dataset(ds, s.fmt, tokenizer, s, kind, max_len, cfg.num_proc, scratch)
            parts.append(tok)
            entries.append(_entry(s, len(ds), len(ds), st, f"eval_fraction {cfg.eval_fraction:g}"))
            total.add(st)
        out["eval"], stats["eval"], composition["eval"] = _concat(parts), total, _finish_split(entries, total)
    if "eval" in out and cfg.packing and not isinstance(out["eval"], dict):
        out["eval"] = pack_dataset(out["eval"], max_len, scratch)
        stats["eval"].packed_rows = len(out["eval"])
    if "eval" in composition:
        composition["eval"]["packed_rows"] = stats["eval"].packed_rows
    composition["train"]["packed_rows"] = stats["train"].packed_rows
    return out, stats, composition


# --------------------------------------------------------------------------------------------------
# cache


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
    # every data setting (sources with their format, mapping and selection keys, seed, ...) but the cache's place
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "num_proc")}
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
    eval: Any | None  # a Dataset, or {name: Dataset} when the eval sources are named
    stats: dict[str, DataStats] = field(default_factory=dict)
    cache_dir: Path | None = None
    from_cache: bool = False
    composition: dict = field(default_factory=dict)


def prepare_data(cfg: DataConfig, tokenizer, main_process_first=None) -> PreparedData:
    """Tokenized (and packed) train/eval sets, built once and cached.

    Under a launcher (LOCAL_RANK set) the local rank 0 of each node prepares and the node's other ranks wait on
    the file system for the cache's ``complete`` marker, watching that the preparer is alive (dsft.data_cache):
    no collective, so no ddp_timeout however long tokenizing takes. ``main_process_first`` is accepted for old
    callers and not used (it was a barrier with the ddp_timeout deadline).
    """
    target = cache_root(cfg) / cache_key(cfg, tokenizer)
    if is_complete(target):
        logger.info("data: using the tokenized cache %s (no tokenization)", target)
        return _load_cached(target)
    if int(os.environ.get("LOCAL_RANK", "0") or 0) != 0:
        logger.info("data: waiting for local rank 0 to prepare %s", target)
        wait_for_cache(target)
        return _load_cached(target)
    import time

    started = time.perf_counter()
    scratch = Scratch(target.with_name(f"{target.name}.work-{socket.gethostname()}-{os.getpid()}"))
    try:
        with preparing(target):
            out, stats, composition = _build_splits(cfg, tokenizer, scratch)
            _save_cache(target, out, stats, composition)
    finally:
        scratch.remove()
    logger.info("data: prepared in %.1f s into %s", time.perf_counter() - started, target)
    loaded = _load_cached(target)
    loaded.from_cache = False
    return loaded


def _save_cache(target: Path, splits: dict, stats: dict[str, DataStats], composition: dict) -> None:
    # host + pid: two nodes' local rank 0 may prepare the same key in a shared cache dir at once
    tmp = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    if tmp.exists():  # left by a killed run whose pid this process reuses
        shutil.rmtree(tmp)
    for key, ds in splits.items():
        if isinstance(ds, dict):
            for name, part in ds.items():
                part.save_to_disk(str(tmp / key / name))
            (tmp / f"{key}_sets.json").write_text(json.dumps(list(ds)))
        else:
            ds.save_to_disk(str(tmp / key))
    (tmp / "stats.json").write_text(json.dumps({k: asdict(v) for k, v in stats.items()}, indent=2))
    (tmp / COMPOSITION_NAME).write_text(json.dumps(composition, indent=2))
    (tmp / "complete").write_text("ok\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)  # a directory onto a non-empty one fails (ENOTEMPTY/EEXIST): no mixing of two
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "complete").is_file():
            raise
        # else another node's preparer finished first; its cache holds the same data (same key)


def _load_cached(target: Path) -> PreparedData:
    import datasets

    stats = {k: DataStats(**v) for k, v in json.loads((target / "stats.json").read_text()).items()}
    train = datasets.load_from_disk(str(target / "train"))
    eval_ds = None
    if (target / "eval_sets.json").exists():
        names = json.loads((target / "eval_sets.json").read_text())
        eval_ds = {name: datasets.load_from_disk(str(target / "eval" / name)) for name in names}
    elif (target / "eval").exists():
        eval_ds = datasets.load_from_disk(str(target / "eval"))
    composition = json.loads((target / COMPOSITION_NAME).read_text())
    return PreparedData(train=train, eval=eval_ds, stats=stats, cache_dir=target, from_cache=True,
                        composition=composition)


def log_prepared(data: PreparedData, log: logging.Logger = logger) -> None:
    """The split totals and what each source contributed (rows and tokens after truncation and drops)."""
    note = " (from cache)" if data.from_cache else ""
    for split, st in data.stats.items():
        log.info("data %s%s", st.summary(split), note)
        for e in data.composition.get(split, {}).get("sources", []):
            log.info("data %s source %s (%s, %s, %s): %d of %d rows selected -> %d samples (%.1f%%), %d tokens "
                     "(%.1f%%), %d truncated, %d dropped", split, e["name"], e["path"], e["format"], e["selection"],
                     e["selected"], e["rows_available"], e["rows"], 100 * e["share_rows"], e["tokens"],
                     100 * e["share_tokens"], e["truncated"], e["dropped_no_target"])


def write_composition(data: PreparedData, output_dir: str | os.PathLike) -> Path:
    """Copy the composition used by this run into output_dir (dsft_data_composition.json)."""
    return atomic_write_json(Path(output_dir) / COMPOSITION_NAME, data.composition, indent=2)


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
