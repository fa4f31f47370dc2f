"""Using a finished run: load a model or an adapter, merge an adapter into its base, generate text."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from dsft.config import RESOLVED_CONFIG_NAME, ModelConfig, from_dict, read_yaml
from dsft.errors import DsftError
from dsft.model import ensure_pad_token, load_model

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_model_config(adapter_dir: str | os.PathLike, base: str | None = None, dtype: str = "fp32") -> ModelConfig:
    """How to load the adapter's base: the run's resolved config (same overrides), else adapter_config.json.

    Only the ``model`` section is taken: a QLoRA run's ``peft.quantization`` is deliberately NOT applied, so the
    base comes back in full precision (``dtype``). Merging into 4-bit weights would round W + BA to 4 bits again
    (bench/lora_vs_qlora.py, SmolLM2: max abs logit difference 4.85 against base + unmerged adapter; 1.0e-4 in fp32).
    """
    adapter_dir = Path(adapter_dir)
    resolved = adapter_dir / RESOLVED_CONFIG_NAME
    if resolved.is_file():
        cfg = from_dict(read_yaml(resolved)).model
    else:
        info = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        cfg = ModelConfig(name_or_path=info.get("base_model_name_or_path") or "")
    if base:
        cfg.name_or_path = base
    if cfg.init != "pretrained":
        raise DsftError(f"{adapter_dir}: the base model was randomly initialised (model.init={cfg.init}), "
                        "so there are no base weights to merge into")
    if not cfg.name_or_path:
        raise DsftError(f"{adapter_dir}: the adapter does not name its base model; pass --base")
    cfg.dtype = dtype
    return cfg


def load_for_inference(path: str | os.PathLike, dtype: str = "fp32", base: str | None = None):
    """(model, tokenizer) from a full model dir, or base + adapter from an adapter dir, in eval mode."""
    from transformers import AutoTokenizer  # deferred: as in dsft.model, each library loads when first needed

    path = Path(path)
    if not path.exists():
        raise DsftError(f"{path}: no such model or adapter directory")
    if is_adapter_dir(path):
        from peft import PeftModel  # deferred: peft (~6 s) for adapter dirs only

        model = PeftModel.from_pretrained(load_model(base_model_config(path, base, dtype)), str(path))
    else:
        model = load_model(ModelConfig(name_or_path=str(path), dtype=dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ensure_pad_token(tokenizer)
    model.eval()
    return model, tokenizer


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output dir (before any heavy work) unless overwriting was asked for."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DsftError(f"--out {out_dir}: exists and is not empty; choose another dir or pass --overwrite")


def write_model_dir(model, tokenizer, out_dir: Path) -> Path:
    """Save an HF model dir (safetensors) into a temporary sibling, then swap it into place, so a failed
    save never leaves a half-written dir where a model is expected."""
    tmp = out_dir.with_name(out_dir.name + ".tmp-write")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "fp32",
                  base: str | None = None, overwrite: bool = False) -> Path:
    """Merge a LoRA (or QLoRA) adapter into a freshly loaded full-precision base (``dtype``: fp32 or bf16, never
    the 4-bit base it was trained on) and save an HF model dir."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not is_adapter_dir(adapter_dir):
        raise DsftError(f"{adapter_dir}: not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    check_output_dir(out_dir, overwrite)
    model, tokenizer = load_for_inference(adapter_dir, dtype=dtype, base=base)
    return write_model_dir(model.merge_and_unload(), tokenizer, out_dir)


def generate(path: str | os.PathLike, prompt: str, max_new_tokens: int = 64, chat: bool = False,
             dtype: str = "fp32") -> str:
    """Greedy completion of ``prompt`` (as a user turn with the chat template when ``chat``)."""
    model, tokenizer = load_for_inference(path, dtype=dtype)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        # use_cache: training turns the KV cache off (also in the saved config); without it every new token
        # re-runs the whole sequence (~40x slower measured on SmolLM2)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
