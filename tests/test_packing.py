"""Packing must give the same per-token loss as padding, and dsft must refuse packing where attention leaks."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from dsft.data import IGNORE_INDEX, PackedCollator, PaddingCollator, pack_dataset
from dsft.errors import DsftError
from dsft.train import check_packing_isolation


def _samples(vocab: int, n: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 14, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        prompt = length // 3
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _model(path, impl: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=impl, dtype=torch.float32)
    model.config.use_cache = False  # as during training
    return model.eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_batch_has_the_same_per_token_loss_as_padded(tiny_model_dir, impl):
    model = _model(tiny_model_dir, impl)
    samples = _samples(model.config.vocab_size)
    padded = PaddingCollator(pad_token_id=0)(samples)
    rows = list(pack_dataset(Dataset.from_list(samples), max_len=24))
    assert len(rows) < len(samples)  # several samples really share a row
    packed = PackedCollator(pad_token_id=0)(rows)
    assert (padded["labels"] != IGNORE_INDEX).sum() == (packed["labels"] != IGNORE_INDEX).sum()
    with torch.no_grad():
        loss_padded = model(**padded).loss.item()
        loss_packed = model(**packed).loss.item()
    assert abs(loss_packed - loss_padded) / loss_padded < 1e-4, (loss_packed, loss_padded)
    assert check_packing_isolation(model, model.config.vocab_size) < 1e-4


def test_packing_is_refused_when_attention_crosses_samples(tiny_model_dir):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def leaky(module, query, key, value, attention_mask, **kwargs):
        # plain causal attention over the whole row: ignores sample boundaries
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    AttentionInterface.register("leaky_test", leaky)
    ALL_MASK_ATTENTION_FUNCTIONS.register("leaky_test", sdpa_mask)
    model = _model(tiny_model_dir, "leaky_test")
    with pytest.raises(DsftError, match="packed samples attend to each other"):
        check_packing_isolation(model, model.config.vocab_size)
