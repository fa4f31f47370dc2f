"""dsft plan: model states against DeepSpeed's own estimators, activations against the tensors torch really
saves, the CLI on a Llama-3-8B-shaped config (config only), MFU in a training log, and dsft report's PNG."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import copy_task_rows, write_jsonl
from dsft import plan as P
from dsft.cli import main
from dsft.config import from_dict, validate

# Llama-3-8B's shape, built locally (no hub)
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192)
LLAMA3_8B_PARAMS = 8_030_261_248


@pytest.fixture(scope="module")
def llama8b_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("llama3-8b-config")
    LlamaConfig(**LLAMA3_8B).save_pretrained(str(path))  # config.json only: no weights anywhere
    return path


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    return str(write_jsonl(tmp_path_factory.mktemp("plan-data") / "train.jsonl", copy_task_rows(40)))


def _cfg(model_dir, train_file, tmp_path, **sections):
    raw = {"model": {"name_or_path": str(model_dir), "init": "from_config", "dtype": "bf16"},
           "data": {"train": train_file, "format": "prompt_completion", "max_seq_len": 4096, "packing": True},
           "train": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4,
                     "gradient_accumulation_steps": 4, "bf16": True}}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def _deepspeed_printed_gpu_gib(fn, *args, **kwargs) -> dict[str, float]:
    """Run a DeepSpeed ``*_all_cold`` estimator and read its table: options -> per-GPU GiB (2 decimals)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args, **kwargs)
    rows = re.findall(r"([\d.]+)GB \|\s*([\d.]+)GB \| (.+)", buf.getvalue())
    assert rows, buf.getvalue()
    # options read e.g. "offload_param=OffloadDeviceEnum.cpu, offload_optimizer=none, zero_init=1"
    return {re.sub(r"\s|OffloadDeviceEnum\.", "", options): float(gpu) for _cpu, gpu, options in rows}


def test_model_states_match_deepspeed_estimators(llama8b_dir, train_file, tmp_path):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    cfg = _cfg(llama8b_dir, train_file, tmp_path)
    shape = P.model_shape(cfg)
    assert shape.params == LLAMA3_8B_PARAMS and not shape.tied_embeddings
    assert shape.largest_layer_params == 128256 * 4096  # the untied embedding / lm_head matrix
    for nodes, per_node in ((1, 8), (2, 8)):
        hw = P.Hardware(nodes=nodes, devices_per_node=per_node, accelerator="H100")

        def planned_gib(stage: int, off_opt: bool, off_par: bool) -> float:
            setup = P.Setup(stage, off_opt, off_par, False, 1, 1)
            mem = P.memory(cfg, shape, hw, setup)
            # DeepSpeed's per-GPU figure: model states + the fp32 gradient partition of the step, and under
            # ZeRO-3 the largest layer gathered (4 bytes per element)
            states = mem.model_states + mem.optimizer_step_extra
            return (states + (4 * shape.largest_layer_params if stage == 3 else 0)) / 2**30

        ds2 = _deepspeed_printed_gpu_gib(estimate_zero2_model_states_mem_needs_all_cold, shape.params,
                                         num_gpus_per_node=per_node, num_nodes=nodes)
        assert ds2["offload_optimizer=none"] == pytest.approx(planned_gib(2, False, False), abs=0.006)
        assert ds2["offload_optimizer=cpu"] == pytest.approx(planned_gib(2, True, False), abs=0.006)
        ds3 = _deepspeed_printed_gpu_gib(estimate_zero3_model_states_mem_needs_all_cold, shape.params,
                                         shape.largest_layer_params, num_gpus_per_node=per_node, num_nodes=nodes)
        expected = {"offload_param=none,offload_optimizer=none": (False, False),
                    "offload_param=none,offload_optimizer=cpu": (True, False),
                    "offload_param=cpu,offload_optimizer=cpu": (True, True)}
        assert len(ds3) == 6
        for options, gpu in ds3.items():
            key = next(k for k in expected if options.startswith(k))
            assert gpu == pytest.approx(planned_gib(3, *expected[key]), abs=0.006), options


def test_parameter_counts_match_deepspeed_on_a_real_model(tiny_model_dir, train_file, tmp_path):
    """The meta-device count equals DeepSpeed's count on the materialized model (total and largest layer), also
    with config_overrides, and LoRA's trainable share equals peft's."""
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    from dsft.model import apply_lora, load_config_object

    for peft in (None, {"lora": {"r": 4, "target_modules": "all-linear"}}):
        sections = {"model": {"init": "from_config", "dtype": "fp32", "config_overrides": {"num_hidden_layers": 3}},
                    "data": {"max_seq_len": 64}}
        if peft:
            sections["peft"] = peft
        cfg = _cfg(tiny_model_dir, train_file, tmp_path, **sections)
        shape = P.model_shape(cfg)
        model = AutoModelForCausalLM.from_config(load_config_object(cfg.model))
        assert model.config.num_hidden_layers == 3
        total, largest = model_to_params(model)
        assert shape.largest_layer_params == largest
        if peft:
            model = apply_lora(model, cfg.peft, False)
            assert shape.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
            assert shape.params == sum(p.numel() for p in model.parameters())
        else:
            assert shape.params == total == shape.trainable


def _saved_tensor_bytes(model, ids, positions, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves during one forward (parameters excluded)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, position_ids=positions, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("precision,lora,checkpointing", [
    ("fp32", False, False), ("bf16-autocast", False, False), ("bf16-weights", False, False),
    ("fp32", True, False), ("bf16-autocast", True, False), ("fp32", False, True),
])
def test_activation_count_matches_saved_tensors(precision, lora, checkpointing, train_file, tmp_path):
    """The planner's per-layer tensor count against what torch saves on a packed batch (tiny Llama, 3 layers)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dsft.model import apply_lora

    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    sections = {"model": {"dtype": "bf16" if precision == "bf16-weights" else "fp32"},
                "data": {"max_seq_len": 128},
                "train": {"bf16": precision != "fp32", "gradient_checkpointing": checkpointing}}
    if lora:
        sections["peft"] = {"lora": {"r": 8, "dropout": 0.05, "target_modules": "all-linear"}}
    cfg = _cfg("unused", train_file, tmp_path, **sections)
    shape = P.model_shape(cfg, config)
    prec = P.precision_of(cfg, None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                             dtype=torch.bfloat16 if precision == "bf16-weights" else torch.float32)
    model.config.use_cache = False
    if lora:
        model = apply_lora(model, cfg.peft, False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch, seq = 2, 128
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    positions = torch.cat([torch.arange(70), torch.arange(58)]).repeat(batch, 1)  # two packed samples per row
    measured = _saved_tensor_bytes(model, ids, positions, prec.autocast)
    acts = P.activation_bytes(shape, prec, batch, seq, checkpointing, "sdpa", 0.05 if lora else 0.0)
    predicted = acts["saved_forward"] + P.autocast_weight_copies(shape, prec, checkpointing)
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)


@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_zero3_linear_keeps_the_inputs_of_frozen_linears(dropout, train_file, tmp_path, monkeypatch):
    """Under ZeRO-3, zero.Init swaps torch.nn.functional.linear for DeepSpeed's LinearFunctionForZeroStage3, which
    saves every input, also of LoRA's frozen base layers: the planner's zero3_linear count against the tensors torch
    saves with that function in place (the same tiny Llama as above, fp32 LoRA)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dsft.model import apply_lora

    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    cfg = _cfg("unused", train_file, tmp_path, model={"dtype": "fp32"}, data={"max_seq_len": 128},
               train={"bf16": False}, peft={"lora": {"r": 8, "dropout": dropout, "target_modules": "all-linear"}})
    shape = P.model_shape(cfg, config)
    prec = P.precision_of(cfg, None)
    assert (prec.compute_bytes, prec.autocast) == (4, False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    model = apply_lora(model, cfg.peft, False)
    model.train()
    batch, seq = 2, 128
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    positions = torch.cat([torch.arange(70), torch.arange(58)]).repeat(batch, 1)
    plain = _saved_tensor_bytes(model, ids, positions, False)
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    measured = _saved_tensor_bytes(model, ids, positions, False)
    acts = P.activation_bytes(shape, prec, batch, seq, False, "sdpa", dropout, zero3_linear=True)
    plain_acts = P.activation_bytes(shape, prec, batch, seq, False, "sdpa", dropout)
    assert acts["saved_forward"] == pytest.approx(measured, rel=0.10), (acts["saved_forward"], measured)
    # the term itself: what ZeRO-3's linear adds over plain torch, predicted vs seen. Seen: the attention input,
    # MLP input and MLP inner product of layers 1-2 plus the lm_head's input; in layer 0 the attention input does
    # not require grad yet (frozen embeddings), so nothing records it -- 7 % of the term with 3 layers, which the
    # planner, counting every layer alike, does not model
    assert acts["saved_forward"] - plain_acts["saved_forward"] == pytest.approx(measured - plain, rel=0.10), (
        acts["saved_forward"] - plain_acts["saved_forward"], measured - plain)


def test_plan_cli_llama3_8b_on_8x80gb(llama8b_dir, train_file, tmp_path, capsys):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps({
        "model": {"name_or_path": str(llama8b_dir), "init": "from_config", "dtype": "bf16"},
        "data": {"train": train_file, "format": "prompt_completion", "max_seq_len": 4096, "packing": True},
        "train": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 4, "bf16": True, "gradient_checkpointing": False},
        "deepspeed": "zero2"}))
    assert main(["plan", str(cfg_path), "--gpus-per-node", "8", "--gpu-mem", "80GiB", "--host-mem", "1TiB",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["params"] == LLAMA3_8B_PARAMS
    conf = out["configured"]["memory"]
    for key in ("model_states", "weights", "gradients", "optimizer_states", "activations", "buffers", "peak"):
        assert conf[key] > 0, key
    assert conf["model_states"] == conf["weights"] + conf["gradients"] + conf["optimizer_states"]
    # ZeRO-2 over 8 devices, bf16 + fp32 master + Adam: 2 + (2 + 12) / 8 bytes per parameter
    assert conf["model_states"] == pytest.approx(LLAMA3_8B_PARAMS * (2 + 14 / 8), rel=1e-6)
    # 4 x 4096 tokens without activation checkpointing do not fit in 80 GB
    assert out["configured"]["fits"] is False and conf["peak"] > 80 * 2**30
    rec = out["recommended"]
    assert rec is not None and rec["fits"]
    assert rec["memory"]["peak"] <= P.FIT_FRACTION * 80 * 2**30
    setup = rec["setup"]
    assert setup["micro_batch"] * setup["accumulation"] == 16  # the configured global batch is kept
    est = rec["estimate"]
    assert est["peak_flops"] == P.ACCELERATORS["H100"]["peak_flops"] and est["tokens_per_s"] > 0
    # step time = tokens x FLOPs per token / (peak x MFU) on each device
    flops = est["flops_per_token"]["hardware"] * est["tokens_per_device_per_step"]
    assert est["step_time_s"] == pytest.approx(flops / (est["peak_flops"] * est["mfu_assumed"]), rel=1e-6)
    # the human-readable table; naming the GPU type plans for it on any machine
    assert main(["plan", str(cfg_path), "--gpus-per-node", "8", "--accelerator", "H100"]) == 0
    text = capsys.readouterr().out
    assert "| peak |" in text and "recommended" in text and "H100" in text


def test_plan_reads_no_data(llama8b_dir, tmp_path, capsys):
    """Planning happens before the data is on the cluster: a missing data file does not stop dsft plan (it reads
    max_seq_len, packing and the batch settings only), while dsft validate, which checks for training, refuses."""
    cfg_path = tmp_path / "run.yaml"
    missing = tmp_path / "not-copied-yet" / "train.jsonl"
    cfg_path.write_text(json.dumps({
        "model": {"name_or_path": str(llama8b_dir), "init": "from_config", "dtype": "bf16"},
        "data": {"train": str(missing), "format": "prompt_completion", "max_seq_len": 4096, "packing": True},
        "train": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 4, "bf16": True, "gradient_checkpointing": False},
        "deepspeed": "zero2"}))
    assert main(["plan", str(cfg_path), "--gpus-per-node", "8", "--gpu-mem", "80GiB", "--accelerator", "H100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hardware"]["accelerator"] == "H100" and out["hardware"]["world"] == 8
    # ZeRO-2 over 8 devices, bf16 + fp32 master + Adam: 2 + (2 + 12) / 8 bytes per parameter and device
    assert out["configured"]["memory"]["model_states"] == pytest.approx(LLAMA3_8B_PARAMS * (2 + 14 / 8), rel=1e-6)
    assert not missing.parent.exists()
    assert main(["validate", str(cfg_path)]) == 2
    assert "data.train" in capsys.readouterr().err


def test_plan_defaults_to_the_hardware_present(monkeypatch):
    """No --accelerator: the hardware this runs on (issue: --gpus-per-node 2 on a CPU box planned 80 GiB H100s)."""
    monkeypatch.setattr(P, "local_device_name", lambda: None)  # a CPU-only machine
    hw = P.hardware_from_flags(gpus_per_node=2)
    assert hw.is_cpu and hw.devices_per_node == 2 and "CPU" in hw.assumed
    hw = P.hardware_from_flags(gpus_per_node=8, accelerator="h100")  # a named GPU type is planned for anywhere
    assert hw.accelerator == "H100" and hw.device_memory_bytes == 80 * 2**30 and hw.assumed == "--accelerator h100"
    hw = P.hardware_from_flags(gpus_per_node=8, gpu_mem="40GiB")  # GPU memory given: a GPU, said to be assumed
    assert hw.accelerator == "H100" and hw.device_memory_bytes == 40 * 2**30 and "--gpu-mem" in hw.assumed
    monkeypatch.setattr(P, "local_device_name", lambda: "NVIDIA A100-SXM4-80GB")  # a GPU machine
    hw = P.hardware_from_flags(gpus_per_node=2)
    assert hw.accelerator == "A100" and "A100-SXM4-80GB" in hw.assumed


def test_plan_bad_flag_is_one_line(tmp_path, tiny_model_dir, train_file, capsys):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)},
                                    "data": {"train": train_file, "format": "prompt_completion"},
                                    "train": {"output_dir": str(tmp_path / "out")}}))
    assert main(["plan", str(cfg_path), "--gpu-mem", "80XB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu-mem" in err[0]


@pytest.mark.integration
def test_mfu_and_report_from_a_tiny_run(tmp_path, tiny_model_dir, train_file, capsys):
    """A real (tiny) run logs tokens/s, MFU and peak memory; dsft report prints its summary and writes a PNG of the
    curves and a markdown page."""
    from dsft.train import run

    cfg = _cfg(tiny_model_dir, train_file, tmp_path,
               model={"dtype": "fp32"}, data={"max_seq_len": 64, "cache_dir": str(tmp_path / "cache")},
               train={"bf16": False, "max_steps": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                      "logging_steps": 1, "report_to": "tensorboard", "save_strategy": "no"})
    result = run(cfg)
    logs = [json.loads(x) for x in (Path(result.output_dir) / "dsft_log.jsonl").read_text().splitlines()]
    train_logs = [r for r in logs if "loss" in r]
    assert len(train_logs) == 4
    from dsft.callbacks import THROUGHPUT_WARMUP_STEPS

    for r in train_logs:
        assert r["peak_memory_gb"] > 0
        if r["step"] <= THROUGHPUT_WARMUP_STEPS:  # warm-up steps are left out of the throughput figures
            assert "tokens_per_second_per_device" not in r and "mfu" not in r, r
            continue
        assert r["tokens_per_second_per_device"] > 0 and r["throughput_steps_measured"] == r["step"] - 2
        assert 0 < r["mfu"] < 1.5, r  # measured CPU peak; a busy machine can make one window look fast
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((Path(result.output_dir) / "runs").iterdir())))
    events.Reload()
    assert {"train/mfu", "train/tokens_per_second_per_device", "train/peak_memory_gb"} <= set(events.Tags()["scalars"])
    assert main(["report", result.output_dir, "--out", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    assert "train loss:" in text and "MFU" in text and "dsft_report.png" in text
    png = tmp_path / "report" / "dsft_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (tmp_path / "report" / "dsft_report.md").read_text()
    assert "![training curves](dsft_report.png)" in md and "| optimizer steps | 4 |" in md


def test_plan_counts_the_reference_copy_of_full_fine_tuning_dpo(llama8b_dir, train_file, tmp_path):
    """method dpo / kto with full fine-tuning keep a frozen reference copy: ZeRO-3 partitions it over the devices,
    lower stages hold it whole; LoRA and precomputed reference log-probs keep none."""
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}]))
    hw = P.hardware_from_flags(gpus_per_node=8, accelerator="H100", host_mem="2TiB")

    def configured(method="dpo", deepspeed="zero3", **extra):
        sections = {"deepspeed": deepspeed, **extra}
        if method != "sft":
            sections.update(method=method, data={"train": pairs, "format": "preference", "packing": False})
        return P.plan(_cfg(llama8b_dir, train_file, tmp_path, **sections), hw).configured_memory

    weight_bytes = LLAMA3_8B_PARAMS * 2  # bf16
    for deepspeed, held in (("zero3", weight_bytes / 8), ("zero2", weight_bytes)):
        sft, dpo, kto = configured("sft", deepspeed), configured("dpo", deepspeed), configured("kto", deepspeed)
        assert sft.reference_weights == 0
        assert dpo.reference_weights == kto.reference_weights == pytest.approx(held, abs=1)
        # the policy's own model states are unchanged; every phase holds the reference too
        assert dpo.model_states == sft.model_states
        for phase in ("load", "optimizer_step", "save"):
            assert dpo.phases[phase] - sft.phases[phase] == pytest.approx(held, abs=2), (deepspeed, phase)
        # DPO runs chosen and rejected in one forward: twice the activations of an SFT micro-batch (KTO: once);
        # both take TRL's losses from full logits, so the SFT to compare with uses the stock (full-logits) loss
        stock = configured("sft", deepspeed, loss={"impl": "stock"})
        assert dpo.activations > 1.9 * stock.activations and kto.activations == stock.activations
        assert sft.activations < stock.activations  # the chunked loss (SFT's default) holds no full logits
    assert configured(train={"precompute_ref_log_probs": True}).reference_weights == 0
    assert configured(peft={"lora": {"r": 16}}).reference_weights == 0
    text = P.format_plan(P.plan(_cfg(llama8b_dir, train_file, tmp_path, method="dpo", deepspeed="zero3",
                                     data={"train": pairs, "format": "preference", "packing": False}), hw))
    assert "| reference_weights |" in text and "frozen reference copy" in text


def test_plan_models_the_chunked_loss_and_sequence_parallelism(llama8b_dir, train_file, tmp_path):
    """The chunked loss drops the per-token vocabulary tensors (one chunk's remain); sp=2 halves the tokens each rank
    holds activations for (packing off: sdpa packing is refused under SP)."""
    hw = P.hardware_from_flags(gpus_per_node=8, accelerator="H100", host_mem="2TiB")
    data = {"packing": False}

    def acts(**sections):
        return P.plan(_cfg(llama8b_dir, train_file, tmp_path, deepspeed="zero3", data=data, **sections),
                      hw).configured_memory.activations

    stock, chunked = acts(loss={"impl": "stock"}), acts()
    vocab = 128256
    # 4 rows x 4096 tokens: the stock loss keeps 4 bytes of log-softmax per token and vocabulary entry, plus the
    # 8 bytes of its backward; chunked keeps 16 bytes per entry for 1,024 tokens only
    assert stock - chunked == pytest.approx(4 * 4096 * vocab * 12 - 1024 * vocab * 16, rel=0.01)
    sp2 = acts(parallel={"sequence": 2})
    assert 0.45 < sp2 / chunked < 0.55


def test_plan_models_the_eval_phase(llama8b_dir, train_file, tmp_path):
    """With eval data and an eval strategy the plan has an evaluation phase: the stock loss holds the eval batch's
    logits (bf16) while two fp32 tensors of the same size are built (the loss, then the metrics' per-row sums);
    the chunked loss holds one chunk's fp32 logits and log-softmax."""
    hw = P.hardware_from_flags(gpus_per_node=8, accelerator="H100", host_mem="2TiB")
    ev = {"eval": train_file}
    train = {"eval_strategy": "steps", "eval_steps": 10, "per_device_eval_batch_size": 2}

    def phases(**sections):
        return P.plan(_cfg(llama8b_dir, train_file, tmp_path, deepspeed="zero3", **sections),
                      hw).configured_memory.phases

    assert "evaluation" not in phases()
    stock, chunked = phases(data=ev, train=train, loss={"impl": "stock"}), phases(data=ev, train=train)
    vocab, tokens = 128256, 2 * 4096
    # train.bf16: accelerate's mixed-precision wrapper hands the logits over in fp32 (4 bytes, not the bf16 2)
    assert stock["evaluation"] - chunked["evaluation"] == pytest.approx(
        (4 + 8) * tokens * vocab - 8 * 1024 * vocab, rel=1e-6)


def test_eval_activation_count():
    shape = P.ModelShape("x", layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=1000,
                         tied_embeddings=True, params=0, trainable=0, embedding_params=0, lm_head_params=0,
                         matmul_params=0, frozen_matmul_params=0, quantizable_params=0, largest_layer_params=0)
    bf16 = P.Precision(2, 2, False, 4, autocast=False)
    layer = 2 * (3 * 64 + 2 * 64 + 2 * 32 + 4 * 128) + 2 * 256  # + the packing mask row per token
    assert P.eval_activation_bytes(shape, bf16, 4, 256) == 4 * 256 * (layer + 10 * 1000)
    assert P.eval_activation_bytes(shape, bf16, 4, 256, chunk_tokens=128) == 4 * 256 * layer + 8 * 128 * 1000
    assert P.eval_activation_bytes(shape, bf16, 4, 256, fp32_outputs=True) == 4 * 256 * (layer + 12 * 1000)
    # sequence parallelism: a quarter of each row per rank at sp=4, no mask
    assert P.eval_activation_bytes(shape, bf16, 4, 256, 128, sequence=4) == 4 * 64 * (layer - 512) + 8 * 128 * 1000


def test_cpu_plan_adds_glibc_retention(llama8b_dir, train_file, tmp_path, monkeypatch):
    """On the CPU every phase above the process baseline grows by the retained fraction glibc's heap keeps
    (measured in bench/plan_validation.py); none when MALLOC_MMAP_THRESHOLD_ fixes the threshold."""
    cfg = _cfg(llama8b_dir, train_file, tmp_path)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)

    def phases(**kw):
        hw = P.Hardware(accelerator="cpu", device_memory_bytes=2**44, host_memory_bytes=2**44,
                        process_baseline_bytes=2**29, **kw)
        return P.plan(cfg, hw).configured_memory.phases

    held, default = phases(malloc_retained_fraction=0.0), phases()
    for name in held:
        assert default[name] - 2**29 == pytest.approx((held[name] - 2**29) * (1 + P.GLIBC_RETAINED_FRACTION), rel=1e-6)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert phases() == held


def test_eval_heap_growth_count():
    """glibc's heap growth over an evaluation after training: EVAL_HEAP_GROWTH_PER_STEP x steps (at most 1: nothing
    reused, also when the step count is unknown) of the eval layers' transients summed over the layers, only
    tensors up to glibc's 32 MiB mmap ceiling counted."""
    shape = P.ModelShape("x", layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=1000,
                         tied_embeddings=True, params=0, trainable=0, embedding_params=0, lm_head_params=0,
                         matmul_params=0, frozen_matmul_params=0, quantizable_params=0, largest_layer_params=0)
    bf16 = P.Precision(2, 2, False, 4, autocast=False)
    layer = 2 * (3 * 64 + 2 * 64 + 2 * 32 + 4 * 128) + 2 * 256  # per token, the packing mask row included
    total = 2 * 4 * 256 * layer
    assert P.eval_heap_growth_bytes(shape, bf16, 4, 256) == total  # steps unknown: the bound
    assert P.eval_heap_growth_bytes(shape, bf16, 4, 256, steps=10) == pytest.approx(
        10 * P.EVAL_HEAP_GROWTH_PER_STEP * total)
    assert P.eval_heap_growth_bytes(shape, bf16, 4, 256, steps=100_000) == total
    # 2 x 65,536 tokens: the [tokens x 128] MLP tensors (32 MiB) still come from the heap, the 64 MiB masks do not
    assert P.eval_heap_growth_bytes(shape, bf16, 2, 65536) == 2 * 2 * 65536 * 2 * (3 * 64 + 2 * 64 + 2 * 32 + 4 * 128)


def test_cpu_plan_eval_heap_growth(llama8b_dir, train_file, tmp_path, monkeypatch):
    """On the CPU with glibc's default malloc the evaluation phase carries the heap the eval forward grows (measured
    RSS: not scaled by the 20 % retention, which also leaves out the vocabulary-wide tensors above the mmap
    ceiling); zero without eval data and with MALLOC_MMAP_THRESHOLD_ set. Eval data alone means an evaluation: dsft
    evaluates after training."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    hw = P.Hardware(accelerator="cpu", device_memory_bytes=2**44, host_memory_bytes=2**44,
                    process_baseline_bytes=2**29)
    small = {"max_seq_len": 64}  # 8 eval rows x 64 tokens: every layer tensor is heap-sized (<= 32 MiB)
    lora = {"lora": {"r": 16, "target_modules": "all-linear"}}  # small model states: the phases' activations count

    def phases(data, growth=P.EVAL_HEAP_GROWTH_PER_STEP, **train):
        cfg = _cfg(llama8b_dir, train_file, tmp_path, data=data, train={"max_steps": 10, **train}, peft=lora)
        with monkeypatch.context() as m:
            m.setattr(P, "EVAL_HEAP_GROWTH_PER_STEP", growth)
            return P.plan(cfg, hw).configured_memory.phases

    no_eval = phases(small)
    assert "evaluation" not in no_eval and phases(small, growth=0.0) == no_eval  # the term is zero without eval
    with_eval = phases({**small, "eval": train_file}, eval_strategy="steps", eval_steps=5)
    without_growth = phases({**small, "eval": train_file}, growth=0.0, eval_strategy="steps", eval_steps=5)
    cfg = _cfg(llama8b_dir, train_file, tmp_path, data=small, peft=lora)
    shape, prec = P.model_shape(cfg), P.precision_of(cfg, None)
    growth = P.eval_heap_growth_bytes(shape, prec, 8, 64, steps=10)
    assert growth > 0.2 * 2**30  # 32 layers x 8 x 64 tokens of Llama-3-8B-sized layer tensors, 10 steps
    assert with_eval["evaluation"] - without_growth["evaluation"] == pytest.approx(growth, rel=1e-6)
    # the same run without eval data plans less: the evaluation after training is its peak
    assert max(with_eval.values()) == with_eval["evaluation"] > max(no_eval.values())
    # no eval_strategy: still the final evaluation after training
    assert phases({**small, "eval": train_file})["evaluation"] == with_eval["evaluation"]
    # more steps before the evaluation, more growth, up to the bound
    assert phases({**small, "eval": train_file}, max_steps=1000)["evaluation"] > with_eval["evaluation"]
    # 8 x 4,096 tokens: every layer tensor is its own mapping, nothing grows the heap
    long_eval = {"eval": train_file}
    assert phases(long_eval)["evaluation"] == phases(long_eval, growth=0.0)["evaluation"]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # freed blocks leave RSS: no growth either
    assert phases({**small, "eval": train_file}) == phases({**small, "eval": train_file}, growth=0.0)
