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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import yaml

from dsft import training_args_fields
from dsft.data_formats import check_data_sources
from dsft.errors import ConfigError
from dsft.fsutil import atomic_write_text
from dsft.preference_checks import check_preference_config, method_fields
from dsft.quant import validate_quantization

RESOLVED_CONFIG_NAME = "dsft_config.yaml"
# the run's JSONL log (dsft.callbacks writes it); here, not there, so its readers (dsft report / status) need no torch
LOG_FILE_NAME = "dsft_log.jsonl"
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
    dtype: Literal["bf16", "fp32", "auto"] = _f(
        "bf16", "Dtype the weights are loaded in. auto: bf16 where the device computes bf16 natively (a GPU with "
        "bf16, a CPU with AVX512-BF16 or AMX), else fp32 -- the faster of the two there; decided by the training "
        "process and written into the resolved config, with train.bf16 to match unless train.bf16/fp16 is set.",
    )
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


DATA_FORMATS = ("text", "prompt_completion", "messages", "sharegpt", "alpaca", "preference")
DataFormat = Literal["text", "prompt_completion", "messages", "sharegpt", "alpaca", "preference"]
# The per-row format settings; each can be set in the data section (all sources) or per source (data.train[i]).
_FORMAT_HELP = {
    "format": "text: {text}. prompt_completion: {prompt, completion}. messages: {messages: [{role, content}]}. "
              "sharegpt: {conversations: [{from, value}]} (roles human/gpt/system/tool). alpaca: {instruction, "
              "input, output, system?} as a system/user/assistant chat. messages, sharegpt and alpaca are rendered "
              "with the tokenizer's chat template; loss on assistant turns only unless train_on_prompt.",
    "text_field": "text: column holding the text.",
    "prompt_field": "prompt_completion: column holding the prompt.",
    "completion_field": "prompt_completion: column holding the completion.",
    "instruction_field": "alpaca: column holding the instruction (the user turn).",
    "input_field": "alpaca: column holding the optional input (appended to the instruction after a blank line).",
    "output_field": "alpaca: column holding the answer (the assistant turn).",
    "system_field": "alpaca: column holding the optional system prompt (absent or empty: no system turn).",
    "messages_field": "messages / sharegpt: column holding the list of turns. Default: messages for messages, "
                      "conversations for sharegpt.",
    "role_key": "messages / sharegpt: key of a turn's role. Default: role for messages, from for sharegpt.",
    "content_key": "messages / sharegpt: key of a turn's text. Default: content for messages, value for sharegpt.",
    "chosen_field": "preference (method dpo): column holding the preferred answer (text, or a list of messages).",
    "rejected_field": "preference (method dpo): column holding the dispreferred answer (text, or a list of messages).",
    "label_field": "preference (method kto): column holding true (desirable) / false (undesirable) for the "
                   "completion in completion_field.",
    "roles": "messages / sharegpt: the file's role names -> system, user, assistant or tool, merged over the "
             "format's own map (sharegpt: human->user, gpt->assistant, system, tool; both formats also accept "
             "the four standard names), e.g. {observation: tool, function_call: assistant}.",
}


@dataclass
class DataSource:
    """One dataset of data.train / data.eval given as a mapping, e.g. {path: code.jsonl, format: sharegpt,
    weight: 0.7}. At most one of weight / samples / fraction (none: every row once). Format keys left out take
    the data section's value."""

    path: str = _f("", "jsonl/json/parquet/csv file, a save_to_disk dir or a hub dataset name. Relative paths "
                       "resolve from the current directory.")
    name: str | None = _f(
        None, "Name in the composition log and, for eval sources, in the metrics (eval_<name>_loss); letters, "
        "digits, _ and -. Default: the file name without its suffix.",
    )
    weight: float | None = _f(
        None, "Share of the mixture, relative to the other weighted sources (normalised to sum 1). The mixture "
        "is as large as it can be without repeating a row: total = min over weighted sources without replace of "
        "rows_i / w_i, and each weighted source gives round(total x w_i) rows (the limiting source all of its "
        "rows, the others a random subset). A source with replace: true may be repeated to meet its share.",
    )
    samples: int | None = _f(
        None, "Exactly this many rows, drawn at random; more than the source has is an error unless replace: true.",
    )
    fraction: float | None = _f(None, "This share (0 < x <= 1) of the source's rows, drawn at random.")
    replace: bool = _f(
        False, "samples / weight: allow more rows than the source has; each row is then repeated n // rows "
        "times and a random n % rows of them once more (the fewest duplicates).",
    )
    format: DataFormat | None = _f(None, "Row format of this source; default: data.format. " + _FORMAT_HELP["format"])
    text_field: str | None = _f(None, _FORMAT_HELP["text_field"] + " Default: data.text_field.")
    prompt_field: str | None = _f(None, _FORMAT_HELP["prompt_field"] + " Default: data.prompt_field.")
    completion_field: str | None = _f(None, _FORMAT_HELP["completion_field"] + " Default: data.completion_field.")
    instruction_field: str | None = _f(None, _FORMAT_HELP["instruction_field"] + " Default: data.instruction_field.")
    input_field: str | None = _f(None, _FORMAT_HELP["input_field"] + " Default: data.input_field.")
    output_field: str | None = _f(None, _FORMAT_HELP["output_field"] + " Default: data.output_field.")
    system_field: str | None = _f(None, _FORMAT_HELP["system_field"] + " Default: data.system_field.")
    messages_field: str | None = _f(None, _FORMAT_HELP["messages_field"] + " Default: data.messages_field.")
    role_key: str | None = _f(None, _FORMAT_HELP["role_key"] + " Default: data.role_key.")
    content_key: str | None = _f(None, _FORMAT_HELP["content_key"] + " Default: data.content_key.")
    roles: dict | None = _f(None, _FORMAT_HELP["roles"] + " Default: data.roles.")
    chosen_field: str | None = _f(None, _FORMAT_HELP["chosen_field"] + " Default: data.chosen_field.")
    rejected_field: str | None = _f(None, _FORMAT_HELP["rejected_field"] + " Default: data.rejected_field.")
    label_field: str | None = _f(None, _FORMAT_HELP["label_field"] + " Default: data.label_field.")


@dataclass
class DataConfig:
    """Where the samples come from and how they become token rows."""

    train: str | DataSource | list[str | DataSource] = _f(
        "", "A jsonl/json/parquet/csv file, a save_to_disk dir or a hub dataset name; or a list of them (a "
        "mixture) whose entries are such a path (every row once) or a mapping {path, name, format, weight | "
        "samples | fraction, replace, field/role keys} (see the data.train[] entry). Relative paths resolve from "
        "the current directory. Selection is deterministic given data.seed.",
    )
    eval: str | DataSource | list[str | DataSource] | None = _f(
        None, "Eval data, same forms as train. When its entries have names, each is evaluated on its own and "
        "reported as eval_<name>_loss (then every entry needs a name). Or use eval_fraction.",
    )
    eval_fraction: float = _f(
        0.0, "Hold out this share (0 < x < 1) of each train source for eval when eval is not given; the rest is "
        "what the mixture selects from.",
    )
    format: DataFormat = _f("messages", _FORMAT_HELP["format"] + " Rows of format prompt_completion without the "
                            "prompt column but with alpaca's instruction and output are read as plain text "
                            "instruction + input -> output (as before format: alpaca existed).")
    max_seq_len: int | None = _f(1024, "Tokens per sample (and per packed row); longer samples are truncated.")
    packing: bool = _f(False, "Pack several samples per row; position_ids restart per sample, no cross-attention.")
    train_on_prompt: bool = _f(False, "Also train on prompt / user / system tokens (default: completion only).")
    add_eos: bool = _f(True, "Append the tokenizer's EOS to text and prompt_completion samples.")
    text_field: str = _f("text", _FORMAT_HELP["text_field"])
    prompt_field: str = _f("prompt", _FORMAT_HELP["prompt_field"])
    completion_field: str = _f("completion", _FORMAT_HELP["completion_field"])
    instruction_field: str = _f("instruction", _FORMAT_HELP["instruction_field"])
    input_field: str = _f("input", _FORMAT_HELP["input_field"])
    output_field: str = _f("output", _FORMAT_HELP["output_field"])
    system_field: str = _f("system", _FORMAT_HELP["system_field"])
    messages_field: str | None = _f(None, _FORMAT_HELP["messages_field"])
    role_key: str | None = _f(None, _FORMAT_HELP["role_key"])
    content_key: str | None = _f(None, _FORMAT_HELP["content_key"])
    roles: dict = _f(help=_FORMAT_HELP["roles"], factory=dict)
    chosen_field: str = _f("chosen", _FORMAT_HELP["chosen_field"])
    rejected_field: str = _f("rejected", _FORMAT_HELP["rejected_field"])
    label_field: str = _f("label", _FORMAT_HELP["label_field"])
    cache_dir: str | None = _f(None, "Where tokenized datasets are cached (default: $DSFT_CACHE or ~/.cache/dsft).")
    num_proc: int | None = _f(
        None, "Worker processes that tokenize (and pack) the data, on the local rank 0 of each node. Default: "
        "the cores available to the process. Sources under 1,000 rows per worker use fewer. Does not change "
        "the tokenized data (not part of the cache key).",
    )
    seed: int = _f(42, "Seed for the eval_fraction split and the mixture's random selection.")


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
    """Frozen base weights quantized with bitsandbytes (QLoRA); absent: none. Short form: `4bit` / `8bit`."""

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
    quantization: QuantizationConfig | None = _f(
        None, "Quantized base weights (QLoRA); absent: none. Short form: `quantization: 4bit` (= {bits: 4}) or "
        "`8bit` (= {bits: 8}).",
    )
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
class LossConfig:
    """How the training and evaluation loss is computed from the model's final hidden states."""

    impl: Literal["chunked", "stock", "liger"] = _f(
        "chunked", "chunked: cross-entropy over chunk_tokens tokens at a time, each chunk's logits recomputed in "
        "backward, so the full tokens x vocab logits never exist (same loss; gradients within fp32 rounding); "
        "eval keeps per-row loss sums instead of logits. Models whose logits are not lm_head(hidden) alone "
        "(softcapping, logit scaling) keep their own loss, with a warning. Not with train.label_smoothing_factor. "
        "stock: the model's own loss (full logits). liger: Liger's fused linear cross-entropy "
        "(train.use_liger_kernel); needs the liger-kernel package and a CUDA GPU.",
    )
    chunk_tokens: int = _f(
        1024, "chunked: tokens per chunk; the largest transient is chunk_tokens x vocab fp32 logits (twice in "
        "backward). Smaller saves memory, larger does fewer, bigger matmuls.",
    )


@dataclass
class ParallelConfig:
    """How ranks split the work beyond data parallelism. world = data-parallel x sequence-parallel."""

    sequence: int = _f(
        1, "Sequence-parallel size (DeepSpeed Ulysses / ALST): each row's tokens are split over this many "
        "consecutive ranks, and attention swaps the split for one over heads; activations per rank fall about "
        "1/sequence. Needs a deepspeed: config, model.attn_implementation sdpa or flash_attention_* (eager is "
        "refused: SP drops the attention mask), and a world size it divides. The global batch is micro x "
        "accumulation x (world / sequence). With data.packing only flash attention keeps packed samples apart. "
        "Attention heads (and key/value heads) must be divisible by it. 1: off.",
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
    loss: LossConfig = _f(help="Loss computation (chunked cross-entropy by default).", factory=LossConfig)
    parallel: ParallelConfig = _f(help="Sequence parallelism (world = data-parallel x sequence-parallel).",
                                  factory=ParallelConfig)
    method: Literal["sft", "dpo", "kto"] = _f(
        "sft", "sft: supervised fine-tuning (transformers' Trainer). dpo / kto: preference tuning with TRL's "
        "DPOTrainer / KTOTrainer (pip install 'dsft[preference]'); data.format must then be preference and train "
        "passes through the fields of TRL's DPOConfig / KTOConfig (docs/preference.md).",
    )
    slurm: SlurmConfig | None = _f(None, "Slurm resources and requeue policy (dsft submit / sweep / sbatch); "
                                  "absent: the defaults.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# loading


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, data_sources: bool = True) -> RunConfig:
    """Read, override, type-check and validate a run config. Loads no model or data.

    ``data_sources=False`` (dsft plan): the data files are neither checked nor opened; planning happens before
    the data is on the cluster and reads only max_seq_len, packing and the batch settings."""
    raw = read_yaml(path)
    for item in overrides or []:
        apply_override(raw, item)
    cfg = from_dict(raw)
    validate(cfg, data_sources=data_sources)
    return cfg


# Values a config may expand to through YAML aliases (*name). A real config has a few hundred; an alias bomb
# (9 nested levels of 9 aliases: 387M values) parses in microseconds, because PyYAML shares aliased objects, and
# then blows up in whatever copies or walks it (dataclasses.asdict, deep_merge, JSON): 6 GB and minutes. The check
# runs on PyYAML's node graph, before any Python object is built. A budget rather than no aliases at all: anchors
# are a normal way to share a list between sections, and yaml.safe_dump writes them for shared objects.
YAML_NODE_BUDGET = 100_000


class _YamlBudgetError(Exception):
    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.mark = mark


class _BudgetLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document whose aliases expand it beyond YAML_NODE_BUDGET nodes."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases: list[tuple[str, Any, Any]] = []  # (anchor, mark of the alias, node it names)

    def compose_node(self, parent: Any, index: Any) -> Any:
        alias = self.peek_event() if self.check_event(yaml.AliasEvent) else None
        node = super().compose_node(parent, index)
        if alias is not None:
            self._aliases.append((alias.anchor, alias.start_mark, node))
        return node

    def compose_document(self) -> Any:
        node = super().compose_document()
        if self._aliases:
            self._check_expansion(node)
        return node

    def _check_expansion(self, root: Any) -> None:
        sizes: dict[int, int] = {}  # id(node) -> expanded size, capped just above the budget
        open_nodes: set[int] = set()
        cap = YAML_NODE_BUDGET + 1

        def size(node: Any) -> int:
            key = id(node)
            if key in sizes:
                return sizes[key]
            if key in open_nodes:  # an anchor that contains an alias to itself: an endless expansion
                return cap
            open_nodes.add(key)
            total = 1
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = []
            for child in children:
                total = min(cap, total + size(child))
                if total >= cap:
                    break
            open_nodes.discard(key)
            sizes[key] = total
            return total

        if size(root) < cap:
            return
        # name the first alias that expands most (in a bomb: the first level past the budget)
        anchor, mark, node = max(self._aliases, key=lambda a: size(a[2]))
        raise _YamlBudgetError(
            f"YAML alias *{anchor} makes the config expand to more than {YAML_NODE_BUDGET:,} values (nested "
            "aliases, an alias bomb?); write the values out or use fewer nested aliases", mark)


def load_yaml_text(text: str, source: str) -> Any:
    """yaml.safe_load with the alias budget; ``source`` names the file (or --set item) in the error."""
    try:
        return yaml.load(text, Loader=_BudgetLoader)  # noqa: S506 (a SafeLoader subclass)
    except _YamlBudgetError as e:
        where = f" line {e.mark.line + 1}:" if e.mark is not None else ""
        raise ConfigError(f"{source}:{where} {e}") from None


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = load_yaml_text(path.read_text(encoding="utf-8"), str(path))
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
        parsed = load_yaml_text(value, f"--set {key}") if value else ""
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
        # A mapping can only be the dataclass, a list only the list type: their own errors name the bad key.
        for arg in args:
            if (isinstance(value, dict) and dataclasses.is_dataclass(arg)) or (
                    isinstance(value, list) and typing.get_origin(arg) is list):
                return _coerce(value, arg, key)
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
        if tp is QuantizationConfig and value is not None and not isinstance(value, dict):
            value = _quantization_short_form(value, key)
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


def _quantization_short_form(value: Any, key: str) -> dict:
    # `4bit` / `8bit` (peers spell it load_in_4bit / quantization_bit: 4). No `true`: it would hide which of two
    # different methods runs (NF4 QLoRA vs LLM.int8, which differ in memory and are not both allowed under ZeRO-3).
    text = str(value).strip().lower().replace("-", "").replace("_", "") if not isinstance(value, bool) else ""
    bits = {"4bit": 4, "8bit": 8, "4": 4, "8": 8}.get(text)
    if bits is None:
        raise ConfigError(f"{key}: expected 4bit, 8bit or a mapping such as {{bits: 4, quant_type: nf4}}; "
                          f"got {value!r}")
    return {"bits": bits}


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
    from transformers import TrainingArguments  # deferred: ~5 s (torch; bitsandbytes through peft)

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def train_field_kinds(fields: dict[str, dataclasses.Field]) -> dict[str, tuple[str | None, bool]]:
    """What the train-section check needs of each field: the simple type a YAML value is coerced to ("float",
    "int", "bool" or None), and whether it is a *_strategy field (where YAML's bare ``no``, read as false, means
    the string "no")."""
    kinds = {}
    for key, f in fields.items():
        annotation = f.type
        name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
        base = name.replace(" | None", "").replace("Optional[", "").rstrip("]").strip()
        kinds[key] = (base if base in ("float", "int", "bool") else None, "Strategy" in str(annotation))
    return kinds


def training_argument_kinds() -> dict[str, tuple[str | None, bool]]:
    """``train_field_kinds`` of TrainingArguments: from the snapshot in dsft/training_args_fields.py when the
    installed transformers is the version it was taken from (so dsft sbatch / validate / plan need not import
    transformers), else from the class itself. tests/test_light_commands.py checks the snapshot against the
    class."""
    try:
        if version("transformers") == training_args_fields.TRANSFORMERS_VERSION:
            return dict(training_args_fields.FIELDS)
    except PackageNotFoundError:
        pass
    return train_field_kinds(training_argument_fields())


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


def _check_train_section(train: dict, fields: dict | None = None, what: str = "TrainingArguments") -> None:
    # fields / what: a TrainingArguments subclass's fields instead (TRL's DPOConfig / KTOConfig for method dpo / kto)
    fields = train_field_kinds(fields) if fields else training_argument_kinds()
    for key, value in train.items():
        if key in REMOVED_TRAINING_ARGUMENTS and key not in fields:
            raise ConfigError(f"train.{key}: not a TrainingArguments field in this transformers version: "
                              f"{REMOVED_TRAINING_ARGUMENTS[key]}")
        if key not in fields:
            raise ConfigError(_unknown_key_message(str(key), list(fields), "train") + f" ({what} field)")
        base, strategy = fields[key]
        if value is False and strategy:
            # YAML 1.1 reads a bare `no` as false; the *_strategy fields mean the string "no".
            train[key] = value = "no"
        simple = {"float": float, "int": int, "bool": bool}
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


def validate(cfg: RunConfig, data_sources: bool = True) -> None:
    """All cross-field checks; each error names the key and says how to fix it. ``data_sources=False`` skips the
    checks of data.train / data.eval (presence, paths, mixtures) for commands that never read the data."""
    m, d, t = cfg.model, cfg.data, cfg.train
    if cfg.method == "sft":
        _check_train_section(t)
        if d.format == "preference":
            raise ConfigError("data.format: preference pairs train with method: dpo (or kto for labelled "
                              "completions); set the top-level method key, or use an SFT format")
    else:  # train keys against TRL's DPOConfig / KTOConfig, the data section's preference settings
        _check_train_section(t, *method_fields(cfg.method))
        check_preference_config(cfg)
    if not m.name_or_path:
        raise ConfigError("model.name_or_path: required; set a local model dir or a hub id")
    if m.init == "pretrained" and is_local_path(m.name_or_path) and not Path(m.name_or_path).expanduser().exists():
        raise ConfigError(f"model.name_or_path: {m.name_or_path} does not exist")
    for bad in ("torch_dtype", "dtype", "attn_implementation"):
        if bad in m.config_overrides:
            raise ConfigError(f"model.config_overrides.{bad}: set model.{'dtype' if 'dtype' in bad else bad} instead")
    if d.num_proc is not None and d.num_proc < 1:
        raise ConfigError(f"data.num_proc: must be at least 1, got {d.num_proc} (leave it unset for the cores available)")
    if data_sources and not d.train:
        raise ConfigError("data.train: required; set a data file, a save_to_disk dir or a hub dataset name")
    if data_sources:
        check_data_sources(cfg)  # every source: path exists, one selection key, valid weights, names, role maps
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
    if m.dtype == "auto" and t.get("fp16"):
        raise ConfigError("train.fp16 with model.dtype=auto: auto may pick bf16 weights, which fp16 mixed precision "
                          "cannot train; set model.dtype: fp32")
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
            validate_quantization(cfg)
    if cfg.slurm is not None:
        check_slurm_config(cfg.slurm)
    _check_loss_section(cfg)
    _check_parallel_section(cfg)
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


# Slurm starts the end-of-job signal this long before the time limit at the earliest; below one minute between
# job start and signal, the signal can arrive before submitit has installed its handler (seen on these machines).
MIN_RUN_BEFORE_SIGNAL_S = 60


def check_slurm_config(s: SlurmConfig) -> None:
    """Checks of the ``slurm:`` section. Here rather than in dsft.slurm so that the config layer, which
    dsft.slurm builds on, imports nothing from it (dsft.slurm.resources.with_overrides calls this too)."""
    for key in ("nodes", "time_min", "array_parallelism"):
        if getattr(s, key) < 1:
            raise ConfigError(f"slurm.{key}: must be at least 1, got {getattr(s, key)}")
    for key in ("gpus_per_node", "signal_delay_s", "max_num_timeout", "max_requeues"):
        if getattr(s, key) < 0:
            raise ConfigError(f"slurm.{key}: must be 0 or more, got {getattr(s, key)}")
    for key in ("tasks_per_node", "cpus_per_task"):
        if getattr(s, key) is not None and getattr(s, key) < 1:
            raise ConfigError(f"slurm.{key}: must be at least 1, got {getattr(s, key)}")
    if s.gpus_per_node and s.tasks_per_node is not None and s.tasks_per_node != s.gpus_per_node:
        raise ConfigError(f"slurm.tasks_per_node: {s.tasks_per_node} ranks for {s.gpus_per_node} GPUs per node; dsft "
                          "runs one rank per device (leave tasks_per_node unset, or make them equal)")
    if s.time_min * 60 - s.signal_delay_s < MIN_RUN_BEFORE_SIGNAL_S:
        raise ConfigError(f"slurm.signal_delay_s: {s.signal_delay_s} s before a {s.time_min} min time limit leaves "
                          f"less than {MIN_RUN_BEFORE_SIGNAL_S} s before the signal; raise slurm.time_min or lower it")
    for key in ("partition", "account", "qos", "constraint", "job_name", "job_dir", "mem"):
        value = getattr(s, key)
        if isinstance(value, str) and (not value.strip() or "\n" in value):
            raise ConfigError(f"slurm.{key}: must be a non-empty single line, got {value!r}")


# Attention kernels DeepSpeed's Ulysses wrapper runs without a mask; of them, those whose varlen kernel separates
# packed samples by position_ids (dsft.sequence_parallel explains the integration).
SP_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")
SP_PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3")


def _check_parallel_section(cfg: RunConfig) -> None:
    sp, m = cfg.parallel.sequence, cfg.model
    if sp < 1:
        raise ConfigError(f"parallel.sequence: must be at least 1 (1: off), got {sp}")
    if sp == 1:
        return
    if not cfg.deepspeed:
        raise ConfigError("parallel.sequence: sequence parallelism runs in DeepSpeed (Ulysses, through accelerate); "
                          "set deepspeed: (e.g. zero2 or zero3)")
    if getattr(cfg, "method", "sft") != "sft":
        raise ConfigError(f"parallel.sequence: method {cfg.method} computes TRL's preference losses from full "
                          "logits, which the sequence-parallel loss path does not provide; use parallel.sequence: 1")
    if cfg.data.max_seq_len is None:
        raise ConfigError("parallel.sequence: needs data.max_seq_len (rows are padded to it so that the ranks' "
                          "slices have equal shapes); set data.max_seq_len")
    if m.attn_implementation not in SP_ATTENTION:
        raise ConfigError(f"parallel.sequence: model.attn_implementation={m.attn_implementation} is refused: "
                          "sequence parallelism drops the attention mask (a full-length 4D mask is O(n^2)) and "
                          f"builds causality from position_ids, which {m.attn_implementation} cannot; use sdpa or "
                          "flash_attention_2")
    if cfg.data.packing and m.attn_implementation not in SP_PACKING_ATTENTION:
        raise ConfigError(f"data.packing with parallel.sequence: {m.attn_implementation} without the attention mask "
                          "would let packed samples attend to each other (only flash attention's varlen kernel "
                          "separates them by position_ids); set data.packing: false or use flash_attention_2")
    for key, value in m.config_overrides.items():  # heads are split over the SP ranks inside attention
        if key in ("num_attention_heads", "num_key_value_heads") and isinstance(value, int) and value % sp:
            raise ConfigError(f"model.config_overrides.{key}: {value} heads cannot be split over "
                              f"parallel.sequence: {sp} ranks; use a sequence size that divides it")


def _check_loss_section(cfg: RunConfig) -> None:
    lo, t = cfg.loss, cfg.train
    if lo.chunk_tokens < 1:
        raise ConfigError(f"loss.chunk_tokens: must be a positive number of tokens, got {lo.chunk_tokens}")
    # the chunked loss replaces the SFT loss only; DPO/KTO (method) compute TRL's own losses from logits
    if lo.impl == "chunked" and t.get("label_smoothing_factor") and getattr(cfg, "method", "sft") == "sft":
        raise ConfigError("train.label_smoothing_factor: the Trainer's label smoother needs the full logits, which "
                          "loss.impl: chunked never builds; set loss.impl: stock to use label smoothing")
    if t.get("use_liger_kernel") and lo.impl != "liger":
        raise ConfigError(f"train.use_liger_kernel: conflicts with loss.impl: {lo.impl}; set loss.impl: liger "
                          "instead (it turns use_liger_kernel on)")
    if lo.impl == "liger":
        from dsft.loss import check_loss_impl  # deferred: dsft.loss loads torch; only loss.impl: liger needs it

        check_loss_impl(lo.impl)


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
    if cfg.loss.impl == "liger":  # transformers applies Liger's kernels (fused linear cross-entropy) to the model
        t["use_liger_kernel"] = True
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
    return atomic_write_text(out / RESOLVED_CONFIG_NAME, dump_yaml(resolved_dict(cfg, use_cpu)))


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def reference_markdown() -> str:
    """The config reference, generated from the dataclasses' help texts (docs/reference.md is this text)."""
    lines = ["## Config reference\n\nGenerated by `dsft reference` from dsft's config dataclasses; regenerate with "
             "`.venv/bin/dsft reference > docs/reference.md`. How a config is read: "
             "[configuration](configuration.md).\n"]

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
                      ("early_stopping", EarlyStoppingConfig), ("guard", GuardConfig), ("loss", LossConfig),
                      ("parallel", ParallelConfig)):
        section(cls, name)
    section(DataSource, "data.train[] / data.eval[] entry")
    section(SlurmConfig, "slurm")
    lines.append("### top level\n\n| key | meaning |\n|---|---|")
    for f in dataclasses.fields(RunConfig):
        if f.name in ("method", "deepspeed", "deepspeed_overrides"):
            lines.append(f"| `{f.name}` | {f.metadata.get('help', '')} |")
    lines.append("")
    lines.append("### `train`\n\nAny `transformers.TrainingArguments` field, passed through unchanged. dsft fills "
                 "`report_to: tensorboard`, `logging_steps: 10`, `include_num_input_tokens_seen: non_padding`, "
                 f"`ddp_timeout: {DEFAULT_DDP_TIMEOUT_S}` unless set, and `use_cpu` where the accelerator is the CPU. "
                 "`save_total_limit` counts complete checkpoints only.\n")
    return "\n".join(lines)
