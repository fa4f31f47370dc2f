"""ZeRO checkpoints → plain HF model directories (DeepSpeed's zero_to_fp32 does the gathering)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dsft.errors import DsftError


def consolidate(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Gather a ZeRO (stage 1-3) checkpoint's partitioned fp32 weights into an HF model dir (safetensors)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not checkpoint_dir.is_dir():
        raise DsftError(f"{checkpoint_dir}: no such checkpoint directory")
    if (checkpoint_dir / "adapter_config.json").is_file():
        raise DsftError(f"{checkpoint_dir}: a LoRA checkpoint; its adapter_model.safetensors is already complete "
                        "(use dsft merge to fold it into the base)")
    if not (checkpoint_dir / "latest").is_file() and not list(checkpoint_dir.glob("global_step*")):
        raise DsftError(f"{checkpoint_dir}: not a DeepSpeed ZeRO checkpoint (no 'latest' file or global_step* dir)")
    if not (checkpoint_dir / "config.json").is_file():
        raise DsftError(f"{checkpoint_dir}: no config.json to rebuild the model from")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DsftError(f"--out {out_dir}: exists and is not empty; choose another dir or pass --overwrite")

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    config = AutoConfig.from_pretrained(str(checkpoint_dir))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise DsftError(f"{checkpoint_dir}: checkpoint does not match its config.json "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    tmp = out_dir.with_name(out_dir.name + ".tmp-consolidate")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if (checkpoint_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(str(checkpoint_dir)).save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
