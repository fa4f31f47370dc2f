"""Issue 11 (1, 2, 7): sharegpt / alpaca / mapped formats, per-source formats, weighted / counted / fractional
mixtures, per-source eval sets, the composition file, and errors that name the file line a row came from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import EOS, IM_END, IM_START, REPO, chars, copy_task_rows, write_jsonl
from dsft.cli import main
from dsft.config import DataConfig, DataSource, from_dict, validate
from dsft.data import (
    COMPOSITION_NAME,
    IGNORE_INDEX,
    cache_key,
    prepare_data,
    selection_counts,
    selection_indices,
    tokenize_row,
)
from dsft.data_formats import resolve_format, resolve_sources
from dsft.errors import ConfigError, DataError

X = IGNORE_INDEX



def turn(role: str, content: str) -> list[int]:
    return [IM_START] + chars(f"{role}\n{content}") + [IM_END] + chars("\n")


def answer_prompt() -> list[int]:
    return [IM_START] + chars("assistant\n")


def answer(content: str) -> list[int]:
    return chars(content) + [IM_END] + chars("\n")


def fmt(**kw):
    src = DataSource(path="x.jsonl", **{k: v for k, v in kw.items() if k != "train_on_prompt"})
    return resolve_format(DataConfig(train="x.jsonl", train_on_prompt=kw.get("train_on_prompt", False)), src)


# ---------------------------------------------------------------------------------------------------------------
# formats, token by token


def test_sharegpt_keeps_system_and_tool_turns_and_labels_gpt_turns(char_tokenizer):
    row = {"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
        {"from": "tool", "value": "42"}, {"from": "gpt", "value": "!"}]}
    out = tokenize_row(row, fmt(format="sharegpt"), char_tokenizer, "c.jsonl: line 1")
    prompt1 = turn("system", "S") + turn("user", "hi") + answer_prompt()
    prompt2 = turn("tool", "42") + answer_prompt()
    assert out["input_ids"] == prompt1 + answer("yo") + prompt2 + answer("!")
    assert out["labels"] == [X] * len(prompt1) + answer("yo") + [X] * len(prompt2) + answer("!")


def test_sharegpt_role_map_and_keys_are_configurable(char_tokenizer):
    row = {"chat": [{"speaker": "asker", "text": "q"}, {"speaker": "bot", "text": "a"},
                    {"speaker": "observation", "text": "o"}, {"speaker": "gpt", "text": "b"}]}
    f = fmt(format="sharegpt", messages_field="chat", role_key="speaker", content_key="text",
            roles={"asker": "user", "bot": "assistant", "observation": "tool"})
    out = tokenize_row(row, f, char_tokenizer, "r")
    p1, p2 = turn("user", "q") + answer_prompt(), turn("tool", "o") + answer_prompt()
    assert out["input_ids"] == p1 + answer("a") + p2 + answer("b")  # the default gpt still maps (merged map)
    assert out["labels"] == [X] * len(p1) + answer("a") + [X] * len(p2) + answer("b")


def test_messages_with_a_role_map(char_tokenizer):
    row = {"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match="message 0 has role 'human'"):
        tokenize_row(row, fmt(format="messages"), char_tokenizer, "r")
    out = tokenize_row(row, fmt(format="messages", roles={"human": "user"}), char_tokenizer, "r")
    assert out["input_ids"] == turn("user", "q") + answer_prompt() + answer("a")


def test_alpaca_is_a_system_user_assistant_chat(char_tokenizer):
    row = {"instruction": "Do", "input": "x", "output": "ok", "system": "S"}
    out = tokenize_row(row, fmt(format="alpaca"), char_tokenizer, "r")
    prompt = turn("system", "S") + turn("user", "Do\n\nx") + answer_prompt()
    assert out["input_ids"] == prompt + answer("ok")
    assert out["labels"] == [X] * len(prompt) + answer("ok")
    # no system column and an empty input: just the instruction as the user turn
    bare = tokenize_row({"instruction": "Do", "input": "", "output": "ok"}, fmt(format="alpaca"), char_tokenizer, "r")
    assert bare["input_ids"] == turn("user", "Do") + answer_prompt() + answer("ok")
    mapped = fmt(format="alpaca", instruction_field="q", input_field="ctx", output_field="a", system_field="sys")
    out2 = tokenize_row({"q": "Do", "ctx": "x", "a": "ok", "sys": "S"}, mapped, char_tokenizer, "r")
    assert out2 == out


def test_text_and_prompt_completion_field_mapping(char_tokenizer):
    out = tokenize_row({"body": "hi"}, fmt(format="text", text_field="body"), char_tokenizer, "r")
    assert out["input_ids"] == chars("hi") + [EOS]
    f = fmt(format="prompt_completion", prompt_field="q", completion_field="a")
    out = tokenize_row({"q": "Q:", "a": "ab"}, f, char_tokenizer, "r")
    assert out["labels"] == [X, X] + chars("ab") + [EOS]


@pytest.mark.parametrize("row, kw, message", [
    ({"conversations": [{"from": "human", "value": "hi"}]}, {"format": "sharegpt"}, "no assistant turn"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, {"format": "sharegpt"},
     "message 0 has from 'robot'; expected one of"),
    ({"conversations": [{"from": "human"}]}, {"format": "sharegpt"}, "message 0 must have from and value"),
    ({"conversations": "hi"}, {"format": "sharegpt"}, "'conversations' must be a non-empty list of {from, value}"),
    ({"messages": []}, {"format": "sharegpt"}, "missing field 'conversations'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]}, {"format": "sharegpt"},
     "message 1 (assistant) is empty"),
    ({"instruction": "Do", "output": ""}, {"format": "alpaca"}, "field 'output' is empty"),
    ({"output": "ok"}, {"format": "alpaca"}, "missing field 'instruction'"),
    ({"instruction": "Do", "output": "ok", "system": 3}, {"format": "alpaca"}, "field 'system' must be a string"),
    ({"q": "a"}, {"format": "prompt_completion", "prompt_field": "q", "completion_field": "a2"},
     "missing field 'a2'"),
])
def test_bad_rows_of_every_format_name_the_line(char_tokenizer, row, kw, message):
    with pytest.raises(DataError, match="c.jsonl: line 9") as e:
        tokenize_row(row, fmt(**kw), char_tokenizer, "c.jsonl: line 9")
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# config validation (before anything is loaded)


def _validate_data(tmp_path, data: dict, **sections):
    train = write_jsonl(tmp_path / "t.jsonl", copy_task_rows(4))
    raw = {"model": {"name_or_path": str(tmp_path)}, "data": {"train": str(train), **data},
           "train": {"output_dir": str(tmp_path / "out")}, **sections}
    raw["data"] = json.loads(json.dumps(raw["data"]).replace("{t}", str(train)))
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


@pytest.mark.parametrize("data, sections, message", [
    ({"train": [{"path": "{t}", "wieght": 0.5}]}, {}, "unknown key 'wieght' in section 'data.train[0]': did you mean 'weight'?"),
    ({"train": [{"path": "{t}", "weight": 0.5, "samples": 3}]}, {}, "data.train[0]: set one of weight, samples or fraction, not weight and samples"),
    ({"train": [{"path": "{t}", "weight": 0}]}, {}, "data.train[0].weight: must be positive, got 0"),
    ({"train": ["{t}", {"path": "{t}", "fraction": 0}]}, {}, "data.train[1].fraction: must be in (0, 1], got 0"),
    ({"train": [{"path": "{t}", "fraction": 1.5}]}, {}, "data.train[0].fraction: must be in (0, 1], got 1.5"),
    ({"train": [{"path": "{t}", "samples": 0}]}, {}, "data.train[0].samples: must be at least 1"),
    ({"train": [{"path": "{t}", "fraction": 0.5, "replace": True}]}, {}, "data.train[0].replace: only applies with samples or weight"),
    ({"train": [{"path": "{t}", "weight": 1, "replace": True}]}, {}, "every weighted source has replace: true"),
    ({"train": [{"path": "{t}", "format": "chatml"}]}, {}, "data.train[0].format: must be one of text, prompt_completion, messages, sharegpt, alpaca"),
    ({"train": [{"path": "{t}", "roles": {"human": "usr"}}]}, {}, "data.train[0].roles.human: maps to 'usr', not a role; did you mean 'user'?"),
    ({"roles": {"bot": "robot"}}, {}, "data.roles.bot: maps to 'robot'"),
    ({"train": [{"path": "{t}", "name": "a"}, {"path": "{t}", "name": "a"}]}, {}, "data.train: the name 'a' is used twice"),
    ({"train": [{"path": "{t}", "name": "a b"}]}, {}, "data.train[0].name: 'a b' may hold only letters"),
    ({"train": [{"path": "nope/code.jsonl"}]}, {}, "data.train[0]: file not found: nope/code.jsonl (relative paths resolve from the current directory"),
    ({"train": [{"weight": 1}]}, {}, "data.train[0].path: required"),
    ({"eval": [{"path": "{t}", "name": "a"}, "{t}"]}, {}, "data.eval[1]: give every eval source a name"),
    ({"eval": [{"path": "{t}", "name": "code"}]},
     {"train": {"output_dir": "o", "eval_strategy": "steps"}, "early_stopping": {"patience": 2}},
     "early_stopping.metric: eval_loss is not reported when eval sources are named; watch one source's metric, e.g. eval_code_loss"),
], ids=lambda v: None)
def test_bad_data_sections_are_refused_at_validation(tmp_path, data, sections, message):
    with pytest.raises(ConfigError) as e:
        _validate_data(tmp_path, data, **sections)
    assert message in str(e.value)


def test_good_data_sections_validate_and_resolve(tmp_path):
    cfg = _validate_data(tmp_path, {"format": "prompt_completion", "train": [
        "{t}", {"path": "{t}", "format": "sharegpt", "weight": 0.7, "name": "code", "roles": {"bot": "assistant"}},
        {"path": "{t}", "samples": 10, "replace": True}, {"path": "{t}", "fraction": 0.5, "format": "alpaca"}]})
    sources = resolve_sources(cfg.data, "train")
    assert [s.name for s in sources] == ["t", "code", "t_2", "t_3"]
    assert [s.fmt.format for s in sources] == ["prompt_completion", "sharegpt", "prompt_completion", "alpaca"]
    assert sources[1].fmt.messages_field == "conversations" and sources[1].fmt.roles["bot"] == "assistant"
    assert sources[1].fmt.roles["gpt"] == "assistant"  # merged over sharegpt's own map
    # a single mapping (not a list) is one source
    single = _validate_data(tmp_path, {"train": {"path": "{t}", "format": "text", "text_field": "prompt"}})
    assert resolve_sources(single.data, "train")[0].fmt.text_field == "prompt"


def test_dsft_validate_names_the_bad_source_key(tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", copy_task_rows(4))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(tmp_path)},
                                      "data": {"train": [{"path": str(train), "fracton": 0.5}]},
                                      "train": {"output_dir": str(tmp_path / "out")}}))
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("dsft: error:")] == [
        "dsft: error: unknown key 'fracton' in section 'data.train[0]': did you mean 'fraction'?"]


# ---------------------------------------------------------------------------------------------------------------
# mixtures


def _src(**kw):
    return resolve_sources(DataConfig(train=[DataSource(path=f"s{i}.jsonl", **k) for i, k in enumerate(kw["s"])]),
                           "train")


def test_selection_counts_follow_the_rules():
    # weights: as large as possible without repeating a row; the limiting source gives all its rows
    assert selection_counts(_src(s=[{"weight": 0.7}, {"weight": 0.3}]), [10_000, 10_000]) == [10_000, 4286]
    assert selection_counts(_src(s=[{"weight": 7}, {"weight": 3}]), [1_000, 10_000]) == [1_000, 429]
    # a replace source may be repeated to meet its share; it does not limit the mixture
    assert selection_counts(_src(s=[{"weight": 0.5}, {"weight": 0.5, "replace": True}]), [1_000, 10]) == [1_000, 1_000]
    # samples exact, fraction of the source, plain entries whole, and weights only share the weighted part
    assert selection_counts(_src(s=[{"samples": 7}, {"fraction": 0.25}, {}, {"weight": 1}]), [10, 40, 5, 8]) == \
        [7, 10, 5, 8]
    with pytest.raises(DataError, match=r"data.train\[0\] \(s0.jsonl\): samples: 11 but the source has 10 rows"):
        selection_counts(_src(s=[{"samples": 11}]), [10])
    assert selection_counts(_src(s=[{"samples": 25, "replace": True}]), [10]) == [25]


def test_selection_indices_are_seeded_and_repeat_rows_only_when_needed():
    import numpy as np

    a = selection_indices(1000, 300, seed=1, key="train", name="x")
    assert len(set(a.tolist())) == 300 and (np.diff(a) >= 0).all()
    assert (a == selection_indices(1000, 300, seed=1, key="train", name="x")).all()
    assert not (a == selection_indices(1000, 300, seed=2, key="train", name="x")).all()
    assert not (a == selection_indices(1000, 300, seed=1, key="train", name="y")).all()
    b = selection_indices(10, 25, seed=1, key="train", name="x")
    counts = np.bincount(b, minlength=10)
    assert len(b) == 25 and counts.min() == 2 and counts.max() == 3 and (counts == 3).sum() == 5


def _mix(tmp_path, tokenizer, train, seed=42, **kw):
    c = DataConfig(train=train, cache_dir=str(tmp_path / "cache"), max_seq_len=64, seed=seed, **kw)
    return prepare_data(c, tokenizer)


def _decoded(tokenizer, ds) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in ds["input_ids"]]


def test_weighted_mixture_proportions_on_10k_rows(tmp_path, char_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10_000)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10_000)])
    train = [DataSource(path=str(a), weight=0.3, name="a"), DataSource(path=str(b), weight=0.7, name="b")]
    data = _mix(tmp_path, char_tokenizer, train, format="text")
    texts = _decoded(char_tokenizer, data.train)
    share_a = sum(t.startswith("a") for t in texts) / len(texts)
    assert abs(share_a - 0.3) < 0.01 and len(texts) == 14_286
    assert len(set(texts)) == len(texts)  # no row repeated
    comp = data.composition["train"]["sources"]
    assert [(e["name"], e["selected"], e["rows"]) for e in comp] == [("a", 4286, 4286), ("b", 10_000, 10_000)]
    assert abs(comp[0]["share_rows"] - 0.3) < 0.01
    assert sum(e["tokens"] for e in comp) == data.stats["train"].tokens


def test_the_same_seed_selects_the_same_rows(tmp_path, char_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(1000)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(1000)])
    train = [DataSource(path=str(a), weight=0.3), DataSource(path=str(b), weight=0.7)]
    texts = _decoded(char_tokenizer, _mix(tmp_path, char_tokenizer, train, format="text").train)
    # a fresh cache dir: selected and tokenized again, not read back
    again = _mix(tmp_path / "again", char_tokenizer, train, format="text")
    assert not again.from_cache and _decoded(char_tokenizer, again.train) == texts
    other = _mix(tmp_path / "other", char_tokenizer, train, seed=7, format="text")
    assert _decoded(char_tokenizer, other.train) != texts and len(other.train) == len(texts) == 1429


def test_samples_and_fraction_give_exact_counts(tmp_path, char_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(40)])
    data = _mix(tmp_path, char_tokenizer, [DataSource(path=str(a), samples=37), DataSource(path=str(b), fraction=0.25),
                                           DataSource(path=str(b), samples=90, replace=True)], format="text")
    texts = _decoded(char_tokenizer, data.train)
    assert len(texts) == 37 + 10 + 90
    assert sum(t.startswith("a") for t in texts) == 37 and len(set(texts[:37])) == 37
    assert [e["name"] for e in data.composition["train"]["sources"]] == ["a", "b", "b_2"]
    with pytest.raises(DataError, match=r"data.train\[0\] \(.*b.jsonl\): samples: 41 but the source has 40 rows"):
        _mix(tmp_path / "too-many", char_tokenizer, [DataSource(path=str(b), samples=41)], format="text")


def test_per_source_formats_in_one_mixture(tmp_path, char_tokenizer):
    share = write_jsonl(tmp_path / "share.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}] * 3)
    alp = write_jsonl(tmp_path / "alp.jsonl", [{"instruction": "Do", "output": "ok"}] * 2)
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"q": "Q:", "a": "ab"}])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "hey"}])
    train = [DataSource(path=str(share), format="sharegpt"), DataSource(path=str(alp), format="alpaca"),
             DataSource(path=str(pc), format="prompt_completion", prompt_field="q", completion_field="a"), str(plain)]
    data = _mix(tmp_path, char_tokenizer, train, format="text")  # the plain path takes data.format
    comp = data.composition["train"]["sources"]
    assert [(e["name"], e["format"], e["rows"]) for e in comp] == [
        ("share", "sharegpt", 3), ("alp", "alpaca", 2), ("pc", "prompt_completion", 1), ("plain", "text", 1)]
    ids = data.train["input_ids"]
    assert ids[0] == turn("user", "hi") + answer_prompt() + answer("yo")
    assert ids[3] == turn("user", "Do") + answer_prompt() + answer("ok")
    assert ids[5] == chars("Q:ab") + [EOS]
    assert ids[6] == chars("hey") + [EOS]
    # with data.format: prompt_completion the plain path's text row is an error naming its own file and line
    with pytest.raises(DataError, match=r"plain.jsonl: line 1: missing field 'prompt'"):
        _mix(tmp_path / "pc", char_tokenizer, train, format="prompt_completion")


def test_a_bad_row_in_the_second_source_names_that_file_and_line(tmp_path, char_tokenizer):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "fine"}] * 5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n\n'
                   '{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: message 1 has from 'bot'"):
        _mix(tmp_path, char_tokenizer, [str(ok), DataSource(path=str(bad), format="sharegpt", samples=2)],
             format="text")


def test_chat_formats_need_a_chat_template(tmp_path, char_tokenizer):
    import copy

    plain = copy.deepcopy(char_tokenizer)
    plain.chat_template = None
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Do", "output": "ok"}])
    with pytest.raises(DataError, match=r"data.train \(.*a.jsonl\): format alpaca is rendered with the tokenizer's "
                                        "chat template and this tokenizer has none"):
        _mix(tmp_path, plain, str(f), format="alpaca")


# ---------------------------------------------------------------------------------------------------------------
# issue 7: the line of the file, whatever the split, selection or blank lines


def _chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = _chat(("user", "hi"), ("assistant", "yo"))


def test_eval_fraction_reports_the_train_file_line(tmp_path, char_tokenizer):
    rows = [GOOD] * 30
    rows[16] = _chat(("system", "S"), ("user", "hi"))  # line 17: no assistant turn
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as e:
        _mix(tmp_path, char_tokenizer, str(f), format="messages", eval_fraction=0.2)
    assert f"{f}: line 17: the chat has no assistant turn" in str(e.value)


def test_blank_lines_count_and_a_selection_keeps_the_line(tmp_path, char_tokenizer):
    lines = [json.dumps(GOOD)] * 8
    lines[1], lines[3] = "", "   "               # blank lines 2 and 4 (the reader skips them)
    lines[4] = json.dumps(_chat(("user", "hi"), ("robot", "beep")))  # line 5
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl: line 5: message 1 has role 'robot'"):
        _mix(tmp_path, char_tokenizer, [DataSource(path=str(f), samples=6)], format="messages")
    with pytest.raises(DataError, match=r"train.jsonl: line 5: "):
        _mix(tmp_path / "w", char_tokenizer, [DataSource(path=str(f), weight=1.0)], format="messages",
             eval_fraction=0.3)


def test_parquet_errors_name_the_row(tmp_path, char_tokenizer):
    from datasets import Dataset

    path = tmp_path / "t.parquet"
    Dataset.from_list([{"text": "ok"}, {"text": "ok"}, {"text": "  "}]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"t.parquet: row 3: field 'text' is empty"):
        _mix(tmp_path, char_tokenizer, str(path), format="text")


# ---------------------------------------------------------------------------------------------------------------
# cache key, per-source eval sets, composition


def test_cache_key_follows_every_new_setting(tmp_path, char_tokenizer):
    f = str(write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}]))
    base = DataConfig(train=[DataSource(path=f, weight=1.0)])
    variants = [DataConfig(train=[DataSource(path=f, weight=2.0)]),
                DataConfig(train=[DataSource(path=f, samples=1)]),
                DataConfig(train=[DataSource(path=f, samples=1, replace=True)]),
                DataConfig(train=[DataSource(path=f, weight=1.0, format="sharegpt")]),
                DataConfig(train=[DataSource(path=f, weight=1.0, roles={"a": "user"})]),
                DataConfig(train=[DataSource(path=f, weight=1.0, name="n")]),
                DataConfig(train=[DataSource(path=f, weight=1.0)], roles={"a": "user"}),
                DataConfig(train=[DataSource(path=f, weight=1.0)], instruction_field="q"),
                DataConfig(train=[DataSource(path=f, weight=1.0)], seed=1)]
    keys = {cache_key(c, char_tokenizer) for c in [base, *variants]}
    assert len(keys) == 1 + len(variants)


def test_named_eval_sources_are_separate_sets(tmp_path, char_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(6)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(4)])
    evals = [DataSource(path=str(a), name="code", samples=3), DataSource(path=str(b), name="chat")]
    data = _mix(tmp_path, char_tokenizer, str(a), format="text", eval=evals, packing=True)
    assert isinstance(data.eval, dict) and list(data.eval) == ["code", "chat"]
    assert sum(len(r) for r in data.eval["code"]["position_ids"]) == data.composition["eval"]["sources"][0]["tokens"]
    comp = data.composition["eval"]
    assert comp["per_source"] and [(e["name"], e["selected"]) for e in comp["sources"]] == [("code", 3), ("chat", 4)]
    cached = _mix(tmp_path, char_tokenizer, str(a), format="text", eval=evals, packing=True)
    assert cached.from_cache and list(cached.eval) == ["code", "chat"] and cached.composition == data.composition
    assert (cached.cache_dir / COMPOSITION_NAME).is_file()
    # unnamed eval sources stay one set
    one = _mix(tmp_path, char_tokenizer, str(a), format="text", eval=[str(a), str(b)])
    assert len(one.eval) == 10


# ---------------------------------------------------------------------------------------------------------------
# through the real CLI and a real run


def _run_config(tmp_path: Path, model_dir: Path, data: dict, **train) -> Path:
    raw = {"model": {"name_or_path": str(model_dir), "dtype": "fp32"},
           "data": {"max_seq_len": 64, "cache_dir": str(tmp_path / "cache"), **data},
           "train": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
                     "report_to": "none", "logging_steps": 2, "save_strategy": "no", **train}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.integration
def test_a_bad_row_in_a_mixture_through_dsft_train(tmp_path, tiny_model_dir):
    ok = write_jsonl(tmp_path / "ok.jsonl", copy_task_rows(6))
    bad = tmp_path / "chat.jsonl"
    bad.write_text("\n".join([json.dumps({"conversations": [{"from": "human", "value": "q"},
                                                             {"from": "gpt", "value": "a"}]})] * 3 +
                             ["", json.dumps({"conversations": [{"from": "human", "value": "q"}]})]) + "\n")
    config = _run_config(tmp_path, tiny_model_dir, {"format": "prompt_completion", "eval_fraction": 0.25, "train": [
        {"path": str(ok), "weight": 0.5}, {"path": str(bad), "format": "sharegpt", "weight": 0.5}]})
    proc = subprocess.run([sys.executable, "-m", "dsft", "train", str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dsft: error:")]
    assert errors == [f"dsft: error: {bad}: line 5: the chat has no assistant turn, so there is nothing to learn"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.integration
def test_per_source_eval_metrics_in_a_real_run(tmp_path, tiny_model_dir):
    from dsft.config import load_config
    from dsft.train import run

    rows = copy_task_rows(60)
    pc = write_jsonl(tmp_path / "copy.jsonl", rows[:40])
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversations": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["completion"]}]}
        for r in rows[40:]])
    config = _run_config(
        tmp_path, tiny_model_dir,
        {"format": "prompt_completion",
         "train": [{"path": str(pc), "weight": 0.5}, {"path": str(chat), "format": "sharegpt", "weight": 0.5}],
         "eval": [{"path": str(pc), "name": "copy", "samples": 8},
                  {"path": str(chat), "name": "chat", "format": "sharegpt", "samples": 8}]},
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2)
    raw = yaml.safe_load(config.read_text())
    raw["early_stopping"] = {"patience": 5, "metric": "eval_chat_loss"}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run(load_config(config))
    out = Path(result.output_dir)
    logs = [json.loads(line) for line in (out / "dsft_log.jsonl").read_text().splitlines()]
    evals = [r for r in logs if any(k.startswith("eval_") for k in r)]
    assert "eval_loss" not in {k for r in evals for k in r}
    for name in ("copy", "chat"):  # the Trainer logs each eval set on its own, at both evaluations (steps 2, 4)
        steps = [r["step"] for r in evals if f"eval_{name}_loss" in r and f"eval_{name}_perplexity" in r]
        assert steps[:2] == [2, 4], evals
    assert "eval_copy_loss" in result.eval_metrics and "eval_chat_loss" in result.eval_metrics
    comp = json.loads((out / COMPOSITION_NAME).read_text())
    assert [(e["name"], e["format"]) for e in comp["train"]["sources"]] == [("copy", "prompt_completion"),
                                                                              ("chat", "sharegpt")]
    assert comp["train"]["sources"][0]["selected"] == comp["train"]["sources"][1]["selected"] == 20
    assert comp["eval"]["per_source"] is True
