"""Data at scale (issue 11 points 3-6): the file-system wait for the tokenized cache (no collective, no
deadline), parallel tokenization, ``dsft prepare``; and resuming checkpoints written before the data changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dsft.config import from_dict
from dsft.errors import ConfigError, DataError


def _run_cfg(tmp_path, **data):
    return from_dict({"model": {"name_or_path": "x"}, "data": {"train": "x.jsonl", **data},
                      "train": {"output_dir": str(tmp_path / "out"), "resume_from_checkpoint": "last"}})


def _saved_checkpoint(tmp_path, saved: dict):
    import yaml

    from dsft.checkpoint import mark_complete
    from dsft.config import RESOLVED_CONFIG_NAME

    path = tmp_path / "out" / "checkpoint-5"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    (path / RESOLVED_CONFIG_NAME).write_text(yaml.safe_dump(saved))
    mark_complete(path)
    return path


def test_a_checkpoint_saved_before_the_chat_keys_became_per_format_still_resumes(tmp_path):
    """Before sharegpt, messages_field/role_key/content_key defaulted to messages/role/content; now to null (the
    format's default). The same effective columns are not a data change; a different column still is."""
    from dsft.config import resolved_dict
    from dsft.resume_check import check_resume_matches

    cfg = _run_cfg(tmp_path)
    old = resolved_dict(cfg)
    old["data"].update(messages_field="messages", role_key="role", content_key="content")
    for new_key in ("num_proc", "seed"):  # keys that did not exist yet
        old["data"].pop(new_key, None)
    path = _saved_checkpoint(tmp_path, old)
    check_resume_matches(cfg, str(path))  # no error

    old["data"]["messages_field"] = "conversation"
    _saved_checkpoint(tmp_path / "b", old)
    cfg_b = _run_cfg(tmp_path / "b")
    with pytest.raises(ConfigError, match=r"changed: data.messages_field: 'conversation' -> 'messages'"):
        check_resume_matches(cfg_b, str(tmp_path / "b" / "out" / "checkpoint-5"))


def test_per_source_chat_keys_resolve_like_the_data_loader():
    """A source mapping's unset keys take the section's value, else its own format's default."""
    from dsft.resume_check import effective_data

    cfg = {"data": {"format": "messages", "messages_field": None, "role_key": "speaker", "content_key": None,
                    "train": [{"path": "a.jsonl", "format": "sharegpt", "messages_field": None, "role_key": None},
                              "b.jsonl"]}}
    out = effective_data(cfg)["data"]
    assert (out["messages_field"], out["role_key"], out["content_key"]) == ("messages", "speaker", "content")
    first = out["train"][0]
    assert (first["messages_field"], first["role_key"], first["content_key"]) == ("conversations", "speaker", "value")
    assert cfg["data"]["messages_field"] is None  # the input is not modified


def _write_log(out, rows):
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "dsft_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


NAMED_EVAL_LOG = [{"step": 1, "loss": 3.0}, {"step": 1, "eval_code_loss": 2.0, "eval_chat_loss": 4.0},
                  {"step": 2, "loss": 2.5}, {"step": 2, "eval_code_loss": 1.5, "eval_chat_loss": 3.5}]


def test_report_shows_each_named_eval_source(tmp_path):
    from dsft.report import format_summary, markdown_summary, plot_curves, read_log

    _write_log(tmp_path / "run", NAMED_EVAL_LOG)
    text = format_summary(tmp_path / "run")
    assert "eval loss code (eval_code_loss): 2.0000 (first eval) -> 1.5000 (last eval)" in text
    assert "eval loss chat (eval_chat_loss): 4.0000 (first eval) -> 3.5000 (last eval)" in text
    assert "| eval loss code (first -> last eval) | 2.0000 -> 1.5000 |" in markdown_summary(tmp_path / "run")
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    path = plot_curves(read_log(tmp_path / "run"), tmp_path / "r.png")
    assert path.stat().st_size > 0


def test_sweep_ranks_named_eval_sources_by_their_mean_and_says_so(tmp_path):
    from dsft.slurm.sweep import collect, write_results

    _write_log(tmp_path / "p0", NAMED_EVAL_LOG)  # mean 2.5
    _write_log(tmp_path / "p1", [{"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.7}])
    points = [{"index": i, "params": {"train.learning_rate": str(i)}, "output_dir": str(tmp_path / f"p{i}"),
               "job_id": f"999999_{i}"} for i in range(2)]
    rows = collect({"points": points})
    assert [(r["point"], r["eval_loss"]) for r in rows] == [(0, 2.5), (1, 2.7)]
    assert rows[0]["eval_metric"] == "mean of eval_chat_loss, eval_code_loss"
    assert rows[1]["eval_metric"] == "eval_loss"
    md, _ = write_results(tmp_path, rows)
    assert "| 1 | 0 | 0 | 2.5000 | mean of eval_chat_loss, eval_code_loss |" in md.read_text()


# --------------------------------------------------------------------------------------------------
# waiting for the cache on the file system (dsft.data_cache), against real preparer processes

FAKE_PREPARER = """
import sys, time
from pathlib import Path
from dsft.data_cache import preparing
from dsft.errors import DataError

target, tag, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with preparing(target, tag=tag, heartbeat_s=0.2):
    time.sleep(float(sys.argv[4]))
    if mode == "fail":
        raise DataError("data/chat.jsonl: line 17: the chat has no assistant turn, so there is nothing to learn")
    if mode == "hang":
        time.sleep(600)
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir()
    (tmp / "complete").write_text("ok")
    tmp.rename(target)
"""


def _start_preparer(tmp_path, mode: str, delay: float):
    import subprocess
    import sys

    target = tmp_path / "cache" / "abc123"
    target.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", FAKE_PREPARER, str(target), "tag1", mode, str(delay)],
                            stderr=subprocess.PIPE, text=True)
    return target, proc


def _wait_until(predicate, timeout=30.0):
    import time

    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.integration  # starts a preparer process
def test_waiter_returns_when_the_preparer_completes(tmp_path):
    import time

    from dsft.data_cache import is_complete, wait_for_cache

    target, proc = _start_preparer(tmp_path, "ok", 2.0)
    t0 = time.monotonic()
    wait_for_cache(target, tag="tag1", poll_s=0.1, startup_grace_s=30)
    assert is_complete(target) and time.monotonic() - t0 > 1.0  # it did wait for the sleep
    assert proc.wait(30) == 0
    assert not list(target.parent.glob("*.preparing.*"))  # the preparer cleaned up its status file


@pytest.mark.integration  # starts a preparer process
def test_waiter_raises_the_preparers_one_line_error(tmp_path):
    from dsft.data_cache import PreparerFailed, wait_for_cache

    target, proc = _start_preparer(tmp_path, "fail", 1.0)
    with pytest.raises(PreparerFailed) as info:
        wait_for_cache(target, tag="tag1", poll_s=0.1, startup_grace_s=30)
    assert str(info.value) == ("data/chat.jsonl: line 17: the chat has no assistant turn, so there is nothing to "
                               "learn")
    assert info.value.exit_code == 2
    proc.wait(30)


@pytest.mark.integration  # starts a preparer process
@pytest.mark.parametrize("reap", [False, True], ids=["zombie", "reaped"])
def test_waiter_stops_within_seconds_when_the_preparer_is_killed(tmp_path, reap):
    import signal
    import time

    from dsft.data_cache import PreparerGone, status_paths, wait_for_cache

    target, proc = _start_preparer(tmp_path, "hang", 0.0)
    _wait_until(lambda: status_paths(target, "tag1")[0].exists())
    proc.send_signal(signal.SIGKILL)
    if reap:
        proc.wait(30)  # else it stays a zombie (kill(pid, 0) still succeeds): the waiter must see through that
    t0 = time.monotonic()
    with pytest.raises(PreparerGone, match=rf"pid {proc.pid}"):
        wait_for_cache(target, tag="tag1", poll_s=0.1, stale_s=600, startup_grace_s=600)
    assert time.monotonic() - t0 < 5
    proc.wait(30)


@pytest.mark.integration  # starts a preparer process
def test_a_stopped_preparer_is_noticed_by_its_heartbeat(tmp_path):
    import signal

    from dsft.data_cache import PreparerGone, status_paths, wait_for_cache

    target, proc = _start_preparer(tmp_path, "hang", 0.0)
    _wait_until(lambda: status_paths(target, "tag1")[0].exists())
    proc.send_signal(signal.SIGSTOP)  # alive for kill(pid, 0), but no longer beating
    try:
        with pytest.raises(PreparerGone, match="no heartbeat"):
            wait_for_cache(target, tag="tag1", poll_s=0.1, stale_s=1.5, startup_grace_s=600)
    finally:
        proc.kill()
        proc.wait(30)


def test_files_of_another_launch_are_ignored_and_no_preparer_is_an_error_after_the_grace(tmp_path):
    from dsft.data_cache import PreparerGone, status_paths, wait_for_cache

    target = tmp_path / "cache" / "abc123"
    target.parent.mkdir()
    # an earlier launch (another parent pid) failed on this key; this launch's preparer has not started
    status_paths(target, "old")[1].write_text('{"error": "old failure", "exit_code": 2}')
    with pytest.raises(PreparerGone, match="waited 1 s for local rank 0"):
        wait_for_cache(target, tag="new", poll_s=0.1, startup_grace_s=1)


def test_two_nodes_preparing_one_key_in_a_shared_cache_keep_the_first_complete_copy(tmp_path):
    """Two nodes' local rank 0 tokenize the same key at once: the second rename fails and is discarded."""
    import datasets

    from dsft.data import DataStats, _load_cached, _save_cache

    target = tmp_path / "k"
    first = {"train": datasets.Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 2]]})}
    second = {"train": datasets.Dataset.from_dict({"input_ids": [[3, 4]], "labels": [[-100, 4]]})}
    _save_cache(target, first, {"train": DataStats(rows=1)}, {})
    _save_cache(target, second, {"train": DataStats(rows=1)}, {})
    assert _load_cached(target).train["input_ids"] == [[1, 2]]
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # the loser's tmp dir is gone


# --------------------------------------------------------------------------------------------------
# batched, parallel tokenization: the same samples as the row-by-row reference (tokenize_row)

def _chat_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    # non-ASCII words too: a byte-level BPE splits one such character over several tokens with the same offsets
    words = "alpha beta gamma delta eps zeta eta theta iota kappa café naïve 東京 🙂".split()
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "be brief"}] if rng.random() < 0.3 else []
        if rng.random() < 0.1:  # an assistant turn first: its "before" prefix is empty
            msgs.append({"role": "assistant", "content": "hello there"})
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 8)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 12)))})
        if rng.random() < 0.2:  # a chat ending on a user turn
            msgs.append({"role": "user", "content": "thanks"})
        rows.append({"messages": msgs})
    return rows


def _reference(rows, fmt, tokenizer, max_len):
    from dsft.data import IGNORE_INDEX, tokenize_row

    out = []
    for row in rows:
        sample = tokenize_row(row, fmt, tokenizer, "x")
        ids, labels = sample["input_ids"][:max_len], sample["labels"][:max_len]
        if any(t != IGNORE_INDEX for t in labels):
            out.append((ids, labels))
    return out


def _tokenizers(char_tokenizer, smollm2_dir):
    from transformers import AutoTokenizer

    yield char_tokenizer
    yield AutoTokenizer.from_pretrained(str(smollm2_dir))  # a real byte-level BPE with a real chat template
    # turns glued together without separators: BPE merges across turn boundaries, so a token starts before an
    # assistant turn and ends inside it (not labelled, as in the reference)
    glued = AutoTokenizer.from_pretrained(str(smollm2_dir))
    glued.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    yield glued


@pytest.fixture(params=["lookup", "definition"])
def label_path(request, monkeypatch):
    """``definition``: the char -> token lookup made wrong (a tokenizer whose offsets do not ascend would do
    that): the first-row check must send every row through the definition."""
    if request.param == "definition":
        import dsft.data

        monkeypatch.setattr(dsft.data, "_first_token_from", lambda enc, pos, n_chars, n_tokens: 0)
    return request.param


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_batched_tokenization_equals_the_row_by_row_reference(tmp_path, char_tokenizer, smollm2_dir,
                                                              train_on_prompt, label_path):
    import datasets

    from dsft.config import DataConfig
    from dsft.data import LINE_COLUMN, tokenize_dataset
    from dsft.data_formats import resolve_format, resolve_sources

    cases = {
        "messages": _chat_rows(120),
        "text": [{"text": f"row {i} " * (i % 7 + 1)} for i in range(200)],
        "prompt_completion": [{"prompt": f"copy {i}:", "completion": f" {i}"} for i in range(200)]
        + [{"instruction": "say", "input": "x" if i % 2 else "", "output": f"y{i}"} for i in range(50)],
        "alpaca": [{"instruction": f"do {i}", "input": "", "output": f"done {i}", "system": "s" * (i % 2)}
                   for i in range(100)],
    }
    for tokenizer in _tokenizers(char_tokenizer, smollm2_dir):
        for fmt_name, rows in cases.items():
            if fmt_name == "prompt_completion":
                by_kind = [rows[:200], rows[200:]]  # one source per shape (legacy alpaca vs prompt/completion)
            else:
                by_kind = [rows]
            for part in by_kind:
                cfg = DataConfig(train="x.jsonl", format=fmt_name, train_on_prompt=train_on_prompt)
                fmt = resolve_format(cfg)
                src = resolve_sources(cfg, "train")[0]
                ds = datasets.Dataset.from_list(part)
                ds = ds.add_column(LINE_COLUMN, list(range(1, len(ds) + 1)))
                tok, stats = tokenize_dataset(ds, fmt, tokenizer, src, "line", max_len=40)
                got = list(zip(tok["input_ids"], tok["labels"]))
                assert got == _reference(part, fmt, tokenizer, 40), (fmt_name, type(tokenizer).__name__)
                assert stats.rows == len(got) and stats.tokens == sum(len(i) for i, _ in got)


@pytest.mark.integration  # starts tokenizer worker processes
def test_worker_processes_give_the_same_data_and_the_same_row_errors(tmp_path, char_tokenizer, monkeypatch):
    import dsft.data
    from conftest import write_jsonl

    from dsft.config import DataConfig
    from dsft.data import prepare_data

    pids = tmp_path / "pids"
    pids.mkdir()
    real = dsft.data.tokenize_batch

    def recording(*args, **kwargs):  # forked workers inherit it: each one leaves a file named by its pid
        (pids / str(os.getpid())).touch()
        return real(*args, **kwargs)

    monkeypatch.setattr(dsft.data, "tokenize_batch", recording)
    rows = _chat_rows(2400)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    one = prepare_data(DataConfig(train=str(path), cache_dir=str(tmp_path / "c1"), num_proc=1, max_seq_len=64),
                       char_tokenizer)
    assert [p.name for p in pids.iterdir()] == [str(os.getpid())]
    for p in pids.iterdir():
        p.unlink()
    # The same file again with 2 workers: an earlier run's intermediate Arrow file once made datasets keep 1 shard
    two = prepare_data(DataConfig(train=str(path), cache_dir=str(tmp_path / "c2"), num_proc=2, max_seq_len=64),
                       char_tokenizer)
    assert len(list(pids.iterdir())) == 2 and str(os.getpid()) not in [p.name for p in pids.iterdir()]
    assert [p.name for p in (tmp_path / "c2").iterdir()] == [two.cache_dir.name]  # the step files are removed
    assert one.cache_dir.name == two.cache_dir.name  # num_proc is not part of the cache key
    assert one.train["input_ids"] == two.train["input_ids"] and one.train["labels"] == two.train["labels"]
    assert one.stats == two.stats

    rows[2100] = {"messages": [{"role": "user", "content": "no answer"}]}  # line 2101, in the second worker
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"chat.jsonl: line 2101: the chat has no assistant turn"):
        prepare_data(DataConfig(train=str(path), cache_dir=str(tmp_path / "c3"), num_proc=2), char_tokenizer)


def test_an_unstable_chat_template_is_refused_in_batches(char_tokenizer):
    import copy

    import datasets

    from dsft.config import DataConfig
    from dsft.data import LINE_COLUMN, tokenize_dataset
    from dsft.data_formats import resolve_format, resolve_sources

    tokenizer = copy.deepcopy(char_tokenizer)
    # marks the last message: a prefix renders its last turn differently from the full chat
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                               "{% if loop.last %}[END]{% endif %}\n{% endfor %}")
    cfg = DataConfig(train="x.jsonl")
    ds = datasets.Dataset.from_list(_chat_rows(5, seed=1)).add_column(LINE_COLUMN, [3, 5, 8, 9, 12])
    with pytest.raises(DataError, match=r"x.jsonl: line 3: the tokenizer's chat template renders turns differently"):
        tokenize_dataset(ds, resolve_format(cfg), tokenizer, resolve_sources(cfg, "train")[0], "line", 64)


# --------------------------------------------------------------------------------------------------
# 2 ranks under torchrun: preparation longer than ddp_timeout, and a killed preparer

# Preparation is made to outlast ddp_timeout by a sleep inside it (tests/data_prep_entry.py), not by the data's
# size: 9,000 long rows took 19 s at load 7 here and under 10 s on an idle machine, which failed the bound. The
# issue's case: ddp_timeout 10, preparation > 30 s.
DDP_TIMEOUT_S = 10
SLOW_PREPARE_S = 32


def _slow_run(tmp_path, model_dir, cache: str):
    import yaml

    from conftest import copy_task_rows, write_jsonl

    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, copy_task_rows(400, seed=5))
    raw = {"model": {"name_or_path": str(model_dir), "dtype": "fp32"},
           "data": {"train": str(data), "format": "prompt_completion", "max_seq_len": 64, "packing": True,
                    "cache_dir": str(tmp_path / cache), "num_proc": 1},
           "train": {"output_dir": str(tmp_path / f"out-{cache}"), "max_steps": 2, "per_device_train_batch_size": 1,
                     "logging_steps": 1, "report_to": "none", "save_strategy": "no", "ddp_timeout": DDP_TIMEOUT_S}}
    path = tmp_path / f"{cache}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _torchrun_cmd(config):
    import sys
    from pathlib import Path

    from conftest import free_port

    entry = Path(__file__).parent / "data_prep_entry.py"  # dsft.run + the slow preparation, timed waits
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(entry), "--config", str(config)]


def _env():
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", "DSFT_TEST_SLOW_PREPARE_S": str(SLOW_PREPARE_S)})
    return env


@pytest.mark.integration
def test_two_ranks_wait_out_a_preparation_longer_than_ddp_timeout(tmp_path, tiny_model_dir):
    """Rank 1 waits > 30 s for rank 0's preparation with ddp_timeout 10: in a barrier it died at 10 s (gloo
    "Timed out waiting 10000ms"); on the file system it waits and both ranks train."""
    import re
    import subprocess

    from conftest import REPO

    proc = subprocess.run(_torchrun_cmd(_slow_run(tmp_path, tiny_model_dir, "cache")), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    took = float(re.search(r"data: prepared in ([\d.]+) s", proc.stderr).group(1))
    assert took >= SLOW_PREPARE_S
    # what proves the point, from the waiting rank itself: it waited longer than ddp_timeout, and lived
    waited = float(re.search(r"dsft-test: rank 1 waited ([\d.]+) s for the cache", proc.stderr).group(1))
    assert waited > DDP_TIMEOUT_S, proc.stderr[-4000:]
    assert (tmp_path / "out-cache" / "dsft_done.json").is_file()
    assert "Timed out" not in proc.stderr


@pytest.mark.integration
def test_killing_the_preparing_rank_ends_the_run_within_seconds(tmp_path, tiny_model_dir):
    import json
    import signal
    import subprocess
    import time

    from conftest import REPO

    proc = subprocess.Popen(_torchrun_cmd(_slow_run(tmp_path, tiny_model_dir, "cache")), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        cache = tmp_path / "cache"
        _wait_until(lambda: any(cache.glob("*.preparing.*")) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        status = json.loads(next(cache.glob("*.preparing.*")).read_text())
        time.sleep(1)  # rank 1 is in its wait by now
        t0 = time.monotonic()
        import os

        os.kill(status["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert elapsed < 15, f"the run took {elapsed:.1f} s to end after the preparer was killed"
    assert "Timed out" not in err
    assert not any((tmp_path / "cache").glob("*/complete"))  # nothing half-made was left as a cache


# --------------------------------------------------------------------------------------------------
# dsft prepare CONFIG: tokenize once, dsft train reads the cache as is

def _prepare_config(tmp_path, model_dir, **extra):
    import yaml

    from conftest import copy_task_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(300, seed=3))
    raw = {"model": {"name_or_path": str(model_dir), "dtype": "fp32"},
           "data": {"train": str(data), "format": "prompt_completion", "max_seq_len": 64, "packing": True,
                    "cache_dir": str(tmp_path / "cache"), "num_proc": 1},
           "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 2,
                     "logging_steps": 1, "report_to": "none", "save_strategy": "no"}, **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_prepare_prints_composition_counts_truncation_and_fill_rate(tmp_path, tiny_model_dir, capsys):
    import json
    import re

    from dsft.cli import main

    config = _prepare_config(tmp_path, tiny_model_dir)
    assert main(["prepare", str(config)]) == 0
    out = capsys.readouterr().out
    cache = Path(re.search(r"^cache: (\S+)$", out, re.M).group(1))
    stats = json.loads((cache / "stats.json").read_text())["train"]
    assert (cache / "complete").is_file() and stats["packed_rows"] > 0
    fill = stats["tokens"] / (stats["packed_rows"] * 64)
    assert (f"train: {stats['rows']} samples, {stats['tokens']} tokens ({stats['target_tokens']} with loss), "
            f"0 truncated at max_seq_len 64, 0 dropped") in out
    assert f"packed into {stats['packed_rows']} rows of 64 tokens, fill rate {100 * fill:.1f}%" in out
    assert re.search(r"^  train \(\S*train\.jsonl, prompt_completion, all rows\): 300 of 300 rows -> 300 "
                     r"samples \(100\.0%\)", out, re.M), out
    assert "already prepared" not in out
    assert main(["prepare", str(config)]) == 0  # second time: read, not tokenized again
    assert f"cache: {cache} (already prepared: nothing was tokenized)" in capsys.readouterr().out


def test_prepare_refuses_what_it_cannot_prepare_in_one_line(tmp_path, tiny_model_dir, capsys):
    from dsft.cli import main

    import json

    config = _prepare_config(tmp_path, tiny_model_dir, method="dpo")
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config.write_text(config.read_text().replace("prompt_completion", "preference").replace("packing: true",
                                                                                             "packing: false"))
    assert main(["prepare", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsft: error: method: dpo data is tokenized by TRL's trainer")
    assert main(["prepare", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith("dsft: error: ")
    assert main(["prepare", str(config), "--time", "5", "--wait"]) == 2  # Slurm flags without --submit: not ignored
    assert capsys.readouterr().err == "dsft: error: prepare: --wait --time only with --submit\n"


@pytest.mark.integration  # two dsft processes: prepare, then train from what it left
def test_train_after_prepare_uses_the_cache_without_tokenizing(tmp_path, tiny_model_dir):
    import re
    import subprocess
    import sys

    from conftest import REPO

    config = _prepare_config(tmp_path, tiny_model_dir)
    dsft = str(Path(sys.executable).parent / "dsft")
    prep = subprocess.run([dsft, "prepare", str(config)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    cache = re.search(r"^cache: (\S+)$", prep.stdout, re.M).group(1)
    assert "data: prepared in" in prep.stderr  # it did tokenize
    train = subprocess.run([dsft, "train", str(config)], cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert f"data: using the tokenized cache {cache} (no tokenization)" in train.stderr
    assert "data: prepared in" not in train.stderr and "tokenizing" not in train.stderr
    assert (tmp_path / "out" / "dsft_done.json").is_file()


def _slurm_or_skip() -> None:
    """The repo's one-node Slurm (scripts/slurm-local.sh): used if up, brought up as root, else skipped."""
    import os
    import shutil
    import subprocess

    from conftest import REPO

    if shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0:
        pytest.skip("no Slurm here: as root, `bash scripts/slurm-local.sh up` brings up a one-node cluster")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm-local.sh"), "up"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"scripts/slurm-local.sh up failed:\n{proc.stderr[-3000:]}"


@pytest.mark.integration  # a real Slurm job (one CPU task) through submitit
def test_prepare_submit_runs_as_a_cpu_slurm_job_and_fills_the_cache(tmp_path, tiny_model_dir, capsys):
    import re
    import subprocess
    import sys

    from conftest import REPO

    _slurm_or_skip()
    config = _prepare_config(tmp_path, tiny_model_dir)
    env = {k: v for k, v in _env().items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.pop("DSFT_TEST_SLOW_PREPARE_S")
    proc = subprocess.run([str(Path(sys.executable).parent / "dsft"), "prepare", str(config), "--submit", "--wait",
                           "--cpus-per-task", "1", "--time", "5"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    job = re.search(r"^submitted job (\S+): dsft prepare, 1 task, no GPU$", proc.stdout, re.M).group(1)
    cache = re.search(r"^cache: (\S+)$", proc.stdout, re.M).group(1)
    assert f"job {job} completed" in proc.stdout and "fill rate" in proc.stdout
    script = (tmp_path / "out" / "slurm" / job / f"{job}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --cpus-per-task=1" in script
    assert "gpus" not in script
    log = (tmp_path / "out" / "slurm" / job / f"{job}_0_log.out").read_text()
    assert f"cache: {cache}" in log  # the summary is in the job's log too
    # the job's cache is the one this config maps to here: a local prepare finds it complete
    from dsft.cli import main

    assert main(["prepare", str(config)]) == 0
    assert f"cache: {cache} (already prepared: nothing was tokenized)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# resume at a late step: the Trainer skips at the sampler (no skipped row read or collated); bench/data_resume.py
# measures it on 1M rows

def test_resume_starts_at_the_checkpoints_batch_without_collating_the_skipped_ones(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    import json
    import shutil

    import yaml
    from transformers import TrainerCallback

    import dsft.data
    import dsft.train
    from conftest import copy_task_rows, write_jsonl
    from dsft.checkpoint import mark_complete
    from dsft.config import load_config
    from dsft.train import run

    real_make = dsft.data.make_collator
    batches: list = []

    def recording_collator(cfg, pad_token_id):
        inner = real_make(cfg, pad_token_id)

        def collate(features):
            batches.append([list(f["input_ids"]) for f in features])
            return inner(features)
        return collate

    monkeypatch.setattr(dsft.train, "make_collator", recording_collator)  # the name build_trainer calls

    class StopAfterOneStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True
            control.should_save = state.global_step == 1  # the first run leaves checkpoint-1
            return control

    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(400, seed=7))

    def config(name: str, resume: str | None = None):
        raw = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "fp32"},
               "data": {"train": str(data), "format": "prompt_completion", "max_seq_len": 64,
                        "cache_dir": str(tmp_path / "cache"), "num_proc": 1},
               "train": {"output_dir": str(tmp_path / name), "max_steps": 150, "per_device_train_batch_size": 2,
                         "logging_steps": 1, "report_to": "none", "save_strategy": "steps", "save_steps": 1000, "seed": 0,
                         "data_seed": 0, **({"resume_from_checkpoint": resume} if resume else {})}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_config(path)

    run(config("a"), [StopAfterOneStep()])
    first_run = list(batches)
    # one step: its batch and the one accelerate's DataLoaderShard fetches ahead (to know the end of the epoch)
    assert len(first_run) == 2
    late = tmp_path / "checkpoint-120"  # 120 batches of 2 into a 200-batch epoch
    shutil.move(str(tmp_path / "a" / "checkpoint-1"), late)
    state = json.loads((late / "trainer_state.json").read_text())
    (late / "trainer_state.json").write_text(json.dumps({**state, "global_step": 120}))
    mark_complete(late)  # the marker lists file sizes

    batches.clear()
    run(config("b", resume=str(late)), [StopAfterOneStep()])
    # as many batches collated as for one step from the start: the 120 skipped ones were never read or collated
    assert len(batches) == len(first_run)
    # ... and it is not the epoch's first batch again (what ignore_data_skip, no skip at all, would give)
    assert batches[0] != first_run[0]
    log = [json.loads(line) for line in (tmp_path / "b" / "dsft_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [121]


def test_chat_renderer_gives_apply_chat_template_strings_and_falls_back_when_they_differ(char_tokenizer, smollm2_dir,
                                                                                       monkeypatch):
    from transformers import AutoTokenizer

    import dsft.data
    from dsft.data import chat_renderer

    chats = [r["messages"] for r in _chat_rows(40, seed=3)]
    for tokenizer in (char_tokenizer, AutoTokenizer.from_pretrained(str(smollm2_dir))):
        render = chat_renderer(tokenizer)
        for gen in (False, True):
            assert render(chats, add_generation_prompt=gen) == tokenizer.apply_chat_template(
                chats, tokenize=False, add_generation_prompt=gen)
        assert render([]) == []

    class Drifted:  # a transformers version whose template call differs: every chat goes through apply_chat_template
        def render(self, **kw):
            return "drifted"

    monkeypatch.setattr(dsft.data, "_compile_jinja_template", lambda template: Drifted())
    assert chat_renderer(char_tokenizer)(chats) == char_tokenizer.apply_chat_template(chats, tokenize=False)
