"""Memory-lean causal-LM loss: cross-entropy from the final hidden states in chunks of tokens, so that the full
``[tokens x vocab]`` logits never exist (``loss.impl: chunked``, the default).

How it plugs in (composition, no Trainer subclass): the ``*ForCausalLM`` instance's ``forward`` is wrapped. When it
is called with ``labels`` (the Trainer's training and evaluation steps), the wrapper runs the model's own forward
with ``labels=None`` and ``logits_to_keep=1`` (the model projects one position per row onto the vocabulary), takes
the decoder's final (normed) hidden states through a forward hook, and applies the lm_head *module* per chunk under
``torch.utils.checkpoint``: each chunk's logits live only while its loss is computed and are recomputed in
backward. Calling the module (not reading ``.weight``) is what makes it right for peft's ``modules_to_save`` copy
of lm_head, tied embeddings, and ZeRO-3, whose pre-forward hooks gather the partitioned weight on each call —
all inside the DeepSpeed engine's forward. Without labels (generation, the packing probe, export) the model's
own forward runs unchanged.

The reduction is the one of transformers' ``ForCausalLMLoss``: labels shifted by one (or the batch's
``shift_labels``), ``ignore_index=-100``, fp32 logits, summed and divided by ``num_items_in_batch`` when the Trainer
passes it (gradient-accumulation normalisation), else the mean over counted tokens. In evaluation the wrapper
returns per-row ``(summed NLL, counted tokens)`` as ``logits``: all ``dsft.callbacks.compute_metrics`` needs for
perplexity, so evaluation holds no logits either.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import types

import torch
from torch.nn import functional as F

from dsft.errors import ConfigError

logger = logging.getLogger("dsft")

IGNORE_INDEX = -100
# Config fields of transformers models whose logits are not lm_head(hidden) alone (softcapping: Gemma 2/3;
# scaling: Cohere, Granite); the chunked loss would differ from the model's own, so it is not used for them.
LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_MARK = "_dsft_chunked_loss"


def causal_lm(model):
    """The ``*ForCausalLM`` module inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(lm) -> str | None:
    """Why the chunked loss would not be exact (or cannot run) for this model; None when it is."""
    if not callable(getattr(lm, "get_output_embeddings", None)) or lm.get_output_embeddings() is None:
        return f"{type(lm).__name__} has no output embeddings (lm_head)"
    try:
        lm.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return f"{type(lm).__name__} does not expose its decoder (get_decoder)"
    if "logits_to_keep" not in inspect.signature(type(lm).forward).parameters:
        return f"{type(lm).__name__}.forward has no logits_to_keep argument"
    config = getattr(lm, "config", None)
    for name in LOGIT_TRANSFORM_FIELDS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0, 0, 0.0, False):
            return f"{type(lm).__name__} transforms its logits ({name}={value})"
    return None


def _chunk_count(tokens: int, chunk_tokens: int, lm_head: torch.nn.Module, device: torch.device) -> int:
    chunks = max(1, math.ceil(tokens / chunk_tokens))
    if any(hasattr(p, "ds_id") for p in lm_head.parameters()) and torch.distributed.is_initialized():
        # ZeRO-3: each lm_head call gathers its partitioned weight with a collective (DeepSpeed's pre-forward hook),
        # again when backward recomputes the chunk. Ranks with different row lengths would call it a different
        # number of times and the collectives would mismatch: all ranks use the largest chunk count.
        count = torch.tensor([chunks], device=device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        chunks = int(count.item())
    return chunks


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    lm_head: torch.nn.Module,
    chunk_tokens: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    row_sums: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token cross-entropy of ``lm_head(hidden)`` computed ``chunk_tokens`` rows at a time.

    ``hidden``: [batch, seq, hidden] final hidden states. Returns (loss, per-row [batch, 2] (summed NLL, counted
    tokens) when ``row_sums`` else None).
    """
    given_shift_labels = shift_labels is not None
    if shift_labels is None:
        # as ForCausalLMLoss: position t predicts label t+1; the last position of every row predicts nothing
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    batch, seq = shift_labels.shape[:2]
    flat_hidden = hidden.reshape(batch * seq, hidden.size(-1))
    flat_labels = shift_labels.reshape(-1).to(hidden.device)

    def chunk_nll(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # fp32 logits, as ForCausalLMLoss upcasts before the cross-entropy
        return F.cross_entropy(lm_head(h).float(), y, ignore_index=IGNORE_INDEX, reduction="none")

    pieces = []
    chunks = _chunk_count(flat_labels.numel(), chunk_tokens, lm_head, hidden.device)
    # Recompute each chunk's logits in backward instead of keeping them (the whole point). Needless without grad;
    # with one chunk the peak (logits live at the start of backward either way) would not drop, only time be added.
    checkpointed = torch.is_grad_enabled() and chunks > 1
    for h, y in zip(torch.tensor_split(flat_hidden, chunks), torch.tensor_split(flat_labels, chunks)):
        if checkpointed:
            pieces.append(torch.utils.checkpoint.checkpoint(chunk_nll, h, y, use_reentrant=False))
        else:
            pieces.append(chunk_nll(h, y))
    nll = torch.cat(pieces)  # [tokens] fp32, 0 where ignored: small next to the logits
    total = nll.sum()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    elif given_shift_labels:
        # Sequence parallelism (transformers' deepspeed_sp_compute_loss passes shift_labels, no num_items_in_batch)
        # weights each rank's mean by its counted tokens; a rank whose slice holds only prompt tokens has none and
        # must give 0, not 0/0: a nan there would reach every rank's gradients through the weighted all-gather.
        loss = total / (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
    else:
        loss = total / (flat_labels != IGNORE_INDEX).sum()  # the mean over counted tokens (nan if none, as stock)
    rows = None
    if row_sums:
        counted = (shift_labels != IGNORE_INDEX).to(hidden.device)
        rows = torch.stack([nll.detach().view(batch, seq).sum(-1), counted.sum(-1).float()], dim=-1)
    return loss, rows


def enable_chunked_loss(model, chunk_tokens: int) -> bool:
    """Wrap the causal LM's forward so that calls with ``labels`` use the chunked loss. Returns False (and logs
    why) where it would not be exact; the model's own loss then stays in use."""
    lm = causal_lm(model)
    reason = unsupported_reason(lm)
    if reason is not None:
        logger.warning("loss.impl=chunked: %s; using the model's own loss (full logits)", reason)
        return False
    if getattr(lm.forward, _MARK, False):
        return True
    original = lm.forward  # bound method

    @functools.wraps(original)  # keeps the signature the Trainer inspects (it has **kwargs: loss kwargs accepted)
    def forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or kwargs.get("return_dict") is False:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original(*args, labels=labels, **kwargs)
        shift_labels = kwargs.pop("shift_labels", None)
        captured = []
        # The decoder's output is the final normed hidden state; a hook added per call keeps no tensor afterwards.
        handle = self.get_decoder().register_forward_hook(lambda module, inputs, output: captured.append(output[0]))
        try:
            outputs = original(*args, labels=None, logits_to_keep=1, **kwargs)
        finally:
            handle.remove()
        loss, rows = chunked_causal_lm_loss(
            captured[-1], labels, self.get_output_embeddings(), chunk_tokens, num_items_in_batch, shift_labels,
            row_sums=not torch.is_grad_enabled(),
        )
        # A new output (ModelOutput keeps None fields out of its dict; the one-position logits are dropped).
        # Training ignores logits; evaluation gets the per-row sums (dsft.callbacks.preprocess_logits_for_metrics).
        rest = {k: v for k, v in outputs.items() if k not in ("loss", "logits")}
        return type(outputs)(loss=loss, logits=rows, **rest)

    logger.info("loss: chunked cross-entropy, %d tokens per chunk (loss.impl=chunked)", chunk_tokens)
    setattr(forward, _MARK, True)
    # a bound method, as accelerate re-wraps model.forward.__func__ for mixed precision
    lm.forward = types.MethodType(forward, lm)
    return True


def check_loss_impl(impl: str) -> None:
    """``loss.impl: liger`` needs the liger_kernel package and a CUDA GPU (Triton kernels); refuse early otherwise."""
    if impl != "liger":
        return
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("loss.impl: liger needs the liger-kernel package (pip install liger-kernel), which is "
                          "not installed; use loss.impl: chunked")
    if not torch.cuda.is_available():
        raise ConfigError("loss.impl: liger runs Triton kernels on a CUDA GPU and none is available here; "
                          "use loss.impl: chunked")
