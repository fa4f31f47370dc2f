"""Model and tokenizer loading, LoRA wrapping, and the layered-learning-rate parameter groups."""

from __future__ import annotations

import logging
import re
import warnings

import torch
from torch import nn

from dsft.config import ModelConfig, PeftConfig, QuantizationConfig
from dsft.errors import ConfigError, DsftError
from dsft.quant import bnb_config, keep_trainable_4bit_layout, prepare_for_kbit_training

logger = logging.getLogger(__name__)
# peft 0.x builds every PeftModel (get_peft_model, PeftModel.from_pretrained) by reading the model's
# is_gradient_checkpointing, which transformers 5 deprecated with a FutureWarning: noise about library internals
# that a dsft user can do nothing about. Only that message, only from where transformers issues it.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.modeling_utils")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Parameters that get no weight decay: biases and norm weights (same name patterns as transformers' Trainer).
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def _trust_remote_code(cfg: ModelConfig) -> bool:
    if cfg.trust_remote_code:
        warnings.warn(
            f"model.trust_remote_code is on: Python code shipped with {cfg.name_or_path} will run", stacklevel=2
        )
    return cfg.trust_remote_code


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer, with a pad token that is safe for dsft's label masks."""
    # deferred (here and below): dsft prepare imports this module for the tokenizer and dsft plan for the config;
    # the model classes, peft (~6 s) and the Trainer load only where a model is built
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision,
                                                  trust_remote_code=_trust_remote_code(cfg))
    except (OSError, ValueError) as e:  # missing/unreadable tokenizer files: name the key, no traceback
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        raise _load_error(key, "tokenizer", source, e) from None
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token one, without growing the vocabulary.

    Reusing an existing token keeps the embedding matrix (and LoRA adapters trained on it) the same
    shape as the base model's. This is safe because dsft builds labels and attention masks itself:
    a pad id is never read as "ignore this position"; the unk token is preferred over EOS so that
    non-padding token counts stay exact.
    """
    if tokenizer.pad_token_id is not None:
        return
    for candidate in (tokenizer.unk_token, tokenizer.eos_token, tokenizer.bos_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            logger.info("tokenizer has no pad token; using %r", candidate)
            return
    raise DsftError("the tokenizer has no pad, unk, eos or bos token to pad with; add a pad token to it")


def align_pad_token(model, tokenizer) -> None:
    """Give the model's config and generation config the tokenizer's pad id where they have none, as the Trainer
    does when training starts (transformers.trainer_utils.align_special_tokens), but without its warning "The
    tokenizer has new PAD/BOS/EOS tokens ...": a pad id the model lacks is the tokenizer's or dsft's choice
    (ensure_pad_token), and dsft's labels and masks never read it. A pad id, BOS or EOS that contradicts the model's
    is left to that warning (rank 0's only: dsft.console)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        return
    config = model.config.get_text_config()
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = pad


def _load_error(key: str, what: str, source: str, e: Exception) -> ConfigError:
    text = " ".join(str(e).split()) or type(e).__name__  # one line
    return ConfigError(f"{key}: cannot load the {what} from {source}: {text[:300]}")


def load_config_object(cfg: ModelConfig):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                            trust_remote_code=_trust_remote_code(cfg))
    except (OSError, ValueError) as e:
        raise _load_error("model.name_or_path", "model config", cfg.name_or_path, e) from None
    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"model.config_overrides.{key}: {type(config).__name__} has no field '{key}'")
        setattr(config, key, value)
    return config


def load_model(cfg: ModelConfig, quantization: QuantizationConfig | None = None):
    """AutoModelForCausalLM from weights (``pretrained``) or random init (``from_config``); with
    ``quantization`` the linear layers are loaded as bitsandbytes 4-/8-bit layers (QLoRA)."""
    from transformers import AutoModelForCausalLM

    config = load_config_object(cfg)
    common = dict(dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation,
                  trust_remote_code=cfg.trust_remote_code)
    if quantization is not None:
        common["quantization_config"] = bnb_config(quantization, cfg.dtype)
    if cfg.init == "from_config":
        model = AutoModelForCausalLM.from_config(config, **common)
    else:
        # safetensors only: pickled .bin checkpoints can execute code on load.
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name_or_path, config=config, revision=cfg.revision, use_safetensors=True, **common
            )
        except OSError as e:  # no (safetensors) weights there
            raise _load_error("model.name_or_path", "weights", cfg.name_or_path, e) from None
    # Training never reads a KV cache, and with one transformers stops confining attention to packed samples.
    model.config.use_cache = False
    if quantization is not None:
        # else one eval-mode forward (packing check, evaluation) switches bitsandbytes' CPU 4-bit layers to a bf16
        # kernel that back-propagates nothing through the base weights, for the rest of the run (dsft.quant)
        keep_trainable_4bit_layout(model)
    return model


def peft_lora_config(peft_cfg: PeftConfig):
    """peft's LoraConfig from dsft's peft.lora section (also handed to TRL's preference trainers)."""
    from peft import LoraConfig as PeftLoraConfig

    lo = peft_cfg.lora
    return PeftLoraConfig(
        r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
        use_rslora=lo.use_rslora, use_dora=lo.use_dora, modules_to_save=lo.modules_to_save, bias=lo.bias,
        task_type="CAUSAL_LM",
    )


def apply_lora(model, peft_cfg: PeftConfig, gradient_checkpointing_reentrant: bool):
    from peft import get_peft_model

    if peft_cfg.quantization is not None:
        model = prepare_for_kbit_training(model)
    lora = peft_lora_config(peft_cfg)
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise ConfigError(f"peft.lora.target_modules: {e}") from None
    if gradient_checkpointing_reentrant:
        # Reentrant checkpointing only back-propagates if the checkpointed block's input requires grad,
        # which frozen embeddings never do.
        model.enable_input_require_grads()
    return model


def is_no_decay(name: str) -> bool:
    return any(re.search(p, name.lower()) for p in NO_DECAY_PATTERNS)


def is_boosted(name: str) -> bool:
    """LoRA B matrices and fully trained new modules (peft's modules_to_save copies) get lr × lr_ratio."""
    return "lora_B" in name or "lora_embedding_B" in name or ".modules_to_save." in name


def parameter_groups(model: nn.Module, learning_rate: float, weight_decay: float, lr_ratio: float) -> list[dict]:
    """Optimizer groups: (base | boosted lr) × (decay | no decay); empty groups are left out."""
    groups: dict[tuple[bool, bool], list] = {}
    names: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (is_boosted(name) and lr_ratio != 1.0, is_no_decay(name))
        groups.setdefault(key, []).append(param)
        names.setdefault(key, []).append(name)
    out = []
    for (boosted, no_decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": learning_rate * (lr_ratio if boosted else 1.0),
            "weight_decay": 0.0 if no_decay else weight_decay,
            "names": names[(boosted, no_decay)],
        })
    return out


def optimizer_cls_and_kwargs(model: nn.Module, args, lr_ratio: float):
    """The optimizer the user's TrainingArguments select (``optim``), fed dsft's parameter groups."""
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = parameter_groups(model, args.learning_rate, args.weight_decay, lr_ratio)
    for g in groups:  # "names" is for inspection; torch optimizers keep unknown keys, but keep them clean
        g.pop("names")
    kwargs = dict(kwargs, params=groups)
    return optimizer_cls, kwargs


def count_parameters(model: nn.Module) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):
        # peft counts a packed 4-bit weight as the parameters it holds (not its bytes) and ZeRO-3's ds_numel
        return model.get_nb_trainable_parameters()
    # ZeRO-3 (zero.Init) leaves each parameter empty between uses; ds_numel is its full size
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return trainable, total


def parameter_elements(model: nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model); they differ under ZeRO-3, where each
    parameter keeps only its partition in ``ds_tensor``."""
    local = total = 0
    for p in model.parameters():
        total += getattr(p, "ds_numel", p.numel())
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return local, total
