"""The run config: one YAML file, typed per concern, validated before anything heavy is loaded.

Sections: ``model``, ``data``, ``peft``, ``train`` (any ``transformers.TrainingArguments`` field, passed
through unchanged), ``early_stopping``. Each field's ``help`` is the reference (``dsft reference``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dsft.errors import ConfigError

RESOLVED_CONFIG_NAME = "dsft_config.yaml"
DEFAULT_DDP_TIMEOUT_S = 600  # train.ddp_timeout unless set; raise it if rank 0 alone needs longer (first tokenizing)
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz")
# Attention implementations whose mask honours restarting position_ids (no attention across packed
# samples) in transformers' masking_utils; tests/test_packing.py proves eager and sdpa on CPU.
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """Which causal LM to fine-tune and how to load it."""

    name_or_path: str = _f("", "Local model dir, or a hub id where the machine is online.")
    init: Literal["pretrained", "from_config"] = _f(
        "pretrained", "pretrained: load weights. from_config: random weights from the config (tests, benchmarks)."
    )
    dtype: Literal["bf16", "fp32"] = _f("bf16", "Dtype the weights are loaded in.")
    config_overrides: dict = _f(help="Model config fields to override, e.g. {num_hidden_layers: 2}.", factory=dict)
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"] = _f(
        "sdpa", "Attention kernel; flash_attention_* need a GPU and the flash-attn package."
    )
    gradient_checkpointing_reentrant: bool = _f(
        False, "Reentrant activation checkpointing (torch's old mode); non-reentrant is the safe default."
    )
    trust_remote_code: bool = _f(False, "Run model code shipped with the checkpoint. Off unless you trust it.")
    tokenizer: str | None = _f(None, "Tokenizer dir or hub id; defaults to name_or_path.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) to pin.")


@dataclass
class DataConfig:
    """Where the samples come from and how they become token rows."""

    train: str | list[str] = _f("", "jsonl/json/parquet/csv file(s), a save_to_disk dir, or a hub dataset name.")
    eval: str | list[str] | None = _f(None, "Eval data, same forms as train. Or use eval_fraction.")
    eval_fraction: float = _f(0.0, "Hold out this share of train for eval (0 < x < 1) when eval is not given.")
    format: Literal["text", "prompt_completion", "messages"] = _f(
        "messages",
        "text: {text}. prompt_completion: {prompt, completion} (alpaca instruction/input/output maps here). "
        "messages: {messages: [{role, content}]} rendered with the tokenizer's chat template.",
    )
    max_seq_len: int | None = _f(1024, "Tokens per sample (and per packed row); longer samples are truncated.")
    packing: bool = _f(False, "Pack several samples per row; position_ids restart per sample, no cross-attention.")
    train_on_prompt: bool = _f(False, "Also train on prompt / user / system tokens (default: completion only).")
    add_eos: bool = _f(True, "Append the tokenizer's EOS to text and prompt_completion samples.")
    text_field: str = _f("text", "Column holding text for format: text.")
    prompt_field: str = _f("prompt", "Column holding the prompt for format: prompt_completion.")
    completion_field: str = _f("completion", "Column holding the completion for format: prompt_completion.")
    messages_field: str = _f("messages", "Column holding the chat for format: messages.")
    cache_dir: str | None = _f(None, "Where tokenized datasets are cached (default: $DSFT_CACHE or ~/.cache/dsft).")
    seed: int = _f(42, "Seed for the eval_fraction split.")


@dataclass
class LoraConfig:
    """LoRA adapter settings (peft)."""

    r: int = _f(16, "Rank of the update matrices.")
    alpha: float = _f(32, "Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).")
    dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: str | list[str] = _f("all-linear", "Module names to adapt, or all-linear.")
    use_rslora: bool = _f(False, "Rank-stabilized scaling alpha / sqrt(r).")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] | None = _f(None, "Modules trained in full and saved with the adapter, e.g. [lm_head].")
    bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases are trained.")


@dataclass
class QuantizationConfig:
    """Load the frozen base weights quantized with bitsandbytes (QLoRA). Absent section: no quantization."""

    bits: Literal[4, 8] = _f(4, "4: QLoRA (Linear4bit, packed weights). 8: LLM.int8 (Linear8bitLt); not with ZeRO-3.")
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type: nf4 (NormalFloat, the QLoRA default) or fp4.")
    double_quant: bool = _f(True, "4-bit: also quantize the per-block scales (saves ~0.4 bit per weight).")
    compute_dtype: Literal["bf16", "fp32"] | None = _f(
        None, "Dtype 4-bit layers dequantize to for their matmuls; default: model.dtype."
    )
    quant_storage: Literal["bf16", "fp32", "uint8"] | None = _f(
        None, "4-bit: dtype the packed weights are stored as; default: model.dtype, which ZeRO-3 needs to "
        "partition them (any other value is refused under ZeRO-3).",
    )


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning. Absent section: full fine-tune."""

    lora: LoraConfig = _f(help="LoRA settings.", factory=LoraConfig)
    quantization: QuantizationConfig | None = _f(None, "Quantized base weights (QLoRA); absent: none.")
    lr_ratio: float = _f(
        1.0, "Learning-rate multiplier for LoRA B matrices and fully trained new modules (LoRA+ style)."
    )


@dataclass
class EarlyStoppingConfig:
    """Stop when the eval metric stops improving (needs eval data)."""

    patience: int = _f(3, "Evaluations without improvement before stopping.")
    threshold: float = _f(0.0, "Minimum improvement that counts.")
    metric: str = _f("eval_loss", "Metric to watch (lower is better for *loss and *perplexity).")


@dataclass
class GuardConfig:
    """Stop a run whose loss or gradient norm stays non-finite (NaN/inf), before it saves broken weights."""

    max_nonfinite_steps: int = _f(
        3, "Stop after this many consecutive optimizer steps with a non-finite loss (any rank) or gradient norm; "
        "no checkpoint is written for such a step, and output_dir/dsft_nonfinite.json gets the recent steps. "
        "0 turns the guard off. Under fp16 only the loss counts (the loss scaler skips overflowing steps).",
    )


@dataclass
class SlurmConfig:
    """Slurm resources and requeue policy of dsft submit / sweep / sbatch (their flags override it)."""

    nodes: int = _f(1, "Nodes per job.")
    gpus_per_node: int = _f(0, "GPUs to request per node (--gpus-per-node); 0 on CPU-only nodes.")
    tasks_per_node: int | None = _f(
        None, "Training processes (ranks) per node: one per device. Default: gpus_per_node, or 1 without GPUs "
        "(on CPU set the number of ranks you want).",
    )
    cpus_per_task: int | None = _f(None, "CPU cores per rank (--cpus-per-task); the cluster's default if unset.")
    mem: str | int | None = _f(None, "Memory per node (--mem), e.g. 64G; the cluster's default if unset.")
    time_min: int = _f(60, "Time limit in minutes (--time).")
    partition: str | None = _f(None, "Partition (--partition); the cluster's default if unset.")
    account: str | None = _f(None, "Account to charge (--account).")
    qos: str | None = _f(None, "Quality of service (--qos).")
    constraint: str | None = _f(None, "Node features required (--constraint), e.g. a100.")
    exclusive: bool = _f(False, "Whole nodes only (--exclusive).")
    job_name: str = _f("dsft", "Job name (--job-name).")
    job_dir: str | None = _f(
        None, "Where job scripts, submitted configs and per-rank logs go (one subdir per job); "
        "default: train.output_dir + /slurm.",
    )
    signal_delay_s: int = _f(
        90, "Slurm signals the job this many seconds before its time limit (USR2); the run then saves at the next "
        "step and stops. Must cover one optimizer step plus a checkpoint save, and leave time_min*60 - "
        "signal_delay_s >= 60.",
    )
    max_num_timeout: int = _f(
        3, "Requeues after hitting the time limit (submitit's budget). submitit counts a preemption as a timeout "
        "once the job has run min(80% of the time limit, time limit - 10 min): always for time limits <= 10 min.",
    )
    max_requeues: int = _f(10, "Requeues of any cause (preemption or time limit) before the job is left failed.")
    array_parallelism: int = _f(4, "dsft sweep: points of the job array that may run at the same time.")


@dataclass
class RunConfig:
    """One fine-tuning run."""

    model: ModelConfig = _f(help="Model section.", factory=ModelConfig)
    data: DataConfig = _f(help="Data section.", factory=DataConfig)
    peft: PeftConfig | None = _f(None, "PEFT section; absent means full fine-tune.")
    train: dict = _f(help="Any transformers.TrainingArguments field, passed through unchanged.", factory=dict)
    early_stopping: EarlyStoppingConfig | None = _f(None, "Early stopping section.")
    deepspeed: str | None = _f(
        None, "DeepSpeed config: a template name from ds_configs/ (zero0 ... zero3_multinode) or a path to any "
        "DeepSpeed JSON. Absent: no DeepSpeed.",
    )
    deepspeed_overrides: dict = _f(help="Values merged (deeply) into the DeepSpeed config.", factory=dict)
    guard: GuardConfig = _f(help="Non-finite loss / gradient guard.", factory=GuardConfig)
    slurm: SlurmConfig | None = _f(None, "Slurm resources and requeue policy (dsft submit / sweep / sbatch); "
                                  "absent: the defaults.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# loading


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read, override, type-check and validate a run config. Loads no model or data."""
    raw = read_yaml(path)
    for item in overrides or []:
        apply_override(raw, item)
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: broken YAML: {problem}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if raw is None:
        raise ConfigError(f"{path}: the config is empty; it needs at least model, data and train sections")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML) to the raw config dict."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.learning_rate=1e-4")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = parsed


def from_dict(raw: dict) -> RunConfig:
    """Build a RunConfig from plain data, rejecting unknown keys and wrong types with the key's name."""
    return _build(RunConfig, raw, "")


def _build(cls: type, raw: Any, where: str) -> Any:
    label = where or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(raw).__name__} ({raw!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key_message(str(key), names, where))
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _unknown_key_message(key: str, valid: list[str], where: str) -> str:
    section = f"section '{where}'" if where else "the top level"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
    return f"unknown key '{key}' in {section}: {hint}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):  # Literal[...] | None is a typing.Union named "Optional"
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is not None:  # list[str], dict[str, int]
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (converted where YAML is ambiguous)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # one candidate type (X | None): its message names the nested key
            raise errors[0]
        kinds = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise ConfigError(f"{key}: expected {kinds}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key)
    if origin is list:
        if isinstance(value, str):  # a single item is accepted where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        return _as_float(value, key)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _as_float(value: Any, key: str) -> float:
    # YAML 1.1 reads 2e-4 (no dot) as a string; accept any numeric spelling.
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


# --------------------------------------------------------------------------------------------------
# validation


def training_argument_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


# TrainingArguments fields that transformers 5 removed, and what replaces them.
REMOVED_TRAINING_ARGUMENTS = {
    "warmup_ratio": "use warmup_steps: a float in [0, 1) is a ratio of the total steps (e.g. warmup_steps: 0.1)",
    "evaluation_strategy": "renamed eval_strategy",
    "overwrite_output_dir": "removed; the Trainer writes into an existing output_dir",
    "no_cuda": "use use_cpu: true",
    "use_mps_device": "removed; the device is detected",
    "per_gpu_train_batch_size": "use per_device_train_batch_size",
    "per_gpu_eval_batch_size": "use per_device_eval_batch_size",
    "logging_dir": "removed; TensorBoard logs go under output_dir/runs",
    "save_safetensors": "removed; weights are always saved as safetensors",
}


def _check_train_section(train: dict) -> None:
    fields = training_argument_fields()
    for key, value in train.items():
        if key in REMOVED_TRAINING_ARGUMENTS and key not in fields:
            raise ConfigError(f"train.{key}: not a TrainingArguments field in this transformers version: "
                              f"{REMOVED_TRAINING_ARGUMENTS[key]}")
        if key not in fields:
            raise ConfigError(_unknown_key_message(str(key), list(fields), "train") + " (TrainingArguments field)")
        annotation = fields[key].type
        if value is False and "Strategy" in str(annotation):
            # YAML 1.1 reads a bare `no` as false; the *_strategy fields mean the string "no".
            train[key] = value = "no"
        simple = {"float": float, "int": int, "bool": bool}
        name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
        base = name.replace(" | None", "").replace("Optional[", "").rstrip("]").strip()
        if base in simple and value is not None:
            converted = _coerce(value, simple[base], f"train.{key}")
            train[key] = converted
    if "deepspeed" in train:
        raise ConfigError("train.deepspeed: set the top-level 'deepspeed:' key (template name or JSON path) instead")
    if "output_dir" in train and not isinstance(train["output_dir"], str):
        raise ConfigError(f"train.output_dir: expected a directory path (string), got {train['output_dir']!r}")
    if not train.get("output_dir"):
        raise ConfigError("train.output_dir: required; set the directory for checkpoints and logs")


def is_local_path(spec: str) -> bool:
    """A data/model spec that names a local file or dir rather than a hub id."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.endswith(DATA_SUFFIXES)
        or os.path.exists(os.path.expanduser(spec))
    )


def validate(cfg: RunConfig) -> None:
    """All cross-field checks; each error names the key and says how to fix it."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _check_train_section(t)
    if not m.name_or_path:
        raise ConfigError("model.name_or_path: required; set a local model dir or a hub id")
    if m.init == "pretrained" and is_local_path(m.name_or_path) and not Path(m.name_or_path).expanduser().exists():
        raise ConfigError(f"model.name_or_path: {m.name_or_path} does not exist")
    for bad in ("torch_dtype", "dtype", "attn_implementation"):
        if bad in m.config_overrides:
            raise ConfigError(f"model.config_overrides.{bad}: set model.{'dtype' if 'dtype' in bad else bad} instead")
    if not d.train:
        raise ConfigError("data.train: required; set a data file, a save_to_disk dir or a hub dataset name")
    for key in ("train", "eval"):
        specs = getattr(d, key)
        for spec in [specs] if isinstance(specs, str) else specs or []:
            if is_local_path(spec) and not Path(spec).expanduser().exists():
                raise ConfigError(f"data.{key}: file not found: {spec}")
    if d.eval and d.eval_fraction:
        raise ConfigError("data.eval and data.eval_fraction are both set; keep one")
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")
    if d.max_seq_len is not None and d.max_seq_len < 2:
        raise ConfigError(f"data.max_seq_len: must be at least 2, got {d.max_seq_len}")
    if d.packing and d.max_seq_len is None:
        raise ConfigError("data.packing needs data.max_seq_len (the packed row length); set data.max_seq_len")
    if d.packing and m.attn_implementation not in PACKING_ATTENTION:
        raise ConfigError(f"data.packing: model.attn_implementation={m.attn_implementation} would attend across samples")
    if d.packing and t.get("use_cache"):
        raise ConfigError("train.use_cache: true lets packed samples attend to each other; remove it")
    has_eval = bool(d.eval) or d.eval_fraction > 0
    eval_strategy = str(t.get("eval_strategy", "no"))
    if eval_strategy != "no" and not has_eval:
        raise ConfigError(
            f"train.eval_strategy={eval_strategy} but there is no eval data; set data.eval or data.eval_fraction"
        )
    if t.get("bf16") and t.get("fp16"):
        raise ConfigError("train.bf16 and train.fp16 are both true; keep one")
    if m.dtype == "bf16" and t.get("fp16"):
        raise ConfigError("train.fp16 with model.dtype=bf16: fp16 mixed precision needs fp32 weights; use train.bf16")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if key in t and (not isinstance(t[key], int) or t[key] < 1):
            raise ConfigError(f"train.{key}: must be a positive integer, got {t[key]!r}")
    if "ddp_timeout" in t and (not isinstance(t["ddp_timeout"], int) or t["ddp_timeout"] < 1):
        raise ConfigError(f"train.ddp_timeout: must be a positive number of seconds, got {t['ddp_timeout']!r}")
    lr = t.get("learning_rate", 1.0)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"train.learning_rate: must be a positive number, got {t['learning_rate']}")
    if t.get("max_steps", -1) in (0,):
        raise ConfigError("train.max_steps: 0 trains nothing; set a positive number or -1 (use num_train_epochs)")
    if cfg.peft is not None:
        lo = cfg.peft.lora
        if lo.r < 1:
            raise ConfigError(f"peft.lora.r: must be at least 1, got {lo.r}")
        if lo.alpha <= 0:
            raise ConfigError(f"peft.lora.alpha: must be positive, got {lo.alpha}")
        if not 0.0 <= lo.dropout < 1.0:
            raise ConfigError(f"peft.lora.dropout: must be in [0, 1), got {lo.dropout}")
        if not lo.target_modules:
            raise ConfigError("peft.lora.target_modules: empty; list module names or use all-linear")
        if cfg.peft.lr_ratio <= 0:
            raise ConfigError(f"peft.lr_ratio: must be positive, got {cfg.peft.lr_ratio}")
        if cfg.peft.quantization is not None:
            from dsft.quant import validate_quantization

            validate_quantization(cfg)
    if cfg.slurm is not None:
        from dsft.slurm.resources import check_slurm_config

        check_slurm_config(cfg.slurm)
    if cfg.guard.max_nonfinite_steps < 0:
        raise ConfigError(f"guard.max_nonfinite_steps: must be 0 (off) or more, got {cfg.guard.max_nonfinite_steps}")
    es = cfg.early_stopping
    if es is not None:
        if es.patience < 1:
            raise ConfigError(f"early_stopping.patience: must be at least 1, got {es.patience}")
        if eval_strategy == "no":
            raise ConfigError("early_stopping needs evaluation; set train.eval_strategy: steps (and eval data)")
        save_strategy = str(t.get("save_strategy", eval_strategy))  # as training_arguments_kwargs fills it
        if save_strategy not in ("best", eval_strategy):
            raise ConfigError(
                f"early_stopping: train.save_strategy={save_strategy} must match train.eval_strategy={eval_strategy}"
            )


# --------------------------------------------------------------------------------------------------
# resolution: every default filled, written next to the outputs


def training_arguments_kwargs(cfg: RunConfig, use_cpu: bool) -> dict:
    """TrainingArguments kwargs: the user's ``train`` section plus the values dsft needs by default."""
    t = dict(cfg.train)
    # gradient_checkpointing is transformers' deprecated alias; pass the current name.
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in t:
            t.setdefault(new, t.pop(old))
    if t.get("activation_checkpointing"):
        t.setdefault("activation_checkpointing_kwargs", {"use_reentrant": cfg.model.gradient_checkpointing_reentrant})
    t.setdefault("report_to", "tensorboard")
    t.setdefault("logging_steps", 10)
    t.setdefault("include_num_input_tokens_seen", "non_padding")
    # A collective waits this long for a peer that hangs or died on another node (a dead local peer fails at
    # once: torchrun stops the others). transformers' 1800 s is half an hour of a stuck job.
    t.setdefault("ddp_timeout", DEFAULT_DDP_TIMEOUT_S)
    t.setdefault("save_only_model", False)
    # dsft's collators need the tokenized columns that the model signature does not name.
    t["remove_unused_columns"] = False
    if cfg.early_stopping is not None:
        t.setdefault("load_best_model_at_end", True)
        t.setdefault("metric_for_best_model", cfg.early_stopping.metric)
        t.setdefault("greater_is_better", not cfg.early_stopping.metric.endswith(("loss", "perplexity")))
        t.setdefault("save_strategy", t.get("eval_strategy"))
        if t.get("eval_steps") and t.get("save_strategy") == "steps":
            t.setdefault("save_steps", t["eval_steps"])
    if use_cpu:
        # Without use_cpu the Trainer refuses bf16 on CPU, and under DeepSpeed accelerate would count one process.
        t["use_cpu"] = True
    return t


def resolved_dict(cfg: RunConfig, use_cpu: bool = False) -> dict:
    out = cfg.to_dict()
    out["train"] = training_arguments_kwargs(cfg, use_cpu)
    return out


def write_resolved(cfg: RunConfig, output_dir: str | os.PathLike, use_cpu: bool = False) -> Path:
    """Write the resolved config (all defaults filled) atomically into output_dir."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / RESOLVED_CONFIG_NAME
    tmp = target.with_suffix(".tmp")
    tmp.write_text(dump_yaml(resolved_dict(cfg, use_cpu)), encoding="utf-8")
    os.replace(tmp, target)
    return target


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def reference_markdown() -> str:
    """The config reference, generated from the dataclasses' help texts."""
    lines = []

    def section(cls: type, name: str) -> None:
        lines.append(f"### `{name}`\n\n{(cls.__doc__ or '').strip()}\n")
        lines.append("| key | type | default | meaning |\n|---|---|---|---|")
        nested = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            # an optional section (X | None) is documented like a required one
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else tp
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{name}.{f.name}"))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = _type_name(tp).replace(" | ", " or ")  # a bare | would split the markdown cell
            lines.append(f"| `{f.name}` | {kind} | `{default!r}` | {f.metadata.get('help', '')} |")
        lines.append("")
        for tp, sub in nested:
            section(tp, sub)

    for name, cls in (("model", ModelConfig), ("data", DataConfig), ("peft", PeftConfig),
                      ("early_stopping", EarlyStoppingConfig), ("guard", GuardConfig)):
        section(cls, name)
    section(SlurmConfig, "slurm")
    lines.append("### top level\n\n| key | meaning |\n|---|---|")
    for f in dataclasses.fields(RunConfig):
        if f.name in ("deepspeed", "deepspeed_overrides"):
            lines.append(f"| `{f.name}` | {f.metadata.get('help', '')} |")
    lines.append("")
    lines.append("### `train`\n\nAny `transformers.TrainingArguments` field, passed through unchanged. dsft fills "
                 "`report_to: tensorboard`, `logging_steps: 10`, `include_num_input_tokens_seen: non_padding`, "
                 f"`ddp_timeout: {DEFAULT_DDP_TIMEOUT_S}` unless set, and `use_cpu` where the accelerator is the CPU. "
                 "`save_total_limit` counts complete checkpoints only.\n")
    return "\n".join(lines)
