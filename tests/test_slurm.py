"""Slurm through submitit. The integration tests run against a real local Slurm (scripts/slurm-local.sh, 2 nodes,
brought up by the `slurm` fixture when running as root, and by .ci/run): (a) a 2-task job trains and returns per-rank
results, (b) an interrupted job requeues, resumes and ends like an uninterrupted one, (c) a 3-point sweep runs as
one job array and writes its table, (d) rendered sbatch templates run to completion. The rest is pure: golden
files of rendered templates with hostile values, the rendered shell run against stub commands, sweep points,
the results table, the preemption callback, and the error without Slurm."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_task_rows, free_port, write_jsonl

BIN = Path(sys.executable).parent
GOLDEN = Path(__file__).parent / "golden"
HOSTILE = "it's \"q\" $HOME `id` a\\b 100%"  # quotes, $, backticks, a backslash, a % (an sbatch pattern char)
# Slurm's --output cannot hold a backslash (it turns file name patterns off and is dropped): paths that end up
# there use the rest
HOSTILE_PATH = HOSTILE.replace("\\", "")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_",
                                                                     "SLURM_", "SUBMITIT_"))}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


def _write_config(path: Path, model_dir: Path, data: dict, out: Path, steps: int = 20, slurm: dict | None = None,
                  **train) -> Path:
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {"train": data["train"], "eval": data["eval"], "format": "prompt_completion", "max_seq_len": 64,
                 "packing": True, "cache_dir": data["cache"]},
        # batch 8 x accumulation 4 per rank: slow enough (a few tenths of a second per step) to be interrupted
        "train": {"output_dir": str(out), "learning_rate": 2e-3, "max_steps": steps, "per_device_train_batch_size": 8,
                  "gradient_accumulation_steps": 4, "logging_steps": 1, "seed": 0, "data_seed": 0,
                  "report_to": "none", "save_strategy": "no", **train},
        "slurm": {"tasks_per_node": 2, "time_min": 5, "signal_delay_s": 30, **(slurm or {})},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _log(out: Path) -> list[dict]:
    path = out / "dsft_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _log(out) if "loss" in r]


# ==================================================================================================
# pure: rendering, golden files, sweep points, results table, preemption callback, no-Slurm error


def _hostile_cfg():
    from dsft.config import from_dict

    return from_dict({
        "model": {"name_or_path": "/models/m"}, "data": {"train": "/data/t.jsonl"},
        "train": {"output_dir": "/runs/x"}, "deepspeed": "zero3_multinode",
        "slurm": {"nodes": 2, "gpus_per_node": 8, "cpus_per_task": 6, "mem": "480G", "time_min": 120,
                  "partition": "gpu $PART", "account": "acc'ount", "qos": 'q"os', "constraint": "a100`x`",
                  "exclusive": True, "job_name": f"ft {HOSTILE}"},
    })


def _render(launcher: str, **paths):
    from dsft.slurm.sbatch import render

    defaults = {"config_path": f"/work/my {HOSTILE}/run.yaml", "job_dir": f"/scratch/{HOSTILE_PATH}/slurm",
                "workdir": "/home/u/project dir",
                "executables": {"torchrun": "/opt/env with space/bin/torchrun",
                                "deepspeed": "/opt/env with space/bin/deepspeed",
                                "python": "/opt/env with space/bin/python"}}
    defaults.update(paths)
    return render(_hostile_cfg(), launcher=launcher, overrides=["train.learning_rate=3e-4", f"data.eval={HOSTILE}"],
                  port=29511, **defaults)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_rendered_templates_match_golden_files(launcher):
    text = _render(launcher)
    golden = GOLDEN / f"{launcher}-2nodes.sbatch"
    if os.environ.get("DSFT_UPDATE_GOLDEN") == "1":
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8"), f"rendered {launcher} script differs from {golden}"
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def _sbatch_value(line: str) -> str:
    """An #SBATCH value as sbatch's parser reads it: shell-like quotes, a backslash escapes in and out of them."""
    value = line.split("=", 1)[1]
    out, quote, escape = [], None, False
    for ch in value:
        if escape:
            out.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif quote:
            if ch == quote:
                quote = None
            else:
                out.append(ch)
        elif ch in "'\"":
            quote = ch
        else:
            out.append(ch)
    return "".join(out)


def test_sbatch_directives_request_what_submit_requests():
    from dsft.slurm.resources import resources

    s = _hostile_cfg().slurm
    directives = {line.split("=", 1)[0][len("#SBATCH --"):]: _sbatch_value(line)
                  for line in _render("torchrun").splitlines() if line.startswith("#SBATCH --") and "=" in line}
    submit = resources(s)
    # one launcher task per node holding the node's ranks' CPUs: the same allocation as one task per rank
    assert directives["ntasks-per-node"] == "1"
    assert int(directives["cpus-per-task"]) == submit["ntasks_per_node"] * submit["cpus_per_task"] == 48
    for key in ("job_name", "nodes", "gpus_per_node", "time", "mem", "partition", "account", "qos", "constraint"):
        assert directives[key.replace("_", "-")] == str(submit[key]), key
    assert directives["job-name"] == f"ft {HOSTILE}"  # hostile value read back unchanged
    assert directives["output"] == f"/scratch/{HOSTILE_PATH.replace('%', '%%')}/slurm/%x-%j.out"
    assert "#SBATCH --exclusive" in _render("torchrun").splitlines()


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_rendered_script_passes_every_value_through_unchanged(tmp_path, launcher):
    """Run the rendered script with stub scontrol/srun/launchers: the launcher must receive exactly the intended
    arguments, hostile characters included, on each node with its own node rank."""
    stubs = tmp_path / f"stubs {HOSTILE}"
    stubs.mkdir()
    record = tmp_path / "argv.json"
    (stubs / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    # srun: drop its own options, run the command as Slurm would on node 1
    (stubs / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                'SLURM_NODEID=1 exec "$@"\n')
    (stubs / "launcher").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                    f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    validated = tmp_path / "validate-argv.json"  # the python that runs `dsft validate` before the step
    (stubs / "python").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                  f"json.dump(sys.argv[1:], open({str(validated)!r}, 'w'))\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    job_dir = tmp_path / f"jobs {HOSTILE_PATH}"
    job_dir.mkdir()
    launcher_path = str(stubs / "launcher")
    text = _render(launcher, job_dir=str(job_dir), executables={"torchrun": launcher_path, "deepspeed": launcher_path,
                                                                "python": str(stubs / "python")})
    script = tmp_path / "job.sh"
    script.write_text(text)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="77")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(record.read_text())
    # the module entry (not a path into a clone): the script works wherever dsft is installed
    entry = ["-m", "dsft.run"] if launcher == "torchrun" else ["--module", "dsft.run"]
    sets = ["--set", "train.learning_rate=3e-4", "--set", f"data.eval={HOSTILE}", "--set",
            "train.resume_from_checkpoint=auto"]
    tail = [*entry, "--config", f"/work/my {HOSTILE}/run.yaml", *sets]
    # the config is checked for the job's shape (2 nodes x 8 ranks) before the step starts
    assert json.loads(validated.read_text()) == ["-m", "dsft", "validate", f"/work/my {HOSTILE}/run.yaml", *sets,
                                                 "--world-size=16", "--devices-per-node=8"]
    if launcher == "torchrun":
        assert argv == ["--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node-a:29511",
                        "--rdzv-id=77", *tail]
    else:
        hostfile = job_dir / "hostfile-77"
        assert argv == ["--node_rank=1", f"--hostfile={hostfile}", "--no_ssh", "--master_addr=node-a",
                        "--master_port=29511", *tail]
        assert hostfile.read_text() == "node-a slots=8\nnode-b slots=8\n"


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
@pytest.mark.parametrize("case, validate_rc, step, requeued, rc", [
    ("bad config: validate refuses it", 2, None, False, 2),
    ("user error under torchrun: exit 1 + the file", 0, "touch_file; exit 1", False, 2),
    ("user error, exit 2 (deepspeed launcher, one node)", 0, "exit 2", False, 2),
    ("rank crash", 0, "exit 1", True, 1),
])
def test_rendered_script_requeues_a_failed_step_but_not_a_user_error(tmp_path, launcher, case, validate_rc, step,
                                                                      requeued, rc):
    """Stub scontrol/srun/python: a step that fails is requeued; a config or data error (dsft exits 2, or a rank
    wrote $DSFT_USER_ERROR_FILE because torchrun turns every failure into exit 1) is final: exit 2, no requeue.
    A config that does not validate stops the job before the step. (The real thing: test_e_ below.)"""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    calls = tmp_path / "calls.log"
    (stubs / "scontrol").write_text(f'#!/bin/bash\nif [[ "$1 $2" == "show hostnames" ]]; then printf "node-a\\n"; '
                                    f'else echo "scontrol $*" >>{shlex.quote(str(calls))}; fi\n')
    (stubs / "srun").write_text(f'#!/bin/bash\necho srun >>{shlex.quote(str(calls))}\n'
                                'touch_file() { echo "train.output_dir: a finished run" >"$DSFT_USER_ERROR_FILE"; }\n'
                                f'{step or "exit 0"}\n')
    (stubs / "python").write_text(f'#!/bin/bash\n(( {validate_rc} )) && echo "dsft: error: unknown key" >&2\n'
                                  f'exit {validate_rc}\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    text = _render(launcher, job_dir=str(job_dir), executables={"torchrun": "torchrun", "deepspeed": "deepspeed",
                                                                "python": str(stubs / "python")})
    script = tmp_path / "job.sh"
    script.write_text(text)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-a",
               SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="78")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == rc, (case, proc.stderr)
    log = calls.read_text().splitlines() if calls.is_file() else []
    assert ("srun" in log) == (step is not None), (case, log)
    assert ("scontrol requeue 78" in log) == requeued, (case, log)
    if not requeued and rc == 2:
        assert "not requeued" in proc.stderr.splitlines()[-1], proc.stderr


def test_slurm_section_is_checked(tmp_path):
    from dsft.config import from_dict, validate
    from dsft.errors import ConfigError

    base = {"model": {"name_or_path": "m", "init": "from_config"}, "data": {"train": "hub/dataset"},
            "train": {"output_dir": str(tmp_path)}}
    for slurm, match in [({"time_min": 1, "signal_delay_s": 30}, "signal_delay_s"),
                         ({"nodes": 0}, "slurm.nodes"), ({"tasks_per_node": 0}, "slurm.tasks_per_node"),
                         ({"partition": ""}, "slurm.partition"), ({"nodez": 2}, "did you mean 'nodes'"),
                         ({"gpus_per_node": 4, "tasks_per_node": 2}, "one rank per device")]:
        with pytest.raises(ConfigError, match=match):
            validate(from_dict({**base, "slurm": slurm}))
    validate(from_dict({**base, "slurm": {"nodes": 2, "gpus_per_node": 4}}))


def test_submit_without_slurm_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from dsft.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    config = tmp_path / "run.yaml"
    config.write_text("model: {name_or_path: m}\n")
    assert main(["submit", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Slurm" in err[0] and "sbatch" in err[0], err
    assert main(["sweep", str(config), "--grid", "train.learning_rate=1e-3,2e-3"]) == 2


def test_a_job_dir_slurm_cannot_write_to_is_refused(tmp_path):
    from dsft.errors import ConfigError
    from dsft.slurm.submit import job_dir_of

    cfg = _hostile_cfg()
    cfg.train["output_dir"] = f"/runs/{HOSTILE}"
    with pytest.raises(ConfigError, match="train.output_dir .* backslash"):
        job_dir_of(cfg)
    cfg.slurm.job_dir = "/scratch/a\\b"
    with pytest.raises(ConfigError, match="slurm.job_dir: .* backslash"):
        job_dir_of(cfg)


def test_submit_refuses_a_fixed_resume_path(tmp_path):
    from dsft.errors import ConfigError
    from dsft.slurm.submit import effective_config

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": "m", "init": "from_config"},
                                      "data": {"train": "hub/dataset"},
                                      "train": {"output_dir": str(tmp_path / "o")}}))
    raw, cfg = effective_config(str(config), [], {"nodes": 2, "tasks_per_node": 4})
    assert cfg.train["resume_from_checkpoint"] == "auto" and raw["slurm"]["nodes"] == 2
    assert cfg.slurm.tasks_per_node == 4
    with pytest.raises(ConfigError, match="resume_from_checkpoint"):
        effective_config(str(config), [f"train.resume_from_checkpoint={tmp_path}"], {})


def test_sweep_points_grid_and_random():
    from dsft.errors import ConfigError
    from dsft.slurm.sweep import parse_grid, parse_ranges, points

    grid = parse_grid(["train.learning_rate=1e-3,3e-3", "train.warmup_steps=0,0.1"])
    assert points(grid, {}, None) == [
        {"train.learning_rate": "1e-3", "train.warmup_steps": "0"},
        {"train.learning_rate": "1e-3", "train.warmup_steps": "0.1"},
        {"train.learning_rate": "3e-3", "train.warmup_steps": "0"},
        {"train.learning_rate": "3e-3", "train.warmup_steps": "0.1"}]
    ranges = parse_ranges(["train.learning_rate=1e-5:1e-3:log"])
    drawn = points({"train.warmup_steps": ["0", "0.1"]}, ranges, 20, seed=3)
    assert drawn == points({"train.warmup_steps": ["0", "0.1"]}, ranges, 20, seed=3)  # reproducible
    assert drawn != points({"train.warmup_steps": ["0", "0.1"]}, ranges, 20, seed=4)
    lrs = [float(p["train.learning_rate"]) for p in drawn]
    assert all(1e-5 <= x <= 1e-3 for x in lrs) and min(lrs) < 1e-4 < max(lrs)  # log-uniform spans decades
    assert {p["train.warmup_steps"] for p in drawn} == {"0", "0.1"}
    for bad, match in [(lambda: points({}, ranges, None), "--range needs --random"),
                       (lambda: parse_grid(["train.output_dir=a,b"]), "own output_dir"),
                       (lambda: parse_ranges(["train.learning_rate=1:0"]), "LOW < HIGH"),
                       (lambda: parse_grid(["learning_rate"]), "expected section.key")]:
        with pytest.raises(ConfigError, match=match):
            bad()


def test_results_table_best_first(tmp_path):
    from dsft.slurm.sweep import collect, write_results

    points = []
    for i, eval_loss in enumerate([2.5, 1.5, None, 2.0]):
        out = tmp_path / f"point-{i:03d}"
        out.mkdir()
        rows = [{"step": 5, "loss": 3.0}] + ([{"step": 5, "eval_loss": eval_loss}] if eval_loss else [])
        write_jsonl(out / "dsft_log.jsonl", rows)
        points.append({"index": i, "params": {"train.learning_rate": str(i)}, "output_dir": str(out),
                       "job_id": f"999999_{i}"})
    rows = collect({"points": points})
    assert [r["point"] for r in rows] == [1, 3, 0, 2]  # best eval loss first, the point without one last
    md, csv_path = write_results(tmp_path, rows)
    table = md.read_text().splitlines()
    assert table[0].startswith("| rank | point | train.learning_rate | eval_loss |")
    assert table[2].startswith("| 1 | 1 | 1 | 1.5000 |") and "| - |" in table[-1]
    with open(csv_path) as f:
        parsed = list(csv.DictReader(f))
    assert [r["point"] for r in parsed] == ["1", "3", "0", "2"] and parsed[0]["eval_loss"] == "1.5"


def test_preemption_callback_saves_and_stops_at_the_next_step(monkeypatch):
    from types import SimpleNamespace

    from transformers import TrainerControl

    from dsft import preemption

    monkeypatch.setattr(preemption, "_watch", preemption._Watch())
    callback = preemption.PreemptionCallback()
    args = SimpleNamespace(device="cpu")
    control = callback.on_step_end(args, SimpleNamespace(global_step=2, max_steps=10), TrainerControl())
    assert not control.should_save and not control.should_training_stop  # not armed: nothing happens
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        assert preemption.arm(signal.SIGUSR2) is previous
        control = callback.on_step_end(args, SimpleNamespace(global_step=3, max_steps=10), TrainerControl())
        assert not control.should_training_stop  # armed, no signal yet
        os.kill(os.getpid(), signal.SIGUSR2)  # recorded by dsft's handler, not acted on
        time.sleep(0.05)
        assert preemption.signal_received_at() is not None
        last = callback.on_step_end(args, SimpleNamespace(global_step=10, max_steps=10), TrainerControl())
        assert not last.should_training_stop  # the last step: the run finishes normally instead
        control = callback.on_step_end(args, SimpleNamespace(global_step=4, max_steps=10), TrainerControl())
        assert control.should_save and control.should_training_stop
        with pytest.raises(preemption.Preempted, match="step 4"):
            callback.on_train_end(args, SimpleNamespace(global_step=4), control)
    finally:
        signal.signal(signal.SIGUSR2, previous)


# ==================================================================================================
# integration: a real one-node Slurm


@pytest.fixture(scope="module")
def slurm():
    """The repo's one-node Slurm, up (idempotent: ~0.3 s when it already runs)."""
    if os.geteuid() == 0:
        # 2 nodes, as .ci/run and tests/test_slurm_multinode.py bring it up: the same config, so no restart between
        # the modules (every node has both cores, so the 2-task jobs here still fit on one node)
        proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm-local.sh"), "up", "--nodes", "2"],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"scripts/slurm-local.sh up failed:\n{proc.stderr[-3000:]}"
    elif subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0 if shutil.which("sinfo") else True:
        pytest.skip("no Slurm here: as root, `bash scripts/slurm-local.sh up` brings up a one-node cluster")
    return True


@pytest.fixture(scope="module")
def slurm_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("slurm-data")
    # ~150 packed rows: a step (8 rows x 4 accumulation x 2 ranks) is a fraction of an epoch, so the requeue test
    # also resumes mid-epoch
    return {"train": str(write_jsonl(d / "train.jsonl", copy_task_rows(480, seed=1))),
            "eval": str(write_jsonl(d / "eval.jsonl", copy_task_rows(16, seed=2))), "cache": str(d / "cache")}


def _submit(config: Path, *flags: str, cwd: Path) -> subprocess.Popen:
    proc = subprocess.Popen([str(BIN / "dsft"), "submit", str(config), "--wait", *flags], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.seen = []  # output read before the job ended
    return proc


def _job_id(proc: subprocess.Popen) -> str:
    for line in proc.stdout:
        proc.seen.append(line)
        match = re.match(r"submitted job (\S+):", line)
        if match:
            return match.group(1)
    raise AssertionError("no job id printed:\n" + "".join(proc.seen)[-3000:])


def _finish(proc: subprocess.Popen) -> str:
    # read() returns what the line iterator already buffered too (communicate(timeout=...) would not)
    out = "".join(proc.seen) + proc.stdout.read()
    proc.wait(timeout=60)
    assert proc.returncode == 0, f"dsft submit --wait exited {proc.returncode}\n{out[-5000:]}"
    return out


def _results(folder: Path, job_id: str, tasks: int) -> list[dict]:
    import submitit

    return submitit.SlurmJob(folder=folder, job_id=job_id, tasks=list(range(tasks))).results()


@pytest.fixture(scope="module")
def reference_job(slurm, tiny_model_dir, slurm_data, tmp_path_factory) -> dict:
    """(a) 2-task job, 20 steps, uninterrupted: the reference of the requeue test too."""
    d = tmp_path_factory.mktemp("slurm-a")
    config = _write_config(d / "run.yaml", tiny_model_dir, slurm_data, d / "out")
    t0 = time.time()
    proc = _submit(config, cwd=d)
    job_id = _job_id(proc)
    stdout = _finish(proc)
    return {"dir": d, "out": d / "out", "job_id": job_id, "stdout": stdout, "seconds": time.time() - t0,
            "folder": d / "out" / "slurm" / job_id, "config": config}


@pytest.mark.integration
def test_a_two_task_job_trains_and_returns_per_rank_results(reference_job, capsys):
    r = reference_job
    print(f"(a) submit -> completed: {r['seconds']:.1f} s")
    results = _results(r["folder"], r["job_id"], 2)
    assert [x["rank"] for x in results] == [0, 1] and {x["world_size"] for x in results} == {2}
    assert len({x["pid"] for x in results}) == 2 and {x["restart"] for x in results} == {0}
    assert {x["global_step"] for x in results} == {20} and len({x["loss"] for x in results}) == 1
    info = json.loads((r["out"] / "dsft_run_info.json").read_text())
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert sorted(x["rank"] for x in info["ranks"]) == [0, 1]
    losses = _losses(r["out"])
    assert [s for s, _ in losses] == list(range(1, 21)) and losses[-1][1] < losses[0][1]
    for rank in (0, 1):  # per-rank logs in the job folder, named in the output
        log = r["folder"] / f"{r['job_id']}_{rank}_log.out"
        assert log.is_file() and str(log) in r["stdout"]
    assert f"job {r['job_id']} completed" in r["stdout"]
    from dsft.cli import main

    assert main(["status", str(r["folder"])]) == 0
    status = capsys.readouterr().out
    assert f"job {r['job_id']}: COMPLETED" in status and "last logged step 20: loss" in status
    # dsft sbatch asks for the same allocation as the script submitit wrote for this job
    submitted = (r["folder"] / f"{r['job_id']}_submission.sh").read_text()
    assert main(["sbatch", str(r["config"])]) == 0
    rendered = capsys.readouterr().out
    assert main(["submit", str(r["config"]), "--partition", "no-such-partition"]) == 2  # sbatch's refusal: one line
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("dsft: error: sbatch refused the job: ")
    opts = {}
    for name, text in (("submit", submitted), ("sbatch", rendered)):
        opts[name] = dict(line[len("#SBATCH --"):].split("=", 1) for line in text.splitlines()
                          if line.startswith("#SBATCH --") and "=" in line)
    for key in ("job-name", "nodes", "time"):
        assert opts["submit"][key] == opts["sbatch"][key], key
    assert (int(opts["submit"]["ntasks-per-node"]) * int(opts["submit"].get("cpus-per-task", 1))
            == int(opts["sbatch"]["ntasks-per-node"]) * int(opts["sbatch"]["cpus-per-task"]) == 2)


@pytest.mark.integration
def test_b_interrupted_job_requeues_resumes_and_matches_the_uninterrupted_run(reference_job, tiny_model_dir,
                                                                             slurm_data, tmp_path):
    import submitit

    config = _write_config(tmp_path / "run.yaml", tiny_model_dir, slurm_data, tmp_path / "out")
    proc = _submit(config, cwd=tmp_path)
    job_id = _job_id(proc)
    folder = tmp_path / "out" / "slurm" / job_id
    deadline = time.time() + 300
    while not any(step >= 3 for step, _ in _losses(tmp_path / "out")):  # interrupt mid-training
        assert time.time() < deadline and proc.poll() is None, "training did not reach step 3"
        time.sleep(0.05)
    submitit.SlurmJob(folder=folder, job_id=job_id)._interrupt()  # what a preemption sends: SIGTERM, then USR2
    _finish(proc)
    results = _results(folder, job_id, 2)
    reference = _results(reference_job["folder"], reference_job["job_id"], 2)

    assert {x["restart"] for x in results} == {1}, "the job was not requeued exactly once"
    first, second = results[0]["attempts"]
    stopped, resumed = first["stopped_at_step"], second["start_step"]
    assert 3 <= stopped < 20 and (tmp_path / "out" / f"checkpoint-{stopped}").is_dir()
    assert resumed == stopped  # saved at the step boundary after the signal: no step of work lost
    assert results[0]["global_step"] == results[1]["global_step"] == reference[0]["global_step"] == 20
    final, final_ref = results[0]["loss"], reference[0]["loss"]
    assert abs(final - final_ref) / abs(final_ref) < 1e-3, (final, final_ref)
    losses, ref_losses = _losses(tmp_path / "out"), _losses(reference_job["out"])
    assert [s for s, _ in losses] == [s for s, _ in ref_losses] == list(range(1, 21))  # each step logged once
    worst = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(losses, ref_losses))
    assert worst < 1e-3, (losses, ref_losses)
    starts = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "Start"], capture_output=True,
                            text=True).stdout.split()
    restarted = datetime.fromisoformat(starts[-1]).timestamp() - first["signal_at"] if len(starts) > 1 else None
    print(f"(b) interrupted after logged step 3; stopped and saved at step {stopped}, resumed at step {resumed} "
          f"(steps lost: {stopped - resumed}); requeue gap: signal -> Slurm started the requeued job "
          f"{restarted if restarted is None else round(restarted, 1)} s, -> task running "
          f"{second['armed_at'] - first['signal_at']:.1f} s, -> first resumed step "
          f"{second['first_step_at'] - first['signal_at']:.1f} s; max rel loss diff vs uninterrupted {worst:.2e}")


@pytest.mark.integration
def test_c_sweep_runs_as_one_job_array_and_writes_its_table(slurm, tiny_model_dir, slurm_data, tmp_path):
    config = _write_config(tmp_path / "run.yaml", tiny_model_dir, slurm_data, tmp_path / "sweep", steps=8,
                           slurm={"tasks_per_node": 1})
    t0 = time.time()
    proc = subprocess.run([str(BIN / "dsft"), "sweep", str(config), "--grid", "train.learning_rate=1e-4,1e-3,1e-2",
                           "--parallel", "2", "--wait"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"(c) 3-point sweep, 2 at a time: {time.time() - t0:.1f} s")
    info = json.loads((tmp_path / "sweep" / "dsft_sweep.json").read_text())
    array = info["array_job_id"]
    assert [p["job_id"] for p in info["points"]] == [f"{array}_{i}" for i in range(3)]  # one job array
    script = (tmp_path / "sweep" / "slurm" / array / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-2%2" in script  # the parallelism cap
    with open(tmp_path / "sweep" / "sweep_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and {r["state"] for r in rows} == {"COMPLETED"}
    evals = [float(r["eval_loss"]) for r in rows]
    assert evals == sorted(evals) and len(set(evals)) == 3
    for r in rows:
        out = Path(r["output_dir"])
        assert out.parent == tmp_path / "sweep" and (out / "model.safetensors").is_file()
        assert float(r["eval_loss"]) == pytest.approx([x for x in _log(out) if "eval_loss" in x][-1]["eval_loss"])
        assert yaml.safe_load((out / "dsft_config.yaml").read_text())["train"]["learning_rate"] == \
            float(r["train.learning_rate"])
    table = (tmp_path / "sweep" / "sweep_results.md").read_text()
    assert table.splitlines()[0].startswith("| rank | point | train.learning_rate | eval_loss |") and table in proc.stdout


def _wait_for(job_id: str, timeout: float = 600) -> str:
    """Poll until Slurm reports a final state (sbatch --wait polls at doubling intervals: up to 30 s late)."""
    from dsft.slurm.submit import job_state

    deadline = time.time() + timeout
    while True:
        state = job_state(job_id)
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "UNKNOWN"):
            return state
        assert time.time() < deadline, f"job {job_id} still {state}"
        time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_d_rendered_sbatch_script_runs_to_completion(slurm, tiny_model_dir, slurm_data, tmp_path, launcher,
                                                     monkeypatch, capsys):
    from dsft.cli import main

    where = tmp_path / f"runs {HOSTILE_PATH}"  # config, outputs and logs under a hostile path
    config = _write_config(where / "run.yaml", tiny_model_dir, slurm_data, where / "out", steps=4,
                           slurm={"job_name": f"d {HOSTILE}"})
    script = tmp_path / "job.sh"
    monkeypatch.chdir(tmp_path)
    assert main(["sbatch", str(config), "--launcher", launcher, "--port", str(free_port()), "--out", str(script)]) == 0
    capsys.readouterr()
    t0 = time.time()
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], env=_env(), capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    state = _wait_for(job_id)
    log = where / "out" / "slurm" / f"d {HOSTILE}-{job_id}.out"  # %x: the job name
    assert state == "COMPLETED", f"{state}\n{log.read_text()[-4000:] if log.is_file() else 'no log'}"
    print(f"(d) {launcher} sbatch script: {time.time() - t0:.1f} s")
    assert (where / "out" / "model.safetensors").is_file() and log.is_file()
    assert [s for s, _ in _losses(where / "out")] == [1, 2, 3, 4]
    info = json.loads((where / "out" / "dsft_run_info.json").read_text())
    assert info["world_size"] == 2 and sorted(x["rank"] for x in info["ranks"]) == [0, 1]
    # the hostile job name reached Slurm unchanged (squeue: sacct shows " as `, as slurmdbd stores it)
    name = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%j"], capture_output=True,
                          text=True).stdout.rstrip("\n")
    assert name == f"d {HOSTILE}"


@pytest.mark.integration
def test_e_a_config_error_fails_the_sbatch_job_without_a_requeue(slurm, tiny_model_dir, slurm_data, tmp_path,
                                                                  monkeypatch, capsys):
    """Rendered torchrun scripts, slurm.max_requeues 3. (1) The config turned bad after `dsft sbatch` (an unknown
    key): `dsft validate` stops the job before the step. (2) A config error only training finds (output_dir holds a
    finished run): every rank exits 2, torchrun exits 1, the file the ranks wrote tells the script. Both: FAILED,
    exit code 2, the `dsft: error:` line in the log, no requeue."""
    from dsft.cli import main

    monkeypatch.chdir(tmp_path)
    jobs = {}
    for case in ("validate", "training"):
        where = tmp_path / case
        out = where / "out"
        config = _write_config(where / "run.yaml", tiny_model_dir, slurm_data, out, steps=2,
                               slurm={"job_name": f"e-{case}", "max_requeues": 3})
        script = tmp_path / f"{case}.sh"
        assert main(["sbatch", str(config), "--port", str(free_port()), "--out", str(script)]) == 0
        if case == "validate":
            config.write_text(config.read_text() + "bogus_key: 1\n")
        else:  # resume_from_checkpoint: auto finds no checkpoint, so the run would train over a finished one
            (out / "dsft_done.json").write_text(json.dumps({"global_step": 2}))
        submitted = subprocess.run(["sbatch", "--parsable", str(script)], env=_env(), capture_output=True, text=True)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip().split(";")[0]
        jobs[case] = (job_id, out / "slurm" / f"e-{case}-{job_id}.out")
    capsys.readouterr()
    for case, (job_id, log_path) in jobs.items():
        state = _wait_for(job_id, timeout=300)
        log = log_path.read_text() if log_path.is_file() else "no log"
        assert state == "FAILED", f"{case}: {state}\n{log[-4000:]}"
        job = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        fields = dict(item.split("=", 1) for item in job.split() if "=" in item)
        assert fields["Restarts"] == "0" and fields["ExitCode"] == "2:0", (case, job)
        assert log.count("dsft: job ") == 1 and "requeue 1 of" not in log, log  # one attempt
        errors = [line for line in log.splitlines() if line.startswith("dsft: error: ")]
        if case == "validate":
            assert "unknown key 'bogus_key'" in errors[0], log
            assert "did not validate (exit 2" in errors[-1] and "not requeued" in errors[-1], log
            assert "rendezvous" in log and "torch.distributed" not in log  # no step started
        else:
            assert "holds a finished run" in errors[0], log
            assert "a requeue cannot fix (exit 1;" in errors[-1] and "not requeued" in errors[-1], log
            assert len(errors) == 2, log  # rank 0's line (not one per rank) and the script's
