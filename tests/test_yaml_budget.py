"""Config loading has a budget: a YAML alias bomb anywhere in a config (or in a --set value) is one `dsft: error:`
line naming the file and line, before anything is expanded -- not minutes and gigabytes in a deep copy.

The bomb: 9 nested levels of 9 aliases each, 9^9 = 387M values once expanded (PyYAML itself shares the aliased
objects, so parsing is instant; the cost comes from whatever walks or copies the result)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_task_rows, write_jsonl
from dsft.config import YAML_NODE_BUDGET, load_config, load_yaml_text
from dsft.errors import ConfigError

LEVELS = "abcdefghi"


def bomb(indent: str) -> str:
    """A mapping of 9 anchors, each level a list of 9 aliases to the previous one."""
    lines = [f"{indent}a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip(LEVELS, LEVELS[1:]):
        lines.append(f"{indent}{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def flow_bomb() -> str:
    """The bomb on one line (a --set value): {a: &a [...], b: &b [*a, ...], ...}."""
    return "{" + ", ".join(bomb("").splitlines()) + "}"


def config_text(tmp_path: Path, model_dir: Path, where: str) -> str:
    """A valid config with the bomb inside section ``where`` (a free-form section, or one with checked keys)."""
    train = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(4))
    sections = {
        "model": f"model:\n  name_or_path: {model_dir}\n",
        "data": f"data:\n  train: {train}\n  format: prompt_completion\n",
        "train": f"train:\n  output_dir: {tmp_path / 'out'}\n",
    }
    if where == "model.config_overrides":
        sections["model"] += "  config_overrides:\n" + bomb("    ")
    elif where in ("data", "train"):
        sections[where] += bomb("  ")
    elif where == "deepspeed_overrides":
        sections[where] = "deepspeed: zero2\ndeepspeed_overrides:\n" + bomb("  ")
    return "".join(sections.values())


# the line of the first alias whose target expands past the budget: *f (9^6 values) on the line of g
def expected_line(text: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if "g: &g" in line)


@pytest.mark.parametrize("where", ["deepspeed_overrides", "model.config_overrides", "train", "data"])
def test_alias_bomb_is_refused_before_expansion(tmp_path, tiny_model_dir, where):
    text = config_text(tmp_path, tiny_model_dir, where)
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.process_time()
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert time.process_time() - start < 1.0
    msg = str(e.value)
    assert msg.startswith(f"{path}: line {expected_line(text)}: YAML alias *f ") and "alias bomb" in msg
    assert "\n" not in msg


def test_alias_bomb_in_a_set_value_is_refused(tmp_path, tiny_model_dir):
    path = tmp_path / "ok.yaml"
    path.write_text(config_text(tmp_path, tiny_model_dir, "none"))
    with pytest.raises(ConfigError, match=r"^--set deepspeed_overrides.x: line 1: YAML alias \*f "):
        load_config(path, [f"deepspeed_overrides.x={flow_bomb()}"])


def test_sparing_anchors_still_work(tmp_path, tiny_model_dir):
    # one list shared by two keys (and a merge key): well inside the budget, read as if written out
    text = config_text(tmp_path, tiny_model_dir, "none") + (
        "peft:\n  lora: &lora {r: 4, target_modules: &mods [q_proj, v_proj]}\n"
        "  lr_ratio: 2\n"
        "deepspeed_overrides:\n  x: {<<: *lora, alpha: 8}\n  y: *mods\n"
    )
    path = tmp_path / "anchors.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.peft.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.deepspeed_overrides == {"x": {"r": 4, "target_modules": ["q_proj", "v_proj"], "alpha": 8},
                                       "y": ["q_proj", "v_proj"]}


def test_budget_edge_and_self_reference():
    # exactly at the budget passes, one value more does not: the count is of expanded nodes (lists count too)
    per = 99
    reps = (YAML_NODE_BUDGET - 1) // (per + 1)  # root list + reps x (list of `per` scalars)
    base = "[" + ", ".join(["0"] * per) + "]"
    ok = f"- &x {base}\n" + "".join("- *x\n" for _ in range(reps - 1))
    assert len(load_yaml_text(ok, "ok")) == reps
    big = ok + "".join("- *x\n" for _ in range(2))
    with pytest.raises(ConfigError, match="more than 100,000 values"):
        load_yaml_text(big, "big")
    # an anchor that contains an alias to itself expands forever (safe_load would build a recursive list)
    with pytest.raises(ConfigError, match=r"^self\.yaml: line 1: YAML alias \*x"):
        load_yaml_text("a: &x [1, *x]\n", "self.yaml")
    assert load_yaml_text("a: &x [1]\nb: *x\n", "t") == yaml.safe_load("a: &x [1]\nb: *x\n")


# Runs the command as its own child and reports that child's usage. The extra process matters: Linux keeps a
# process's peak RSS across fork and exec, so a child forked straight from this (large) pytest process would report
# pytest's peak; a child of this small launcher starts its count afresh.
_LAUNCHER = """
import json, resource, subprocess, sys
deadline, cmd = float(sys.argv[1]), sys.argv[2:]
try:
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=deadline)
    status, err = proc.returncode, proc.stderr
except subprocess.TimeoutExpired as e:
    status, err = -9, (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"status": status, "stderr": err, "cpu_s": u.ru_utime + u.ru_stime, "rss_mb": u.ru_maxrss / 1024}))
"""


def _run_limited(args: list[str], deadline_s: float) -> tuple[int, str, float, float]:
    """Run ``python -m dsft ARGS``; (exit status, stderr, CPU seconds, peak RSS in MB) of that process alone,
    killed at ``deadline_s`` of wall time (a loaded CI machine: the limits below are on CPU time and memory)."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(deadline_s), sys.executable, "-m", "dsft", *args],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=deadline_s + 60)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return r["status"], r["stderr"], r["cpu_s"], r["rss_mb"]


@pytest.mark.integration
@pytest.mark.parametrize("where", ["deepspeed_overrides", "model.config_overrides", "train", "data", "--set"])
def test_alias_bomb_in_a_real_process(tmp_path, tiny_model_dir, where):
    path = tmp_path / "bomb.yaml"
    path.write_text(config_text(tmp_path, tiny_model_dir, "none" if where == "--set" else where))
    args = ["validate", str(path)]
    if where == "--set":
        args += ["--set", "deepspeed_overrides.y=" + flow_bomb()]
    status, stderr, cpu_s, rss_mb = _run_limited(args, deadline_s=120)
    lines = stderr.strip().splitlines()
    assert status == 2, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("dsft: error: ") and "YAML alias *f" in lines[0], lines
    assert (str(path) in lines[0]) if where != "--set" else ("--set deepspeed_overrides.y: line 1:" in lines[0])
    # before the fix: > 2 minutes of CPU and 6 GB. The CLI's own imports take ~0.1-2 s of CPU here.
    assert cpu_s < 10, cpu_s
    assert rss_mb < 1024, rss_mb
