"""Data preparation throughput and memory (issue 11, point 3): dsft's tokens/s against the limit measured in the
same run, with 1 and 2 worker processes, and the peak RSS.

    .venv/bin/python bench/data_prep.py                 # 200k generated conversations (the goal's size)
    .venv/bin/python bench/data_prep.py --rows 20000    # a quick run

The limit: the same rows rendered with the chat template and tokenized by ONE batched call of the fast tokenizer
(``tokenizer(texts)``), in one process, nothing else (no label location, no Arrow, no cache). Goals: dsft with 1
process >= 0.8x the limit; with 2 processes >= 1.7x dsft with 1. Each dsft run is a fresh process (its peak RSS
is its own; children's peak is taken from RUSAGE_CHILDREN). Tokenizer: SmolLM2-135M-Instruct from
``.cache/dsft/models`` (``dsft prepare-demo --cache-dir .cache/dsft``). Writes bench/results/data_prep_<rows>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO, machine, write_result  # noqa: E402

TOKENIZER = REPO / ".cache/dsft/models/SmolLM2-135M-Instruct"
WORDS = ("the of and to in is was for on that with as by at from it an be this are or have not which one you all "
         "model data train token loss rank node cache file line batch step").split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            msgs = [{"role": "system", "content": sentence(8)}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 3)):
                msgs.append({"role": "user", "content": " ".join(sentence(rng.randint(5, 20))
                                                                 for _ in range(rng.randint(1, 4)))})
                msgs.append({"role": "assistant", "content": " ".join(sentence(rng.randint(5, 20))
                                                                      for _ in range(rng.randint(2, 8)))})
            f.write(json.dumps({"messages": msgs}) + "\n")


def limit(path: Path) -> dict:
    """Render + one batched fast-tokenizer call, one process (reads the rows into memory first, untimed)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    chats = [json.loads(line)["messages"] for line in open(path, encoding="utf-8")]
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    texts = tok.apply_chat_template(chats, tokenize=False)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    tokens = sum(map(len, ids))
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds),
            "cpu_seconds": round(cpu, 2)}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker processes): on a busy machine the ratio of
    CPU times still compares the work done, where wall times also measure the neighbours."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _rss_anon_kb(pid: str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
    except OSError:  # the process ended
        return 0


class AnonPeak(threading.Thread):
    """Peak anonymous memory (RssAnon: heap and stacks, not file pages) of this process and of its largest child
    (a forked worker also counts the pages it still shares with this process), sampled every 0.2 s. ru_maxrss also counts the pages of memory-mapped Arrow files read so far:
    the kernel can drop those at any time, and they grow with the dataset however little the process holds."""

    def __init__(self):
        super().__init__(daemon=True)
        self.main_kb = self.children_kb = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.main_kb = max(self.main_kb, _rss_anon_kb())
            kids = []
            for task in Path("/proc/self/task").iterdir():
                with contextlib.suppress(OSError):
                    kids += (task / "children").read_text().split()
            self.children_kb = max([self.children_kb] + [_rss_anon_kb(k) for k in kids])


def dsft_run(path: Path, cache: Path, num_proc: int, packing: bool) -> dict:
    """prepare_data from the JSON-lines file to the finished cache, in this (fresh) process."""
    from transformers import AutoTokenizer

    from dsft.config import DataConfig
    from dsft.data import prepare_data

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    cfg = DataConfig(train=str(path), format="messages", max_seq_len=2048, packing=packing, cache_dir=str(cache),
                     num_proc=num_proc)
    anon = AnonPeak()
    anon.start()
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    data = prepare_data(cfg, tok)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    anon.stop.set()
    shutil.rmtree(cache)  # 1M rows make a few GB
    st = data.stats["train"]
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"num_proc": num_proc, "packing": packing, "tokens": st.tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(st.tokens / seconds), "cpu_seconds": round(cpu, 2),
            "peak_rss_mb_main": round(self_kb / 1024), "peak_rss_mb_worker": round(child_kb / 1024),
            "peak_anon_mb_main": round(anon.main_kb / 1024), "peak_anon_mb_worker": round(anon.children_kb / 1024)}


def main() -> int:
    machine_info = machine()  # the load before the runs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--workdir", default="/tmp/dsft-bench-data-prep")
    p.add_argument("--procs", default="1,2", help="dsft worker process counts to run")
    p.add_argument("--packing", action="store_true", help="also pack (max_seq_len 2048)")
    p.add_argument("--no-limit", action="store_true",
                   help="skip the limit (it holds every row, text and id list in memory: ~4 GB per 200k rows)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    work = Path(a.workdir)
    data = work / f"chats-{a.rows}.jsonl"
    if a.child:  # one measurement in a fresh process
        kind, _, n = a.child.partition(":")
        out = limit(data) if kind == "limit" else dsft_run(data, work / f"cache-{kind}-{n}-{time.time_ns()}",
                                                           int(n), a.packing)
        print(json.dumps(out))
        return 0
    if not TOKENIZER.is_dir():
        print(f"no tokenizer at {TOKENIZER}: run `.venv/bin/dsft prepare-demo --cache-dir .cache/dsft` first")
        return 1
    work.mkdir(parents=True, exist_ok=True)
    if not data.exists():
        t0 = time.perf_counter()
        generate(data, a.rows)
        print(f"generated {a.rows} chats in {time.perf_counter() - t0:.1f} s -> {data}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def child(spec: str) -> dict:
        cmd = [sys.executable, __file__, "--rows", str(a.rows), "--workdir", str(work), "--child", spec]
        cmd += ["--packing"] if a.packing else []
        # a datasets cache of its own: every run pays the JSON -> Arrow conversion, none reuses another's
        hf_cache = work / f"hf-datasets-{spec.replace(':', '-')}-{time.time_ns()}"
        proc = subprocess.run(cmd, env={**env, "HF_DATASETS_CACHE": str(hf_cache)}, capture_output=True, text=True,
                              cwd=REPO)
        shutil.rmtree(hf_cache, ignore_errors=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])

    results = {"rows": a.rows}
    if not a.no_limit:
        results["limit"] = child("limit")
        print(f"limit (render + one batched tokenizer call, 1 process): {results['limit']}")
    for n in [int(x) for x in a.procs.split(",")]:
        results[f"dsft_{n}"] = r = child(f"dsft:{n}")
        if "limit" in results:
            r["x_limit"] = round(r["tokens_per_s"] / results["limit"]["tokens_per_s"], 3)
            r["x_limit_cpu"] = round(results["limit"]["cpu_seconds"] / r["cpu_seconds"], 3)
        print(f"dsft num_proc={n}: {r}")
    if "dsft_1" in results and "dsft_2" in results:
        results["speedup_2_vs_1"] = round(results["dsft_2"]["tokens_per_s"] / results["dsft_1"]["tokens_per_s"], 3)
        print(f"2 processes vs 1: {results['speedup_2_vs_1']}x")
    results["machine"] = dict(machine_info, load_avg_at_end=os.getloadavg())
    print(f"wrote {write_result(f'data_prep_{a.rows}', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
