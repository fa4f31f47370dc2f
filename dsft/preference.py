"""Preference tuning (``method: dpo | kto``): TRL's DPOTrainer / KTOTrainer built from the same run config.

dsft's part is what it does for SFT: check the config and the data before anything heavy runs (errors name the
key, or the file and line), load the model the way ``model:`` / ``peft:`` say, and hand TRL a trainer with dsft's
callbacks (complete-checkpoint markers, the non-finite guard, metrics log, early stopping). TRL's trainers are
used as they are: they tokenize the rows, build the reference model's log-probs and compute the losses.

Reference model: with ``peft:`` (LoRA / QLoRA) TRL wraps the model with the adapter and computes the reference
with the adapter disabled, so there is no second copy of the weights. Full fine-tuning gets a frozen copy that
dsft loads exactly like the policy (same ``model:`` section, so ``init: from_config`` and ``config_overrides``
give the same weights); under ZeRO-3 it is loaded partitioned (zero.Init) and TRL wraps it in a DeepSpeed engine
of the same stage. With ``train.precompute_ref_log_probs`` no reference is kept: TRL runs the policy once over
the data before training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import datasets
from transformers import EarlyStoppingCallback, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from dsft.callbacks import MetricsCallback
from dsft.config import RunConfig
from dsft.data import LINE_COLUMN, PreparedData, load_source, selection_counts, selection_indices
from dsft.data_formats import _entries, resolve_sources, standard_turns
from dsft.errors import ConfigError, DataError
from dsft.guards import CompleteCheckpointCallback, NonFiniteGuard
from dsft.model import (align_pad_token, count_parameters, load_model, load_tokenizer, optimizer_cls_and_kwargs,
                        peft_lora_config)
from dsft.preference_checks import row_shape, trl_config_class
from dsft.quant import prepare_for_kbit_training

logger = logging.getLogger("dsft")


def preference_arguments(cfg: RunConfig, kwargs: dict) -> tuple[type, dict]:
    """TRL's config class and its kwargs: dsft's resolved ``train`` section plus the values dsft owns.

    TRL changes three TrainingArguments defaults (bf16 on, gradient checkpointing on, learning_rate 1e-6). The
    first two are put back to TrainingArguments' (off unless the train section says so), so one train section
    means the same under every method; the learning rate keeps TRL's preference-tuning default.
    """
    kwargs = dict(kwargs)
    if not kwargs.get("fp16"):
        kwargs.setdefault("bf16", False)
    kwargs.setdefault("activation_checkpointing", False)
    kwargs["max_length"] = cfg.data.max_seq_len
    return trl_config_class(cfg.method), kwargs


# --------------------------------------------------------------------------------------------------
# data


def _messages(value: Any, fmt, where: str, name: str) -> list[dict]:
    """A list of {role, content} turns with standard roles (data.roles / role_key / content_key map others)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}' must be text or a non-empty list of messages")
    return standard_turns(value, fmt, where, label=f"field '{name}' ")


def _part(row: dict, field: str, fmt, where: str, chat: bool | None) -> tuple[Any, bool]:
    """One text-or-messages field of a row, checked; returns (value, is_chat)."""
    if field not in row or row[field] is None:
        raise DataError(f"{where}: missing field '{field}'")
    value = row[field]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{field}' is empty")
        is_chat = False
    else:
        value, is_chat = _messages(value, fmt, where, field), True
    if chat is not None and is_chat != chat:
        raise DataError(f"{where}: field '{field}' is {'a list of messages' if is_chat else 'text'} while the "
                        f"prompt is {'a list of messages' if chat else 'text'}; use one form per row "
                        "(text fields, or message lists for prompt and answers)")
    return value, is_chat


@dataclasses.dataclass(frozen=True)
class PreferenceFields:
    prompt: str
    chosen: str
    rejected: str
    completion: str
    label: str


def _fields(d, src_cfg) -> PreferenceFields:
    def pick(key: str) -> str:
        value = getattr(src_cfg, key, None) if src_cfg is not None else None
        return getattr(d, key) if value is None else value

    return PreferenceFields(pick("prompt_field"), pick("chosen_field"), pick("rejected_field"),
                            pick("completion_field"), pick("label_field"))


def normalize_row(row: dict, method: str, f: PreferenceFields, fmt, where: str) -> tuple[dict, bool]:
    """One raw row as TRL's standard columns ({prompt, chosen, rejected} or {prompt, completion, label})."""
    prompt, chat = _part(row, f.prompt, fmt, where, None)
    if method == "dpo":
        chosen, _ = _part(row, f.chosen, fmt, where, chat)
        rejected, _ = _part(row, f.rejected, fmt, where, chat)
        if chosen == rejected:
            raise DataError(f"{where}: '{f.chosen}' and '{f.rejected}' are the same answer; a pair must differ")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, chat
    completion, _ = _part(row, f.completion, fmt, where, chat)
    if f.label not in row or row[f.label] is None:
        raise DataError(f"{where}: missing field '{f.label}'")
    label = row[f.label]
    if not isinstance(label, bool):
        raise DataError(f"{where}: field '{f.label}' must be true (desirable) or false (undesirable), got {label!r}")
    return {"prompt": prompt, "completion": completion, "label": label}, chat


def _normalize_source(numbered_rows, method: str, f: PreferenceFields, src, kind: str):
    """Check every (number, row) of one source and keep only TRL's columns; returns (dataset, is_chat)."""
    rows, forms = [], set()
    for number, raw in numbered_rows:
        where = f"{src.path}: {kind} {number}"
        row, chat = normalize_row(raw, method, f, src.fmt, where)
        if forms and chat not in forms:
            raise DataError(f"{where}: {'message lists' if chat else 'text'} while earlier rows of this file are "
                            f"{'text' if chat else 'message lists'}; keep one form per source")
        forms.add(chat)
        rows.append(row)
    return datasets.Dataset.from_list(rows), bool(forms and forms.pop())


def _scan_json_lines(src, method: str, f: PreferenceFields) -> None:
    """Check a local JSON-lines file row by row (after the Arrow reader failed on it)."""
    path = Path(src.path).expanduser()
    if not path.is_file() or not path.name.lower().endswith(".jsonl"):
        return

    def rows():
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{src.path}: line {number}: not valid JSON ({e.msg} at column {e.colno})")
                    if not isinstance(row, dict):
                        raise DataError(f"{src.path}: line {number}: expected a JSON object")
                    yield number, row

    _normalize_source(rows(), method, f, src, "line")


def load_preference_data(cfg: RunConfig, tokenizer):
    """Every source of data.train / data.eval checked and mixed (weights / samples / fraction / eval_fraction as
    for SFT), as TRL's standard columns. Returns dsft.data.PreparedData (stats empty: TRL tokenizes)."""
    d, method = cfg.data, cfg.method

    def source_configs(key: str) -> list:
        entries, _ = _entries(getattr(d, key))
        return [None if isinstance(e, str) else e for e in entries]

    def checked(key: str) -> list[tuple[Any, Any, str]]:
        out = []
        for src, src_cfg in zip(resolve_sources(d, key), source_configs(key)):
            f = _fields(d, src_cfg)
            try:
                raw, kind = load_source(src)
            except DataError:
                # A column holding text in some rows and message lists in others fails in the Arrow reader, which
                # names no row; checking the JSON lines one by one finds it (and raises with its line number)
                _scan_json_lines(src, method, f)
                raise
            ds, chat = _normalize_source(((r[LINE_COLUMN], r) for r in raw), method, f, src, kind)
            if chat and not getattr(tokenizer, "chat_template", None):
                raise DataError(f"{src.where} ({src.path}): rows are message lists, rendered with the tokenizer's "
                                "chat template, and this tokenizer has none; use text fields")
            out.append((src, ds, kind))
        return out

    composition: dict[str, Any] = {}

    def mix(key: str, parts: list[tuple[Any, Any, str]]):
        counts = selection_counts([s for s, _, _ in parts], [len(ds) for _, ds, _ in parts])
        picked, entries = [], []
        for (s, ds, _), n in zip(parts, counts):
            sel = ds if n == len(ds) else ds.select(selection_indices(len(ds), n, d.seed, key, s.name))
            picked.append(sel)
            entries.append({"name": s.name, "path": s.path, "format": "preference", "selection": s.selection,
                            "rows_available": len(ds), "selected": n, "rows": len(sel)})
        composition[key] = {"sources": entries, "rows": sum(len(p) for p in picked), "method": method}
        return picked

    train_parts = checked("train")
    eval_parts = checked("eval") if d.eval else []
    held_out = []
    if not eval_parts and d.eval_fraction > 0:
        for i, (s, ds, kind) in enumerate(train_parts):
            if len(ds) < 2:
                raise DataError(f"data.eval_fraction: {s.path} has fewer than 2 rows to split")
            split = ds.train_test_split(test_size=d.eval_fraction, seed=d.seed)
            train_parts[i] = (s, split["train"], kind)
            held_out.append(split["test"])
    train = datasets.concatenate_datasets(mix("train", train_parts))
    if method == "kto":
        # TRL reads KTO batches in order (train_sampling_strategy: sequential; the KL completions come from the
        # neighbouring rows): shuffle once (data.seed) so that a file sorted by label does not give one-label batches
        train = train.shuffle(seed=d.seed).flatten_indices()
    eval_ds = None
    if eval_parts:
        picked = mix("eval", eval_parts)
        if all(s.named for s, _, _ in eval_parts):  # one eval set per source: eval_<name>_* metrics
            eval_ds = {s.name: p for (s, _, _), p in zip(eval_parts, picked)}
        else:
            eval_ds = datasets.concatenate_datasets(picked)
    elif held_out:
        eval_ds = datasets.concatenate_datasets(held_out)
        composition["eval"] = {"rows": len(eval_ds), "selection": f"eval_fraction {d.eval_fraction:g}"}
    if method == "kto":
        labels = train["label"]
        if all(labels) or not any(labels):
            raise DataError(f"data.train: every row has label {labels[0]}; KTO needs desirable (true) and "
                            "undesirable (false) completions")
    return PreparedData(train=train, eval=eval_ds, composition=composition)


def log_truncation_policy(cfg: RunConfig, args) -> None:
    logger.info(
        "%s: max_length = data.max_seq_len = %s tokens per prompt + answer sequence (TRL truncation_mode %s: the "
        "start is kept, so a long answer loses its end)%s", cfg.method, args.max_length,
        getattr(args, "truncation_mode", "keep_start"),
        "; rows whose prompt alone fills max_length are dropped" if cfg.method == "dpo" else "",
    )


# --------------------------------------------------------------------------------------------------
# trainer


def build_preference_trainer(cfg: RunConfig, args):
    """TRL's DPOTrainer / KTOTrainer with dsft's model loading and callbacks. Returns (trainer, prepared data)
    like dsft.train.build_trainer."""
    import trl  # deferred: the optional `preference` extra; SFT runs import this module too (dsft.train)

    tokenizer = load_tokenizer(cfg.model)
    with args.main_process_first(desc="preference data"):
        data = load_preference_data(cfg, tokenizer)
    for split, entry in data.composition.items():
        logger.info("data %s: %d %s rows %s", split, entry["rows"], cfg.method, row_shape(cfg.method))
    log_truncation_policy(cfg, args)

    quant = cfg.peft.quantization if cfg.peft is not None else None
    set_seed(args.seed)  # LoRA's random A matrices and from_config weights: the same on every run
    model = load_model(cfg.model, quant)
    align_pad_token(model, tokenizer)
    ref_model, peft_config = None, None
    if cfg.peft is not None:
        if quant is not None:
            model = prepare_for_kbit_training(model)
        # TRL wraps the model itself; with a fresh adapter its reference is this model with the adapter disabled
        # (no second copy). A PeftModel handed in would instead get a copy of the adapter as "ref".
        peft_config = peft_lora_config(cfg.peft)
        logger.info("%s reference model: the base weights with the LoRA adapter disabled (no copy)", cfg.method)
    elif args.precompute_ref_log_probs:
        logger.info("%s reference model: none kept; TRL precomputes the reference log-probs with the initial "
                    "policy before training", cfg.method)
    else:
        # TRL would reload the reference from the checkpoint path alone, losing init: from_config and
        # config_overrides; loading it the same way as the policy gives identical weights.
        set_seed(args.seed)
        ref_model = load_model(cfg.model, None)
        ref_model.requires_grad_(False)
        logger.info("%s reference model: a frozen copy of the initial weights%s", cfg.method,
                    " (ZeRO-3: partitioned like the policy)" if _zero3() else "")

    callbacks: list[Any] = [MetricsCallback(*extra_forwards(cfg.method, args)),
                            CompleteCheckpointCallback(cfg.train.get("save_total_limit"))]
    guard = NonFiniteGuard(cfg.guard.max_nonfinite_steps) if cfg.guard.max_nonfinite_steps else None
    if guard is not None:
        callbacks.append(guard)
    if cfg.early_stopping is not None:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping.patience, cfg.early_stopping.threshold))
    trainer_cls = trl.DPOTrainer if cfg.method == "dpo" else trl.KTOTrainer
    try:
        trainer = trainer_cls(model=model, ref_model=ref_model, args=args, train_dataset=data.train,
                              eval_dataset=data.eval, processing_class=tokenizer, callbacks=callbacks,
                              peft_config=peft_config)
    except ValueError as e:  # TRL's checks of its own settings (loss_type combinations, ...)
        raise ConfigError(f"train: {str(e).strip().splitlines()[0]}") from None
    # dsft's parameter groups (no decay on norms/biases, peft.lr_ratio for LoRA B), as for SFT; the Trainer
    # builds the optimizer from this attribute when training starts
    lr_ratio = cfg.peft.lr_ratio if cfg.peft is not None else 1.0
    trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(trainer.model, args, lr_ratio)
    trainable, total = count_parameters(trainer.model)
    logger.info("parameters: %d trainable of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    if guard is not None:
        guard.accelerator = trainer.accelerator
        _guard_records_the_preference_loss(trainer, guard)
    return trainer, data


def _guard_records_the_preference_loss(trainer, guard) -> None:
    """The non-finite guard's forward hook sees the model's own outputs (TRL's forwards return a language-model
    loss, of the policy and of the adapter-off reference); TRL computes the DPO / KTO loss outside the model. Record
    that one too, so that a non-finite preference loss (e.g. IPO's square overflowing) counts even when the logits
    and the gradient norm are finite."""
    compute_loss = trainer.compute_loss

    def recorded(model, inputs, return_outputs=False, **kwargs):
        out = compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        guard._record_loss(model, inputs, (out[0] if return_outputs else out,))  # training forwards only
        return out

    trainer.compute_loss = recorded


def extra_forwards(method: str, args) -> tuple[int, int]:
    """(reference forwards, extra policy forwards) without a backward over each trained token, for the FLOPs per
    token behind MFU. DPO: the reference scores the same chosen + rejected sequences. KTO: the reference scores the
    completions, and for its KL estimate (every loss_type but apo_zero_unpaired) the policy and the reference score
    as many mismatched prompt + completion sequences. Precomputed reference log-probs cost no forward per step."""
    reference = 0 if args.precompute_ref_log_probs else 1
    if method == "kto" and args.loss_type != "apo_zero_unpaired":
        return 2 * reference, 1
    return reference, 0


def _zero3() -> bool:
    return is_deepspeed_zero3_enabled()
