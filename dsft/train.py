"""The training recipe: config → tokenizer → data → model → stock ``transformers.Trainer``.

``run`` is what every entry point calls (``dsft train``, ``launch/train.py`` under torchrun).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import get_reporting_integration_callbacks, is_deepspeed_zero3_enabled

from dsft import resume_check
from dsft import sequence_parallel as sp
from dsft.callbacks import MetricsCallback, compute_metrics, peak_memory_bytes, preprocess_logits_for_metrics
from dsft.checkpoint import resolve_resume, saved_world_size, to_universal
from dsft.config import RunConfig, training_arguments_kwargs, write_resolved
from dsft.console import announce_cpu_comm_op
from dsft.data import log_prepared, make_collator, prepare_data, write_composition
from dsft.deepspeed import deep_merge, prepare_for_run
from dsft.disk import DiskSpaceCallback, save_failure
from dsft.distributed import (Topology, accelerator_is_cpu, apply_collective_timeout, check_world_agreement,
                              configure_cpu_threads, export_local_world_size, init_deepspeed_distributed,
                              node_layout_problems, topology, world_views)
from dsft.errors import ConfigError, DsftError
from dsft.fsutil import atomic_write_json
from dsft.guards import CompleteCheckpointCallback, NonFiniteError, NonFiniteGuard
from dsft.loss import enable_chunked_loss
from dsft.model import (align_pad_token, apply_lora, count_parameters, load_model, load_tokenizer,
                        optimizer_cls_and_kwargs, parameter_elements)
from dsft.precision import resolve_auto_dtype
from dsft.preference import build_preference_trainer, preference_arguments

logger = logging.getLogger("dsft")


@dataclass
class RunResult:
    output_dir: str
    train_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    log_history: list = field(default_factory=list)


def build_training_arguments(cfg: RunConfig, topo: Topology | None = None):
    """TrainingArguments from the ``train`` section (+ the DeepSpeed config); its own checks are reported
    as config errors."""
    topo = topo or topology()
    kwargs = training_arguments_kwargs(cfg, use_cpu=accelerator_is_cpu())
    # dsft applies save_total_limit itself, counting complete checkpoints only (CompleteCheckpointCallback)
    kwargs.pop("save_total_limit", None)
    ds = prepare_for_run(cfg, topo.world_size, topo.local_world_size)
    if ds is not None:
        kwargs["deepspeed"] = ds
    if torch.distributed.is_available():
        apply_collective_timeout(kwargs["ddp_timeout"], bool(kwargs.get("use_cpu")), kwargs.get("ddp_backend"))
    if cfg.parallel.sequence > 1:  # DeepSpeed Ulysses through accelerate (dsft.sequence_parallel)
        sp.check_world(topo.world_size, cfg.parallel.sequence)
        kwargs["parallelism_config"] = sp.parallelism_config(cfg.parallel.sequence, topo.world_size,
                                                             cfg.model.attn_implementation)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # a launched run, not validate
            extra = sp.configure_state(bool(kwargs.get("use_cpu")))
            if extra:
                kwargs["accelerator_config"] = {**(kwargs.get("accelerator_config") or {}), **extra}
    arguments_cls = TrainingArguments
    if cfg.method != "sft":  # TRL's DPOConfig / KTOConfig (TrainingArguments subclasses); dsft.preference
        arguments_cls, kwargs = preference_arguments(cfg, kwargs)
    try:
        return arguments_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"train: {str(e).strip().splitlines()[0]}") from None


def check_packing_isolation(model, vocab_size: int, atol_fraction: float | None = None) -> float:
    """Prove on this model that packed samples do not attend to each other; return the discrepancy.

    The second of two packed samples must give the same logits as when run alone.
    """
    gen = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab_size, (1, 7), generator=gen)
    second = torch.randint(0, vocab_size, (1, 5), generator=gen)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers does not look for packed sequences
        together = model(input_ids=packed.to(device), position_ids=positions.to(device), use_cache=False)
        together = together.logits[:, 7:].float()
        alone = model(input_ids=second.to(device), use_cache=False).logits.float()
    model.train(was_training)
    scale = alone.abs().max().item() or 1.0
    diff = (together - alone).abs().max().item() / scale
    if atol_fraction is None:
        atol_fraction = 2e-2 if next(model.parameters()).dtype != torch.float32 else 1e-4
    if diff > atol_fraction:
        raise DsftError(
            f"data.packing: with attn_implementation={model.config._attn_implementation}, packed samples attend "
            f"to each other in {type(model).__name__} (relative logit difference {diff:.3g}); "
            "set data.packing: false or model.attn_implementation: sdpa"
        )
    return diff


def _move_reporting_callbacks_last(trainer) -> None:
    # The Trainer puts reporting integrations (TensorBoard, ...) before user callbacks; move them after,
    # so they log the metrics MetricsCallback adds.
    for cls in get_reporting_integration_callbacks(trainer.args.report_to):
        instance = trainer.pop_callback(cls)
        if instance is not None:
            trainer.add_callback(instance)


def build_trainer(cfg: RunConfig, args=None):
    """Everything up to a ready Trainer. Returns (trainer, prepared data)."""
    args = args or build_training_arguments(cfg)
    if args.deepspeed and zero3_enabled():
        init_deepspeed_distributed(args.ddp_timeout)
    if cfg.method != "sft":  # TRL's DPOTrainer / KTOTrainer with dsft's callbacks (dsft.preference)
        trainer, data = build_preference_trainer(cfg, args)
        _move_reporting_callbacks_last(trainer)
        return trainer, data
    tokenizer = load_tokenizer(cfg.model)
    # local rank 0 of each node tokenizes; the others wait on the cache's files, not in a barrier (dsft.data_cache)
    data = prepare_data(cfg.data, tokenizer)
    log_prepared(data, logger)  # split totals and each source's rows and tokens
    # The Trainer seeds in its __init__, after the model exists: seed here, or LoRA's random A matrices (and
    # from_config weights) differ from run to run.
    set_seed(args.seed)
    # Under ZeRO-3 each rank holds only its partition (zero.Init) -- except for quantized models, which
    # transformers loads whole on every rank (it skips zero.Init for them); DeepSpeed partitions them afterwards.
    model = load_model(cfg.model, cfg.peft.quantization if cfg.peft is not None else None)
    align_pad_token(model, tokenizer)
    if cfg.data.packing and not zero3_enabled():  # a ZeRO-3 forward needs every rank; proven in tests instead
        check_packing_isolation(model, model.config.vocab_size)
    if cfg.peft is not None:
        model = apply_lora(model, cfg.peft, cfg.model.gradient_checkpointing_reentrant)
    if cfg.loss.impl == "chunked":  # after LoRA: the loss calls peft's lm_head module (modules_to_save copy)
        enable_chunked_loss(model, cfg.loss.chunk_tokens)
    trainable, total = count_parameters(model)
    logger.info("parameters: %d trainable of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    callbacks: list[Any] = [MetricsCallback(), CompleteCheckpointCallback(cfg.train.get("save_total_limit"))]
    guard = NonFiniteGuard(cfg.guard.max_nonfinite_steps) if cfg.guard.max_nonfinite_steps else None
    if guard is not None:
        callbacks.append(guard)
    if cfg.early_stopping is not None:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping.patience, cfg.early_stopping.threshold))
    lr_ratio = cfg.peft.lr_ratio if cfg.peft is not None else 1.0
    collator = make_collator(cfg.data, tokenizer.pad_token_id)
    if cfg.parallel.sequence > 1:  # rows split evenly over the SP ranks, position_ids in every batch
        width = sp.row_width(cfg.data.max_seq_len, cfg.parallel.sequence)  # max_seq_len is required under SP
        collator = sp.SequenceParallelCollator(collator, width, tokenizer.pad_token_id)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args, lr_ratio),
        compute_metrics=compute_metrics if data.eval is not None else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if data.eval is not None else None,
    )
    if guard is not None:
        guard.accelerator = trainer.accelerator
    _move_reporting_callbacks_last(trainer)
    return trainer, data


RUN_INFO_NAME = "dsft_run_info.json"


def rank_info(topo: Topology, threads: int | None, model=None, ref_model=None) -> dict:
    """What this rank reports about itself right after loading (before the first step). ``ref_model``: the frozen
    reference copy of full-fine-tuning DPO / KTO, reported separately (ZeRO-3 must partition it too)."""
    # node_rank from the launcher / Slurm (topology()), not from the host name: nodes may share one
    me = {"rank": topo.rank, "local_rank": topo.local_rank, "node_rank": topo.node_rank,
          "ranks_per_node": topo.local_world_size, "host": platform.node(), "pid": os.getpid(), "threads": threads}
    if model is not None:
        me["param_elements_held"], me["param_elements_total"] = parameter_elements(model)
    if ref_model is not None:
        me["ref_param_elements_held"], me["ref_param_elements_total"] = parameter_elements(ref_model)
    me["peak_memory_gb_after_load"] = round(peak_memory_bytes() / 2**30, 3)
    return me


def write_run_info(args, me: dict, model=None) -> dict:
    """Record who trained: every rank reports ``me`` (rank, local rank, node, ...) through the process group, and
    rank 0 writes the list with the versions next to the outputs. Proves all ranks joined one world."""
    if model is not None:  # the Trainer turns activation checkpointing on at the start of train()
        me = dict(me, activation_checkpointing=bool(getattr(model, "is_activation_checkpointing", False)))
    ds_config = args.hf_deepspeed_config.config if getattr(args, "hf_deepspeed_config", None) else {}
    hpz = ds_config.get("zero_optimization", {}).get("zero_hpz_partition_size")
    if hpz is not None:  # what this rank's DeepSpeed runs with ("auto" filled with this rank's ranks per node)
        me = dict(me, zero_hpz_partition_size=hpz)
    ranks = [me]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, me)
    # every rank checks the layout all reported (a wrong node rank or hpZ size shows on the rank that has it)
    for problem in node_layout_problems(ranks, hpz if isinstance(hpz, int) else None):
        logger.warning("rank %d: node layout: %s", me["rank"], problem)
    info = {
        "world_size": args.world_size,
        "ranks": ranks,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "deepspeed_zero_stage": (args.hf_deepspeed_config.config.get("zero_optimization", {}).get("stage", 0)
                                 if getattr(args, "hf_deepspeed_config", None) else None),
        "num_nodes": len({r["node_rank"] for r in ranks}),
        # world = data-parallel x sequence-parallel; each rank records its dp rank (dsft.sequence_parallel)
        "sequence_parallel_size": me.get("sequence_parallel_size", 1),
        "data_parallel_size": me.get("data_parallel_size", args.world_size),
        "cpu": accelerator_is_cpu(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if args.process_index == 0:
        atomic_write_json(os.path.join(args.output_dir, RUN_INFO_NAME), info, indent=2)
    return info


class RunInfoCallback(TrainerCallback):
    """Writes dsft_run_info.json when training starts (all ranks take part in the gather)."""

    def __init__(self, me: dict) -> None:
        self.me = me

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        sp_size = self.me.get("sequence_parallel_size", 1)
        if sp_size > 1:  # DeepSpeed builds its SP groups with the engine, just before this: check them against dsft's
            sp.check_place(sp.place_views(self.me["rank"], args.world_size, sp_size))
        write_run_info(args, self.me, model)


def adapt_to_world_size(cfg: RunConfig, resume: str | None, topo: Topology) -> RunConfig:
    """A ZeRO checkpoint written by a different number of ranks is converted to DeepSpeed's universal
    format (once) and loaded as such; same world size: unchanged."""
    if not resume or not cfg.deepspeed:
        return cfg
    saved = saved_world_size(resume)
    if saved is None or saved == topo.world_size:
        return cfg
    logger.warning("checkpoint %s was written by %d ranks, this run has %d: loading it as a universal checkpoint",
                   resume, saved, topo.world_size)
    to_universal(resume, is_main=topo.rank == 0)
    overrides = deep_merge(cfg.deepspeed_overrides, {"checkpoint": {"load_universal": True}})
    return dataclasses.replace(cfg, deepspeed_overrides=overrides)


def zero3_enabled() -> bool:
    # True while TrainingArguments holding a ZeRO-3 config are alive (transformers' own switch for zero.Init)
    return is_deepspeed_zero3_enabled()


def run(cfg: RunConfig, callbacks: Sequence[Any] = (), force: bool = False, overwrite: bool = False) -> RunResult:
    """Train, save the final model (or adapter) and tokenizer to output_dir, evaluate, mark the run finished.

    ``callbacks``: extra TrainerCallbacks (Slurm preemption, benchmarks, tests). ``force``: resume even if the
    checkpoint was written with a different model/data/peft config. ``overwrite``: start from scratch in an
    output_dir holding a finished run or an earlier run's checkpoints (they are removed).
    """
    export_local_world_size()
    topo = topology()
    threads = configure_cpu_threads(topo)
    if threads is not None:
        logger.info("CPU: %d threads per rank (%d local ranks)", threads, topo.local_world_size)
        # accelerate imports deepspeed whenever it is installed (Trainer.__init__ -> unwrap_model), and DeepSpeed's
        # auto-detection then logs "Setting accelerator to CPU ... unable to detect it", also on runs without
        # DeepSpeed. Naming the accelerator dsft already found skips that detection (and its banner).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if cfg.deepspeed:  # DeepSpeed's comm on CPU loads (first time: builds) its shm op; say so, once
            announce_cpu_comm_op(topo.rank)
    cfg = resolve_auto_dtype(cfg)  # model.dtype: auto -> this machine's faster precision, before anything uses it
    resume = None if overwrite else resolve_resume(cfg)
    if resume is not None:  # a requeued or restarted job says where it continues from
        logger.info("resuming from %s", resume)
    resume_check.check_output_dir(cfg, resume, overwrite)
    if resume is not None:
        resume_check.check_resume_matches(cfg, resume, force)
    cfg = adapt_to_world_size(cfg, resume, topo)
    args = build_training_arguments(cfg, topo)
    trainer, data = build_trainer(cfg, args)
    check_world_agreement(world_views(args, trainer.accelerator))
    # Nothing is written to output_dir before this point: bad data or a model that fails to load leave no
    # half-made run behind (the Trainer only creates the empty dir).
    if args.process_index == 0:
        resume_check.prepare_output_dir(args.output_dir, resume, overwrite)
        path = write_resolved(cfg, args.output_dir, use_cpu=accelerator_is_cpu())
        logger.info("resolved config written to %s", path)
        write_composition(data, args.output_dir)  # the mixture this run trained on, per source
    me = rank_info(topo, threads, trainer.model, getattr(trainer, "ref_model", None))  # ref_model: TRL trainers
    place = sp.SequenceParallelPlace.of(topo.rank, topo.world_size, cfg.parallel.sequence)
    me.update(sequence_parallel_size=place.sp_size, sequence_parallel_rank=place.sp_rank,
              data_parallel_size=place.dp_size, data_parallel_rank=place.dp_rank)
    disk = DiskSpaceCallback()  # warns before a save that may not fit; names the checkpoint of a failed one
    for callback in (RunInfoCallback(me), disk, *callbacks):
        trainer.add_callback(callback)
    guard = next((c for c in trainer.callback_handler.callbacks if isinstance(c, NonFiniteGuard)), None)
    if guard is not None:  # last: its veto on saving a non-finite step overrides any other callback's save
        trainer.pop_callback(guard)
        trainer.add_callback(guard)
    try:
        train_output = trainer.train(resume_from_checkpoint=resume)
    except Exception as e:  # a full disk / quota / I/O error: one line, not the writing library's traceback
        failure = save_failure(e, args.output_dir, disk.saving_step)
        if failure is None:
            raise
        raise failure from e
    if guard is not None and guard.tripped:
        raise NonFiniteError(guard.tripped)  # the last good checkpoint stays the newest; no final save
    try:
        trainer.save_model(args.output_dir)
    except Exception as e:
        failure = save_failure(e, args.output_dir, None, what=f"the final model to {args.output_dir}")
        if failure is None:
            raise
        raise failure from e
    result = RunResult(output_dir=args.output_dir, train_metrics=dict(train_output.metrics),
                       log_history=list(trainer.state.log_history))
    if data.eval is not None:
        result.eval_metrics = trainer.evaluate()
    if args.process_index == 0:
        resume_check.mark_finished(args.output_dir, {"global_step": trainer.state.global_step,
                                                     "train_loss": result.train_metrics.get("train_loss")})
    return result
