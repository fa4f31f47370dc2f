"""DeepSpeed configs: templates, loading, "auto" resolution, linting and model-state memory.

The templates live in the repo's ``ds_configs/`` directory (see its README) and ship in the package as
``dsft.templates.ds_configs``; ``TEMPLATES_DIR`` is that installed directory (the repo folder itself under an
editable install), or ``$DSFT_DS_CONFIGS`` when set (a user's own copy).

Nothing here imports deepspeed at module import time; ``resolve_auto`` only needs transformers + accelerate and the
installed deepspeed's metadata (transformers checks its version), not the deepspeed module itself.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dsft import templates
from dsft.config import training_arguments_kwargs
from dsft.errors import ConfigError
from dsft.quant import quant_storage

if TYPE_CHECKING:
    from dsft.config import RunConfig

TEMPLATES_DIR = templates.directory("ds_configs")

AUTO = "auto"
# Keys the HF Trainer integration fills from TrainingArguments / the model config when they say "auto"
# (transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig.trainer_config_process / _finalize).
HF_AUTO_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
    "optimizer.params.lr",
    "optimizer.params.betas",
    "optimizer.params.eps",
    "optimizer.params.weight_decay",
    "scheduler.params.warmup_min_lr",
    "scheduler.params.warmup_max_lr",
    "scheduler.params.total_num_steps",
    "scheduler.params.warmup_num_steps",
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)
# Placeholders dsft (not HF) fills at launch.
DSFT_AUTO_KEYS = ("zero_optimization.zero_hpz_partition_size",)
_STEP_KEYS = ("scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps")

# TrainingArguments defaults the linter needs when the run config leaves them out.
_TRAIN_DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_grad_norm": 1.0,
                   "optim": "adamw_torch_fused"}


# --------------------------------------------------------------------------------------------------
# templates and loading


def template_names() -> list[str]:
    """Template names (file stems) available in TEMPLATES_DIR, sorted."""
    if not TEMPLATES_DIR.is_dir():
        return []
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.json"))


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".json") or os.sep in spec or "/" in spec or spec.startswith(("~", "."))


def template_path(spec: str) -> Path:
    """The JSON file a ``deepspeed:`` value names: a template name or a path."""
    if _looks_like_path(spec) or (Path(spec).expanduser().is_file() and spec not in template_names()):
        path = Path(spec).expanduser()
        if not path.is_file():
            names = template_names()
            stem = Path(spec).name.removesuffix(".json")
            hint = f"did you mean the template '{stem}'? " if stem in names else ""
            raise ConfigError(
                f"deepspeed: file not found: {path} (relative paths start at {Path.cwd()}); {hint}fix the path or "
                f"use a template name ({', '.join(names) or 'none found in ' + str(TEMPLATES_DIR)})"
            )
        return path
    names = template_names()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        where = f"valid: {', '.join(names)}" if names else f"no templates found in {TEMPLATES_DIR} (set $DSFT_DS_CONFIGS)"
        raise ConfigError(f"deepspeed: unknown template '{spec}'; {hint}{where}; or give a path to a DeepSpeed JSON")
    return TEMPLATES_DIR / f"{spec}.json"


def read_json(path: Path) -> dict:
    """Read a DeepSpeed JSON file; errors name the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"deepspeed: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"deepspeed: {path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"deepspeed: {path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg}); "
            "JSON has no comments or trailing commas"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed: {path}: the top level must be a JSON object, got {type(data).__name__}")
    return data


def deep_merge(base: dict, overrides: dict) -> dict:
    """A copy of ``base`` with ``overrides`` merged in: mappings merge key by key, other values replace,
    and ``None`` removes the key (e.g. ``{zero_optimization: {offload_param: null}}``)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_ds_config(spec: str | os.PathLike, overrides: dict | None = None) -> dict:
    """Load a template (``"zero2"``) or any DeepSpeed JSON file unchanged, then deep-merge ``overrides``.

    Files from HF transformers, Axolotl, LLaMA-Factory or your own are accepted as they are, including
    ``optimizer``/``scheduler`` sections and ``"auto"`` values.
    """
    if not str(spec):
        raise ConfigError("deepspeed: empty value; set a template name (e.g. zero2) or a JSON path")
    data = read_json(template_path(str(spec)))
    if overrides:
        if not isinstance(overrides, dict):
            raise ConfigError(f"deepspeed_overrides: expected a mapping, got {overrides!r}")
        data = deep_merge(data, overrides)
    return data


# --------------------------------------------------------------------------------------------------
# small accessors


def get_path(ds: dict, dotted: str, default: Any = None) -> Any:
    node: Any = ds
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _zero(ds: dict) -> dict:
    z = ds.get("zero_optimization")
    return z if isinstance(z, dict) else {}


def zero_stage(ds: dict) -> int:
    stage = _zero(ds).get("stage", 0)
    return int(stage) if isinstance(stage, (int, float)) and not isinstance(stage, bool) else 0


def _zget(ds: dict, name: str, default: Any = None) -> Any:
    """A zero_optimization value by its HF/docs name, also under DeepSpeed's alias without the stage3_ prefix."""
    z = _zero(ds)
    if name in z:
        return z[name]
    if name.startswith("stage3_") and name[len("stage3_"):] in z:
        return z[name[len("stage3_"):]]
    return default


def _offload_device(ds: dict, which: str) -> str:
    section = _zero(ds).get(which)
    device = section.get("device", "none") if isinstance(section, dict) else "none"
    return str(device or "none").lower()


def offloads(ds: dict) -> tuple[bool, bool]:
    """(optimizer offloaded, params offloaded): device cpu or nvme."""
    return (_offload_device(ds, "offload_optimizer") in ("cpu", "nvme"),
            _offload_device(ds, "offload_param") in ("cpu", "nvme"))


def find_auto(ds: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is the string "auto"."""
    found = []
    if isinstance(ds, dict):
        for key, value in ds.items():
            found += find_auto(value, f"{prefix}{key}.")
    elif isinstance(ds, list):
        for i, value in enumerate(ds):
            found += find_auto(value, f"{prefix}{i}.")
    elif ds == AUTO:
        found.append(prefix[:-1])
    return found


# --------------------------------------------------------------------------------------------------
# "auto" resolution


def fill_dsft_placeholders(ds: dict, devices_per_node: int) -> dict:
    """A copy with the placeholders only dsft fills: ``zero_hpz_partition_size: "auto"`` -> devices per node.

    Use this for the config handed to the Trainer (which fills the HF "auto" keys itself at run time).
    """
    out = copy.deepcopy(ds)
    z = out.get("zero_optimization")
    if isinstance(z, dict) and z.get("zero_hpz_partition_size") == AUTO:
        z["zero_hpz_partition_size"] = int(devices_per_node)
    return out


def load_model_config(cfg: RunConfig) -> Any:
    """The model's transformers config (no weights), with model.config_overrides applied."""
    from transformers import AutoConfig  # deferred: transformers (~4 s); dsft sbatch imports this module

    m = cfg.model
    try:
        return AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code,
                                          **m.config_overrides)
    except Exception as e:  # noqa: BLE001 - any load failure is the same user-facing problem
        raise ConfigError(
            f"model.name_or_path: cannot read the model config from {m.name_or_path!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it is needed to fill DeepSpeed 'auto' bucket sizes — "
            "fix the path, or set numbers for them in deepspeed_overrides"
        ) from None


def _hf_args_view(cfg: RunConfig, world_size: int) -> Any:
    """The TrainingArguments values the HF DeepSpeed integration reads, without running TrainingArguments'
    __post_init__ (which resets accelerate's global state and sets up devices / process groups: unsafe inside a
    launched run and slow). Field defaults come from TrainingArguments itself; ``world_size`` is given."""
    from transformers import TrainingArguments  # deferred: ~5 s (see load_model_config)

    class _ArgsView:
        get_warmup_steps = TrainingArguments.get_warmup_steps

    view = _ArgsView()
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            setattr(view, f.name, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            setattr(view, f.name, f.default_factory())
    for key, value in training_arguments_kwargs(cfg, use_cpu=False).items():
        setattr(view, key, value)
    view.world_size = int(world_size)
    return view


def resolve_auto(ds: dict, cfg: RunConfig, world_size: int, hidden_size: int | None = None, *,
                 devices_per_node: int | None = None, num_training_steps: int | None = None) -> dict:
    """A copy of ``ds`` with every "auto" filled exactly as the HF Trainer will fill it for this run.

    Calls transformers' own ``HfTrainerDeepSpeedConfig.trainer_config_process`` and ``trainer_config_finalize``
    (with a stand-in for TrainingArguments whose ``world_size`` is the given one, and a stand-in model carrying the
    model config). ``hidden_size`` None reads the model config (no weights) when a hidden-size key is "auto".
    ``zero_hpz_partition_size: "auto"`` becomes ``devices_per_node`` (default $LOCAL_WORLD_SIZE, else world_size).
    Scheduler step counts stay "auto" unless ``num_training_steps`` (or train.max_steps > 0) is known.
    Values that contradict the run config raise ConfigError, as the Trainer would.
    """
    from transformers.integrations import deepspeed as hf_ds  # deferred: transformers (see load_model_config)

    if devices_per_node is None:
        devices_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    work = fill_dsft_placeholders(ds, devices_per_node)

    if num_training_steps is None and cfg.train.get("max_steps", -1) > 0:
        num_training_steps = int(cfg.train["max_steps"])

    hidden_keys = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                   "zero_optimization.stage3_param_persistence_threshold")
    if hidden_size is not None:
        model_config: Any = _HiddenSize(int(hidden_size))
    elif any(get_path(work, k) == AUTO for k in hidden_keys):
        model_config = load_model_config(cfg)
    else:
        model_config = _HiddenSize(None)

    class _StandInModel:
        config = model_config

    # sequence parallelism: accelerate sets train_batch_size from the data-parallel size (world / sp) at engine start
    args = _hf_args_view(cfg, max(1, world_size // cfg.parallel.sequence))
    previous = hf_ds._hf_deepspeed_config_weak_ref
    try:
        # HfDeepSpeedConfig registers itself as the process-wide DeepSpeed config (a weakref that from_pretrained
        # consults for ZeRO-3); restore whatever was there so resolving never changes model loading.
        hf_config = hf_ds.HfTrainerDeepSpeedConfig(work)
        hf_config.trainer_config_process(args, auto_find_batch_size=bool(getattr(args, "auto_find_batch_size", 0)))
        held = None
        if num_training_steps is None and "scheduler" in hf_config.config:
            # Step counts are unknown before the data is loaded: finalize() would write None into them, so the
            # scheduler (lr already filled above) sits out and keeps "auto" for the Trainer.
            held = hf_config.config.pop("scheduler")
        hf_config.trainer_config_finalize(args, _StandInModel(), num_training_steps or 0)
        if held is not None:
            hf_config.config["scheduler"] = held
    except ValueError as e:
        raise ConfigError(f"deepspeed: {e}".replace("\n", " ")) from None
    except ImportError as e:
        raise ConfigError(f"deepspeed: {e}; install it with pip install 'dsft[deepspeed]'") from None
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = previous
    out = hf_config.config

    left = [k for k in find_auto(out) if not (num_training_steps is None and k in _STEP_KEYS)]
    if left:
        raise ConfigError(
            f"deepspeed: 'auto' at {', '.join(left)} is not a value the HF Trainer fills; set numbers for "
            "them in the DeepSpeed JSON or deepspeed_overrides"
        )
    return out


class _HiddenSize:
    def __init__(self, hidden_size: int | None) -> None:
        if hidden_size is not None:
            self.hidden_size = hidden_size


# --------------------------------------------------------------------------------------------------
# lint


@dataclass(frozen=True)
class Finding:
    level: Literal["error", "warning"]
    key: str
    message: str
    rule: str = ""

    def __str__(self) -> str:
        return f"{self.level}: {self.key}: {self.message}"


# ZeRO-Offload runs the optimizer step on the host. Optimizers DeepSpeed has host kernels for (its own
# "optimizer" section types) and the TrainingArguments.optim values accelerate maps onto them
# (accelerate.utils.deepspeed.map_pytorch_optim_to_deepspeed: torch Adam/AdamW -> DeepSpeedCPUAdam,
# torch Adagrad -> DeepSpeedCPUAdagrad, bitsandbytes 32-bit Lion -> DeepSpeedCPULion; anything else is silently
# replaced by DeepSpeedCPUAdam).
DS_OFFLOAD_OPTIMIZERS = ("adam", "adamw", "adagrad", "lion")
HF_OPTIMS_MAPPED_FOR_OFFLOAD = ("adamw_torch", "adamw_torch_fused", "adagrad", "lion_32bit")
# Optimizers whose state/kernels need the GPU (bitsandbytes 8-bit/paged, layer-wise hooks, LOMO fused update).
_GPU_ONLY_OPTIM_MARKERS = ("8bit", "bnb", "paged", "layerwise", "lomo", "adamw_torch_4bit")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _quantization(cfg: RunConfig) -> tuple[int | None, str | None]:
    """(bits, dtype the packed 4-bit weights are stored as) from ``peft.quantization``; (None, None) without it."""
    q = cfg.peft.quantization if cfg.peft is not None else None
    if q is None:
        return None, None

    return q.bits, (quant_storage(q, cfg.model.dtype) if q.bits == 4 else None)


def lint(cfg: RunConfig, ds: dict, world_size: int, devices_per_node: int,
         device_memory_bytes: int | None = None) -> list[Finding]:
    """Check a DeepSpeed config against the run config and the cluster shape. Works on the loaded config
    (with "auto" values) or on ``resolve_auto``'s output. Errors would fail or silently mistrain the run;
    warnings waste memory or speed."""
    t = cfg.train
    out: list[Finding] = []

    def add(level: str, key: str, message: str, rule: str) -> None:
        out.append(Finding(level, key, message, rule))  # type: ignore[arg-type]

    stage = zero_stage(ds)
    off_opt, off_param = offloads(ds)

    # batch arithmetic: DeepSpeed asserts train_batch_size == micro * accumulation * world; HF asserts micro and
    # accumulation equal the TrainingArguments values.
    micro_run = t.get("per_device_train_batch_size", _TRAIN_DEFAULTS["per_device_train_batch_size"])
    accum_run = t.get("gradient_accumulation_steps", _TRAIN_DEFAULTS["gradient_accumulation_steps"])
    micro, accum, total = (ds.get(k) for k in
                           ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"))
    if _is_int(micro) and micro != micro_run and not t.get("auto_find_batch_size"):
        add("error", "deepspeed.train_micro_batch_size_per_gpu",
            f"{micro} but train.per_device_train_batch_size is {micro_run}; set it to \"auto\"", "batch")
    if _is_int(accum) and accum != accum_run:
        add("error", "deepspeed.gradient_accumulation_steps",
            f"{accum} but train.gradient_accumulation_steps is {accum_run}; set it to \"auto\"", "batch")
    # with sequence parallelism the sp ranks of a group share each row: data-parallel size = world / sp
    sp = cfg.parallel.sequence
    if sp > 1 and world_size % sp:
        add("error", "parallel.sequence", f"{sp} does not divide the world size {world_size} (world = data-parallel "
            "x sequence-parallel)", "sequence_parallel")
    dp = max(1, world_size // sp)
    if _is_int(total):
        m = micro if _is_int(micro) else micro_run
        a = accum if _is_int(accum) else accum_run
        what = f"data-parallel size {dp} (world {world_size} / sequence {sp})" if sp > 1 else f"world size {dp}"
        if total != m * a * dp:
            add("error", "deepspeed.train_batch_size",
                f"{total} != micro batch {m} x accumulation {a} x {what} = {m * a * dp}; "
                "set it to \"auto\"", "batch")
    if sp > 1 and stage == 0:
        add("error", "parallel.sequence", "needs ZeRO stage 1, 2 or 3 (stage 0's gradient averaging under "
            "sequence parallelism is not verified); use zero2 or zero3", "sequence_parallel")
    if sp > 1 and stage in (1, 2) and get_path(ds, "zero_optimization.reduce_scatter") is True \
            and "reduce_scatter" in (cfg.deepspeed_overrides.get("zero_optimization") or {}):
        add("error", "deepspeed.zero_optimization.reduce_scatter", "true with parallel.sequence under ZeRO-1/2: "
            "DeepSpeed then sums the sequence-parallel ranks' gradients without averaging them (sp x too large); "
            "dsft turns reduce_scatter off and sets gradient_predivide_factor to fix it -- remove the override",
            "sequence_parallel")

    # precision
    ds_bf16, ds_fp16 = get_path(ds, "bf16.enabled"), get_path(ds, "fp16.enabled")
    run_bf16 = bool(t.get("bf16") or t.get("bf16_full_eval"))
    run_fp16 = bool(t.get("fp16") or t.get("fp16_full_eval"))
    eff_bf16 = ds_bf16 if isinstance(ds_bf16, bool) else run_bf16 if ds_bf16 == AUTO else False
    eff_fp16 = ds_fp16 if isinstance(ds_fp16, bool) else run_fp16 if ds_fp16 == AUTO else False
    if eff_bf16 and eff_fp16:
        add("error", "deepspeed.fp16.enabled", "fp16 and bf16 are both enabled; keep one (set both to \"auto\" "
            "and choose with train.bf16 / train.fp16)", "precision")
    for name, ds_val, run_val in (("bf16", ds_bf16, run_bf16), ("fp16", ds_fp16, run_fp16)):
        if isinstance(ds_val, bool) and ds_val != run_val:
            add("error", f"deepspeed.{name}.enabled",
                f"{str(ds_val).lower()} but train.{name} is {str(run_val).lower()}; set it to \"auto\"", "precision")
    clip = ds.get("gradient_clipping")
    clip_run = t.get("max_grad_norm", _TRAIN_DEFAULTS["max_grad_norm"])
    if _num(clip) is not None and clip_run is not None and float(clip) != float(clip_run):
        add("error", "deepspeed.gradient_clipping",
            f"{clip} but train.max_grad_norm is {clip_run}; set it to \"auto\"", "precision")

    # ZeRO-3 prefetch
    if stage == 3:
        live = _zget(ds, "stage3_max_live_parameters")
        if _num(live) == 0:
            add("warning", "deepspeed.zero_optimization.stage3_max_live_parameters",
                "0 releases every parameter right after use and disables prefetching (slow, re-gathers each layer); "
                "use 1e9 (the DeepSpeed default) unless you are out of memory", "max_live_parameters")

    # ZeRO++ hpZ
    hpz = _zero(ds).get("zero_hpz_partition_size")
    hpz = devices_per_node if hpz == AUTO else hpz  # what resolve_auto will fill
    if _is_int(hpz) and hpz > 1:
        key = "deepspeed.zero_optimization.zero_hpz_partition_size"
        if stage != 3:
            add("warning", key, f"hpZ only applies to ZeRO-3 (stage is {stage}); remove it", "hpz")
        if world_size <= devices_per_node:
            add("warning", key, f"{hpz} on a single node ({world_size} devices): hpZ saves inter-node traffic only "
                "and costs a second parameter copy per device; use the zero3 template on one node", "hpz")
        elif hpz > devices_per_node:
            add("warning", key, f"{hpz} is more than the {devices_per_node} devices per node, so the secondary "
                f"partition spans nodes; set it to {devices_per_node}", "hpz")
        if world_size % hpz:
            add("error", key, f"{hpz} does not divide the world size {world_size} (DeepSpeed asserts); "
                f"set it to the devices per node ({devices_per_node})", "hpz")
        if off_opt or off_param:
            add("error", key, "hpZ with offload_optimizer/offload_param is broken upstream (loss stuck, grad norm "
                "0: deepspeedai/DeepSpeed#6926); drop hpZ (zero3_offload) or the offload (zero3_multinode)",
                "hpz_offload")
    for name, issue in (("zero_quantized_weights", "#4852"), ("zero_quantized_gradients", "#7164")):
        if _zero(ds).get(name) is True:
            add("warning", f"deepspeed.zero_optimization.{name}",
                f"ZeRO++ quantized communication has open convergence/crash bugs upstream (deepspeedai/DeepSpeed"
                f"{issue}); compare the loss curve against a run without it, or set it to false", "zeropp_quantized")

    # quantized base weights (bitsandbytes) under ZeRO-3
    bits, storage = _quantization(cfg)
    if stage == 3 and bits == 8:
        add("error", "peft.quantization.bits", "8 (LLM.int8) with ZeRO-3: upstream trains it with wrong losses; "
            "use bits: 4 (QLoRA) or ZeRO-2", "quant_8bit_zero3")
    if stage == 3 and bits == 4 and storage != cfg.model.dtype:
        add("error", "peft.quantization.quant_storage",
            f"{storage}: ZeRO-3 partitions the packed 4-bit weights as tensors of this dtype and needs it equal "
            f"to the model dtype; remove it (it defaults to model.dtype) or set quant_storage: {cfg.model.dtype}",
            "qlora_zero3_storage")

    # optimizer under ZeRO-Offload
    if off_opt:
        key = "deepspeed.zero_optimization.offload_optimizer"
        opt_type = get_path(ds, "optimizer.type")
        force_ds_cpu = ds.get("zero_force_ds_cpu_optimizer", True) is not False
        if stage == 0:
            add("error", key, "offload_optimizer needs ZeRO stage 1, 2 or 3; set zero_optimization.stage", "offload")
        if isinstance(opt_type, str):
            if opt_type.lower() not in DS_OFFLOAD_OPTIMIZERS:
                add("error", "deepspeed.optimizer.type",
                    f"{opt_type} has no CPU implementation for ZeRO-Offload (supported: "
                    f"{', '.join(DS_OFFLOAD_OPTIMIZERS)}); use AdamW or remove the offload", "offload_optimizer")
        else:
            optim = t.get("optim", _TRAIN_DEFAULTS["optim"])
            optim = str(getattr(optim, "value", optim)).lower()  # a string, or an OptimizerNames member
            if force_ds_cpu and optim not in HF_OPTIMS_MAPPED_FOR_OFFLOAD:
                add("error", "train.optim",
                    f"{optim} with offload_optimizer: accelerate replaces it with DeepSpeedCPUAdam (zero_force_ds_cpu_"
                    f"optimizer is true); use one of {', '.join(HF_OPTIMS_MAPPED_FOR_OFFLOAD)} or set "
                    "zero_force_ds_cpu_optimizer: false", "offload_optimizer")
            elif any(marker in optim for marker in _GPU_ONLY_OPTIM_MARKERS):
                add("error", "train.optim",
                    f"{optim} keeps its state or update on the GPU and cannot run on offloaded (host) partitions; "
                    "use adamw_torch with offload_optimizer", "offload_optimizer")

    # overlap_comm bucket memory: DeepSpeed docs put it at 4.5x the buckets (5e8 + 5e8 elements x 2 bytes x 4.5 = 9GB)
    overlap = _zero(ds).get("overlap_comm")
    overlap = (stage == 3) if overlap is None else overlap
    if device_memory_bytes and overlap is True and stage >= 1:
        second = "stage3_prefetch_bucket_size" if stage == 3 else "allgather_bucket_size"
        reduce_b = _zget(ds, "reduce_bucket_size", 5e8)
        other_b = _zget(ds, second, 5e7 if stage == 3 else 5e8)
        if _num(reduce_b) is not None and _num(other_b) is not None:
            bytes_per = 2 if (eff_bf16 or eff_fp16) else 4
            need = (float(reduce_b) + float(other_b)) * bytes_per * 4.5
            if need > 0.10 * device_memory_bytes:
                add("warning", "deepspeed.zero_optimization.reduce_bucket_size",
                    f"overlap_comm buffers need ~{need / 1e9:.1f} GB (4.5 x (reduce_bucket_size {reduce_b:.3g} + "
                    f"{second} {other_b:.3g}) x {bytes_per} B), over 10% of the {device_memory_bytes / 1e9:.0f} GB "
                    "device; lower the bucket sizes (e.g. 2e8 or \"auto\") or set overlap_comm: false", "overlap_comm")
    return out


# --------------------------------------------------------------------------------------------------
# model-state memory


def model_state_bytes(params: int, stage: int, world: int, offload_optimizer: bool = False,
                      offload_params: bool = False, trainable_params: int | None = None) -> dict:
    """Per-device bytes of model states for mixed-precision Adam (ZeRO paper, K=12), Ψ = params, T = trainable.

    Device: weights 2Ψ (ZeRO-3: 2Ψ/N), gradients 2T (ZeRO-2/3: 2T/N), optimizer states 12T (ZeRO-1+: 12T/N) —
    16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N for stages 0-3 when T = Ψ. ``offload_optimizer`` moves the optimizer states
    and the gradient partition (kept in fp32 on the host for the CPU step, 4T/N) to host RAM; ``offload_params``
    (ZeRO-3 only) moves the 2Ψ/N weight partition. ``host_*`` keys are per device (multiply by devices per node).

    ``deepspeed_extra``: bytes DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs) count on top
    of the paper formula — the fp32 gradient partition the optimizer step reads (4T/N at stage 1-2, 2T/N more than
    the fp16 partition at stage 3), none with offload_optimizer. ``total_deepspeed`` = total + deepspeed_extra.
    Activations, buckets and the ZeRO-3 gather of the largest layer are not included.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0-3, got {stage}")
    if world < 1 or params < 0:
        raise ValueError("world must be >= 1 and params >= 0")
    if offload_params and stage != 3:
        raise ValueError("offload_params needs ZeRO stage 3")
    if offload_optimizer and stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1-3")
    p = params
    tr = params if trainable_params is None else trainable_params
    n = world
    weights = 2 * p / n if stage == 3 else 2 * p
    grads = 2 * tr / n if stage >= 2 else 2 * tr
    optim = 12 * tr / n if stage >= 1 else 12 * tr
    extra = {0: 0, 1: 4 * tr / n, 2: 4 * tr / n, 3: 2 * tr / n}[stage]
    host_weights = host_grads = host_optim = 0.0
    if offload_optimizer:
        host_optim, optim = optim, 0
        host_grads = 4 * tr / n
        if stage >= 2:
            grads = 0
        extra = 0
    if offload_params:
        host_weights, weights = weights, 0
    result = {"weights": weights, "gradients": grads, "optimizer_states": optim}
    result = {k: int(math.ceil(v)) for k, v in result.items()}
    result["total"] = sum(result.values())
    result["deepspeed_extra"] = int(math.ceil(extra))
    result["total_deepspeed"] = result["total"] + result["deepspeed_extra"]
    host = {"host_weights": host_weights, "host_gradients": host_grads, "host_optimizer_states": host_optim}
    host = {k: int(math.ceil(v)) for k, v in host.items()}
    host["host_total"] = sum(host.values())
    result.update(host)
    return result


def prepare_for_run(cfg: RunConfig, world_size: int, devices_per_node: int,
                    device_memory_bytes: int | None = None) -> dict | None:
    """The DeepSpeed config handed to TrainingArguments: loaded, overridden, dsft placeholders filled, linted.

    HF "auto" values are left for the Trainer to fill. Lint errors raise ConfigError (all of them, one per
    line); warnings are logged.
    """
    if not cfg.deepspeed:
        return None
    ds = fill_dsft_placeholders(load_ds_config(cfg.deepspeed, cfg.deepspeed_overrides), devices_per_node)
    findings = lint(cfg, ds, world_size, devices_per_node, device_memory_bytes)
    if not [f for f in findings if f.level == "error"]:
        ds = sequence_parallel_gradient_fix(ds, cfg.parallel.sequence, world_size)
    errors = [f for f in findings if f.level == "error"]
    for f in findings:
        if f.level != "error":
            logging.getLogger(__name__).warning("deepspeed %s: %s", f.key, f.message)
    if errors:
        raise ConfigError("\n".join(f"deepspeed {f.key}: {f.message}" for f in errors))
    return ds


def sequence_parallel_gradient_fix(ds: dict, sequence: int, world_size: int) -> dict:
    """ZeRO-1/2 under sequence parallelism (DeepSpeed 0.19.8 + transformers 5.23): every SP rank back-propagates
    the group's whole loss, and ZeRO-1/2's reduction divides the summed gradients by world / sp instead of world,
    so the gradients come out sp times too large (measured with SGD, 2 ranks sp=2: grad norm 8.08 vs 4.04 for
    1 rank, and the losses diverge; AdamW with clipping hides most of it, being scale-invariant). ZeRO-3 averages
    right. Fix: pre-divide by the whole world (gradient_predivide_factor = world), which DeepSpeed honours only
    with reduce_scatter off; then no post-scaling is applied. Proven in tests/test_sequence_parallel.py."""
    if sequence <= 1 or zero_stage(ds) not in (1, 2):
        return ds
    out = copy.deepcopy(ds)
    out["gradient_predivide_factor"] = float(world_size)
    out.setdefault("zero_optimization", {})["reduce_scatter"] = False
    return out
