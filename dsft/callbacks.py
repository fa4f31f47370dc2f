"""Trainer extensions: throughput / memory metrics, a JSONL log, eval perplexity."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

LOG_FILE_NAME = "dsft_log.jsonl"


def peak_memory_bytes() -> int:
    """Peak memory of this process on its device: allocator peak on an accelerator, peak RSS on CPU."""
    if torch.accelerator.is_available():
        return int(torch.accelerator.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class MetricsCallback(TrainerCallback):
    """Adds tokens/s per device (non-pad tokens, over the last logging window), MFU where the device's peak is
    known (``dsft.plan.device_peak_flops``: measured on the CPU, the accelerator table for 16-bit GPU runs) and
    peak memory to every training log, and appends every log (train and eval) to ``output_dir/dsft_log.jsonl``
    on rank 0.

    MFU counts the matmul FLOPs of the model (``dsft.plan.train_flops_per_token`` without attention scores,
    whose cost depends on each packed sample's length) and no activation recompute.
    dsft moves the reporting callbacks (TensorBoard, ...) after this one so they see these metrics.
    """

    def __init__(self) -> None:
        self._last_time: float | None = None
        self._last_tokens = 0
        self._flops_per_token: float | None = None
        self._peak_flops: float | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            from dsft.plan import device_peak_flops, model_matmul_params, train_flops_per_token

            self._flops_per_token = train_flops_per_token(*model_matmul_params(model))["model"]
            self._peak_flops = device_peak_flops("bf16" if args.bf16 else "fp16" if args.fp16 else "fp32")
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen
        log = Path(args.output_dir) / LOG_FILE_NAME
        if state.is_world_process_zero and state.global_step == 0 and log.exists():
            log.unlink()  # a fresh run starts a fresh log; a resumed one appends

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs and self._last_time is not None:
            now = time.perf_counter()
            tokens = state.num_input_tokens_seen - self._last_tokens
            elapsed = max(now - self._last_time, 1e-9)
            # num_input_tokens_seen is summed over all processes
            logs["tokens_per_second_per_device"] = round(tokens / elapsed / max(args.world_size, 1), 2)
            if self._flops_per_token and self._peak_flops:
                logs["mfu"] = round(logs["tokens_per_second_per_device"] * self._flops_per_token / self._peak_flops, 5)
            logs["peak_memory_gb"] = round(peak_memory_bytes() / 2**30, 3)
            self._last_time, self._last_tokens = now, state.num_input_tokens_seen
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(args.output_dir) / LOG_FILE_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row (summed next-token NLL, counted tokens): the small tensors eval keeps instead of logits."""
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    counted = (shift_labels != -100)
    return torch.stack([nll.sum(-1), counted.sum(-1).to(nll.dtype)], dim=-1)


def preprocess_logits_for_metrics(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    if logits.dim() == 2:  # already per-row (NLL sum, tokens): the chunked loss (dsft.loss) built no logits
        return logits
    return token_loss_sums(logits, labels)


def compute_metrics(eval_pred) -> dict:
    """Token-weighted eval perplexity (exp of total NLL over total loss tokens)."""
    sums = eval_pred.predictions
    total_nll, total_tokens = float(sums[..., 0].sum()), float(sums[..., 1].sum())
    mean = total_nll / max(total_tokens, 1.0)
    return {"perplexity": math.exp(min(mean, 50.0)), "token_nll": mean}
