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
    from dsft.export import check_output_dir, write_model_dir

    check_output_dir(out_dir, overwrite)

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
    tokenizer = None
    if (checkpoint_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    write_model_dir(model, tokenizer, out_dir)
    return out_dir


def checkpoint_tag(checkpoint_dir: Path) -> str | None:
    """The DeepSpeed tag (global_stepN) a checkpoint dir holds: from its 'latest' file, else the newest."""
    latest = checkpoint_dir / "latest"
    if latest.is_file():
        return latest.read_text().strip()
    steps = sorted(checkpoint_dir.glob("global_step*"), key=lambda p: p.stat().st_mtime)
    return steps[-1].name if steps else None


def saved_world_size(checkpoint_dir: str | os.PathLike) -> int | None:
    """How many data-parallel ranks wrote a ZeRO (stage 1-3) checkpoint: one optimizer partition per rank.
    None for checkpoints without partitions (no DeepSpeed, or ZeRO-0)."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = checkpoint_tag(checkpoint_dir)
    if tag is None:
        return None
    count = len(list((checkpoint_dir / tag).glob("*zero_pp_rank_*_optim_states.pt")))
    return count or None


def to_universal(checkpoint_dir: str | os.PathLike, is_main: bool, timeout_s: float = 1800) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (ds_to_universal), once: the main process
    converts, the others wait for the ``latest_universal`` file DeepSpeed writes last."""
    import subprocess
    import sys
    import time

    checkpoint_dir = Path(checkpoint_dir)
    tag = checkpoint_tag(checkpoint_dir)
    marker = checkpoint_dir / "latest_universal"
    out = checkpoint_dir / f"{tag}_universal"
    if is_main and not marker.is_file():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(checkpoint_dir / tag), "--output_folder", str(out), "--num_extract_workers", "1",
               "--num_merge_workers", "1",
               # the HF Trainer does not record universal_checkpoint_info; DeepSpeed injects the default
               "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not marker.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DsftError(f"{checkpoint_dir}: conversion to a universal checkpoint failed: {' | '.join(tail)}")
    deadline = time.monotonic() + timeout_s
    while not marker.is_file():
        if time.monotonic() > deadline:
            raise DsftError(f"{checkpoint_dir}: timed out waiting for the universal checkpoint conversion")
        time.sleep(1)
    return out
