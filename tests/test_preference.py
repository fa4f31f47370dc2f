"""Preference tuning (method: dpo | kto) through TRL: config pass-through, preference rows, the reference model,
and short runs on a toy task where the chosen answer copies the prompt and the rejected one does not."""

from __future__ import annotations

import gc
import json
import math
import random
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")

from conftest import REPO, write_jsonl  # noqa: E402
from test_slurm import slurm  # noqa: E402,F401 (the local Slurm fixture, for the preemption test)

from dsft.config import from_dict, load_config, validate  # noqa: E402
from dsft.errors import ConfigError, DataError  # noqa: E402


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """chosen copies the prompt's word (right); rejected is a random word of other letters (wrong)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
        wrong = "".join(rng.choice("stuvwxyz") for _ in range(len(word)))
        rows.append({"prompt": f"copy {word}:", "chosen": f" {word}", "rejected": f" {wrong}"})
    return rows


def kto_rows(pairs: list[dict]) -> list[dict]:
    """The same pairs unpaired: each answer on its own row with a desirable / undesirable label."""
    out = []
    for r in pairs:
        out += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
    return out


def _raw(tmp_path, model_dir, data, method="dpo", peft=True, **train) -> dict:
    raw = {
        "method": method,
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {"train": str(data), "format": "preference", "max_seq_len": 64},
        "train": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8, "max_steps": 12,
                  "learning_rate": 5e-3, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
                  "seed": 0, **train},
    }
    if peft:
        raw["peft"] = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    return raw


def _cfg(*args, **kwargs):
    cfg = from_dict(_raw(*args, **kwargs))
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", pair_rows(64))


# --------------------------------------------------------------------------------------------------
# config


def test_train_section_passes_trl_fields_through_and_names_the_closest_key(tmp_path, tiny_model_dir, pairs_file):
    from dsft.train import build_training_arguments

    cfg = _cfg(tmp_path, tiny_model_dir, pairs_file, beta=0.25, loss_type="ipo", precompute_ref_log_probs=True)
    args = build_training_arguments(cfg)
    assert type(args).__name__ == "DPOConfig"
    assert (args.beta, args.loss_type, args.precompute_ref_log_probs) == (0.25, ["ipo"], True)
    # one source of truth for the length; TRL's changed defaults (bf16, checkpointing) put back to dsft's
    assert args.max_length == 64
    assert args.bf16 is False and args.activation_checkpointing is False
    with pytest.raises(ConfigError, match=r"unknown key 'betta' in section 'train': did you mean 'beta'\? "
                                          r"\(DPOConfig field\)"):
        _cfg(tmp_path, tiny_model_dir, pairs_file, betta=0.1)
    with pytest.raises(ConfigError, match="train.max_length: set data.max_seq_len"):
        _cfg(tmp_path, tiny_model_dir, pairs_file, max_length=128)
    with pytest.raises(ConfigError, match=r"'beta'.*\(TrainingArguments field\)|unknown key 'beta'"):
        _cfg(tmp_path, tiny_model_dir, pairs_file, method="sft", beta=0.1)
    kto = _cfg(tmp_path, tiny_model_dir, pairs_file, method="kto", desirable_weight=1.5)
    assert type(build_training_arguments(kto)).__name__ == "KTOConfig"
    with pytest.raises(ConfigError, match="KL term needs at least 2 rows"):
        _cfg(tmp_path, tiny_model_dir, pairs_file, method="kto", per_device_train_batch_size=1)


def test_method_and_data_format_must_agree(tmp_path, tiny_model_dir, pairs_file):
    raw = _raw(tmp_path, tiny_model_dir, pairs_file)
    raw["data"]["format"] = "prompt_completion"
    with pytest.raises(ConfigError, match="data.train: method: dpo trains on preference data; set data.format: "
                                          "preference"):
        validate(from_dict(raw))
    raw = _raw(tmp_path, tiny_model_dir, pairs_file, method="sft")
    with pytest.raises(ConfigError, match="data.format: preference pairs train with method: dpo"):
        validate(from_dict(raw))
    raw = _raw(tmp_path, tiny_model_dir, pairs_file)
    raw["method"] = "orpo"
    with pytest.raises(ConfigError, match="method: must be one of sft, dpo, kto"):
        from_dict(raw)
    raw = _raw(tmp_path, tiny_model_dir, pairs_file)
    raw["data"]["packing"] = True
    with pytest.raises(ConfigError, match="data.packing: not with method: dpo"):
        validate(from_dict(raw))


# --------------------------------------------------------------------------------------------------
# data


def test_text_and_conversational_rows_become_trl_columns(tmp_path, tiny_model_dir, char_tokenizer):
    from dsft.preference import load_preference_data

    chat = [{"q": [{"from": "human", "value": "copy ab:"}], "good": [{"from": "gpt", "value": "ab"}],
             "bad": [{"from": "gpt", "value": "xy"}]}]
    data = write_jsonl(tmp_path / "chat.jsonl", chat)
    raw = _raw(tmp_path, tiny_model_dir, data)
    raw["data"].update(prompt_field="q", chosen_field="good", rejected_field="bad", role_key="from",
                       content_key="value", roles={"human": "user", "gpt": "assistant"})
    prepared = load_preference_data(from_dict(raw), char_tokenizer)
    assert prepared.train.column_names == ["prompt", "chosen", "rejected"]
    assert prepared.train[0] == {"prompt": [{"role": "user", "content": "copy ab:"}],
                                 "chosen": [{"role": "assistant", "content": "ab"}],
                                 "rejected": [{"role": "assistant", "content": "xy"}]}
    text = write_jsonl(tmp_path / "kto.jsonl", kto_rows(pair_rows(4)))
    prepared = load_preference_data(from_dict(_raw(tmp_path, tiny_model_dir, text, method="kto")), char_tokenizer)
    assert sorted(prepared.train.column_names) == ["completion", "label", "prompt"]
    assert sum(prepared.train["label"]) == 4 and len(prepared.train) == 8


@pytest.mark.parametrize("method,bad,message", [
    ("dpo", {"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ("dpo", {"prompt": "p", "chosen": " a", "rejected": " a"}, "'chosen' and 'rejected' are the same answer"),
    ("dpo", {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     "field 'chosen' is a list of messages while the prompt is text"),
    ("dpo", {"prompt": [{"role": "boss", "content": "p"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}, "field 'prompt' message 0 has role 'boss'"),
    ("kto", {"prompt": "p", "completion": "a", "label": "yes"}, "field 'label' must be true"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, tiny_model_dir, char_tokenizer, method, bad, message):
    from dsft.preference import load_preference_data

    good = pair_rows(3) if method == "dpo" else kto_rows(pair_rows(2))
    path = tmp_path / "rows.jsonl"
    # a blank line before the bad row: line numbers are the file's, not the row index
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + "\n" + json.dumps(bad) + "\n")
    cfg = from_dict(_raw(tmp_path, tiny_model_dir, path, method=method))
    line = len(good) + 2
    with pytest.raises(DataError, match=rf"^{path}: line {line}: {message}"):
        load_preference_data(cfg, char_tokenizer)


@pytest.mark.integration
def test_cli_reports_a_bad_preference_row_in_one_line(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "rows.jsonl", pair_rows(3) + [{"prompt": "p", "chosen": "a", "rejected": 3}])
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(_raw(tmp_path, tiny_model_dir, path)))  # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", "dsft", "train", str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dsft: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert errors == [f"dsft: error: {path}: line 4: field 'rejected' must be text or a non-empty list of messages"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "dsft_config.yaml").exists()  # nothing written before the data was checked


# --------------------------------------------------------------------------------------------------
# reference model


def _llama_instances() -> int:
    from transformers import LlamaForCausalLM

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, LlamaForCausalLM))


def test_lora_dpo_keeps_no_second_copy_and_full_dpo_a_frozen_identical_one(tmp_path, tiny_model_dir, pairs_file):
    from dsft.train import build_trainer

    before = _llama_instances()
    trainer, _ = build_trainer(_cfg(tmp_path, tiny_model_dir, pairs_file))
    assert trainer.ref_model is None
    assert _llama_instances() - before == 1  # the policy only: the reference is it with the adapter disabled
    base = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    expected_base = sum(t.numel() for t in _safetensors(tiny_model_dir).values())
    assert base == expected_base and 0 < lora < base / 2  # no "ref" adapter copy either
    assert lora == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    del trainer
    gc.collect()

    # full fine-tuning: a frozen copy, identical to the policy even for random (from_config) weights with overrides
    raw = _raw(tmp_path, tiny_model_dir, pairs_file, peft=False)
    raw["model"].update(init="from_config", config_overrides={"num_hidden_layers": 1})
    cfg = from_dict(raw)
    validate(cfg)
    before = _llama_instances()
    trainer, _ = build_trainer(cfg)
    assert _llama_instances() - before == 2
    ref = trainer.ref_model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    policy = dict(trainer.model.named_parameters())
    assert len(policy) == len(dict(ref.named_parameters())) and ref.config.num_hidden_layers == 1
    for name, p in ref.named_parameters():
        assert torch.equal(p, policy[name]), name


def test_mfu_flops_per_token_count_the_reference_forward(tmp_path, tiny_model_dir, pairs_file):
    """A train step costs 6 FLOPs per matmul weight and token; the reference's forward adds 2 per reference weight
    (DPO: the chosen + rejected tokens the policy trains on; KTO also scores a KL batch with policy and reference)."""
    from transformers import TrainerControl, TrainerState

    from dsft.callbacks import MetricsCallback
    from dsft.preference import extra_forwards
    from dsft.train import build_trainer, build_training_arguments

    n = sum(t.numel() for k, t in _safetensors(tiny_model_dir).items()
            if k.endswith("proj.weight") or k == "lm_head.weight")

    def flops_per_token(callback, args, model) -> float:
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
        return callback._flops_per_token

    def built(cfg):
        trainer, _ = build_trainer(cfg)
        callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MetricsCallback))
        return trainer, flops_per_token(callback, trainer.args, trainer.model)

    trainer, full = built(_cfg(tmp_path, tiny_model_dir, pairs_file, peft=False))
    assert full == 6 * n + 2 * n
    model = trainer.model
    precomputed = build_training_arguments(_cfg(tmp_path, tiny_model_dir, pairs_file, peft=False,
                                                precompute_ref_log_probs=True))
    assert flops_per_token(MetricsCallback(*extra_forwards("dpo", precomputed)), precomputed, model) == 6 * n
    kto_file = write_jsonl(tmp_path / "kto.jsonl", kto_rows(pair_rows(4)))
    kto = build_training_arguments(_cfg(tmp_path, tiny_model_dir, kto_file, method="kto", peft=False))
    # the completions: train 6n + reference 2n; the KL batch: policy 2n + reference 2n
    assert flops_per_token(MetricsCallback(*extra_forwards("kto", kto)), kto, model) == 12 * n
    del trainer, model
    # LoRA: the frozen base costs 4 per weight in the step (no weight gradient), A/B 6; the reference is the base
    trainer, lora = built(_cfg(tmp_path, tiny_model_dir, pairs_file))
    adapter = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert adapter > 0 and lora == 4 * n + 6 * adapter + 2 * n


def test_plan_counts_the_zero3_reference_engines_gathered_parameters(tmp_path, tiny_model_dir, pairs_file):
    """Full-fine-tuning DPO under ZeRO-3: TRL's reference engine runs with the policy's zero_optimization (its
    dotted-key overrides do not reach DeepSpeed: checked below), and its forward holds the largest module plus up to
    min(stage3_prefetch_bucket_size, stage3_max_live_parameters) gathered elements. The planner adds that to the
    phases that run the reference forward (forward_backward), not to load / optimizer step / save."""
    from deepspeed.runtime.config import DeepSpeedConfig

    import dsft.plan as P

    # what TRL's prepare_deepspeed (trl/models/utils.py) does to the reference engine's config under ZeRO-3
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
          "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 12345,
                                "stage3_param_persistence_threshold": 0},
          "zero_optimization.stage3_prefetch_bucket_size": 0.9 * 64 * 64,
          "zero_optimization.stage3_param_persistence_threshold": 640}
    zero = DeepSpeedConfig(ds).zero_config
    assert (zero.prefetch_bucket_size, zero.param_persistence_threshold) == (12345, 0)

    hw = P.hardware_from_flags(gpus_per_node=2, accelerator="H100", host_mem="64GiB")
    shape = None

    def memory(prefetch, max_live, **train):
        nonlocal shape
        raw = _raw(tmp_path, tiny_model_dir, pairs_file, peft=False, **train)
        raw["deepspeed"] = "zero3"
        raw["deepspeed_overrides"] = {"zero_optimization": {"stage3_prefetch_bucket_size": prefetch,
                                                            "stage3_max_live_parameters": max_live}}
        cfg = from_dict(raw)
        validate(cfg)
        shape = P.model_shape(cfg)
        return P.plan(cfg, hw).configured_memory

    for prefetch, max_live in ((20_000, 1e9), (20_000, 5_000), (1e8, 1e9)):
        none = memory(prefetch, max_live, precompute_ref_log_probs=True)  # no reference kept
        assert none.reference_weights == none.reference_buffers == 0
        # the largest module + min(prefetch, max live), never more than the whole model
        live = min(shape.largest_layer_params + min(prefetch, max_live), shape.params)
        m = memory(prefetch, max_live)
        assert m.reference_buffers == live * 4, (prefetch, max_live)  # fp32 weights
        assert m.phases["forward_backward"] - none.phases["forward_backward"] == pytest.approx(
            m.reference_weights + m.reference_buffers, abs=8)
        for phase in ("load", "optimizer_step", "save"):
            assert m.phases[phase] - none.phases[phase] == pytest.approx(m.reference_weights, abs=8), phase
    assert "| reference_buffers |" in P.format_plan(P.plan(from_dict(_raw(tmp_path, tiny_model_dir, pairs_file,
                                                                           peft=False) | {"deepspeed": "zero3"}), hw))


def _safetensors(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# --------------------------------------------------------------------------------------------------
# training


def _train_logs(history: list[dict]) -> list[dict]:
    return [r for r in history if "loss" in r]


@pytest.fixture(scope="module")
def lora_dpo_run(tmp_path_factory, tiny_model_dir, pairs_file):
    """12 steps of LoRA-DPO in this process (fp32, 8 pairs per step): (tmp dir, RunResult); output in dir/out."""
    from dsft.train import run

    tmp_path = tmp_path_factory.mktemp("lora-dpo")
    return tmp_path, run(_cfg(tmp_path, tiny_model_dir, pairs_file))


@pytest.mark.integration
def test_lora_dpo_learns_the_preference(lora_dpo_run):
    tmp_path, result = lora_dpo_run
    logs = _train_logs(result.log_history)
    assert len(logs) == 12
    accuracy = [r["rewards/accuracies"] for r in logs]
    margins = [r["rewards/margins"] for r in logs]
    # the last 3 steps (24 pairs) rank chosen over rejected on > 80 % of pairs, and the margin has grown
    assert sum(accuracy[-3:]) / 3 > 0.8, accuracy
    assert sum(margins[-3:]) / 3 > 2 * max(sum(margins[:2]) / 2, 1e-3), margins
    assert logs[-1]["loss"] < logs[0]["loss"] < math.log(2) + 1e-3
    out = tmp_path / "out"
    # dsft's MetricsCallback is on the trainer: its log has the reward curves and the throughput
    logged = [json.loads(line) for line in (out / "dsft_log.jsonl").read_text().splitlines()]
    assert all("rewards/margins" in r for r in logged if "loss" in r)
    assert all("tokens_per_second_per_device" in r for r in logged if "loss" in r and r["step"] > 2)  # after warm-up
    assert (out / "adapter_model.safetensors").is_file() and (out / "dsft_done.json").is_file()
    (tmp_path / "curves.json").write_text(json.dumps(logs))  # for docs/preference.md


@pytest.mark.integration
def test_dsft_merge_of_a_dpo_adapter_gives_the_adapter_models_logits(lora_dpo_run, capsys):
    """`dsft merge` of the LoRA-DPO output: the merged model (no LoRA modules) gives the logits of base + unmerged
    adapter. fp32: merging adds B A x scale into W once instead of per forward, a reassociation of fp32 sums, so
    the logits agree to rounding; bound 1e-5 of the largest logit."""
    from dsft.cli import main
    from dsft.export import load_for_inference

    tmp_path, _ = lora_dpo_run
    out, merged_dir = tmp_path / "out", tmp_path / "merged"
    assert main(["merge", str(out), "--out", str(merged_dir)]) == 0
    assert f"merged model saved to {merged_dir}" in capsys.readouterr().out
    adapter, tok = load_for_inference(out, dtype="fp32")
    merged, _ = load_for_inference(merged_dir, dtype="fp32")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = tok(["copy abcdef: abcdef", "copy hgf: stu"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = adapter(**ids).logits, merged(**ids).logits
        with adapter.disable_adapter():
            base = adapter(**ids).logits
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    print(f"dpo merge parity: max abs logit difference {diff:.3g} (logits up to {scale:.3g})")
    assert diff <= 1e-5 * scale
    assert (a - base).abs().max() > 100 * max(diff, 1e-7)  # DPO moved the adapter far beyond the merge's rounding


@pytest.mark.integration
def test_kto_trains_on_the_same_data_unpaired(tmp_path, tiny_model_dir):
    from dsft.train import run

    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows(pair_rows(64)))
    result = run(_cfg(tmp_path, tiny_model_dir, data, method="kto", max_steps=10))
    logs = _train_logs(result.log_history)
    losses = [r["loss"] for r in logs]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert all("kl" in r for r in logs)
    # desirable answers gain reward over undesirable ones
    assert logs[-1]["rewards/chosen"] > logs[-1]["rewards/rejected"]


@pytest.mark.integration
def test_resume_from_a_checkpoint_reproduces_the_next_steps(tmp_path, tiny_model_dir, pairs_file):
    from dsft.checkpoint import is_complete
    from dsft.train import run

    first = run(_cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=6, save_strategy="steps", save_steps=3))
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert is_complete(checkpoint)
    # a second output dir holding only checkpoint-3: resume: auto picks it up
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    shutil.copytree(checkpoint, second_dir / "checkpoint-3")
    raw = _raw(tmp_path, tiny_model_dir, pairs_file, max_steps=6, save_strategy="steps", save_steps=3,
               resume_from_checkpoint="auto")
    raw["train"]["output_dir"] = str(second_dir)
    cfg = from_dict(raw)
    validate(cfg)
    second = run(cfg)
    a = {r["step"]: r["loss"] for r in first.log_history if "loss" in r and "step" in r}
    b = {r["step"]: r["loss"] for r in second.log_history if "loss" in r and "step" in r}
    # it resumed (steps 1-3 come from the checkpoint's trainer state; this run logged only 4-6)
    resumed = [json.loads(line)["step"] for line in (second_dir / "dsft_log.jsonl").read_text().splitlines()]
    assert [s for s in resumed if s <= 6] == [4, 5, 6, 6]  # the last is the train summary
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-3 * abs(a[step]), (step, a[step], b[step])


@pytest.mark.integration
def test_qlora_dpo_trains_with_the_4bit_base_as_reference(tmp_path, tiny_model_dir, pairs_file):
    """peft.quantization: {} (NF4, compute in the model dtype fp32, so no bound depends on the CPU's bf16)."""
    import bitsandbytes as bnb

    from dsft.train import build_trainer

    raw = _raw(tmp_path, tiny_model_dir, pairs_file, max_steps=6)
    raw["peft"]["quantization"] = {}
    cfg = from_dict(raw)
    validate(cfg)
    trainer, _ = build_trainer(cfg)
    assert trainer.ref_model is None  # the reference is the 4-bit base with the adapter disabled
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules()) == 7 * 2
    trainable = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    # TRL's choice for quantized models (QLoRA paper): trainable adapter weights in bf16
    assert {p.dtype for _, p in trainable} == {torch.bfloat16}
    result = trainer.train()
    logs = _train_logs(trainer.state.log_history)
    assert len(logs) == 6 and result.global_step == 6
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-3 and logs[0]["rewards/margins"] == 0
    assert all(math.isfinite(r["loss"]) for r in logs)
    assert sum(r["rewards/accuracies"] for r in logs[-3:]) / 3 > 0.8, logs
    assert logs[-1]["rewards/margins"] > 0.05 and logs[-1]["loss"] < logs[0]["loss"] - 0.02, logs
    trainer.save_model(str(tmp_path / "adapter"))
    saved = _safetensors_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # only the adapter is written


def _safetensors_file(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_config_file_with_method_dpo_loads(tmp_path, tiny_model_dir, pairs_file):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(_raw(tmp_path, tiny_model_dir, pairs_file, beta=0.2)))
    assert load_config(path, ["train.loss_type=robust", "train.label_smoothing=0.1"]).train["loss_type"] == "robust"


@pytest.mark.integration
def test_nonfinite_guard_stops_a_diverging_dpo_run_without_saving_the_bad_steps(tmp_path, tiny_model_dir, pairs_file):
    """LoRA-DPO, one process, checkpoints every 3 steps: from step 5 on one output-embedding weight is NaN (as in
    the SFT guard test, tests/test_reliability.py), so the DPO loss and the LoRA gradients are NaN. With
    guard.max_nonfinite_steps 2 the run stops at step 6 with NonFiniteError (exit code 3) naming the loss and the
    gradient norm; checkpoint-6 (a save step in the streak) is never written and checkpoint-3 is left as it was."""
    from test_reliability import run_poisoned_from_step_5

    raw = _raw(tmp_path, tiny_model_dir, pairs_file, max_steps=9, save_strategy="steps", save_steps=3)
    raw["guard"] = {"max_nonfinite_steps": 2}
    cfg = from_dict(raw)
    validate(cfg)
    _, steps = run_poisoned_from_step_5(cfg, tmp_path / "out")
    assert steps[5]["nonfinite_loss_ranks"] == [0] and steps[6]["nonfinite_grad_norm"], steps
    # the guard recorded the DPO loss the Trainer logged (besides the model forwards' own language-model losses)
    logged = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "out" / "dsft_log.jsonl").read_text()
                                                .splitlines()) if "loss" in r}
    for step in (1, 4):
        assert any(abs(x - logged[step]) <= 1e-6 * logged[step] for x in steps[step]["loss"]), (step, steps[step])
    assert abs(logged[1] - math.log(2)) < 1e-4


# --------------------------------------------------------------------------------------------------
# full-fine-tuning DPO under ZeRO-3 on 2 ranks: the reference copy is partitioned like the policy


def _torchrun(nproc: int, *configs) -> None:
    from test_distributed import BIN, _run, free_port

    _run([str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
          str(free_port()), "tests/run_configs.py", *map(str, configs)], timeout=600)


def _config_file(path, raw: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "run.yaml").write_text(json.dumps(raw))  # JSON is YAML
    return path / "run.yaml"


@pytest.fixture(scope="module")
def two_rank_dpo(tmp_path_factory, tiny_model_dir, pairs_file):
    """One torchrun launch (2 ranks, gloo, fp32) running, one after another: LoRA-DPO under ZeRO-2, 6 steps of
    2 x 4 pairs saving checkpoints 3 and 6 (``lora-zero2``); full-fine-tuning DPO under ZeRO-3, 3 steps
    (``full-zero3``)."""
    root = tmp_path_factory.mktemp("dpo-2ranks")
    lora = _raw(root / "lora-zero2", tiny_model_dir, pairs_file, per_device_train_batch_size=4, max_steps=6,
                save_strategy="steps", save_steps=3)
    lora["deepspeed"] = "zero2"
    full = _raw(root / "full-zero3", tiny_model_dir, pairs_file, peft=False, per_device_train_batch_size=4,
                max_steps=3, learning_rate=1e-3)
    full["deepspeed"] = "zero3"
    # every parameter partitioned, the reference's too: TRL's engine for it keeps the policy's zero_optimization
    # (its 10 x hidden size threshold is written as a dotted key DeepSpeed ignores; see the planner test above)
    full["deepspeed_overrides"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    _torchrun(2, _config_file(root / "lora-zero2", lora), _config_file(root / "full-zero3", full))
    return root


@pytest.mark.integration
def test_zero3_full_dpo_on_two_ranks_partitions_the_reference_too(two_rank_dpo, tiny_model_dir):
    out = two_rank_dpo / "full-zero3" / "out"
    info = json.loads((out / "dsft_run_info.json").read_text())
    assert info["world_size"] == 2 and info["deepspeed_zero_stage"] == 3 and len(info["ranks"]) == 2
    n = sum(t.numel() for t in _safetensors(tiny_model_dir).values())
    for r in info["ranks"]:
        assert r["param_elements_total"] == r["ref_param_elements_total"] == n, r
        # each rank holds about half of each model (a whole copy on a rank would be share 1.0)
        for key in ("param_elements_held", "ref_param_elements_held"):
            assert 0.45 < r[key] / n < 0.55, (key, r)
    print("elements held per rank (policy, reference) of", n, ":",
          [(r["param_elements_held"], r["ref_param_elements_held"]) for r in info["ranks"]])
    logs = [json.loads(line) for line in (out / "dsft_log.jsonl").read_text().splitlines()]
    logs = [r for r in logs if "loss" in r]
    assert len(logs) == 3
    # the partitioned reference gathers its weights for its forward: at step 1 it equals the policy (loss log 2,
    # zero rewards); then the chosen answers gain on the rejected ones
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-4 and logs[0]["rewards/margins"] == 0
    assert logs[-1]["rewards/margins"] > 0 and logs[-1]["loss"] < logs[0]["loss"]


@pytest.mark.integration
def test_lora_dpo_resumes_on_a_different_world_size(two_rank_dpo, tiny_model_dir, pairs_file):
    """ZeRO-2 LoRA-DPO saved at step 3 by 2 ranks x 4 pairs resumes on 1 rank x 4 pairs x accumulation 2: the same
    global batch of 8 pairs, the same rows in the same order (the sampler's permutation does not depend on the
    world size; 2 ranks take micro-batches 2k and 2k+1 of a step, 1 rank takes both in turn). dsft converts the
    checkpoint to DeepSpeed's universal format, which restores the fp32 LoRA weights and Adam moments as they were;
    what may differ is only the order of fp32 additions (an all-reduce average of 2 gradients vs an accumulation),
    so steps 4-6 reproduce the 2-rank run's losses within 1e-3 relative (fp32; measured: bitwise equal)."""
    straight = two_rank_dpo / "lora-zero2" / "out"
    resumed = two_rank_dpo / "one-rank"
    shutil.copytree(straight / "checkpoint-3", resumed / "out" / "checkpoint-3")
    raw = _raw(resumed, tiny_model_dir, pairs_file, per_device_train_batch_size=4, gradient_accumulation_steps=2,
               max_steps=6, save_strategy="steps", save_steps=3, resume_from_checkpoint="last")
    raw["deepspeed"] = "zero2"
    _torchrun(1, _config_file(resumed, raw))
    out = resumed / "out"
    assert (out / "checkpoint-3" / "latest_universal").is_file()  # went through the universal checkpoint
    assert json.loads((out / "dsft_run_info.json").read_text())["world_size"] == 1
    logs = [json.loads(line) for line in (straight / "dsft_log.jsonl").read_text().splitlines()]
    a = {r["step"]: r for r in logs if "loss" in r}
    logs = [json.loads(line) for line in (out / "dsft_log.jsonl").read_text().splitlines()]
    b = {r["step"]: r for r in logs if "loss" in r}
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [4, 5, 6]  # it continued from step 3
    assert json.loads((out / "dsft_done.json").read_text())["global_step"] == 6
    for step in (4, 5, 6):
        for key in ("loss", "rewards/margins"):
            assert abs(a[step][key] - b[step][key]) <= 1e-3 * abs(a[step][key]), (step, key, a[step], b[step])
        assert b[step]["learning_rate"] == pytest.approx(a[step]["learning_rate"], rel=1e-6)  # scheduler restored


# --------------------------------------------------------------------------------------------------
# dsft submit on the local Slurm (scripts/slurm-local.sh): a DPO job survives a preemption


@pytest.mark.integration
def test_dsft_submit_dpo_job_survives_a_preemption(slurm, tmp_path, tiny_model_dir, pairs_file):
    """2 tasks, LoRA-DPO, 12 steps; interrupted (SIGTERM + USR2 as for a preemption) once step 2 is logged: it saves
    at the next step boundary, is requeued and resumes from that checkpoint to the end, each step logged once."""
    import time

    import submitit

    from test_slurm import _finish, _job_id, _losses, _results, _submit

    raw = _raw(tmp_path, tiny_model_dir, pairs_file, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    raw["slurm"] = {"tasks_per_node": 2, "time_min": 5, "signal_delay_s": 30}
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(raw))
    out = tmp_path / "out"
    proc = _submit(config, cwd=tmp_path)
    job_id = _job_id(proc)
    deadline = time.time() + 300
    while not any(step >= 2 for step, _ in _losses(out)):  # interrupt mid-training
        assert time.time() < deadline and proc.poll() is None, "training did not reach step 2"
        time.sleep(0.05)
    submitit.SlurmJob(folder=out / "slurm" / job_id, job_id=job_id)._interrupt()
    _finish(proc)
    results = _results(out / "slurm" / job_id, job_id, 2)
    assert {x["restart"] for x in results} == {1}, "the job was not requeued exactly once"
    first, second = results[0]["attempts"]
    stopped, resumed = first["stopped_at_step"], second["start_step"]
    assert 2 <= stopped < 12 and (out / f"checkpoint-{stopped}").is_dir() and resumed == stopped
    assert {x["global_step"] for x in results} == {12}
    logs = [r for r in (json.loads(line) for line in (out / "dsft_log.jsonl").read_text().splitlines())
            if "loss" in r]
    assert [r["step"] for r in logs] == list(range(1, 13))  # each step once, across the requeue
    assert all(math.isfinite(r["loss"]) for r in logs)
    # the resumed attempt kept the preference it had learned: rewards keep ranking chosen above rejected
    assert logs[-1]["rewards/margins"] > 0 and logs[-1]["rewards/accuracies"] > 0.5, logs[-1]
    assert (out / "adapter_model.safetensors").is_file() and (out / "dsft_done.json").is_file()


# --------------------------------------------------------------------------------------------------
# dsft prepare-preference: HumanEval pairs (canonical solution vs the model's own greedy completion)


def test_greedy_completion_is_cut_where_the_function_ends():
    from dsft.preference_pairs import build_pairs, cut_at_stop

    text = "    return x + 1\n\n\ndef main():\n    print(f(2))\n"
    assert cut_at_stop(text) == "    return x + 1\n"
    assert cut_at_stop("    return 1\n\nif __name__ == '__main__':\n    f()") == "    return 1\n"
    assert cut_at_stop("\n\ndef other():") == ""
    rows = [{"prompt": "def f(x):\n", "completion": "    return x + 1\n"},
            {"prompt": "def g(x):\n", "completion": "    return x * 2\n"},
            {"prompt": "def h(x):\n", "completion": "    return -x\n"}]
    pairs, skipped = build_pairs(rows, [text.replace("+", "-"), "    return x * 2\n# done", "\ndef h2(): pass"])
    # g's greedy answer equals its solution and h's is empty: no preference in either
    assert skipped == 2 and pairs == [{"prompt": "def f(x):\n", "chosen": "    return x + 1\n",
                                       "rejected": "    return x - 1\n"}]


def test_the_rejected_answer_is_the_body_the_model_wrote():
    """SmolLM2-135M-Instruct on the bare HumanEval prompts wrote no body (a fence and prose, or a new top-level
    statement); asked through its chat template it writes the function again from its def line, in a code block.
    Both are read as the body they hold, or nothing (then the pair is skipped)."""
    from dsft.preference_pairs import function_name, rejected_answer

    prompt = ('from typing import List\n\n\ndef helper(x):\n    return x\n\n\n'
              'def add(a: int,\n        b: int) -> int:\n    """ Add two numbers.\n    >>> add(1, 2)\n    3\n    """\n')
    assert function_name(prompt) == "add"  # the last def: helpers come first
    # a continuation: cut at the first top-level statement
    assert rejected_answer("    return a - b\n\n\nprint(add(1, 2))\n", prompt) == "    return a - b\n"
    # a closed code fence and prose, or a test, have no body
    assert rejected_answer("```\n\nThis function adds a and b.", prompt) == ""
    assert rejected_answer("\n# Test the function\nprint(add(1, 2))", prompt) == ""
    # a chat answer: the function in a code block, then prose
    answer = '```python\ndef add(a, b):\n    """Add."""\n    return a * b\n```\n\nThis function multiplies.'
    assert rejected_answer(answer, prompt) == "    return a * b\n"
    # the function again (a multi-line signature, its docstring): the body after the docstring
    again = ('def add(a: int,\n        b: int) -> int:\n    """ Add two numbers.\n    """\n    c = a * b\n\n'
             "    return c\n```\n\nThis function multiplies.\n")
    assert rejected_answer("\n" + again, prompt) == "    c = a * b\n\n    return c\n"
    one_line_docstring = 'def add(a, b):\n    """Add."""\n    return b\ndef other(): pass'
    assert rejected_answer(one_line_docstring, prompt) == "    return b\n"
    # only the docstring (generation ran out) or another function's name: nothing
    assert rejected_answer('\ndef add(a, b):\n    """ Add two\n    numbers', prompt) == ""
    assert rejected_answer("\ndef add_manual(a, b):\n    return a + b\n", prompt) == ""


def test_an_instruct_model_is_asked_through_its_chat_template(char_tokenizer):
    from dsft.preference_pairs import generation_prompt

    prompt = "def f(x):\n    \"\"\"add 1\"\"\"\n"
    text = generation_prompt(char_tokenizer, prompt)
    # a user turn asking for the function; the model answers with the function (rejected_answer reads its body)
    assert text == ("<|im_start|>user\nComplete this Python function:\n```python\n" + prompt + "```<|im_end|>\n"
                    "<|im_start|>assistant\n")

    class Plain:
        chat_template = None

    assert generation_prompt(Plain(), prompt) == prompt  # a base model continues the bare prompt


def test_prepare_preference_writes_pairs_once_and_names_missing_inputs(tmp_path, tiny_model_dir, capsys):
    from dsft.cli import main

    cache = tmp_path / "cache"
    assert main(["prepare-preference", "--cache-dir", str(cache), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsft: error: ") and "dsft prepare-demo" in err[0]
    src = cache / "data" / "humaneval"
    src.mkdir(parents=True)
    solutions = [{"prompt": f"def f{i}(x):\n    \"\"\"add {i}\"\"\"\n", "completion": f"    return x + {i}\n"}
                 for i in range(5)]
    write_jsonl(src / "train.jsonl", solutions[:3])
    write_jsonl(src / "eval.jsonl", solutions[3:])
    args = ["prepare-preference", "--cache-dir", str(cache), "--model", str(tiny_model_dir), "--max-new-tokens", "8",
            "--batch-size", "2"]
    assert main(args) == 0
    out = cache / "data" / "humaneval-dpo"
    for name, rows in (("train", solutions[:3]), ("eval", solutions[3:])):
        pairs = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        by_prompt = {r["prompt"]: r for r in rows}
        assert 0 < len(pairs) <= len(rows)
        for pair in pairs:  # the canonical solution is chosen; the random tiny model's text is rejected
            assert pair["chosen"] == by_prompt[pair["prompt"]]["completion"] and pair["rejected"] != pair["chosen"]
    first = capsys.readouterr().out
    assert "train_pairs: " in first and "up_to_date" not in first
    assert main(args) == 0 and "up_to_date: True" in capsys.readouterr().out  # same settings: no second generation
    assert main(args[:-2] + ["--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("dsft: error: --max-new-tokens, --batch-size and --limit")
