"""Formatting, masking, truncation, caching and packing of the three data formats, token by token."""

from __future__ import annotations


import pytest
import torch

from conftest import EOS, IM_END, IM_START, chars, write_jsonl
from dsft.config import DataConfig
from dsft.data import (
    IGNORE_INDEX,
    PackedCollator,
    PaddingCollator,
    load_rows,
    pack_dataset,
    prepare_data,
    tokenize_row,
)
from dsft.errors import DataError

X = IGNORE_INDEX


def masked(ids: list[int]) -> list[int]:
    return [X] * len(ids)


def cfg(**kw) -> DataConfig:
    return DataConfig(train="unused", **kw)


def test_text_format_trains_on_every_token_but_the_first(char_tokenizer):
    out = tokenize_row({"text": "hi!"}, cfg(format="text"), char_tokenizer, "row 1")
    assert out["input_ids"] == chars("hi!") + [EOS]
    assert out["labels"] == [X] + chars("i!") + [EOS]


def test_prompt_completion_masks_the_prompt(char_tokenizer):
    out = tokenize_row({"prompt": "Q:", "completion": "ab"}, cfg(format="prompt_completion"), char_tokenizer, "r")
    assert out["input_ids"] == chars("Q:ab") + [EOS]
    assert out["labels"] == masked(chars("Q:")) + chars("ab") + [EOS]


def test_prompt_completion_train_on_prompt(char_tokenizer):
    c = cfg(format="prompt_completion", train_on_prompt=True, add_eos=False)
    out = tokenize_row({"prompt": "Q:", "completion": "ab"}, c, char_tokenizer, "r")
    assert out["input_ids"] == chars("Q:ab")
    assert out["labels"] == [X] + chars(":ab")


def test_alpaca_rows_map_to_prompt_completion(char_tokenizer):
    row = {"instruction": "Do", "input": "x", "output": "ok"}
    out = tokenize_row(row, cfg(format="prompt_completion"), char_tokenizer, "r")
    assert out["input_ids"] == chars("Do\n\nx") + chars("ok") + [EOS]
    assert out["labels"] == masked(chars("Do\n\nx")) + chars("ok") + [EOS]
    no_input = tokenize_row({"instruction": "Do", "input": "", "output": "ok"}, cfg(format="prompt_completion"),
                            char_tokenizer, "r")
    assert no_input["input_ids"] == chars("Dook") + [EOS]


def test_messages_label_only_assistant_turns(char_tokenizer):
    row = {"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": "!"},
    ]}
    out = tokenize_row(row, cfg(format="messages"), char_tokenizer, "r")

    def turn(role, content):
        return [IM_START] + chars(f"{role}\n{content}") + [IM_END] + chars("\n")

    prompt1 = turn("system", "S") + turn("user", "hi") + [IM_START] + chars("assistant\n")
    answer1 = chars("yo") + [IM_END] + chars("\n")
    prompt2 = turn("user", "?") + [IM_START] + chars("assistant\n")
    answer2 = chars("!") + [IM_END] + chars("\n")
    assert out["input_ids"] == prompt1 + answer1 + prompt2 + answer2
    assert out["labels"] == masked(prompt1) + answer1 + masked(prompt2) + answer2

    everything = tokenize_row(row, cfg(format="messages", train_on_prompt=True), char_tokenizer, "r")
    assert everything["labels"] == [X] + out["input_ids"][1:]


@pytest.mark.parametrize("row, fmt, message", [
    ({"txt": "a"}, "text", "row 7: missing field 'text'"),
    ({"text": "   "}, "text", "row 7: field 'text' is empty"),
    ({"text": 5}, "text", "row 7: field 'text' must be a string, got int"),
    ({"prompt": "a"}, "prompt_completion", "missing field 'completion'"),
    ({"prompt": "a", "completion": ""}, "prompt_completion", "field 'completion' is empty"),
    ({"messages": "hi"}, "messages", "must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "role 'robot'"),
    ({"messages": [{"role": "user"}]}, "messages", "message 0 must have role and content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}, "messages",
     "message 1 (assistant) is empty"),
    ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}, "messages",
     "content must be a string"),
])
def test_bad_rows_name_the_row(char_tokenizer, row, fmt, message):
    with pytest.raises(DataError, match="row 7") as e:
        tokenize_row(row, cfg(format=fmt), char_tokenizer, "train.jsonl row 7")
    assert message in str(e.value)


def test_bad_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe broken"}\n')
    with pytest.raises(DataError, match="bad.jsonl"):
        load_rows(str(bad), "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_rows(str(empty), "train")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_rows(str(tmp_path / "x.txt"), "train") if (tmp_path / "x.txt").write_text("a") else None


def _prepare(tmp_path, tokenizer, rows, **kw):
    path = tmp_path / "train.jsonl"
    if not path.exists():  # rewriting would change the file's mtime and so the cache key
        write_jsonl(path, rows)
    c = DataConfig(train=str(path), cache_dir=str(tmp_path / "cache"), **kw)
    return prepare_data(c, tokenizer)


def test_truncation_is_counted_and_samples_without_targets_are_dropped(tmp_path, char_tokenizer):
    rows = [
        {"prompt": "ab", "completion": "cdefgh"},       # 9 tokens with EOS -> truncated to 6, keeps targets
        {"prompt": "abcdefgh", "completion": "x"},      # prompt fills max_seq_len -> no target -> dropped
        {"prompt": "a", "completion": "b"},             # fits
    ]
    data = _prepare(tmp_path, char_tokenizer, rows, format="prompt_completion", max_seq_len=6)
    st = data.stats["train"]
    assert (st.rows, st.truncated, st.dropped_no_target) == (2, 2, 1)
    first = data.train[0]
    assert first["input_ids"] == chars("abcdef")
    assert first["labels"] == [X, X] + chars("cdef")


def test_empty_after_filtering_is_an_error(tmp_path, char_tokenizer):
    with pytest.raises(DataError, match="no sample has a token to learn"):
        _prepare(tmp_path, char_tokenizer, [{"prompt": "abcdefgh", "completion": "x"}],
                 format="prompt_completion", max_seq_len=4)


def test_tokenization_is_cached(tmp_path, char_tokenizer, monkeypatch):
    rows = [{"text": "hello"}, {"text": "world"}]
    first = _prepare(tmp_path, char_tokenizer, rows, format="text")
    assert not first.from_cache
    import dsft.data

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(dsft.data, "tokenize_dataset", boom)
    second = _prepare(tmp_path, char_tokenizer, rows, format="text")
    assert second.from_cache and second.cache_dir == first.cache_dir
    assert second.train["input_ids"] == first.train["input_ids"]
    # A change of settings or of the file's content misses the cache.
    monkeypatch.undo()
    third = _prepare(tmp_path, char_tokenizer, rows, format="text", max_seq_len=3)
    assert third.cache_dir != first.cache_dir


def test_eval_fraction_split(tmp_path, char_tokenizer):
    rows = [{"text": f"s{i}"} for i in range(20)]
    data = _prepare(tmp_path, char_tokenizer, rows, format="text", eval_fraction=0.25)
    assert len(data.train) == 15 and len(data.eval) == 5


def test_packing_rows_restart_positions_and_fit(tmp_path, char_tokenizer):
    from datasets import Dataset

    lengths = [5, 3, 8, 2, 6, 1, 4]
    ds = Dataset.from_dict({
        "input_ids": [list(range(10, 10 + n)) for n in lengths],
        "labels": [[X] + list(range(11, 10 + n)) for n in lengths],
    })
    packed = pack_dataset(ds, max_len=8)
    total = 0
    for row in packed:
        assert len(row["input_ids"]) <= 8
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        # every sample starts at position 0 and its first label is ignored
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for s in starts:
            assert row["input_ids"][s] == 10 and row["labels"][s] == X
        total += len(row["input_ids"])
    assert total == sum(lengths)
    assert len(packed) == 4  # 29 tokens in rows of 8: best-fit-decreasing reaches the minimum


def test_collators():
    feats = [{"input_ids": [5, 6, 7], "labels": [X, 6, 7], "position_ids": [0, 1, 2]},
             {"input_ids": [8], "labels": [X], "position_ids": [0]}]
    padded = PaddingCollator(pad_token_id=0)(feats)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padded["labels"].tolist() == [[X, 6, 7], [X, X, X]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    packed = PackedCollator(pad_token_id=0)(feats)
    assert "attention_mask" not in packed
    assert packed["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert packed["labels"].tolist() == [[X, 6, 7], [X, X, X]]
    assert isinstance(packed["input_ids"], torch.Tensor)
