"""``dsft plan``: will a run fit, and how fast will it go — from the model config alone.

The model is built on the meta device (no weights, no RAM) to count parameters; peft wraps it the same way to
count the LoRA share. Per device the planner predicts

- model states (weights, gradients, optimizer states) with DeepSpeed's ZeRO formulas
  (``dsft.deepspeed.model_state_bytes``), scaled to the run's precision (fp32 / bf16 weights, mixed-precision
  master copies, 4-bit base weights);
- activations per micro-batch from a tensor-by-tensor count of what autograd saves in a pre-norm decoder layer
  (attention with rotary embeddings, gated MLP) and in the loss over the vocabulary, with and without activation
  checkpointing — ``tests/test_plan.py`` checks the count against the tensors torch really saves;
- DeepSpeed buffers (gradient buckets; ZeRO-3's gathered parameters and prefetch) and a fixed per-process
  overhead: the CUDA context on a GPU, the measured library baseline of a training process on the CPU;
- the peak, as the largest of the phases loading, forward/backward, optimizer step, final save and evaluation
  (with eval data); on the CPU plus what glibc malloc keeps resident of freed memory.

Step time comes from FLOPs (6 per parameter per token, 4 for frozen weights, plus attention and activation
recompute) at a stated MFU on a table of accelerator peaks (the CPU's peak is measured). ``recommend`` searches
ZeRO stage, offload, activation checkpointing and micro-batch for the fastest setup that fits at the configured
global batch. ``bench/plan_validation.py`` compares the predictions with measured peaks.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dsft.deepspeed import (_quantization, _zget, get_path, load_ds_config, model_state_bytes, offloads, resolve_auto,
                            zero_stage)
from dsft.errors import ConfigError
from dsft.flops import ACCELERATORS, accelerator_name, cpu_peak_flops, local_device_name, train_flops_per_token
from dsft.precision import auto_dtype, resolve_auto_dtype

if TYPE_CHECKING:
    from dsft.config import RunConfig

GiB = 2**30

DEFAULT_MFU = 0.40  # what well-tuned fine-tuning reaches on these parts; the estimate scales with it
# of the best measured CPU rate: dsft's LoRA fine-tune of SmolLM2-135M (fp32, one thread) ran at 32-42 % of it here
DEFAULT_MFU_CPU = 0.4
DEFAULT_HOST_BYTES = 512 * GiB
GPU_CONTEXT_BYTES = int(0.75 * GiB)  # CUDA/ROCm context + allocator reserve, per process
GPU_HOST_PROCESS_BYTES = 3 * GiB  # host RAM of one GPU training process (libraries incl. CUDA, data, pinned bufs)
# glibc malloc on the CPU: tensors up to its dynamic mmap threshold (<= 32 MiB) come from the heap once the threshold
# has risen, and freed heap blocks stay resident (only the top of the heap is returned). Peak RSS in default
# conditions exceeded what the run holds (runs with MALLOC_MMAP_THRESHOLD_=131072) by 5-32 % (median 13 %) of the
# part above the process baseline on the 8 rank rows measured both ways (bench/plan_validation.py: fp32, 1-2 ranks,
# ZeRO 0-3): planned as 20 % on top of every CPU phase. The larger, structural part is modelled where it arises:
# activation_bytes(heap_retains=True) and the training heap kept during evaluation. 0 when MALLOC_MMAP_THRESHOLD_ is
# set (freed blocks then leave RSS).
GLIBC_RETAINED_FRACTION = 0.20
# glibc, evaluation after training steps (default malloc): RSS climbs layer by layer through the eval forward, on
# top of the training heap glibc kept, and falls back when the evaluation ends -- freed per-layer eval tensors are
# not all reused by the next layer -- by more the more training steps came before. The demo
# (examples/demo-smollm2-lora.yaml: 8 x 512 eval tokens, 30 layers, whose eval layers' heap-sized transients add up
# to 2.27 GiB; bench/plan_validation.py's rss_timeline, 2026-11-30) grew 0.2 GiB in its evaluation before training,
# 0.59 after step 8, 1.13 after step 16 and 1.39 GiB in the final evaluation (two other runs of it grew less):
# up to 0.038 of that sum per optimizer step before the evaluation, i.e. all of it (nothing reused, the bound)
# from 27 steps on, and when the step count is not known (no max_steps).
EVAL_HEAP_GROWTH_PER_STEP = 0.038
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's dynamic mmap threshold stops here: larger blocks always get own mappings
FIT_FRACTION = 0.92  # plan to at most this share of device memory (allocator fragmentation, spikes)
OFFLOAD_HOST_BYTES_PER_S = 10e9  # optimizer offload: host Adam + PCIe traffic, per device (rough)
PCIE_BYTES_PER_S = 25e9  # parameter offload traffic per device


# --------------------------------------------------------------------------------------------------
# the model, counted on the meta device


@dataclass
class ModelShape:
    """Parameter counts and dimensions of the model a run config describes."""

    architecture: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    params: int  # unique parameters, LoRA adapters included
    trainable: int
    embedding_params: int
    lm_head_params: int  # 0 when tied to the embeddings
    matmul_params: int  # weights used in matmuls per token (decoder linears + lm_head, tied or not)
    frozen_matmul_params: int
    quantizable_params: int  # decoder-layer linear weights (what bitsandbytes quantizes; lm_head stays)
    largest_layer_params: int  # DeepSpeed's definition: most parameters directly in one module
    lora_params: int = 0
    lora_modules: list = field(default_factory=list)  # (input group, in_features) of one layer's adapted linears
    lora_rank: int = 0


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_config_for(cfg: RunConfig):
    """The model's transformers config with model.config_overrides applied (no weights are read)."""
    from dsft.model import load_config_object  # deferred: dsft.model loads torch; the CLI imports this module

    try:
        return load_config_object(cfg.model)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable config dir / unknown hub id: one line naming the key
        raise ConfigError(f"model.name_or_path: cannot read the model config from {cfg.model.name_or_path!r} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def model_shape(cfg: RunConfig, config: Any = None) -> ModelShape:
    """Count the parameters of the run's model on the meta device; with a peft section, wrap it in LoRA there."""
    # deferred: torch and transformers (~5 s), which the CLI's other commands (it imports this module) do not need
    import torch
    from transformers import AutoModelForCausalLM

    config = config if config is not None else model_config_for(cfg)
    # torch.device("meta"), not accelerate's init_empty_weights: under the latter transformers does not tie the
    # lm_head to the embeddings, which would count a tied model's head twice
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(_first(text, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(text, "num_attention_heads", "n_head"))
    shape_kwargs = dict(
        architecture=type(model).__name__,
        layers=int(_first(text, "num_hidden_layers", "n_layer")),
        hidden=hidden,
        intermediate=int(_first(text, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        heads=heads,
        kv_heads=int(_first(text, "num_key_value_heads", default=heads)),
        head_dim=int(_first(text, "head_dim", default=hidden // heads)),
        vocab=int(text.vocab_size),
    )
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    lm_head = out_emb.weight.numel() if out_emb is not None else 0
    decoder_linear = sum(m.weight.numel() for m in model.modules()
                         if isinstance(m, torch.nn.Linear) and m is not out_emb)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())

    lora_params = rank = 0
    lora_modules: list[tuple[str, int]] = []
    if cfg.peft is not None:
        from dsft.model import apply_lora  # deferred: torch (see model_config_for)

        with torch.device("meta"):
            model = apply_lora(model, cfg.peft, gradient_checkpointing_reentrant=False)
        rank = cfg.peft.lora.r
        first_layer = None
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                lora_params += sum(p.numel() for p in module.lora_A.parameters())
                lora_params += sum(p.numel() for p in module.lora_B.parameters())
                layer = re.search(r"\.(\d+)\.", name)
                if layer and (first_layer is None or layer.group(1) == first_layer):
                    first_layer = layer.group(1)
                    lora_modules.append((lora_group(name), int(module.in_features)))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    matmul = decoder_linear + lm_head
    frozen_mm = matmul if cfg.peft is not None else 0
    if cfg.peft is not None and cfg.peft.lora.modules_to_save and "lm_head" in cfg.peft.lora.modules_to_save:
        frozen_mm -= lm_head
    return ModelShape(**shape_kwargs, tied_embeddings=tied, params=params, trainable=trainable,
                      embedding_params=in_emb.weight.numel(), lm_head_params=0 if tied else lm_head,
                      matmul_params=matmul, frozen_matmul_params=frozen_mm, quantizable_params=decoder_linear,
                      largest_layer_params=largest, lora_params=lora_params, lora_modules=lora_modules,
                      lora_rank=rank)


# --------------------------------------------------------------------------------------------------
# the setup being planned


@dataclass
class Hardware:
    nodes: int = 1
    devices_per_node: int = 1  # GPUs per node, or ranks per node on the CPU
    device_memory_bytes: float = 80 * GiB  # on the CPU: the host memory shared by the node's ranks
    host_memory_bytes: float = 512 * GiB
    accelerator: str = "H100"  # a key of ACCELERATORS, or "cpu"
    peak_flops: float | None = None  # per device; None: from ACCELERATORS
    mfu: float = DEFAULT_MFU
    process_baseline_bytes: int | None = None  # CPU: RSS of a training process before the model (measured)
    malloc_retained_fraction: float | None = None  # CPU: glibc's retained heap; None: GLIBC_RETAINED_FRACTION
    assumed: str = ""  # how this hardware was chosen (a flag, or the machine dsft plan runs on); shown in the plan

    @property
    def world(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def is_cpu(self) -> bool:
        return self.accelerator == "cpu"


@dataclass(frozen=True)
class Setup:
    """One way to run: ZeRO stage (0 = no ZeRO), offloads, activation checkpointing, micro-batch, accumulation."""

    stage: int
    offload_optimizer: bool
    offload_params: bool
    activation_checkpointing: bool
    micro_batch: int
    accumulation: int
    deepspeed: bool = True  # False: plain DDP / single process (stage must be 0)

    def describe(self) -> str:
        if not self.deepspeed:
            zero = "no DeepSpeed"
        else:
            zero = f"ZeRO-{self.stage}"
            off = [n for n, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
            zero += f" + offload {'/'.join(off)}" if off else ""
        ac = "activation checkpointing" if self.activation_checkpointing else "no activation checkpointing"
        return f"{zero}, {ac}, micro-batch {self.micro_batch} x accumulation {self.accumulation}"

    def template(self) -> str | None:
        """The dsft DeepSpeed template that gives this setup (None: no DeepSpeed)."""
        if not self.deepspeed:
            return None
        if self.stage == 3 and (self.offload_optimizer or self.offload_params):
            return "zero3_offload"
        if self.stage == 2 and self.offload_optimizer:
            return "zero2_offload"
        return f"zero{self.stage}"


@dataclass
class Precision:
    weight_bytes: float  # bytes per weight element the module holds while training
    compute_bytes: int  # dtype of matmul outputs / activations
    master_copy: bool  # an fp32 copy of the trainable weights in the optimizer (DeepSpeed mixed precision)
    adam_state_bytes: int  # per trainable element (two moments)
    autocast: bool  # fp32 weights with bf16/fp16 autocast: each forward casts the weights


def precision_of(cfg: RunConfig, ds: dict | None) -> Precision:
    """How the run keeps its tensors: DeepSpeed with bf16/fp16 casts the module to 16 bits and keeps fp32 master
    weights; without DeepSpeed the weights stay in model.dtype and bf16 runs as autocast."""
    t = cfg.train
    half = bool(t.get("bf16") or t.get("fp16"))
    if ds is not None:
        ds_half = any(get_path(ds, f"{k}.enabled") in (True, "auto") and (get_path(ds, f"{k}.enabled") is True
                                                                           or t.get(k)) for k in ("bf16", "fp16"))
        if ds_half:
            return Precision(2, 2, True, 8, autocast=False)
        # DeepSpeed in fp32: ZeRO still keeps its own fp32 partition for the optimizer (a copy)
        return Precision(4, 4, zero_stage_of(ds) >= 1, 8, autocast=False)
    weight = 2 if cfg.model.dtype == "bf16" else 4
    if weight == 2:
        return Precision(2, 2, False, 4, autocast=False)  # torch optimizers keep moments in the param dtype
    return Precision(4, 2 if half else 4, False, 8, autocast=half)


def zero_stage_of(ds: dict | None) -> int:
    return zero_stage(ds) if ds is not None else 0


def quantization_bits(cfg: RunConfig) -> int | None:
    return _quantization(cfg)[0]


def _double_quant(cfg: RunConfig) -> bool:
    q = getattr(cfg.peft, "quantization", None) if cfg.peft is not None else None
    for name in ("bnb_4bit_use_double_quant", "double_quant", "use_double_quant"):
        value = q.get(name) if isinstance(q, dict) else getattr(q, name, None)
        if value is not None:
            return bool(value)
    return False


def weight_bytes_total(shape: ModelShape, prec: Precision, bits: int | None, double_quant: bool = False) -> float:
    """Bytes of all weights as the module holds them. bitsandbytes 4-bit: 0.5 byte per decoder-linear weight plus
    one fp32 absmax per 64 (double quantization: 8-bit absmax + fp32 per 256 blocks); 8-bit: 1 byte + fp32 row
    scales (negligible). Everything else (embeddings, norms, lm_head, LoRA) in the module dtype."""
    if bits in (4, 8):
        q = shape.quantizable_params
        per = 0.5 + ((1 / 64 + 4 / (64 * 256)) if double_quant else 4 / 64) if bits == 4 else 1.0
        return q * per + (shape.params - q) * prec.weight_bytes
    return shape.params * prec.weight_bytes


# --------------------------------------------------------------------------------------------------
# memory


@dataclass
class Memory:
    """Per-device bytes; ``peak`` is the largest phase. ``host`` is per node."""

    weights: int
    gradients: int
    optimizer_states: int
    optimizer_step_extra: int  # DeepSpeed's fp32 gradient partition, alive during the optimizer step
    activations: int
    buffers: int
    overhead: int
    peak: int
    peak_phase: str
    phases: dict[str, int]
    host: dict[str, int]
    reference_weights: int = 0  # DPO / KTO full fine-tuning: TRL's frozen reference copy (in every phase)
    reference_buffers: int = 0  # ... under ZeRO-3: the reference engine's gathered parameters in its forward

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer_states

    def as_dict(self) -> dict:
        return {"model_states": self.model_states, "weights": self.weights, "gradients": self.gradients,
                "optimizer_states": self.optimizer_states, "optimizer_step_extra": self.optimizer_step_extra,
                "activations": self.activations, "buffers": self.buffers,
                "overhead": self.overhead, "peak": self.peak, "peak_phase": self.peak_phase,
                "phases": dict(self.phases), "host": dict(self.host), "reference_weights": self.reference_weights,
                "reference_buffers": self.reference_buffers}


# which input a LoRA-adapted linear reads, from its name: the attention norm's output, the attention output,
# the MLP norm's output, or the MLP's inner product
_LORA_GROUPS = (("attn_out", ("o_proj", "out_proj", "wo", "dense")), ("mlp_mid", ("down_proj", "w2", "fc2")),
                ("mlp_in", ("gate_proj", "up_proj", "w1", "w3", "fc1")))


def lora_group(module_name: str) -> str:
    leaf = module_name.rsplit(".", 1)[-1]
    return next((group for group, names in _LORA_GROUPS if leaf in names), "attn_in")


def layer_activation_bytes(shape: ModelShape, prec: Precision, seq_len: int, attn: str, lora_dropout: float,
                           full_finetune: bool, zero3_linear: bool = False) -> float:
    """Bytes autograd keeps per token for one decoder layer (pre-norm attention with rotary + gated MLP).

    Counted tensor by tensor as torch 2.x / transformers 5 save them (``tests/test_plan.py`` checks this against
    ``saved_tensors_hooks``): each RMSNorm keeps its fp32 input and 1/rms, plus its normalized output when the
    norm weight trains; a linear keeps its input only when its weight trains (under autocast, one bf16 cast per
    linear); sdpa keeps q, k, v (at the query head count when a mask is passed, as packing and padding do), the
    output and the log-sum-exp, plus the float mask; the gated MLP keeps gate, silu(gate) and up (and their
    product for a training down projection). LoRA (peft keeps adapters in fp32) adds per adapted linear the
    dropout mask and output, or its input cast, and the rank-r intermediate.

    ``zero3_linear``: DeepSpeed ZeRO-3's ``zero.Init`` (``zero_optimization.memory_efficient_linear``, on by
    default) replaces ``torch.nn.functional.linear`` with ``LinearFunctionForZeroStage3``, which saves every
    linear's input for backward whether or not its weight trains; so under ZeRO-3 the frozen base linears of
    LoRA keep their inputs as in full fine-tuning (see ``zero3_frozen_linear_inputs``).
    """
    h, i, q = shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    a = prec.compute_bytes
    r = prec.weight_bytes if prec.weight_bytes in (2, 4) else 2
    norm = 4 * h + 4 + ((4 if r == 4 else r) * h if full_finetune else 0)
    if full_finetune:
        linear_inputs = (3 + 2) * a * h if prec.autocast else 2 * r * h
        down_in = a * i
    else:
        linear_inputs = down_in = 0
    if attn in ("flash_attention_2", "flash_attention_3"):
        attention = 2 * a * q + 2 * a * shape.kv_heads * shape.head_dim + 4 * shape.heads
    else:
        attention = 4 * a * q + 4 * shape.heads
        if attn in ("sdpa", "eager"):
            attention += a * seq_len  # the float mask built from packed position_ids or the padding mask
        if attn == "eager":  # probabilities in fp32 (and their cast back to a 16-bit compute dtype), per key
            attention += shape.heads * seq_len * (4 + (a if a != 4 else 0))
    mlp = 3 * a * i + down_in
    frozen_inputs = zero3_frozen_linear_inputs(shape, prec) if zero3_linear and not full_finetune else 0
    lora = 0.0
    counted_groups: set[str] = set()
    for group, fan_in in shape.lora_modules:
        lora += (2 if prec.autocast else 4) * shape.lora_rank  # lora_B's input
        if lora_dropout > 0:
            lora += fan_in * (6 if prec.autocast else 8)  # fp32 mask + output (or its bf16 cast under autocast)
        elif prec.autocast:
            lora += 2 * fan_in
        elif r == 2:
            lora += 4 * fan_in  # the bf16 input cast to the fp32 adapter
        elif group != "attn_out" and group not in counted_groups and not frozen_inputs:
            lora += 4 * fan_in  # fp32: the shared input itself (under ZeRO-3 in frozen_inputs already)
            counted_groups.add(group)
    return 2 * norm + linear_inputs + attention + mlp + lora + frozen_inputs


def zero3_frozen_linear_inputs(shape: ModelShape, prec: Precision) -> float:
    """Bytes per token and decoder layer that ZeRO-3 keeps for a frozen-weight (LoRA) layer and plain torch does
    not: DeepSpeed's memory-efficient linear (``deepspeed/runtime/zero/linear.py``, installed globally by
    ``zero.Init``) saves each linear's input even when the weight needs no gradient. Per layer that is the
    attention norm's output (read by q/k/v: one tensor), the MLP norm's output (gate/up) and the MLP's inner
    product (down), in the compute dtype; o_proj's input is the attention output, which sdpa keeps anyway.
    Measured (bench/plan_validation.py's 135m-2r-zero3-lora, saved_tensors_hooks, 2026-11-30): the same three
    tensors per layer, 157 MiB over 30 layers at 2 x 256 tokens in fp32, the whole excess over plain LoRA's
    saved tensors. 4-bit / 8-bit base layers (bitsandbytes) do not call F.linear and transformers loads them
    outside zero.Init: not counted there."""
    return prec.compute_bytes * (2 * shape.hidden + shape.intermediate)


def activation_bytes(shape: ModelShape, prec: Precision, micro_batch: int, seq_len: int, checkpointing: bool,
                     attn: str = "sdpa", lora_dropout: float = 0.0, chunk_tokens: int | None = None,
                     sequence: int = 1, heap_retains: bool = False, zero3_linear: bool = False) -> dict[str, float]:
    """Activation memory of one micro-batch. ``saved_forward``: what autograd holds at the end of the forward
    pass; ``total``: the peak at the start of backward, which adds the loss's gradients over the vocabulary (and
    with checkpointing, the recomputed layer).

    ``chunk_tokens``: the chunked loss (dsft.loss) keeps per token only the final hidden state and its NLL; the
    vocabulary-wide tensors exist for one chunk at a time (logits, log-softmax and their gradients, recomputed in
    backward). ``sequence``: sequence parallelism puts seq_len / sequence tokens of each row on a rank; attention
    runs without a mask there (DeepSpeed drops it), on the full row for heads / sequence -- the same bytes per
    local token for q, k, v and the output.

    ``heap_retains`` (the CPU with glibc's default malloc): the vocabulary-wide transients (> 32 MiB: their own
    mappings, returned when freed) and the recomputed layer (tensors of a few MiB: glibc's heap, which keeps them
    resident after they are freed) add up instead of taking turns.

    ``zero3_linear``: ZeRO-3's memory-efficient linear keeps the inputs of frozen linears (LoRA's base layers, and
    the stock loss's lm_head), see ``layer_activation_bytes``."""
    tokens = micro_batch * -(-seq_len // max(1, sequence))
    full = shape.frozen_matmul_params == 0
    per_layer = layer_activation_bytes(shape, prec, seq_len, attn, lora_dropout, full, zero3_linear)
    if sequence > 1 and attn == "sdpa":
        per_layer -= prec.compute_bytes * seq_len  # no float mask: DeepSpeed's Ulysses wrapper drops it
    r = prec.weight_bytes if prec.weight_bytes in (2, 4) else 2
    layers_saved = shape.layers * (r * shape.hidden if checkpointing else per_layer)
    recompute = per_layer if checkpointing else 0  # one layer's full set while it is recomputed
    final_norm = 4 * shape.hidden + 4 + (r * shape.hidden if full else 0) + (
        prec.compute_bytes * shape.hidden if prec.autocast and full else 0)
    if chunk_tokens:
        saved_loss = final_norm + 4  # the hidden state the chunks read, and the fp32 NLL per token
        saved = (layers_saved + saved_loss) * tokens
        # one chunk at a time: fp32 logits + log-softmax in forward; recomputed logits and two gradients in backward
        chunk = 16 * shape.vocab * min(chunk_tokens, tokens)
        both = (chunk + recompute * tokens) if heap_retains else max(chunk, recompute * tokens)
        return {"per_layer_per_token": per_layer, "saved_forward": saved, "total": saved + both,
                "layers": (layers_saved + recompute) * tokens}
    saved_loss = 4 * shape.vocab + final_norm  # cross_entropy keeps the fp32 log-softmax
    if zero3_linear and not full:  # ZeRO-3's linear keeps the frozen lm_head's input (the final norm's output)
        saved_loss += prec.compute_bytes * shape.hidden
    backward = 8 * shape.vocab  # at the start of backward: its gradient and the logits' gradient
    saved = (layers_saved + saved_loss) * tokens
    both = (backward + recompute) if heap_retains else max(backward, recompute)
    return {"per_layer_per_token": per_layer, "saved_forward": saved, "total": saved + both * tokens,
            "layers": (layers_saved + recompute) * tokens}


def eval_activation_bytes(shape: ModelShape, prec: Precision, rows: int, seq_len: int,
                          chunk_tokens: int | None = None, sequence: int = 1, attn: str = "sdpa",
                          fp32_outputs: bool = False) -> float:
    """Peak of one evaluation micro-batch. Without autograd nothing is kept across layers: one layer's transients
    (residual stream, q/k/v/output, the gated MLP's four inner tensors, the packing mask) plus the vocabulary-wide
    tensors, which dominate.

    Stock loss: the model's logits (compute dtype) stay alive -- the Trainer hands them to
    ``preprocess_logits_for_metrics`` -- while first the loss (ForCausalLMLoss: fp32 copy + log-softmax) and then
    ``dsft.callbacks.token_loss_sums`` (fp32 copy of the shifted view + log-softmax) build two fp32 tensors of the
    same size: logits + 8 bytes per token and vocabulary entry. Chunked (dsft.loss): one chunk's fp32 logits and
    log-softmax at a time (the 16-bit lm_head output dies at its fp32 cast); the Trainer keeps per-row sums only.
    ``fp32_outputs``: the Trainer runs bf16/fp16 mixed precision, whose forward wrapper (accelerate's
    convert_outputs_to_fp32) hands over the stock loss's logits as an fp32 copy: 4 bytes kept instead of 2.
    """
    tokens = rows * -(-seq_len // max(1, sequence))
    a = prec.compute_bytes
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    layer = a * (3 * shape.hidden + 2 * q + 2 * kv + 4 * shape.intermediate)
    if attn in ("sdpa", "eager") and sequence == 1:
        layer += a * seq_len  # the [rows, 1, seq, seq] mask built from packed position_ids / padding
    if attn == "eager":
        layer += shape.heads * seq_len * (4 + a)
    kept = 4 if fp32_outputs else a
    vocab = (8 * min(chunk_tokens, tokens) if chunk_tokens else (kept + 8) * tokens) * shape.vocab
    return layer * tokens + vocab


def eval_heap_growth_bytes(shape: ModelShape, prec: Precision, rows: int, seq_len: int, sequence: int = 1,
                           attn: str = "sdpa", steps: int | None = None) -> float:
    """CPU, glibc's default malloc: what the heap grows by during an evaluation after ``steps`` optimizer steps
    (None: unknown; see EVAL_HEAP_GROWTH_PER_STEP): min(1, EVAL_HEAP_GROWTH_PER_STEP x steps) of the eval layers'
    transients summed over all layers, counting only the tensors glibc takes from its heap (a [tokens x width]
    tensor up to MMAP_THRESHOLD_MAX; larger ones get their own mappings, returned when freed). The
    vocabulary-wide tensors are not part of it."""
    tokens = rows * -(-seq_len // max(1, sequence))
    a = prec.compute_bytes
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # (count, width) of one eval layer's transients, as eval_activation_bytes counts them
    widths = [(3, shape.hidden), (2, q), (2, kv), (4, shape.intermediate)]
    if attn in ("sdpa", "eager") and sequence == 1:
        widths.append((1, seq_len))  # the packing / padding mask
    per_layer = sum(n * a * w * tokens for n, w in widths if a * w * tokens <= MMAP_THRESHOLD_MAX)
    fraction = 1.0 if not steps or steps < 0 else min(1.0, EVAL_HEAP_GROWTH_PER_STEP * steps)
    return fraction * shape.layers * per_layer


def evaluates(cfg: RunConfig) -> bool:
    """Whether the run evaluates: with eval data, during training per ``train.eval_strategy`` and, whatever the
    strategy, once after training (dsft.train runs ``trainer.evaluate()`` whenever there is eval data)."""
    return bool(cfg.data.eval) or bool(cfg.data.eval_fraction)


def autocast_weight_copies(shape: ModelShape, prec: Precision, checkpointing: bool) -> int:
    """Under autocast every linear's weight is cast to bf16 in the forward and the copy is kept for backward; with
    checkpointing only the lm_head's copy is (the layers cast again when they are recomputed)."""
    if not prec.autocast:
        return 0
    return 2 * (shape.vocab * shape.hidden if checkpointing else shape.matmul_params)


def _ds_sizes(ds: dict | None, cfg: RunConfig, shape: ModelShape, world: int, per_node: int) -> dict:
    """Bucket sizes (elements) with DeepSpeed's "auto" values filled as the HF integration fills them."""
    if ds is None:
        return {}
    try:
        resolved = resolve_auto(ds, cfg, world, hidden_size=shape.hidden, devices_per_node=per_node)
    except ConfigError:
        resolved = ds

    def num(name: str, default: float) -> float:
        value = _zget(resolved, name, default)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    z = resolved.get("zero_optimization", {}) if isinstance(resolved.get("zero_optimization"), dict) else {}
    stage = zero_stage_of(resolved)
    return {
        "reduce_bucket": num("reduce_bucket_size", 5e8),
        "allgather_bucket": num("allgather_bucket_size", 5e8),
        "prefetch_bucket": num("stage3_prefetch_bucket_size", 5e7),
        "max_live": num("stage3_max_live_parameters", 1e9),
        "max_reuse": num("stage3_max_reuse_distance", 1e9),
        "persistence": num("stage3_param_persistence_threshold", 1e5),
        "overlap_comm": bool(z.get("overlap_comm", stage == 3)),
    }


def memory(cfg: RunConfig, shape: ModelShape, hw: Hardware, setup: Setup, ds: dict | None = None) -> Memory:
    """Per-device memory of ``setup`` on ``hw`` for the run ``cfg`` describes."""
    world = hw.world
    stage = setup.stage if setup.deepspeed else 0
    use_ds = setup.deepspeed
    if use_ds and ds is None:  # a candidate setup: the matching template
        ds = load_ds_config(setup.template() or "zero0")
    prec = precision_of(cfg, ds if use_ds else None)
    bits = quantization_bits(cfg)

    # model states: DeepSpeed's formula (2 / 2 / 12 bytes per element, sharded per stage), scaled to the dtypes
    ms = model_state_bytes(shape.params, stage, world, setup.offload_optimizer, setup.offload_params,
                           shape.trainable)
    wb = weight_bytes_total(shape, prec, bits, _double_quant(cfg))
    w_scale = wb / (2 * shape.params) if shape.params else 0.0
    g_scale = prec.weight_bytes / 2
    o_scale = ((4 if prec.master_copy else 0) + prec.adam_state_bytes) / 12
    weights = ms["weights"] * w_scale
    grads = ms["gradients"] * g_scale
    optim = ms["optimizer_states"] * o_scale
    step_extra = ms["deepspeed_extra"] if use_ds and stage >= 1 else 0  # fp32 grad partition during the step
    host_states = (ms["host_weights"] * w_scale + ms["host_gradients"] + ms["host_optimizer_states"] * o_scale)

    # TRL's DPOTrainer runs chosen and rejected of each pair in one forward: two sequences per row of the micro-batch
    rows = setup.micro_batch * (2 if cfg.method == "dpo" else 1)
    # the chunked loss replaces the SFT loss only (DPO / KTO compute TRL's losses from full logits)
    chunk = cfg.loss.chunk_tokens if cfg.loss.impl == "chunked" and cfg.method == "sft" else None
    sp = cfg.parallel.sequence
    acts = activation_bytes(shape, prec, rows, _seq_len(cfg), setup.activation_checkpointing,
                            cfg.model.attn_implementation, cfg.peft.lora.dropout if cfg.peft is not None else 0.0,
                            chunk_tokens=chunk, sequence=sp,
                            heap_retains=hw.is_cpu and _malloc_retained_fraction(hw) > 0,
                            zero3_linear=zero3_memory_efficient_linear(ds if use_ds else None, stage, bits))
    act = acts["total"]
    act += autocast_weight_copies(shape, prec, setup.activation_checkpointing)

    # buffers
    sizes = _ds_sizes(ds if use_ds else None, cfg, shape, world, hw.devices_per_node)
    buffers = 0.0
    if use_ds and stage in (1, 2):
        buffers += sizes["reduce_bucket"] * prec.weight_bytes * (2 if sizes["overlap_comm"] else 1)
    if use_ds and stage == 3:
        # parameters gathered for compute stay until released: all of them while the model is smaller than the
        # reuse distance (forward and backward reuse every layer), else up to max_live_parameters
        reusable = shape.params * 2 <= sizes["max_reuse"]
        live = shape.params if reusable else min(shape.params, sizes["max_live"])
        gathered = live * prec.weight_bytes * (w_scale * 2 / prec.weight_bytes if bits else 1)
        buffers += max(gathered, 4 * shape.largest_layer_params)
        buffers += sizes["prefetch_bucket"] * prec.weight_bytes
        buffers += sizes["reduce_bucket"] * prec.weight_bytes * (2 if sizes["overlap_comm"] else 1)
    if not use_ds and world > 1:
        # DDP's buckets hold a second copy of every gradient (the Trainer leaves gradient_as_bucket_view off)
        buffers += shape.trainable * prec.weight_bytes
    if use_ds and stage == 0 and world > 1:
        # ZeRO-0 all-reduces the gradients flattened into buckets of up to 5e8 elements (a copy), at the step
        step_extra += min(shape.trainable, 5e8) * prec.weight_bytes

    overhead = _overhead(hw)
    # Gradients appear during backward while the activations are freed (and plain gradients are freed again after
    # the step). ZeRO-2/3 put them into one partition buffer allocated at the first reduction, early in backward —
    # on an accelerator it counts whole from then; on the CPU its pages become resident only as they are written.
    head_grads = (shape.lm_head_params or shape.embedding_params) * prec.weight_bytes / (world if stage >= 2 else 1) \
        if shape.frozen_matmul_params == 0 else 0
    # At the end of backward: every gradient, the embedding's dense gradient before it is added into the (tied)
    # weight's, and with checkpointing the first layer recomputed.
    embedding_grad = shape.embedding_params * prec.weight_bytes if shape.frozen_matmul_params == 0 else 0
    recomputed = acts["per_layer_per_token"] * rows * -(-_seq_len(cfg) // sp) if setup.activation_checkpointing \
        else 0
    # DPO / KTO with full fine-tuning keep a frozen reference copy (weights only) from load to the end: ZeRO-3
    # partitions it like the policy; below stage 3 TRL wraps it in a stage-0 engine, whole on every rank
    ref = (wb / world if use_ds and stage == 3 else wb) if keeps_reference_copy(cfg) else 0.0
    ref_gather = reference_gather_elements(shape, sizes) * prec.weight_bytes \
        if keeps_reference_copy(cfg) and use_ds and stage == 3 else 0.0
    if stage >= 2 and not hw.is_cpu:
        fwd_bwd = weights + optim + grads + max(act, embedding_grad + recomputed) + buffers
    else:
        fwd_bwd = weights + optim + max(head_grads + act, grads + embedding_grad + recomputed) + buffers
    step = weights + optim + grads + step_extra + buffers
    load = _load_bytes(shape, prec, wb, stage, world, use_ds)
    save = weights + optim + _save_bytes(cfg, shape, prec, wb, stage)
    fwd_bwd, step, load, save = fwd_bwd + ref + ref_gather, step + ref, load + ref, save + ref
    named = [("load", load), ("forward_backward", fwd_bwd), ("optimizer_step", step), ("save", save)]
    unretained: dict[str, float] = {}  # per phase: bytes outside glibc's retained share (own mappings, measured)
    if evaluates(cfg):
        # Evaluation runs between optimizer steps: weights and optimizer states stay; plain gradients were freed by
        # zero_grad (DeepSpeed keeps its partition buffer). The Trainer's default eval batch is 8 rows.
        eval_rows = int(cfg.train.get("per_device_eval_batch_size", 8)) * (2 if cfg.method == "dpo" else 1)
        mixed = bool(cfg.train.get("bf16") or cfg.train.get("fp16"))
        eval_act = eval_activation_bytes(shape, prec, eval_rows, _seq_len(cfg), chunk, sp,
                                         cfg.model.attn_implementation, fp32_outputs=mixed)
        if hw.is_cpu and _malloc_retained_fraction(hw) > 0:
            # glibc keeps the training step's heap resident: the layer activations (tensors of a few MiB) freed in
            # backward are still RSS when evaluation runs between steps (the vocabulary-wide ones, > 32 MiB, were
            # returned). The chunked demo's peak RSS rose by this much at its first evaluation after training.
            eval_act += acts["layers"]
            # and the eval forward grows the heap on top of it (every run with eval data evaluates after training,
            # after max_steps steps); measured RSS itself, so outside the retained share below
            growth = eval_heap_growth_bytes(shape, prec, eval_rows, _seq_len(cfg), sp, cfg.model.attn_implementation,
                                            steps=int(cfg.train.get("max_steps", -1) or -1))
            eval_act += growth
            # vocabulary-wide eval tensors above glibc's mmap ceiling are own mappings: none of it stays resident
            vocab_only = eval_activation_bytes(shape, prec, eval_rows, _seq_len(cfg), chunk, sp,
                                               cfg.model.attn_implementation, fp32_outputs=mixed) - \
                eval_activation_bytes(dataclasses.replace(shape, vocab=0), prec, eval_rows, _seq_len(cfg), chunk,
                                      sp, cfg.model.attn_implementation, fp32_outputs=mixed)
            eval_tokens = eval_rows * -(-_seq_len(cfg) // sp)
            vocab_tensor = 4 * shape.vocab * (min(chunk, eval_tokens) if chunk else eval_tokens)
            unretained["evaluation"] = growth + (vocab_only if vocab_tensor > MMAP_THRESHOLD_MAX else 0.0)
        eval_act += 2 * shape.vocab * shape.hidden if prec.autocast else 0  # the lm_head's cast weight
        named.append(("evaluation", weights + optim + (grads if use_ds else 0) + buffers + eval_act + ref + ref_gather))
    if hw.is_cpu:  # what glibc keeps resident of freed tensors, on top of what the phase holds
        retained = _malloc_retained_fraction(hw)
        named = [(k, v * (1 + retained) - retained * unretained.get(k, 0.0)) for k, v in named]
    phases = {k: int(v + overhead) for k, v in named}
    peak_phase = max(phases, key=phases.get)

    ranks = hw.devices_per_node
    host = {"offloaded_states": int(host_states * ranks),
            # each rank materializes its (ZeRO-3: partitioned) model in host RAM before moving it to the device
            "model_loading": int((wb / world if use_ds and stage == 3 else wb) * ranks) if not hw.is_cpu else 0,
            "consolidation": int(_save_bytes(cfg, shape, prec, wb, stage)),
            "processes": int((overhead if hw.is_cpu else GPU_HOST_PROCESS_BYTES) * ranks)}
    host["peak"] = host["processes"] + max(host["offloaded_states"] + host["consolidation"], host["model_loading"])
    if hw.is_cpu:
        host["peak"] = phases[peak_phase] * ranks + host["offloaded_states"]
    return Memory(weights=int(weights), gradients=int(grads), optimizer_states=int(optim),
                  optimizer_step_extra=int(step_extra), activations=int(act),
                  buffers=int(buffers), overhead=int(overhead), peak=phases[peak_phase] + int(
                      host_states if hw.is_cpu else 0), peak_phase=peak_phase, phases=phases, host=host,
                  reference_weights=int(ref), reference_buffers=int(ref_gather))


def zero3_memory_efficient_linear(ds: dict | None, stage: int, bits: int | None) -> bool:
    """Whether the run's linears go through DeepSpeed's LinearFunctionForZeroStage3 (it saves every input, see
    ``zero3_frozen_linear_inputs``): ZeRO-3 with zero.Init, i.e. not 4-/8-bit models (transformers loads those
    outside zero.Init), unless ``zero_optimization.memory_efficient_linear`` is false."""
    if ds is None or stage != 3 or bits:
        return False
    value = _zget(ds, "memory_efficient_linear", True)
    return value is not False and str(value).lower() != "false"


def reference_gather_elements(shape: ModelShape, sizes: dict) -> float:
    """Parameters the ZeRO-3 reference engine holds gathered during its forward (DPO / KTO full fine-tuning).

    TRL wraps the reference in its own engine with the policy's ``zero_optimization`` as it is: its overrides
    (``"zero_optimization.stage3_prefetch_bucket_size"`` ... as dotted top-level keys) do not reach DeepSpeed's
    config (checked: DeepSpeedConfig keeps the nested values). The forward runs without a backward, so no
    parameter is reused within DeepSpeed's trace and each module's are freed after use; the coordinator gathers
    the current module's and prefetches up to ``stage3_prefetch_bucket_size`` elements ahead while fewer than
    ``stage3_max_live_parameters`` are gathered: at most the largest module plus min(prefetch, max live)."""
    return min(shape.params, shape.largest_layer_params + min(sizes["prefetch_bucket"], sizes["max_live"]))


def keeps_reference_copy(cfg: RunConfig) -> bool:
    """Whether a preference run holds a second, frozen copy of the model as its reference: full fine-tuning with
    method dpo / kto, unless train.precompute_ref_log_probs (LoRA / QLoRA: the base with the adapter disabled)."""
    return cfg.method in ("dpo", "kto") and cfg.peft is None and not cfg.train.get("precompute_ref_log_probs")


def _seq_len(cfg: RunConfig) -> int:
    return int(cfg.data.max_seq_len or 2048)


def _malloc_retained_fraction(hw: Hardware) -> float:
    if hw.malloc_retained_fraction is not None:
        return hw.malloc_retained_fraction
    return 0.0 if os.environ.get("MALLOC_MMAP_THRESHOLD_") else GLIBC_RETAINED_FRACTION


def _overhead(hw: Hardware) -> int:
    if hw.is_cpu:
        return int(hw.process_baseline_bytes if hw.process_baseline_bytes is not None else process_baseline_bytes())
    return GPU_CONTEXT_BYTES


def _load_bytes(shape: ModelShape, prec: Precision, wb: float, stage: int, world: int, use_ds: bool) -> float:
    """Loading: the model in its load dtype; DeepSpeed (stage 1-2) then flattens it into one buffer (a copy)."""
    if use_ds and stage == 3:
        return wb / world + 4 * shape.largest_layer_params  # zero.Init partitions layer by layer
    return wb * (2 if use_ds and stage in (1, 2) else 1)


def _save_bytes(cfg: RunConfig, shape: ModelShape, prec: Precision, wb: float, stage: int) -> float:
    """The final save: an adapter is small; full weights are serialized from one state-dict copy (ZeRO-3 gathers
    the 16-bit weights on rank 0 first)."""
    if cfg.peft is not None:
        return shape.lora_params * prec.weight_bytes
    return wb


# --------------------------------------------------------------------------------------------------
# speed


def shape_flops_per_token(shape: ModelShape, seq_len: int | None, checkpointing: bool = False) -> dict:
    matmul = shape.matmul_params + shape.lora_params
    return train_flops_per_token(matmul, matmul - shape.frozen_matmul_params, shape.layers,
                                 shape.heads * shape.head_dim, seq_len, checkpointing)


def peak_flops_for(hw: Hardware, dtype: str = "bf16") -> float | None:
    if hw.peak_flops:
        return hw.peak_flops
    if hw.is_cpu:
        import torch  # deferred: the planner imports torch only for a CPU's thread count and the meta model

        return cpu_peak_flops(dtype, max(1, torch.get_num_threads() // hw.devices_per_node))
    entry = ACCELERATORS.get(hw.accelerator)
    return entry["peak_flops"] if entry else None


def step_estimate(cfg: RunConfig, shape: ModelShape, hw: Hardware, setup: Setup) -> dict:
    """Step time and tokens/s from FLOPs at the assumed MFU, plus offload traffic that does not overlap."""
    seq = _seq_len(cfg)
    flops = shape_flops_per_token(shape, seq, setup.activation_checkpointing)
    tokens_per_device = setup.micro_batch * setup.accumulation * seq
    dtype = "bf16" if cfg.train.get("bf16") or cfg.model.dtype == "bf16" else "fp32"
    peak = peak_flops_for(hw, dtype)
    if not peak:
        return {"flops_per_token": flops, "step_time_s": None, "tokens_per_s": None}
    compute_s = tokens_per_device * flops["hardware"] / (peak * hw.mfu)
    extra_s = 0.0
    if setup.offload_optimizer:
        extra_s += 16 * shape.trainable / hw.world / OFFLOAD_HOST_BYTES_PER_S
    if setup.offload_params:
        extra_s += 3 * setup.accumulation * shape.params * 2 / PCIE_BYTES_PER_S
    step_s = compute_s + extra_s
    return {"flops_per_token": flops, "tokens_per_device_per_step": tokens_per_device, "peak_flops": peak,
            "mfu_assumed": hw.mfu, "step_time_s": step_s,
            "tokens_per_s": tokens_per_device * hw.world / step_s,
            "tokens_per_s_per_device": tokens_per_device / step_s}


_BASELINE_PROBE = ("import resource, dsft.train, dsft.data, dsft.model, transformers, datasets, peft, deepspeed; "
                   "from transformers import Trainer; "
                   "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


@functools.lru_cache(maxsize=1)
def process_baseline_bytes() -> int:
    """Peak RSS of a fresh process that imports what a training process imports, before any model: the fixed
    part of every CPU rank's memory (measured, ~0.5 GB here)."""
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    out = subprocess.run([sys.executable, "-c", _BASELINE_PROBE], capture_output=True, text=True, env=env)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return int(0.55 * GiB)


# --------------------------------------------------------------------------------------------------
# the configured setup and the recommendation


def ds_config_of(cfg: RunConfig) -> dict | None:
    if not cfg.deepspeed:
        return None
    return load_ds_config(cfg.deepspeed, cfg.deepspeed_overrides)


def configured_setup(cfg: RunConfig, ds: dict | None = None) -> Setup:
    t = cfg.train
    ds = ds if ds is not None else ds_config_of(cfg)
    off_opt, off_param = offloads(ds) if ds is not None else (False, False)
    ac = bool(t.get("gradient_checkpointing", t.get("activation_checkpointing", False)))
    return Setup(stage=zero_stage_of(ds), offload_optimizer=off_opt, offload_params=off_param,
                 activation_checkpointing=ac, micro_batch=int(t.get("per_device_train_batch_size", 8)),
                 accumulation=int(t.get("gradient_accumulation_steps", 1)), deepspeed=ds is not None)


def candidates(base: Setup, world: int) -> list[Setup]:
    """Every setup that keeps the configured batch per device and step (micro-batch x accumulation, so the global
    batch on ``world`` devices): power-of-two micro-batches dividing it, and the configured one."""
    per_device = base.micro_batch * base.accumulation
    micros = sorted({m for m in range(1, per_device + 1)
                     if per_device % m == 0 and (m & (m - 1) == 0 or m == base.micro_batch)})
    out = []
    variants = [(0, False, False), (1, False, False), (2, False, False), (3, False, False), (2, True, False),
                (3, True, False), (3, True, True)]
    if world == 1:  # nothing to shard across: only ZeRO-Offload can help one device
        variants = [v for v in variants if v[0] == 0 or v[1]]
    for stage, off_opt, off_par in variants:
        for ac in (False, True):
            for m in micros:
                out.append(Setup(stage, off_opt, off_par, ac, m, per_device // m,
                                 deepspeed=stage > 0 or base.deepspeed))
    return out


@dataclass
class Plan:
    shape: ModelShape
    hardware: Hardware
    configured: Setup
    configured_memory: Memory
    configured_estimate: dict
    recommended: Setup | None
    recommended_memory: Memory | None
    recommended_estimate: dict | None
    notes: list[str] = field(default_factory=list)

    def fits(self, mem: Memory) -> bool:
        return _fits(mem, self.hardware)

    def as_dict(self) -> dict:
        def setup_dict(s: Setup | None) -> dict | None:
            return None if s is None else {**dataclasses.asdict(s), "template": s.template(),
                                           "description": s.describe()}

        return {
            "model": dataclasses.asdict(self.shape),
            "hardware": {**dataclasses.asdict(self.hardware), "world": self.hardware.world},
            "configured": {"setup": setup_dict(self.configured), "memory": self.configured_memory.as_dict(),
                           "fits": self.fits(self.configured_memory), "estimate": self.configured_estimate},
            "recommended": None if self.recommended is None else {
                "setup": setup_dict(self.recommended), "memory": self.recommended_memory.as_dict(),
                "fits": True, "estimate": self.recommended_estimate},
            "notes": self.notes,
        }


def _fits(mem: Memory, hw: Hardware) -> bool:
    if hw.is_cpu:
        return mem.host["peak"] <= FIT_FRACTION * hw.host_memory_bytes
    return mem.peak <= FIT_FRACTION * hw.device_memory_bytes and mem.host["peak"] <= hw.host_memory_bytes


def plan(cfg: RunConfig, hw: Hardware) -> Plan:
    """Memory and speed of the configured setup on ``hw``, and the fastest setup that fits."""
    if cfg.model.dtype == "auto":  # what the training process would pick on the planned hardware
        cfg = resolve_auto_dtype(cfg, "bf16" if not hw.is_cpu else auto_dtype("cpu"))
    shape = model_shape(cfg)
    ds = ds_config_of(cfg)
    base = configured_setup(cfg, ds)
    mem = memory(cfg, shape, hw, base, ds)
    est = step_estimate(cfg, shape, hw, base)
    best = None
    for cand in candidates(base, hw.world):
        cand_ds = ds if (ds is not None and cand.stage == base.stage and cand.offload_optimizer ==
                         base.offload_optimizer and cand.offload_params == base.offload_params) else None
        m = memory(cfg, shape, hw, cand, cand_ds)
        if not _fits(m, hw):
            continue
        e = step_estimate(cfg, shape, hw, cand)
        # fastest first; then no offload, no ZeRO-3 (50% more traffic than DDP/ZeRO-1/2, which the FLOPs
        # estimate does not see), the configured micro-batch (else the largest that fits), and the least memory
        key = (round(e["step_time_s"] or 0, 6), cand.offload_params, cand.offload_optimizer, cand.stage == 3,
               cand.micro_batch != base.micro_batch, -cand.micro_batch, m.peak)
        if best is None or key < best[0]:
            best = (key, cand, m, e)
    notes = []
    if keeps_reference_copy(cfg):
        notes.append(f"method {cfg.method}: reference_weights is the frozen reference copy of the model (ZeRO-3 "
                     "partitions it; peft or train.precompute_ref_log_probs: none); under ZeRO-3, reference_buffers "
                     "are the parameters its forward gathers (largest module + stage3_prefetch_bucket_size)")
    quant = quantization_bits(cfg)
    if quant:
        notes.append(f"{quant}-bit base weights (bitsandbytes): linear weights counted at "
                     f"{0.5 if quant == 4 else 1} byte + quantization constants; lm_head and embeddings unquantized")
    if hw.is_cpu:
        notes.append("CPU: per-rank memory includes the measured process baseline "
                     f"({_overhead(hw) / GiB:.2f} GiB: libraries imported by a training process), and "
                     f"+{_malloc_retained_fraction(hw):.0%} of the rest for freed memory glibc malloc keeps resident")
        if evaluates(cfg):
            notes.append("evaluation phase (eval data: per eval_strategy and once after training): "
                         "per_device_eval_batch_size rows (Trainer default 8) of max_seq_len tokens, on top of the "
                         "training heap glibc keeps, plus the heap the eval forward grows")
    else:
        notes.append(f"GPU: per-device memory includes {GPU_CONTEXT_BYTES / GiB:.2f} GiB for the CUDA context and "
                     f"allocator; a setup fits at <= {FIT_FRACTION:.0%} of device memory")
    return Plan(shape, hw, base, mem, est, best[1] if best else None, best[2] if best else None,
                best[3] if best else None, notes)


def hardware_from_flags(nodes: int = 1, gpus_per_node: int | None = None, gpu_mem: str | None = None,
                        host_mem: str | None = None, accelerator: str | None = None,
                        mfu: float | None = None) -> Hardware:
    """The Hardware `dsft plan`'s flags describe. Without --accelerator: the hardware present -- the local GPU if
    there is one, else this CPU (device memory = host memory; --gpus-per-node counts ranks) -- except that --gpu-mem
    on a machine without a GPU describes a GPU, planned with H100 peak FLOP/s. ``assumed`` says which applied."""
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be at least 1, got {value}")
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu: must be in (0, 1], got {mfu}")
    names = {k.lower(): k for k in ACCELERATORS} | {"cpu": "cpu"}
    if accelerator is not None:
        if accelerator.lower() not in names:
            raise ConfigError(f"--accelerator: unknown {accelerator!r}; one of {', '.join(ACCELERATORS)}, cpu "
                              "(another GPU: set --gpu-mem and $DSFT_PEAK_TFLOPS)")
        name = names[accelerator.lower()]
        assumed = f"--accelerator {accelerator}"
    else:
        local = local_device_name()
        if local:
            name = accelerator_name(local) or "gpu"
            assumed = f"this machine's {local} (no --accelerator given)"
        elif gpu_mem:
            name = "H100"
            assumed = "--gpu-mem on a machine without a GPU: a GPU with H100 peak FLOP/s (name it with --accelerator)"
        else:
            name = "cpu"
            assumed = "this machine's CPU: no GPU here and no --accelerator given (e.g. --accelerator H100 for GPUs)"
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if name == "cpu":
        host = parse_bytes(host_mem, "--host-mem") if host_mem else physical
        return Hardware(nodes=nodes, devices_per_node=gpus_per_node or 1, device_memory_bytes=host,
                        host_memory_bytes=host, accelerator="cpu", mfu=mfu or DEFAULT_MFU_CPU, assumed=assumed)
    if gpu_mem:
        device = parse_bytes(gpu_mem, "--gpu-mem")
    elif name in ACCELERATORS:
        device = ACCELERATORS[name]["memory_bytes"]
    else:
        import torch  # deferred: torch (~1 s) for the local device's memory only, when no accelerator is named

        if torch.cuda.is_available():  # without importing deepspeed (its import logs an accelerator banner)
            device = torch.cuda.get_device_properties(0).total_memory
        else:
            from deepspeed.accelerator import get_accelerator  # deferred: optional, and its import logs a banner

            device = get_accelerator().total_memory()
    peak = float(os.environ["DSFT_PEAK_TFLOPS"]) * 1e12 if os.environ.get("DSFT_PEAK_TFLOPS") else None
    return Hardware(nodes=nodes, devices_per_node=gpus_per_node or 1, device_memory_bytes=device,
                    host_memory_bytes=parse_bytes(host_mem, "--host-mem") if host_mem else DEFAULT_HOST_BYTES,
                    accelerator=name, peak_flops=peak, mfu=mfu or DEFAULT_MFU, assumed=assumed)


# --------------------------------------------------------------------------------------------------
# presentation


def parse_bytes(text: str, flag: str) -> float:
    """'80GiB', '80GB', '512G', '1.5TiB', '81920MiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{flag}: {text!r} is not a size; write e.g. 80GiB, 80GB or 512G")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    return value * ((1024 if binary or not unit else 1000) ** power if unit else 1)


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def format_plan(p: Plan) -> str:
    s, hw = p.shape, p.hardware
    lines = [
        f"model: {s.architecture}, {s.params / 1e9:.3f}B parameters ({s.trainable / 1e6:.1f}M trainable), "
        f"{s.layers} layers, hidden {s.hidden}, vocab {s.vocab}",
        f"hardware: {hw.nodes} node(s) x {hw.devices_per_node} {hw.accelerator} "
        + (f"rank(s), {hw.host_memory_bytes / GiB:.0f} GiB host" if hw.is_cpu else
           f"({hw.device_memory_bytes / GiB:.0f} GiB each), {hw.host_memory_bytes / GiB:.0f} GiB host per node"),
        *([f"hardware assumed: {hw.assumed}"] if hw.assumed else []),
        "",
        "| per device (GiB) | configured | recommended |",
        "|---|---|---|",
    ]
    rec, rmem = p.recommended, p.recommended_memory
    rows = [("setup", p.configured.describe(), rec.describe() if rec else "nothing fits"),
            ("DeepSpeed template", p.configured.template() or "-", (rec.template() or "-") if rec else "-")]
    keys = ("weights", "gradients", "optimizer_states", "model_states", "activations", "buffers", "overhead", "peak")
    if p.configured_memory.reference_weights or (rmem and rmem.reference_weights):
        keys = ("reference_weights", *keys)
    if p.configured_memory.reference_buffers or (rmem and rmem.reference_buffers):
        keys = tuple(k for key in keys for k in ((key, "reference_buffers") if key == "buffers" else (key,)))
    for key in keys:
        rows.append((key, _gb(getattr(p.configured_memory, key)), _gb(getattr(rmem, key)) if rmem else "-"))
    rows.append(("peak phase", p.configured_memory.peak_phase, rmem.peak_phase if rmem else "-"))
    rows.append(("host RAM per node", _gb(p.configured_memory.host["peak"]), _gb(rmem.host["peak"]) if rmem else "-"))
    rows.append(("fits", "yes" if p.fits(p.configured_memory) else "NO", "yes" if rec else "-"))
    for est_key, label in (("step_time_s", "step time (s)"), ("tokens_per_s", "tokens/s (all devices)")):
        def fmt(e: dict | None) -> str:
            return "-" if not e or e.get(est_key) is None else f"{e[est_key]:.3g}"
        rows.append((label, fmt(p.configured_estimate), fmt(p.recommended_estimate)))
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    e = p.configured_estimate
    if e.get("peak_flops"):
        lines.append("")
        peak = e["peak_flops"]
        peak_text = f"{peak / 1e12:.4g} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.3g} GFLOP/s (measured)"
        lines.append(f"estimate: {e['flops_per_token']['hardware'] / 1e9:.2f} GFLOPs per token "
                     f"(model {e['flops_per_token']['model'] / 1e9:.2f}), peak {peak_text} per device at MFU "
                     f"{e['mfu_assumed']:.0%}")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
