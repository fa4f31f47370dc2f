"""Long sequences: per-rank peak RSS and tokens/s of a plain hand-written HF Trainer script, dsft with the chunked
loss, and dsft with the chunked loss + sequence parallelism (sp=2), from 1k to 32k tokens; the longest length each
trains within a fixed per-rank memory budget. Not a test.

    .venv/bin/python bench/long_context.py [--lengths 2048 4096 8192 16384 32768] [--layers 2] [--budget-gib 4]
                                           [--ladder-steps 1] [--tput-len 1024 --tput-steps 6 --pairs 3]

Model: SmolLM2-135M-Instruct's architecture (hidden 576, MLP 1536, vocab 49,152, tied embeddings) cut to
``--layers`` of its 30 decoder layers, with 8 attention heads of 72 and 2 key/value heads in place of 9 of 64 and 3
(same q/o shapes; sequence parallelism splits heads over the ranks and 2 divides neither 9 nor 3); random weights
(seed 0), saved once as a model dir that every setup loads. fp32, sdpa, LoRA r=16 alpha 32 dropout 0.05 on all
linear layers, activation checkpointing (non-reentrant), AdamW, batch 1, one row of exactly L tokens per optimizer
step (prompt -> completion rows of random words truncated at L; loss on the completion).

Setups, each point a fresh process (one thread per rank):
  plain    bench/plain_trainer.py --activation-checkpointing (transformers + peft, the model's own loss: full logits)
  chunked  dsft train, loss.impl chunked (chunk 1,024 tokens), one process
  sp2      dsft, loss.impl chunked, parallel.sequence 2, DeepSpeed ZeRO-``--zero``, 2 ranks under torchrun (gloo)

Peak RSS: from the kernel (ru_maxrss of the process over its whole life: loading, training, saving); under
torchrun each rank's via bench/rank_peak.py. A watcher samples the RSS of the run's processes every 50 ms and kills
the run when their sum passes ``--hard-cap-gib`` (a machine-safety limit, above the budget), so the first
over-budget length still gives its true peak up to that cap. Each setup climbs the lengths and stops after its first
length over ``--budget-gib`` (any rank's peak); longer lengths are skipped.

tokens/s: at ``--tput-len`` the plain and chunked setups run ``--tput-steps`` steps, alternating (plain, chunked),
(chunked, plain), ... for ``--pairs`` pairs; tokens/s over the steps after the first 2 (dsft's own definition:
clock started at the end of step 2, stopped at the last step's log); the median of the pair ratios is reported.
On the ladder (``--ladder-steps``, 1 by default): L x steps / the Trainer's train_runtime, the first step included
(one-off costs and all): comparable between setups at one length, not a steady-state rate.

Prints markdown tables and writes bench/results/long_context.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BIN, REPO, SMOLLM2, cpu_env, free_port, machine, markdown_table, write_result  # noqa: E402

GIB = 2**30
SETUPS = ("plain", "chunked", "sp2")
ARCH = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 72}
ENV = cpu_env(DSFT_CPU_THREADS="1")  # one thread per process / rank (OMP_NUM_THREADS=1 too)


# ---------------------------------------------------------------------------------------------------------------
# preparation (in a child process, so that this one stays small)

def prepare(workdir: Path, layers: int, longest: int, rows: int) -> None:
    import random

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(SMOLLM2))
    config.num_hidden_layers = layers
    for key, value in ARCH.items():
        setattr(config, key, value)
    config.max_position_embeddings = max(config.max_position_embeddings, longest + 64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(workdir / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (SMOLLM2 / name).is_file():
            shutil.copy(SMOLLM2 / name, workdir / "model" / name)
    tok = AutoTokenizer.from_pretrained(str(SMOLLM2))
    # words that are one token each after a space: rows of exactly L tokens after truncation
    words = [t[1:] for t in tok.get_vocab() if t.startswith("\u0120") and t[1:].isalpha() and t[1:].islower()
             and len(t) > 3]
    rng = random.Random(0)
    with open(workdir / "train.jsonl", "w") as f:
        for _ in range(rows):
            completion = " " + " ".join(rng.choice(words) for _ in range(longest + 256))
            n = len(tok(completion, add_special_tokens=False)["input_ids"])
            assert n > longest, n
            f.write(json.dumps({"prompt": "Continue the list:", "completion": completion}) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# running one point under the watcher

def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


def watched(cmd: list[str], log: Path, hard_cap: int) -> dict:
    """Run ``cmd`` (its own session), sample its processes' RSS; kill it when their sum passes ``hard_cap``."""
    start = time.perf_counter()
    load = [os.getloadavg()[0]]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    sampled: dict[int, int] = {}
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        total = 0
        for p in _tree(proc.pid):
            r = _rss(p)
            sampled[p] = max(sampled.get(p, 0), r)
            total += r
        if total > hard_cap and not killed:
            killed = True
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)
    load.append(os.getloadavg()[0])
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"exit_code": proc.returncode, "killed_at_hard_cap": killed, "wall_s": time.perf_counter() - start,
            "ru_maxrss_bytes": usage.ru_maxrss * 1024, "sampled_max_rss_bytes": max(sampled.values(), default=0),
            "loadavg": load}


def run_point(setup: str, length: int, steps: int, a: argparse.Namespace, work: Path, tag: str) -> dict:
    name = f"{setup}-{length}-{tag}"
    out = work / name
    model, data = work / "model", work / "train.jsonl"
    if setup == "plain":
        cmd = [sys.executable, str(REPO / "bench" / "plain_trainer.py"), "--model", str(model), "--data", str(data),
               "--out", str(out), "--steps", str(steps), "--batch", "1", "--max-len", str(length),
               "--activation-checkpointing"]
    else:
        cfg = {"model": {"name_or_path": str(model), "init": "pretrained", "dtype": "fp32",
                         "attn_implementation": "sdpa"},
               "data": {"train": str(data), "format": "prompt_completion", "max_seq_len": length, "packing": False,
                        "cache_dir": str(work / "cache")},
               "peft": {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
               "loss": {"impl": "chunked", "chunk_tokens": a.chunk},
               "train": {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 1,
                         "learning_rate": 2e-4, "logging_steps": 1, "report_to": "none", "save_strategy": "no",
                         "seed": 0, "bf16": False, "gradient_checkpointing": True}}
        if setup == "sp2":
            cfg["deepspeed"] = f"zero{a.zero}"
            cfg["parallel"] = {"sequence": 2}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if setup == "chunked":
            cmd = [str(BIN / "dsft"), "train", str(path)]
        else:
            peaks = work / f"{name}.peaks"
            peaks.mkdir()
            cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                   str(REPO / "bench" / "rank_peak.py"), str(peaks), "--config", str(path)]
    w = watched(cmd, work / f"{name}.log", int(a.hard_cap_gib * GIB))
    r = {"setup": setup, "length": length, "steps": steps, **w}
    if setup == "sp2":
        ranks = {}
        for f in (work / f"{name}.peaks").glob("rank*.json"):
            rec = json.loads(f.read_text())
            ranks[int(rec["rank"])] = rec["peak_rss_bytes"]
        # killed runs leave no rank files: the sampled maximum of the largest process stands in
        r["rank_peak_bytes"] = [ranks[k] for k in sorted(ranks)] if len(ranks) == 2 else [w["sampled_max_rss_bytes"]]
    else:
        r["rank_peak_bytes"] = [max(w["ru_maxrss_bytes"], w["sampled_max_rss_bytes"])]
    r["peak_bytes"] = max(r["rank_peak_bytes"])
    r["over_budget"] = r["peak_bytes"] > a.budget_gib * GIB
    r["ok"] = w["exit_code"] == 0 and not w["killed_at_hard_cap"]
    if r["ok"]:
        if setup == "plain":
            m = json.loads((work / f"{name}.log").read_text().strip().splitlines()[-1])
            r.update(train_runtime=m["train_runtime"], losses=m["losses"],
                     tokens_per_s_after_warmup=m.get("tokens_per_s_after_warmup"))
        else:
            logs = [json.loads(x) for x in (out / "dsft_log.jsonl").read_text().splitlines() if x.strip()]
            final = next(x for x in reversed(logs) if "train_runtime" in x)
            last = next((x for x in reversed(logs) if "tokens_per_second_per_device" in x), {})
            r.update(train_runtime=final["train_runtime"], losses=[x["loss"] for x in logs if "loss" in x],
                     tokens_per_s_after_warmup=last.get("tokens_per_second_per_device"))
        r["tokens_per_s_all_steps"] = length * steps / r["train_runtime"]
    else:
        r["log_tail"] = (work / f"{name}.log").read_text()[-1500:]
    shutil.rmtree(out, ignore_errors=True)
    state = "KILLED at hard cap" if w["killed_at_hard_cap"] else "over budget" if r["over_budget"] else \
        "ok" if r["ok"] else f"FAILED (exit {w['exit_code']})"
    print(f"# {setup:8s} {length:6d} tokens x {steps}: peak/rank {[round(b / 1e6) for b in r['rank_peak_bytes']]} MB, "
          f"{r.get('tokens_per_s_all_steps', 0):.1f} tok/s (all steps), wall {w['wall_s']:.0f} s, "
          f"load {w['loadavg'][0]:.1f}-{w['loadavg'][1]:.1f}: {state}", file=sys.stderr, flush=True)
    if not r["ok"] and not w["killed_at_hard_cap"]:
        print(r["log_tail"], file=sys.stderr)
    return r


# ---------------------------------------------------------------------------------------------------------------

def mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e6:,.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--budget-gib", type=float, default=4.0, help="per-rank peak RSS budget")
    p.add_argument("--hard-cap-gib", type=float, default=8.5, help="kill a run whose processes' RSS sum passes it")
    p.add_argument("--ladder-steps", type=int, default=1)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--zero", type=int, default=2, choices=(1, 2, 3))
    p.add_argument("--tput-len", type=int, default=1024)
    p.add_argument("--tput-steps", type=int, default=6)
    p.add_argument("--pairs", type=int, default=3, help="alternating plain/chunked pairs at --tput-len (0: none)")
    p.add_argument("--compare-at", type=int, default=8192, help="length of the peak-ratio goal")
    p.add_argument("--prepare", help=argparse.SUPPRESS)
    p.add_argument("--keep", help="work dir to keep (default: a temporary one)")
    a = p.parse_args()
    if a.prepare:
        prepare(Path(a.prepare), a.layers, max([*a.lengths, a.tput_len]), max(a.tput_steps, a.ladder_steps) + 2)
        return

    info = machine()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="dsft-long-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--prepare", str(work), "--layers", str(a.layers), "--lengths",
                    *map(str, a.lengths), "--tput-len", str(a.tput_len), "--tput-steps", str(a.tput_steps),
                    "--ladder-steps", str(a.ladder_steps)], env=ENV, check=True)
    runs: list[dict] = []

    # throughput at --tput-len: plain and chunked alternating
    for i in range(a.pairs):
        for setup in ("plain", "chunked") if i % 2 == 0 else ("chunked", "plain"):
            runs.append({**run_point(setup, a.tput_len, a.tput_steps, a, work, f"tput{i}"), "pair": i})

    # the ladder
    longest: dict[str, int | None] = {}
    for setup in a.setups:
        longest[setup] = None
        for length in sorted(a.lengths):
            r = run_point(setup, length, a.ladder_steps, a, work, "ladder")
            runs.append(r)
            if r["ok"] and not r["over_budget"]:
                longest[setup] = length
            else:
                break  # first length over budget (or failed): longer ones are skipped
    minutes = (time.perf_counter() - t0) / 60
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)

    # tables
    ladder = [r for r in runs if "pair" not in r]
    rows = []
    for length in sorted(a.lengths):
        row = [f"{length:,}"]
        for setup in a.setups:
            r = next((x for x in ladder if x["setup"] == setup and x["length"] == length), None)
            if r is None:
                row += ["skipped", "-"]
                continue
            peak = "/".join(mb(b) for b in r["rank_peak_bytes"])
            flag = " (killed)" if r["killed_at_hard_cap"] else " (over)" if r["over_budget"] else ""
            row += [peak + flag, f"{r['tokens_per_s_all_steps']:.0f}" if r.get("tokens_per_s_all_steps") else "-"]
        rows.append(row)
    headers = ["tokens"] + [h for s in a.setups for h in (f"{s} peak MB/rank", f"{s} tok/s")]
    print(markdown_table(headers, rows))
    print(f"\nbudget {a.budget_gib} GiB per rank; longest within it: "
          + ", ".join(f"{s} {longest[s]}" for s in a.setups))

    goals: dict = {}
    at = {s: next((x for x in ladder if x["setup"] == s and x["length"] == a.compare_at and not
                   x["killed_at_hard_cap"]), None) for s in a.setups}
    if at.get("plain"):
        for s in ("chunked", "sp2"):
            if at.get(s):
                goals[f"peak_ratio_{s}_vs_plain_at_{a.compare_at}"] = at[s]["peak_bytes"] / at["plain"]["peak_bytes"]
    if longest.get("plain") and longest.get("sp2"):
        goals["longest_ratio_sp2_vs_plain"] = longest["sp2"] / longest["plain"]
    ratios = []
    tput = [r for r in runs if "pair" in r]
    for i in range(a.pairs):
        side = {r["setup"]: r for r in tput if r["pair"] == i}
        if all(side[s].get("tokens_per_s_after_warmup") for s in ("plain", "chunked")):
            ratios.append(side["chunked"]["tokens_per_s_after_warmup"] / side["plain"]["tokens_per_s_after_warmup"])
    if ratios:
        goals[f"tokens_per_s_ratio_chunked_vs_plain_at_{a.tput_len}_median"] = statistics.median(ratios)
        goals["tokens_per_s_pair_ratios"] = ratios
        trows = [[r["pair"], r["setup"], f"{r['tokens_per_s_after_warmup']:.1f}", mb(r["peak_bytes"]),
                  f"{r['losses'][0]:.4f}", f"{r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f}"] for r in tput if r["ok"]]
        print("\n" + markdown_table(["pair", "setup", f"tokens/s (steps 3-{a.tput_steps})", "peak MB",
                                     "step-1 loss", "load"], trows))
    loads = [x for r in runs for x in r["loadavg"]]
    print(f"\ngoals: {json.dumps({k: v for k, v in goals.items() if k != 'tokens_per_s_pair_ratios'})}"
          f"\nload average {min(loads):.1f}-{max(loads):.1f} on {info['cores']} cores; {minutes:.1f} min")
    path = write_result("long_context", {
        "machine": info, "started": started, "minutes": minutes, "settings": vars(a), "architecture":
        {"base": "SmolLM2-135M-Instruct", "num_hidden_layers": a.layers, **ARCH}, "runs": runs,
        "longest_within_budget": longest, "goals": goals, "table": {"headers": headers, "rows": rows},
        "loadavg_range": [min(loads), max(loads)]})
    print(f"written {path}")


if __name__ == "__main__":
    main()
