"""Model-state bytes a process really holds, counted from its tensors (not from RSS).

Counted just before the Trainer's optimizer step. Under DeepSpeed the engine has already stepped by then (accelerate
runs ``engine.step()`` inside ``backward``), so what is counted is what persists between steps; gradients DeepSpeed
frees at the step are not in it. Weights are the model's parameters (under ZeRO-3 only the partition in ``ds_tensor``); the optimizer side is
every tensor reachable from the optimizer object (DeepSpeed's ZeRO optimizers keep fp32 master partitions,
moments and gradient partitions in plain attributes, lists and dicts). Storages are counted once, so the flat
buffers ZeRO builds behind parameter views are not double counted.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from dsft.callbacks import peak_memory_bytes
from dsft.fsutil import atomic_write_json

MODEL_STATES_NAME = "dsft_model_states.json"


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    if t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    return (storage.data_ptr(), storage.nbytes()) if storage.nbytes() else None


def _parameter_tensors(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        out.append(p.data)
        if hasattr(p, "ds_tensor"):  # ZeRO-3: p.data is released between uses; the partition lives here
            out.append(p.ds_tensor)
    return out


def _reachable_tensors(root: object, max_depth: int = 8) -> list[torch.Tensor]:
    """Tensors in ``root``'s attributes, lists, tuples, sets and dicts (keys too: torch optimizers key state by
    parameter), skipping nn.Modules (their parameters are counted as weights)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack: list[tuple[object, int]] = [(root, 0)]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or depth > max_depth or isinstance(obj, nn.Module):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            if getattr(obj, "grad", None) is not None:
                found.append(obj.grad)
            continue
        if isinstance(obj, dict):
            children = [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("torch", "deepspeed", "accelerate",
                                                                                  "transformers", "bitsandbytes"):
            children = list(vars(obj).values())
        else:
            continue
        stack.extend((child, depth + 1) for child in children)
    return found


def held_model_state_bytes(model: nn.Module, optimizer: object | None) -> dict:
    """{"weights", "gradients", "optimizer_states", "total"} bytes this process holds right now.

    ``gradients`` counts ``param.grad`` tensors; ``optimizer_states`` everything else the optimizer reaches
    (fp32 master copies, moments, ZeRO gradient partitions), each storage once.
    """
    counted: set[tuple[int, int]] = set()

    def add(tensors: list[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            key = _storage_key(t)
            if key is not None and key not in counted:
                counted.add(key)
                total += key[1]
        return total

    weights = add(_parameter_tensors(model))
    grads = add([p.grad for p in model.parameters() if p.grad is not None])
    optim = add(_reachable_tensors(optimizer)) if optimizer is not None else 0
    return {"weights": weights, "gradients": grads, "optimizer_states": optim, "total": weights + grads + optim}


class ModelStateBytesCallback(TrainerCallback):
    """Counts held model-state bytes before each optimizer step and writes this rank's largest count, with its peak
    memory so far, to ``output_dir/dsft_model_states.json`` (rank r appends ``.rank{r}``)."""

    def __init__(self) -> None:
        self.peak: dict = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        now = held_model_state_bytes(model, optimizer)
        if now["total"] > self.peak.get("total", -1):
            self.peak = dict(now, step=state.global_step + 1)

    def on_train_end(self, args, state, control, **kwargs):
        rank = args.process_index
        path = Path(args.output_dir) / (MODEL_STATES_NAME + (f".rank{rank}" if rank else ""))
        record = dict(self.peak, rank=rank, pid=os.getpid(), peak_memory_bytes=peak_memory_bytes())
        atomic_write_json(path, record, indent=2)
