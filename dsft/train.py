"""The training recipe: config → tokenizer → data → model → stock ``transformers.Trainer``.

``run`` is what every entry point calls (``dsft train``, ``launch/train.py`` under torchrun).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from dsft.callbacks import MetricsCallback, compute_metrics, preprocess_logits_for_metrics
from dsft.config import RunConfig, training_arguments_kwargs, write_resolved
from dsft.errors import ConfigError, DsftError

logger = logging.getLogger("dsft")


@dataclass
class RunResult:
    output_dir: str
    train_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    log_history: list = field(default_factory=list)


def accelerator_is_cpu() -> bool:
    return not torch.accelerator.is_available()


def build_training_arguments(cfg: RunConfig):
    """TrainingArguments from the ``train`` section; its own checks are reported as config errors."""
    from transformers import TrainingArguments

    kwargs = training_arguments_kwargs(cfg, use_cpu=accelerator_is_cpu())
    try:
        return TrainingArguments(**kwargs)
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
    from transformers.integrations import get_reporting_integration_callbacks

    for cls in get_reporting_integration_callbacks(trainer.args.report_to):
        instance = trainer.pop_callback(cls)
        if instance is not None:
            trainer.add_callback(instance)


def build_trainer(cfg: RunConfig, args=None):
    """Everything up to a ready Trainer. Returns (trainer, prepared data)."""
    from transformers import EarlyStoppingCallback, Trainer

    from dsft.data import make_collator, prepare_data
    from dsft.model import apply_lora, count_parameters, load_model, load_tokenizer, optimizer_cls_and_kwargs

    args = args or build_training_arguments(cfg)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, args.main_process_first)
    for split, stats in data.stats.items():
        logger.info("data %s%s", stats.summary(split), " (from cache)" if data.from_cache else "")
    model = load_model(cfg.model)
    if cfg.data.packing:
        check_packing_isolation(model, model.config.vocab_size)
    if cfg.peft is not None:
        model = apply_lora(model, cfg.peft, cfg.model.gradient_checkpointing_reentrant)
    trainable, total = count_parameters(model)
    logger.info("parameters: %d trainable of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    callbacks: list[Any] = [MetricsCallback()]
    if cfg.early_stopping is not None:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping.patience, cfg.early_stopping.threshold))
    lr_ratio = cfg.peft.lr_ratio if cfg.peft is not None else 1.0
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=make_collator(cfg.data, tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args, lr_ratio),
        compute_metrics=compute_metrics if data.eval is not None else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if data.eval is not None else None,
    )
    _move_reporting_callbacks_last(trainer)
    return trainer, data


def run(cfg: RunConfig) -> RunResult:
    """Train, save the final model (or adapter) and tokenizer to output_dir, evaluate."""
    args = build_training_arguments(cfg)
    if args.process_index == 0:
        path = write_resolved(cfg, args.output_dir, use_cpu=accelerator_is_cpu())
        logger.info("resolved config written to %s", path)
    trainer, data = build_trainer(cfg, args)
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    train_output = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    result = RunResult(output_dir=args.output_dir, train_metrics=dict(train_output.metrics),
                       log_history=list(trainer.state.log_history))
    if data.eval is not None:
        result.eval_metrics = trainer.evaluate()
    return result
