"""Data sources and row formats: resolve ``data.train`` / ``data.eval`` into sources with every format setting
filled, check them before anything heavy runs, and turn one raw row of any format into text or a chat.

Pure Python (no datasets / tokenizer imports): dsft.config calls ``check_data_sources`` during validation.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from dsft.errors import ConfigError, DataError

if TYPE_CHECKING:  # dsft.config imports this module: its types only for the checker, or the import would cycle
    from dsft.config import DataConfig, DataSource, RunConfig

ROLES = ("system", "user", "assistant", "tool")
CHAT_FORMATS = ("messages", "sharegpt", "alpaca")
# Per-format defaults of the chat keys (None in the config means: this format's default).
CHAT_DEFAULTS = {
    "messages": {"messages_field": "messages", "role_key": "role", "content_key": "content"},
    "sharegpt": {"messages_field": "conversations", "role_key": "from", "content_key": "value"},
}
# ShareGPT's role names; the standard names are accepted by both chat formats as well.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}
FORMAT_KEYS = ("format", "text_field", "prompt_field", "completion_field", "instruction_field", "input_field",
               "output_field", "system_field", "messages_field", "role_key", "content_key", "roles")
SELECTION_KEYS = ("weight", "samples", "fraction")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class RowFormat:
    """Everything needed to turn one raw row into a sample: the format with every field/role key filled."""

    format: str
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    system_field: str = "system"
    messages_field: str = "messages"
    role_key: str = "role"
    content_key: str = "content"
    roles: dict = field(default_factory=dict)  # file role name -> standard role
    train_on_prompt: bool = False
    add_eos: bool = True

    @property
    def is_chat(self) -> bool:
        return self.format in CHAT_FORMATS


@dataclass
class Source:
    """One resolved entry of data.train / data.eval."""

    where: str            # the config key, e.g. data.train[1]
    path: str             # as written in the config (what error messages name)
    name: str
    named: bool           # the user gave the name
    fmt: RowFormat
    weight: float | None = None
    samples: int | None = None
    fraction: float | None = None
    replace: bool = False

    @property
    def selection(self) -> str:
        if self.weight is not None:
            return f"weight {self.weight:g}" + (" (replace)" if self.replace else "")
        if self.samples is not None:
            return f"samples {self.samples}" + (" (replace)" if self.replace else "")
        if self.fraction is not None:
            return f"fraction {self.fraction:g}"
        return "all rows"


def resolve_format(d: DataConfig, src: DataSource | None = None) -> RowFormat:
    """The row format of one source: its own keys, else the data section's, else the format's defaults."""

    def pick(key: str):
        value = getattr(src, key, None) if src is not None else None
        return getattr(d, key) if value is None else value

    fmt = pick("format")
    chat = CHAT_DEFAULTS.get(fmt, CHAT_DEFAULTS["messages"])
    roles = {r: r for r in ROLES}
    if fmt == "sharegpt":
        roles.update(SHAREGPT_ROLES)
    roles.update(pick("roles") or {})
    return RowFormat(
        format=fmt, text_field=pick("text_field"), prompt_field=pick("prompt_field"),
        completion_field=pick("completion_field"), instruction_field=pick("instruction_field"),
        input_field=pick("input_field"), output_field=pick("output_field"), system_field=pick("system_field"),
        messages_field=pick("messages_field") or chat["messages_field"], role_key=pick("role_key") or chat["role_key"],
        content_key=pick("content_key") or chat["content_key"], roles=roles,
        train_on_prompt=d.train_on_prompt, add_eos=d.add_eos,
    )


def as_entry(entry: Any) -> Any:
    """A data.train / data.eval entry as a source mapping: a plain path is a source with every key unset (this
    module does not import dsft.config, which imports it: no DataSource here)."""
    if not isinstance(entry, str):
        return entry
    return SimpleNamespace(path=entry, name=None, weight=None, samples=None, fraction=None, replace=False,
                           **dict.fromkeys(FORMAT_KEYS))


def _looks_local(spec: str) -> bool:
    """A spec naming a local file or dir rather than a hub dataset (as dsft.config.is_local_path)."""
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(_SUFFIXES) or os.path.exists(
        os.path.expanduser(spec))


def _entries(value: Any) -> tuple[list, bool]:
    if not value:
        return [], False
    if isinstance(value, list):
        return list(value), True
    return [value], False


def default_name(path: str) -> str:
    base = Path(path.rstrip("/")).name or path
    for suffix in _SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9_-]+", "_", base) or "data"


def resolve_sources(d: DataConfig, key: str) -> list[Source]:
    """data.<key> as sources; unnamed ones are named after their file (made unique with _2, _3, ...)."""
    entries, is_list = _entries(getattr(d, key))
    out: list[Source] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"data.{key}[{i}]" if is_list else f"data.{key}"
        src = as_entry(entry)
        name = src.name or default_name(src.path)
        if not src.name:
            base, n = name, 2
            while name in seen:
                name, n = f"{base}_{n}", n + 1
        seen.add(name)
        out.append(Source(where=where, path=src.path, name=name, named=bool(src.name), fmt=resolve_format(d, src),
                          weight=src.weight, samples=src.samples, fraction=src.fraction, replace=src.replace))
    return out


def missing_path_hint(path: str) -> str:
    return f"relative paths resolve from the current directory, {os.getcwd()}"


def check_data_sources(cfg: RunConfig) -> None:
    """Config-time checks of data.train / data.eval entries (no file is read beyond an existence check)."""
    d = cfg.data
    check_role_map(d.roles, "data.roles")
    for key in ("train", "eval"):
        entries, _ = _entries(getattr(d, key))
        for i, entry in enumerate(entries):
            src = as_entry(entry)
            where = f"data.{key}[{i}]" if isinstance(getattr(d, key), list) else f"data.{key}"
            _check_source(src, where)
        sources = resolve_sources(d, key)
        names = [s.name for s in sources if s.named]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"data.{key}: the name {dupes[0]!r} is used twice; names must be unique")
        weighted = [s for s in sources if s.weight is not None]
        if weighted and all(s.replace for s in weighted):
            raise ConfigError(f"data.{key}: every weighted source has replace: true, so nothing sizes the mixture; "
                              "leave replace off on at least one (the mixture is as large as that source allows)")
    eval_sources = resolve_sources(d, "eval")
    if any(s.named for s in eval_sources) and not all(s.named for s in eval_sources):
        unnamed = next(s for s in eval_sources if not s.named)
        raise ConfigError(f"{unnamed.where}: give every eval source a name (eval is then reported per source as "
                          "eval_<name>_loss), or none (one eval set)")
    named_eval = [s.name for s in eval_sources if s.named]
    es = cfg.early_stopping
    if named_eval and es is not None:
        prefixes = [f"eval_{n}_" for n in named_eval]
        if not es.metric.startswith(tuple(prefixes)):
            raise ConfigError(f"early_stopping.metric: {es.metric} is not reported when eval sources are named; "
                              f"watch one source's metric, e.g. eval_{named_eval[0]}_loss")


def _check_source(src: DataSource, where: str) -> None:
    if not src.path:
        raise ConfigError(f"{where}.path: required; set a data file, a save_to_disk dir or a hub dataset name")
    if _looks_local(src.path) and not Path(src.path).expanduser().exists():
        raise ConfigError(f"{where}: file not found: {src.path} ({missing_path_hint(src.path)})")
    chosen = [k for k in SELECTION_KEYS if getattr(src, k) is not None]
    if len(chosen) > 1:
        raise ConfigError(f"{where}: set one of weight, samples or fraction, not {' and '.join(chosen)}")
    if src.weight is not None and not src.weight > 0:
        raise ConfigError(f"{where}.weight: must be positive, got {src.weight}")
    if src.samples is not None and src.samples < 1:
        raise ConfigError(f"{where}.samples: must be at least 1, got {src.samples}")
    if src.fraction is not None and not 0.0 < src.fraction <= 1.0:
        raise ConfigError(f"{where}.fraction: must be in (0, 1], got {src.fraction}")
    if src.replace and src.weight is None and src.samples is None:
        raise ConfigError(f"{where}.replace: only applies with samples or weight")
    if src.name is not None and not _NAME.match(src.name):
        raise ConfigError(f"{where}.name: {src.name!r} may hold only letters, digits, _ and - (it becomes part "
                          "of metric names)")
    for key in ("text_field", "prompt_field", "completion_field", "instruction_field", "input_field",
                "output_field", "system_field", "messages_field", "role_key", "content_key"):
        value = getattr(src, key)
        if value is not None and not value:
            raise ConfigError(f"{where}.{key}: empty; name a column")
    check_role_map(src.roles, f"{where}.roles")


def check_role_map(roles: dict | None, where: str) -> None:
    for name, role in (roles or {}).items():
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(ROLES)}"
            raise ConfigError(f"{where}.{name}: maps to {role!r}, not a role; {hint}")


# --------------------------------------------------------------------------------------------------
# one row


def text_field(row: dict, name: str, where: str, allow_empty: bool = False, optional: bool = False) -> str | None:
    if name not in row or row[name] is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def alpaca_prompt(row: dict, fmt: RowFormat, where: str) -> str:
    instruction = text_field(row, fmt.instruction_field, where)
    extra = text_field(row, fmt.input_field, where, allow_empty=True, optional=True) or ""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def legacy_alpaca(row: dict, fmt: RowFormat) -> bool:
    """prompt_completion rows in alpaca's shape (no prompt column, instruction + output): read as before."""
    return fmt.prompt_field not in row and fmt.instruction_field in row and fmt.output_field in row


def standard_turns(turns: list, fmt: RowFormat, where: str, label: str = "") -> list[dict]:
    """``turns`` as [{role, content}] with standard roles (data.roles / role_key / content_key map others), each
    checked; ``label`` names the field in errors when a row has several chats (preference data)."""
    clean = []
    for i, msg in enumerate(turns):
        if not isinstance(msg, dict) or fmt.role_key not in msg or fmt.content_key not in msg:
            raise DataError(f"{where}: {label}message {i} must have {fmt.role_key} and {fmt.content_key}")
        role = fmt.roles.get(msg[fmt.role_key]) if isinstance(msg[fmt.role_key], str) else None
        if role is None:
            raise DataError(f"{where}: {label}message {i} has {fmt.role_key} {msg[fmt.role_key]!r}; expected one of "
                            f"{', '.join(fmt.roles)} (data.roles maps other names)")
        content = msg[fmt.content_key]
        if not isinstance(content, str):
            raise DataError(f"{where}: {label}message {i} {fmt.content_key} must be a string, got "
                            f"{type(content).__name__}")
        clean.append({"role": role, "content": content})
    return clean


def chat_messages(row: dict, fmt: RowFormat, where: str) -> list[dict]:
    """The row as [{role, content}] with standard roles, checked; at least one non-empty assistant turn."""
    if fmt.format == "alpaca":
        system = text_field(row, fmt.system_field, where, allow_empty=True, optional=True)
        messages = [{"role": "system", "content": system}] if system and system.strip() else []
        messages.append({"role": "user", "content": alpaca_prompt(row, fmt, where)})
        messages.append({"role": "assistant", "content": text_field(row, fmt.output_field, where)})
        return messages
    turns = row.get(fmt.messages_field)
    shape = f"{{{fmt.role_key}, {fmt.content_key}}}"
    if turns is None:
        raise DataError(f"{where}: missing field '{fmt.messages_field}'")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{fmt.messages_field}' must be a non-empty list of {shape}")
    clean = standard_turns(turns, fmt, where)
    for i, msg in enumerate(clean):
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise DataError(f"{where}: message {i} (assistant) is empty")
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{where}: the chat has no assistant turn, so there is nothing to learn")
    return clean


def as_format(cfg: Any) -> RowFormat:
    """A RowFormat from a RowFormat or a DataConfig (its top-level settings)."""
    if isinstance(cfg, RowFormat):
        return cfg
    return resolve_format(cfg)

