"""The chunked loss (dsft/loss.py) against the model's own loss: same value and gradients (fp32, rel 1e-5) for
plain, packed, completion-only, LoRA, LoRA + modules_to_save lm_head, tied embeddings, QLoRA, accumulation
normalisation and ragged chunks; eval keeps per-row sums, not logits; the config key and its refusals; and a
2-rank ZeRO-3 run whose losses equal the stock run's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dsft.config import LossConfig, from_dict, reference_markdown, validate
from dsft.errors import ConfigError
from dsft.loss import chunked_causal_lm_loss, enable_chunked_loss

REL = 1e-5


def _tiny(tie: bool = False, seed: int = 0, vocab: int = 97):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.config.use_cache = False
    return model


def _batch(vocab: int = 97, rows: int = 2, length: int = 23, seed: int = 1, prompt: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=gen)
    labels = ids.clone()
    labels[:, :prompt] = -100  # completion-only: no loss on the prompt
    labels[-1, -4:] = -100  # right padding on the last row
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model, batch: dict, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(stock, chunked) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = stock, chunked
    assert torch.isfinite(loss_a) and loss_a.item() != 0.0
    assert abs(loss_a.item() - loss_b.item()) <= REL * abs(loss_a.item()), (loss_a.item(), loss_b.item())
    assert grads_a.keys() == grads_b.keys() and grads_a
    nonzero = 0
    for name, ga in grads_a.items():
        gb = grads_b[name]
        scale = ga.abs().max().item()
        nonzero += scale > 0
        assert (ga - gb).abs().max().item() <= REL * max(scale, 1e-12), name
    assert nonzero > 0


def _compare(model, batch: dict, chunk: int = 7, **kwargs) -> None:
    model.train()
    stock = _loss_and_grads(model, batch, **kwargs)
    assert enable_chunked_loss(model, chunk)
    chunked = _loss_and_grads(model, batch, **kwargs)
    _assert_same(stock, chunked)


def _lm_head_never_sees_all_tokens(model, batch: dict, chunk: int) -> None:
    """The proof that no full logits exist: every lm_head call gets at most chunk_tokens rows."""
    from dsft.loss import causal_lm

    seen = []
    handle = causal_lm(model).get_output_embeddings().register_forward_hook(
        lambda m, i, o: seen.append(o.shape[:-1].numel()))
    try:
        model(**batch).loss.backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    assert seen and max(seen) <= max(chunk, batch["input_ids"].shape[0])  # one position per row (logits_to_keep=1)


def test_plain_and_ragged_chunks_match_the_model_loss():
    model, batch = _tiny(), _batch()
    _compare(model, batch, chunk=5)  # 2 x 23 tokens: 5 does not divide 46
    _lm_head_never_sees_all_tokens(model, batch, 5)


def test_completion_only_labels_match():
    _compare(_tiny(), _batch(prompt=9), chunk=8)


def test_packed_rows_with_restarting_positions_match():
    # as dsft.data.PackedCollator builds them: two samples in one row, position_ids restart, no attention_mask
    batch = _batch(rows=1, length=20, prompt=0)
    batch["position_ids"] = torch.cat([torch.arange(12), torch.arange(8)]).unsqueeze(0)
    batch["labels"][0, 12] = -100
    _compare(_tiny(), batch, chunk=6)


def test_tied_embeddings_match():
    model = _tiny(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _compare(model, _batch(), chunk=16)


def test_accumulation_normalisation_by_num_items_in_batch():
    # the Trainer passes the token count of the whole accumulated batch; the loss is sum / that count
    _compare(_tiny(), _batch(), chunk=9, num_items_in_batch=torch.tensor(137))


def test_shift_labels_from_the_batch_are_used():
    model, batch = _tiny(), _batch()
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
    stock = _loss_and_grads(model, batch)
    enable_chunked_loss(model, 4)
    _assert_same(stock, _loss_and_grads(model, {"input_ids": batch["input_ids"], "labels": batch["labels"] * 0,
                                                 "shift_labels": shift}))


def _lora(model, modules_to_save=None):
    from dsft.config import LoraConfig, PeftConfig
    from dsft.model import apply_lora

    peft = apply_lora(model, PeftConfig(lora=LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=modules_to_save)),
                      False)
    # LoRA B starts at zero; move it so the adapters change the model's output and the comparison means something
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft


def test_lora_matches():
    _compare(_lora(_tiny()), _batch(prompt=5), chunk=7)


def test_lora_with_trainable_lm_head_copy_matches_and_trains_the_copy():
    model = _lora(_tiny(), modules_to_save=["lm_head"])
    with torch.no_grad():  # make the trainable copy differ from the frozen original: reading the wrong one shows
        for name, p in model.named_parameters():
            if "modules_to_save" in name and "lm_head" in name:
                p.add_(0.1)
    _compare(model, _batch(), chunk=7)
    model.zero_grad(set_to_none=True)
    model(**_batch()).loss.backward()
    copies = [p for n, p in model.named_parameters() if "modules_to_save" in n and "lm_head" in n]
    assert copies and all(p.grad is not None and p.grad.abs().sum() > 0 for p in copies)


def test_qlora_4bit_matches(tmp_path):
    pytest.importorskip("bitsandbytes")
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from conftest import write_tiny_model
    from dsft.config import ModelConfig, QuantizationConfig
    from dsft.model import load_model

    path = write_tiny_model(tmp_path / "m", hidden=64)
    model = load_model(ModelConfig(name_or_path=str(path), dtype="fp32"), QuantizationConfig(compute_dtype="fp32"))
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    vocab = model.config.vocab_size
    model = _lora(model)
    _compare(model, _batch(vocab=vocab, prompt=4), chunk=10)


def test_eval_returns_row_sums_instead_of_logits_and_they_give_the_loss():
    from dsft.callbacks import compute_metrics, preprocess_logits_for_metrics, token_loss_sums

    model, batch = _tiny(), _batch(prompt=3)
    model.eval()
    with torch.no_grad():
        stock = model(**batch)
        expected = token_loss_sums(stock.logits, batch["labels"])
        enable_chunked_loss(model, 6)
        out = model(**batch)
    assert out.logits.shape == (2, 2)  # no [batch, tokens, vocab] tensor
    rows = preprocess_logits_for_metrics((out.logits,), batch["labels"])
    torch.testing.assert_close(rows, expected, rtol=REL, atol=0)
    metrics = compute_metrics(type("P", (), {"predictions": rows.numpy()})())
    assert math.isclose(metrics["token_nll"], stock.loss.item(), rel_tol=REL)
    # without labels (generation, probes) the model's own forward runs: full logits
    with torch.no_grad():
        assert model(input_ids=batch["input_ids"]).logits.shape == (2, 23, 97)


def test_a_model_that_scales_its_logits_keeps_its_own_loss(caplog):
    model = _tiny()
    model.config.logits_scaling = 4.0
    assert not enable_chunked_loss(model, 8)
    assert "logits_scaling" in caplog.text


def test_chunk_function_without_num_items_is_the_mean():
    hidden = torch.randn(1, 5, 4)
    head = torch.nn.Linear(4, 11, bias=False)
    labels = torch.tensor([[1, 2, -100, 4, 5]])
    loss, _ = chunked_causal_lm_loss(hidden, labels, head, 2)
    logits = head(hidden)[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
    assert math.isclose(loss.item(), expected.item(), rel_tol=REL)


# --------------------------------------------------------------------------------------------------
# config


def _raw(**extra) -> dict:
    raw = {"model": {"name_or_path": "m", "init": "from_config"}, "data": {"train": "hub/ds"},
           "train": {"output_dir": "out"}}
    raw.update(extra)
    return raw


def test_loss_section_defaults_to_chunked_and_is_in_the_reference():
    cfg = from_dict(_raw())
    assert cfg.loss == LossConfig(impl="chunked", chunk_tokens=1024)
    ref = reference_markdown()
    assert "### `loss`" in ref and "| `chunk_tokens` |" in ref and "| `impl` |" in ref


@pytest.mark.parametrize("raw, message", [
    (_raw(loss={"chunk_tokens": 0}), "loss.chunk_tokens: must be a positive"),
    (_raw(loss={"impl": "fused"}), "loss.impl: must be one of chunked, stock, liger"),
    (_raw(train={"output_dir": "o", "label_smoothing_factor": 0.1}), "train.label_smoothing_factor"),
    (_raw(train={"output_dir": "o", "use_liger_kernel": True}), "train.use_liger_kernel: conflicts"),
])
def test_bad_loss_settings_are_one_line_errors(raw, message):
    with pytest.raises(ConfigError) as e:
        validate(from_dict(raw))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_label_smoothing_is_accepted_with_the_stock_loss():
    validate(from_dict(_raw(loss={"impl": "stock"}, train={"output_dir": "o", "label_smoothing_factor": 0.1})))


def test_liger_is_refused_here_with_the_reason(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(found):
        return lambda name, *a: found if name == "liger_kernel" else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec(None))
    with pytest.raises(ConfigError, match="liger-kernel package"):
        validate(from_dict(_raw(loss={"impl": "liger"})))
    monkeypatch.setattr(importlib.util, "find_spec", find_spec(object()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA GPU"):
        validate(from_dict(_raw(loss={"impl": "liger"})))


def test_bad_loss_key_from_the_cli_is_exit_2(tmp_path):
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw(loss={"chunk_tokens": -1})))
    proc = subprocess.run([sys.executable, "-m", "dsft", "validate", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("dsft: error: loss.chunk_tokens")


# --------------------------------------------------------------------------------------------------
# 2 ranks, ZeRO-3: the lm_head weight is partitioned and gathered by DeepSpeed's hooks on every chunk


@pytest.mark.integration
def test_zero3_two_ranks_chunked_losses_equal_stock(tmp_path, tiny_model_dir):
    import yaml

    from conftest import REPO, copy_task_rows, write_jsonl
    from test_distributed import BIN, _logs, _run, free_port

    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(120, seed=3))
    configs = {}
    for impl in ("stock", "chunked"):
        d = tmp_path / impl
        d.mkdir()
        raw = {
            "model": {"name_or_path": str(tiny_model_dir), "dtype": "fp32"},
            "data": {"train": str(data), "format": "prompt_completion", "max_seq_len": 64, "packing": True,
                     "eval_fraction": 0.1, "cache_dir": str(tmp_path / "cache")},
            "loss": {"impl": impl, "chunk_tokens": 24},  # 24 does not divide the 128 tokens of a micro-batch
            "deepspeed": "zero3",
            "train": {"output_dir": str(d / "out"), "learning_rate": 2e-3, "max_steps": 4, "logging_steps": 1,
                      "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
                      "gradient_accumulation_steps": 2, "eval_strategy": "steps", "eval_steps": 4, "seed": 0,
                      "data_seed": 0, "report_to": "none", "save_strategy": "no", "gradient_checkpointing": True},
        }
        (d / "run.yaml").write_text(yaml.safe_dump(raw))
        configs[impl] = d / "run.yaml"
    entry = REPO / "tests" / "run_configs.py"
    if not entry.exists():
        entry = REPO / "launch" / "run_configs.py"
    proc = _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                 str(free_port()), str(entry), str(configs["stock"]), str(configs["chunked"])], timeout=600)
    assert proc.stderr.count("loss: chunked cross-entropy, 24 tokens per chunk") == 1  # rank 0 logs, chunked run only
    logs = {impl: _logs(tmp_path / impl / "out") for impl in configs}
    losses = {impl: [r["loss"] for r in rows if "loss" in r] for impl, rows in logs.items()}
    evals = {impl: [r for r in rows if "eval_loss" in r] for impl, rows in logs.items()}
    print("stock", losses["stock"], "\nchunked", losses["chunked"])
    assert len(losses["stock"]) == 4 and losses["stock"][-1] < losses["stock"][0]
    assert losses["chunked"] == pytest.approx(losses["stock"], rel=REL)
    assert len(evals["chunked"]) == len(evals["stock"]) >= 1
    for key in ("eval_loss", "eval_perplexity"):
        assert evals["chunked"][-1][key] == pytest.approx(evals["stock"][-1][key], rel=REL), key
