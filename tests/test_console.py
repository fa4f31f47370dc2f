"""dsft.console's filters, one process: each drops only its one message (the 2-rank console as a whole is
tests/test_distributed.py::test_multi_rank_console_shows_each_fact_once_and_a_bad_config_as_one_line)."""

from __future__ import annotations

import logging
import warnings

import pytest

from dsft import console

LOGGERS = ("accelerate.accelerator", "transformers.modeling_utils", "transformers.trainer_utils")


@pytest.fixture
def shown():
    """What each of the filtered loggers lets through; the filters are taken off again afterwards."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(f"{record.name}: {record.getMessage()}")

    handler = Keep()
    saved = {}
    for name in LOGGERS:
        log = logging.getLogger(name)
        saved[name] = (list(log.filters), log.level)
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
    yield seen
    for name in LOGGERS:
        log = logging.getLogger(name)
        log.removeHandler(handler)
        log.filters[:] = saved[name][0]
        log.setLevel(saved[name][1])


def _emit_all() -> None:
    logging.getLogger("accelerate.accelerator").warning(
        "[RANK 0] Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has 2.")
    logging.getLogger("accelerate.accelerator").warning("some other accelerate warning")
    logging.getLogger("transformers.modeling_utils").warning("\x1b[1mLlamaForCausalLM LOAD REPORT\x1b[0m from: m\n...")
    logging.getLogger("transformers.trainer_utils").warning("The tokenizer has new PAD/BOS/EOS tokens that differ ...")


def test_rank_0_keeps_the_facts_and_drops_the_by_design_mismatch(shown):
    console.quiet_library_messages(rank=0)
    console.quiet_library_messages(rank=0)  # idempotent: one filter per logger
    _emit_all()
    assert not any("mismatch" in s for s in shown)
    assert any("some other accelerate warning" in s for s in shown)
    assert any("LOAD REPORT" in s for s in shown) and any("PAD/BOS/EOS" in s for s in shown)
    assert len(logging.getLogger("accelerate.accelerator").filters) == 1


def test_load_report_is_left_to_rank_0(shown, monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # restored afterwards: rank 1 sets it
    console.quiet_library_messages(rank=1)
    _emit_all()
    assert shown == ["accelerate.accelerator: some other accelerate warning"]


def test_dsft_gives_the_model_the_pad_id_so_transformers_has_nothing_to_align(shown, tiny_model_dir):
    """transformers' "The tokenizer has new PAD/BOS/EOS tokens" warning (Trainer.train(), every rank) reported the
    pad id the model config lacks, which the tokenizer or dsft chose: dsft sets it first (dsft.model.align_pad_token).
    The warning is left for a BOS/EOS (or pad) that contradicts the model's: that one rank 0 still shows."""
    from transformers.trainer_utils import align_special_tokens

    from dsft.config import ModelConfig
    from dsft.model import align_pad_token, load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="fp32")
    tokenizer, model = load_tokenizer(cfg), load_model(cfg)
    assert model.config.pad_token_id is None and tokenizer.pad_token_id is not None  # what the warning said
    align_pad_token(model, tokenizer)
    align_special_tokens(model, tokenizer)  # what Trainer.train() runs
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert not any("PAD/BOS/EOS" in s for s in shown), shown
    tokenizer.eos_token = tokenizer.unk_token  # an EOS the model's configs do not have: still said
    align_pad_token(model, tokenizer)
    align_special_tokens(model, tokenizer)
    assert [s for s in shown if "PAD/BOS/EOS" in s and "'eos_token_id'" in s and "pad_token_id" not in s], shown


def test_only_deepspeeds_deprecated_collectives_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_library_messages(rank=0)
        for message in ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...",
                        "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...",
                        "`torch.distributed.something_else` is deprecated"):
            warnings.warn_explicit(message, FutureWarning, "c10d_logger.py", 83, module="torch.distributed.c10d_logger")
        warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning, "x.py", 1,
                               module="somewhere.else")
    assert [str(w.message) for w in caught] == ["`torch.distributed.something_else` is deprecated",
                                                 "`torch.distributed.all_gather_into_tensor` is deprecated"]


def test_shm_op_built_looks_where_torch_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not console.shm_op_built()
    (tmp_path / console.SHM_OP).mkdir()
    assert not console.shm_op_built()  # a build in progress (or failed): no library yet
    (tmp_path / console.SHM_OP / f"{console.SHM_OP}.so").write_bytes(b"")
    assert console.shm_op_built()
