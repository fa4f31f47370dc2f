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

from dsft.config import LOG_FILE_NAME
from dsft.flops import device_peak_flops, model_matmul_params, train_flops_per_token
from dsft.fsutil import atomic_write_text
# Optimizer steps left out of tokens/s and MFU at the start of a run (and of a resumed one): one-off set-up costs.
THROUGHPUT_WARMUP_STEPS = 2


def peak_memory_bytes() -> int:
    """Peak memory of this process on its device: allocator peak on an accelerator, peak RSS on CPU."""
    if torch.accelerator.is_available():
        return int(torch.accelerator.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class MetricsCallback(TrainerCallback):
    """Adds tokens/s per device (non-pad tokens, cumulative from the end of the first THROUGHPUT_WARMUP_STEPS
    optimizer steps on: absent until then; ``throughput_steps_measured`` says over how many steps), MFU where the
    device's peak is known (``dsft.flops.device_peak_flops``: measured on the CPU, the accelerator table for 16-bit GPU runs) and
    peak memory to every training log, and appends every log (train and eval) to ``output_dir/dsft_log.jsonl``
    on rank 0.

    MFU counts the matmul FLOPs of the model (``dsft.flops.train_flops_per_token`` without attention scores,
    whose cost depends on each packed sample's length) and no activation recompute. Preference tuning runs
    forwards without a backward over the same tokens too (``dsft.preference.extra_forwards``): each reference
    forward adds 2 FLOPs per reference matmul weight (the policy's without LoRA's A/B: with LoRA the reference is
    the base with the adapter disabled), each extra policy forward (KTO's KL estimate) 2 per policy matmul weight.
    dsft moves the reporting callbacks (TensorBoard, ...) after this one so they see these metrics.
    """

    def __init__(self, reference_forwards: int = 0, policy_forwards: int = 0) -> None:
        self.reference_forwards, self.policy_forwards = reference_forwards, policy_forwards
        self._last_time: float | None = None
        self._last_tokens = 0
        self._warmup_until = THROUGHPUT_WARMUP_STEPS
        self._measured_from = 0
        self._flops_per_token: float | None = None
        self._peak_flops: float | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            matmul, trainable = model_matmul_params(model)
            self._flops_per_token = train_flops_per_token(matmul, trainable)["model"]
            if self.reference_forwards or self.policy_forwards:
                self._flops_per_token += 2 * (self.reference_forwards * reference_matmul_params(model)
                                              + self.policy_forwards * matmul)
            self._peak_flops = device_peak_flops("bf16" if args.bf16 else "fp16" if args.fp16 else "fp32")
        # throughput is measured from the end of the warm-up steps on (see on_step_end)
        self._warmup_until = state.global_step + THROUGHPUT_WARMUP_STEPS
        self._last_time = None
        self._last_tokens = state.num_input_tokens_seen
        log = Path(args.output_dir) / LOG_FILE_NAME
        if state.is_world_process_zero and state.global_step == 0 and log.exists():
            log.unlink()  # a fresh run starts a fresh log; a resumed one appends
        elif state.is_world_process_zero and log.exists():
            # resumed from checkpoint-N: records after step N came from work that was lost (a failed or
            # interrupted later save) and are about to be logged again; keep each step once
            drop_records_after(log, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # The first steps pay one-off costs (DeepSpeed engine and communicator set-up, op JIT, allocator growth):
        # a 4-step run's first window read 63 tokens/s, a later one 785, and a short window's MFU 84 %. The clock
        # starts when they are done, and the rate is cumulative from there, so it averages over every measured step.
        if self._last_time is None and state.global_step >= self._warmup_until:
            self._last_time, self._last_tokens = time.perf_counter(), state.num_input_tokens_seen
            self._measured_from = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs:
            logs["peak_memory_gb"] = round(peak_memory_bytes() / 2**30, 3)
        if "loss" in logs and self._last_time is not None and state.global_step > self._measured_from:
            elapsed = max(time.perf_counter() - self._last_time, 1e-9)
            tokens = state.num_input_tokens_seen - self._last_tokens
            # num_input_tokens_seen is summed over all processes; the rate covers steps after the warm-up only
            logs["tokens_per_second_per_device"] = round(tokens / elapsed / max(args.world_size, 1), 2)
            logs["throughput_steps_measured"] = state.global_step - self._measured_from
            if self._flops_per_token and self._peak_flops:
                logs["mfu"] = round(logs["tokens_per_second_per_device"] * self._flops_per_token / self._peak_flops, 5)
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(args.output_dir) / LOG_FILE_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def drop_records_after(log: Path, step: int) -> int:
    """Rewrite a JSONL log without its records of steps after ``step`` (atomically); returns how many went."""
    kept, dropped = [], 0
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            after = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError, TypeError):
            after = True  # a line torn by a crash or a full disk: no step to keep it for
        if after:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(log, "".join(line + "\n" for line in kept))
    return dropped


def reference_matmul_params(model) -> int:
    """Matmul weights of a preference reference forward: every nn.Linear of ``model`` but LoRA's A/B (at full size
    under ZeRO-3). A full-fine-tuning reference is a frozen copy of the same shapes."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name:
            total += int(getattr(module.weight, "ds_numel", module.weight.numel()))
    return total


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
