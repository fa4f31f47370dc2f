"""Quantized base weights (QLoRA): the bitsandbytes config built from ``peft.quantization``, the checks, the
k-bit preparation before LoRA, and the byte count of a (partly) quantized model.

Nothing here imports bitsandbytes at module import time.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

from dsft.errors import ConfigError

if TYPE_CHECKING:
    from dsft.config import QuantizationConfig, RunConfig

# bitsandbytes' CPU backend warns once per process that the optional `kernels` package is missing; installing
# it does not make the CPU path faster here (it tries the hub at import and falls back), so the warning is noise.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def quant_storage(q: QuantizationConfig, model_dtype: str) -> str:
    """The dtype the packed 4-bit weights are stored as: the configured one, else the model dtype.

    Defaulting to the model dtype (rather than bitsandbytes' uint8) is what lets ZeRO-3 partition the packed
    weights like any other tensor of the model; it changes nothing for the maths and nothing without ZeRO-3.
    """
    return q.quant_storage or model_dtype


def validate_quantization(cfg: RunConfig) -> None:
    """Checks of ``peft.quantization`` that need no model (called from ``config.validate``)."""
    q = cfg.peft.quantization if cfg.peft is not None else None
    if q is None:
        return
    if q.bits == 8 and q.quant_storage is not None:
        raise ConfigError("peft.quantization.quant_storage: only applies to bits: 4; remove it for 8-bit")
    if cfg.model.init != "pretrained":
        raise ConfigError("peft.quantization: quantizes pretrained weights while loading them; "
                          "model.init: from_config has none (use init: pretrained or remove peft.quantization)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("peft.quantization: needs the bitsandbytes package; pip install 'dsft[qlora]'")


def bnb_config(q: QuantizationConfig, model_dtype: str):
    """``transformers.BitsAndBytesConfig`` for ``from_pretrained(quantization_config=...)``."""
    # deferred: torch and transformers; dsft.config imports this module to validate peft.quantization
    import torch
    from transformers import BitsAndBytesConfig

    logging.getLogger(_BNB_CPU_LOGGER).setLevel(logging.ERROR)  # before bitsandbytes is first imported
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "uint8": torch.uint8}
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtypes[q.compute_dtype or model_dtype],
        bnb_4bit_quant_storage=dtypes[quant_storage(q, model_dtype)],
    )


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def keep_trainable_4bit_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout; return the layers changed.

    bitsandbytes 0.50 ``Linear4bit.forward``, on a CPU with AVX512-BF16, repacks the weight for its fused kernel the
    first time it runs in eval mode without grad (dsft's packing-isolation check, an evaluation) and never undoes
    it. From then on every forward, in training too, goes through ``gemv_4bit``: computed in bf16 and with no
    autograd kernel, so no gradient flows back through the frozen base weights (only through the LoRA branches).
    Training after that silently differs (grad norm roughly halved on a tiny Llama); ZeRO-3 runs escaped it only
    because dsft skips the check there. The dequantize + matmul path stays exact and differentiable.
    """
    changed = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        # already repacked: undo it (bitsandbytes re-quantizes double-quant scales: close, not bit-identical)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # deferred: optional `qlora`

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            module.quant_state = weight.quant_state
        changed += 1
    return changed


def prepare_for_kbit_training(model):
    """peft's k-bit preparation (freeze the base, norms and the other unquantized weights in fp32) before LoRA.

    Activation checkpointing is NOT enabled here (``use_gradient_checkpointing=False``): the Trainer enables it
    from ``train.gradient_checkpointing`` with ``model.gradient_checkpointing_reentrant``, for quantized and
    unquantized models alike, and makes the frozen embedding output require grad (what reentrant checkpointing
    needs to reach the LoRA weights) — doing it here too would enable it twice, through transformers' deprecated
    ``gradient_checkpointing_enable``. Non-reentrant stays the default: with frozen 4-bit weights both modes gave
    identical losses under ZeRO-3 (tests/test_qlora.py), and non-reentrant does not depend on that hook.
    """
    from peft import prepare_model_for_kbit_training  # deferred: peft (see bnb_config)

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def weight_bytes(model) -> dict:
    """Bytes the model's weights take, counted from the tensors: ``quantized`` (the packed bitsandbytes weights
    plus their quantization state: absmax, nested absmax, code), ``other`` (every other parameter and buffer)
    and ``total``. Under ZeRO-3 a partitioned parameter counts its local partition."""
    quantized = other = 0
    seen: set[int] = set()

    def nbytes(t) -> int:
        if t is None or id(t) in seen:
            return 0
        seen.add(id(t))
        return t.numel() * t.element_size()

    def state_bytes(state) -> int:
        if state is None:
            return 0
        total = sum(nbytes(getattr(state, name, None)) for name in ("absmax", "code", "offset"))
        return total + state_bytes(getattr(state, "state2", None))

    for p in model.parameters():
        held = p.ds_tensor if hasattr(p, "ds_tensor") else p
        if type(p).__name__ in ("Params4bit", "Int8Params"):
            quantized += nbytes(held) + state_bytes(getattr(p, "quant_state", None))
            quantized += nbytes(getattr(p, "SCB", None))  # LLM.int8 row scales
        else:
            other += nbytes(held)
    for b in model.buffers():
        other += nbytes(b)
    return {"quantized": quantized, "other": other, "total": quantized + other}
