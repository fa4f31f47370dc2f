"""Config-time checks of preference tuning (method: dpo | kto): which TRL config class the train section passes
through to, and what the data section must say. A leaf module (dsft.config calls it during validation), so it
imports nothing of dsft beyond errors and data_formats; TRL is imported only when a preference method is used.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from dsft.data_formats import resolve_sources
from dsft.errors import ConfigError

if TYPE_CHECKING:
    from dsft.config import RunConfig

logger = logging.getLogger("dsft")

PREFERENCE_METHODS = ("dpo", "kto")
# TRL fields dsft sets from its own sections: one source of truth for each value.
OWNED_BY_DSFT = {
    "max_length": "set data.max_seq_len (dsft passes it to TRL as max_length: prompt + answer tokens)",
    "model_init_kwargs": "dsft loads the model itself; use the model section (dtype, attn_implementation, ...)",
    "trust_remote_code": "set model.trust_remote_code",
    "pad_token": "deprecated in TRL; dsft gives the tokenizer a pad token",
}


def trl_config_class(method: str):
    """TRL's DPOConfig / KTOConfig (both extend TrainingArguments)."""
    try:
        import trl  # deferred: the optional `preference` extra, and ~5 s; dsft.config imports this module
    except ImportError:
        raise ConfigError(f"method: {method} needs TRL; install it with: pip install 'dsft[preference]'") from None
    return {"dpo": trl.DPOConfig, "kto": trl.KTOConfig}[method]


def method_fields(method: str) -> tuple[dict[str, dataclasses.Field], str]:
    """The fields the train section may set for this method, and the class's name (for error messages)."""
    cls = trl_config_class(method)
    return {f.name: f for f in dataclasses.fields(cls) if f.init}, cls.__name__


def check_preference_config(cfg: RunConfig) -> None:
    """Config-time checks for method dpo / kto beyond the train keys (dsft.config checks those against
    ``method_fields``); no model, no data read beyond existence checks."""
    t, d = cfg.train, cfg.data
    for key, hint in OWNED_BY_DSFT.items():
        if key in t:
            raise ConfigError(f"train.{key}: {hint}")
    for key in ("train", "eval"):
        for src in resolve_sources(d, key):
            if src.fmt.format != "preference":
                raise ConfigError(f"{src.where}: method: {cfg.method} trains on preference data; set data.format: "
                                  f"preference (rows {row_shape(cfg.method)}), got format {src.fmt.format}")
    if d.packing:
        raise ConfigError(f"data.packing: not with method: {cfg.method} (TRL pads each chosen/rejected sequence); "
                          "set data.packing: false")
    if d.train_on_prompt:
        raise ConfigError(f"data.train_on_prompt: method {cfg.method} scores the answers only; remove it")
    if d.max_seq_len is None:
        logger.warning("data.max_seq_len is null: TRL will not truncate prompt + answer sequences")
    if cfg.method == "kto":
        loss_type = t.get("loss_type", "kto")
        batch = t.get("per_device_train_batch_size", 8)
        # TRL's KL estimate pairs each prompt with another row's completion inside the micro-batch
        if loss_type != "apo_zero_unpaired" and isinstance(batch, int) and batch < 2:
            raise ConfigError(f"train.per_device_train_batch_size: KTO's KL term needs at least 2 rows per "
                              f"micro-batch, got {batch} (or set train.loss_type: apo_zero_unpaired)")


def row_shape(method: str) -> str:
    return "{prompt, chosen, rejected}" if method == "dpo" else "{prompt, completion, label}"
