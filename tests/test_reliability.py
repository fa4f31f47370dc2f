"""Faults injected into real runs: a kill -9 while a checkpoint is written, a rank killed mid-step, a hung
peer, a loss that turns NaN; and the safe-resume / finished-run checks.

Multi-process runs use 2 CPU ranks under torchrun with DeepSpeed ZeRO-2 (fp32, tiny Llama); faults come from
``tests/fault_entry.py`` (test-only, selected by DSFT_TEST_FAULTS).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_task_rows, free_port, write_jsonl
from dsft.checkpoint import COMPLETE_MARKER, PARTIAL_DIR, is_complete, latest_complete_checkpoint, list_checkpoints

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    return str(write_jsonl(tmp_path_factory.mktemp("rel-data") / "train.jsonl", copy_task_rows(160, seed=1)))


def _config(d: Path, model_dir: Path, data: str, deepspeed: str | None = "zero2", **train) -> Path:
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {"train": data, "format": "prompt_completion", "max_seq_len": 64, "packing": True,
                 "cache_dir": str(d / "cache")},
        "train": {"output_dir": str(d / "out"), "learning_rate": 2e-3, "per_device_train_batch_size": 2,
                  "logging_steps": 1, "seed": 0, "data_seed": 0, "report_to": "none", **train},
    }
    if deepspeed:
        raw["deepspeed"] = deepspeed
    d.mkdir(parents=True, exist_ok=True)
    path = d / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(**faults) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", "DSFT_TEST_FAULTS": json.dumps(faults)})
    return env


def _torchrun(config: Path, *flags: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), "tests/fault_entry.py", "--config", str(config), *flags]


def _start(cmd: list[str], log: Path, **faults) -> subprocess.Popen:
    # own session: the test can kill the launcher and every rank at once
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**faults), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended early ({proc.returncode}):\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)


def _logged(out: Path) -> list[dict]:
    path = out / "dsft_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _digests(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# 1. crash-consistent checkpoints


def test_kill_while_writing_a_checkpoint_then_resume_from_the_previous_complete_one(tmp_path, tiny_model_dir,
                                                                                       data_file):
    """kill -9 of the launcher and both ranks while checkpoint-6 is being written (after the model and the
    ZeRO shards, before RNG states and trainer_state.json); the requeued run (resume: auto) skips the partial
    checkpoint with a warning, resumes from checkpoint-3 and reproduces steps 4-6 of the killed run."""
    config = _config(tmp_path, tiny_model_dir, data_file, max_steps=6, save_strategy="steps", save_steps=3,
                     save_total_limit=1, resume_from_checkpoint="auto")
    out = tmp_path / "out"
    first = _start(_torchrun(config), tmp_path / "first.log", slow_save={"step": 6, "seconds": 600})
    try:
        _wait_for(lambda: all((out / f"slow-save-rank{r}").exists() for r in (0, 1)), first, tmp_path / "first.log")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed = {r["step"]: r["loss"] for r in _logged(out) if "loss" in r}
    assert sorted(killed) == [1, 2, 3, 4, 5, 6]  # step 6 was logged before its checkpoint was written
    assert is_complete(out / "checkpoint-3")
    partial = out / "checkpoint-6"
    assert partial.is_dir() and not (partial / COMPLETE_MARKER).exists() and not is_complete(partial)
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert latest_complete_checkpoint(out)[0].name == "checkpoint-3"  # transformers' get_last_checkpoint: 6

    resumed = subprocess.run(_torchrun(config), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "skipping" in resumed.stderr and "checkpoint-6: it is incomplete" in resumed.stderr
    # the resumed run drops the killed run's records after checkpoint-3 from the log and logs steps 4-6 anew:
    # each step once
    steps = [r["step"] for r in _logged(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    after = {r["step"]: r["loss"] for r in _logged(out) if "loss" in r and r["step"] > 3}
    for step, loss in after.items():
        assert abs(loss - killed[step]) / killed[step] < 1e-3, (step, loss, killed[step])
    # the partial one was moved aside (not deleted); the rewritten checkpoint-6 is complete; the limit of 1
    # removed checkpoint-3 only after checkpoint-6 was marked complete
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6"]
    assert is_complete(out / "checkpoint-6")
    assert len(list((out / PARTIAL_DIR).iterdir())) == 1
    assert (out / "dsft_done.json").is_file() and (out / "model.safetensors").is_file()

    # weights as safetensors only: the final save, the checkpoint, and the checkpoint consolidated
    from dsft.checkpoint import consolidate
    from test_security import pickled_weight_files

    merged = consolidate(out / "checkpoint-6", tmp_path / "consolidated")
    assert (out / "checkpoint-6" / "model.safetensors").is_file() and (merged / "model.safetensors").is_file()
    assert pickled_weight_files(out, deepspeed_state=True) == [] and pickled_weight_files(merged) == []


# --------------------------------------------------------------------------------------------------
# 2. rank failure


def test_a_killed_rank_ends_the_run_fast_naming_it_and_saved_work_is_untouched(tmp_path, tiny_model_dir, data_file):
    config = _config(tmp_path, tiny_model_dir, data_file, max_steps=1000, save_strategy="steps", save_steps=2)
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = _start(_torchrun(config), log)
    try:
        _wait_for(lambda: len(_logged(out)) >= 5 and is_complete(out / "checkpoint-4"), proc, log)
        saved = {p.name: _digests(p) for p in list_checkpoints(out) if is_complete(p)}
        rank1 = next(r["pid"] for r in json.loads((out / "dsft_run_info.json").read_text())["ranks"] if r["rank"] == 1)
        killed_at = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        proc.wait(timeout=120)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    print(f"rank 1 killed at step {len(_logged(out))}: launcher exited {proc.returncode} after {elapsed:.1f} s")
    assert proc.returncode != 0
    assert elapsed < 60
    assert "rank      : 1 (local_rank: 1)" in text and "Signal 9 (SIGKILL)" in text  # torchrun's root cause
    for name, digests in saved.items():
        assert _digests(out / name) == digests, name
        assert is_complete(out / name)
    assert not (out / "dsft_done.json").exists()


HUNG_PEER = """
import sys, time, torch, torch.distributed as dist
from dsft.distributed import apply_collective_timeout
apply_collective_timeout(float(sys.argv[1]), use_cpu=True)
group = dist.new_group([0, 1])  # as DeepSpeed builds its data-parallel group: no timeout argument
t = torch.ones(1)
dist.all_reduce(t, group=group)
if dist.get_rank() == 1:
    time.sleep(120)  # hangs (alive, connected, silent)
start = time.monotonic()
try:
    dist.all_reduce(t, group=group)
except RuntimeError as e:
    print(f"rank 0 gave up after {time.monotonic() - start:.1f} s: {str(e)[:120]}", flush=True)
    sys.exit(1)
"""


def test_a_hung_peer_times_out_in_groups_deepspeed_creates(tmp_path):
    """Without dsft's timeout a DeepSpeed group waits 30 min (gloo's default) for a silent peer: measured in a
    real ZeRO-2 run with one rank SIGSTOPped (no error after 150 s with ddp_timeout 15); with it, 15 s."""
    script = tmp_path / "hung_peer.py"
    script.write_text(HUNG_PEER)
    start = time.monotonic()
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()), str(script), "3"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 0 gave up after" in proc.stdout and "Timed out waiting 3000ms" in proc.stdout, proc.stdout
    assert elapsed < 60, elapsed


# --------------------------------------------------------------------------------------------------
# 3. non-finite guard


def _assert_guard_stopped(out: Path, message: str, first_bad: int, stop: int, good: dict[str, str]) -> dict:
    assert f"training stopped at step {stop}" in message and f"since step {first_bad}" in message, message
    assert "the last complete one is checkpoint-3" in message
    report = json.loads((out / "dsft_nonfinite.json").read_text())
    assert report["stopped_at_step"] == stop and report["first_nonfinite_step"] == first_bad
    steps = {r["step"]: r for r in report["recent_steps"]}
    assert steps[first_bad - 1]["nonfinite_loss_ranks"] == [] and not steps[first_bad - 1]["nonfinite_grad_norm"]
    assert report["recent_logs"], report
    # checkpoint-6 (a save step inside the non-finite streak) was never written; checkpoint-3 is as it was
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert _digests(out / "checkpoint-3") == good and is_complete(out / "checkpoint-3")
    assert not (out / "model.safetensors").exists() and not (out / "dsft_done.json").exists()
    return steps


def run_poisoned_from_step_5(cfg, out: Path) -> tuple[Exception, dict]:
    """Train ``cfg`` (checkpoints every 3 steps, guard.max_nonfinite_steps 2) with a NaN weight from step 5 on;
    the run must stop at step 6 as _assert_guard_stopped checks. Returns (the NonFiniteError, the report's steps)."""
    from fault_entry import Poison

    from dsft.guards import NonFiniteError
    from dsft.train import run

    class Snapshot(Poison):  # hashes checkpoint-3 once it is complete, before any NaN
        good: dict = {}

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 4:
                Snapshot.good = _digests(out / "checkpoint-3")
            super().on_step_begin(args, state, control, **kwargs)

    with pytest.raises(NonFiniteError) as e:
        run(cfg, callbacks=[Snapshot(step=5, rank=0)])
    assert e.value.exit_code == 3
    return e.value, _assert_guard_stopped(out, str(e.value), first_bad=5, stop=6, good=Snapshot.good)


def test_nonfinite_guard_stops_without_overwriting_the_last_good_checkpoint(tmp_path, tiny_model_dir, data_file):
    """One process, no DeepSpeed: a NaN weight from step 5 on; guard.max_nonfinite_steps 2 stops at step 6."""
    from dsft.config import load_config

    cfg = load_config(_config(tmp_path, tiny_model_dir, data_file, deepspeed=None, max_steps=9,
                              save_strategy="steps", save_steps=3),
                      ["guard.max_nonfinite_steps=2"])
    _, steps = run_poisoned_from_step_5(cfg, tmp_path / "out")
    assert steps[5]["nonfinite_loss_ranks"] == [0] and steps[6]["nonfinite_grad_norm"]


def test_nonfinite_guard_under_deepspeed_on_two_ranks(tmp_path, tiny_model_dir, data_file):
    """ZeRO-2: only rank 1's weights turn NaN (step 5 on). DeepSpeed skips the overflowing steps (grad norm
    inf), rank 0's loss stays finite, and still both ranks stop at step 6, naming rank 1."""
    config = _config(tmp_path, tiny_model_dir, data_file, max_steps=9, save_strategy="steps", save_steps=3)
    text = config.read_text() + "guard: {max_nonfinite_steps: 2}\n"
    config.write_text(text)
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = _start(_torchrun(config), log, poison={"step": 5, "rank": 1})
    try:
        _wait_for(lambda: is_complete(out / "checkpoint-3") and len(_logged(out)) >= 4, proc, log)
        good = _digests(out / "checkpoint-3")
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert proc.returncode != 0
    assert "exitcode  : 3" in output  # dsft's NonFiniteError on the ranks, as torchrun reports it
    message = next(line for line in output.splitlines() if "dsft: error: training stopped" in line)
    assert "loss on rank 1" in message and "gradient norm (inf)" in message
    steps = _assert_guard_stopped(out, message, first_bad=5, stop=6, good=good)
    assert steps[5]["nonfinite_loss_ranks"] == [1] and steps[5]["grad_norm"] == float("inf")
    assert all(v == v for v in steps[5]["loss"]), "rank 0's own loss was finite"  # rank 0 writes the report


def test_guard_blocks_saves_on_non_finite_steps_and_stops_only_after_k_in_a_row(tmp_path):
    """The decision alone, one process: a transient non-finite step is not saved but does not stop the run; a
    finite step resets the count; K in a row stop it, with the report written."""
    from types import SimpleNamespace

    import torch
    from transformers import TrainerControl

    from dsft.guards import NonFiniteGuard

    guard = NonFiniteGuard(max_steps=2)
    model = torch.nn.Linear(2, 1)
    args = SimpleNamespace(fp16=False, world_size=1, process_index=0, device="cpu", output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, log_history=[{"loss": 1.0, "step": 1}])

    def step(loss: float, grad: float) -> TrainerControl:
        guard._record_loss(model, None, {"loss": torch.tensor(loss)})
        model.weight.grad = torch.full_like(model.weight, grad)
        guard.on_pre_optimizer_step(args, state, TrainerControl(), model=model)
        state.global_step += 1
        control = TrainerControl(should_save=True)
        guard.on_step_end(args, state, control)
        return control

    nan, inf = float("nan"), float("inf")
    assert step(1.0, 0.1).should_save
    transient = step(nan, 0.1)
    assert not transient.should_save and not transient.should_training_stop and guard.tripped is None
    assert step(1.0, 0.1).should_save and guard.streak == 0  # a finite step resets the count
    assert not step(1.0, inf).should_save and guard.streak == 1  # a non-finite gradient norm counts too
    stop = step(nan, 0.1)
    assert stop.should_training_stop and not stop.should_save and not stop.should_evaluate
    assert "training stopped at step 5" in guard.tripped and "since step 4" in guard.tripped
    report = json.loads((tmp_path / "dsft_nonfinite.json").read_text())
    assert [r["step"] for r in report["recent_steps"]] == [1, 2, 3, 4, 5]
    assert report["recent_steps"][3]["grad_norm"] == inf and report["recent_steps"][4]["nonfinite_loss_ranks"] == [0]


# --------------------------------------------------------------------------------------------------
# 4. safe resume, finished runs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, data_file) -> Path:
    """A finished 4-step single-process run that saved checkpoint-2 and checkpoint-4."""
    from dsft.cli import main

    d = tmp_path_factory.mktemp("finished")
    assert main(["train", str(_config(d, tiny_model_dir, data_file, deepspeed=None, max_steps=4,
                                      save_strategy="steps", save_steps=2))]) == 0
    return d


def test_a_finished_run_is_not_trained_over_without_overwrite(finished_run, tmp_path, tiny_model_dir, data_file,
                                                               capsys):
    import shutil

    from dsft.cli import main

    out = tmp_path / "out"
    shutil.copytree(finished_run / "out", out)  # the module's finished run stays as it is for the other tests
    config = _config(tmp_path, tiny_model_dir, data_file, deepspeed=None, max_steps=4, save_strategy="steps",
                     save_steps=2)
    before = {p.name: _digests(p) for p in list_checkpoints(out)}
    done = (out / "dsft_done.json").read_text()
    capsys.readouterr()
    auto = ["--set", "train.resume_from_checkpoint=auto"]
    for extra, why in (([], "choose another output_dir"), (auto, "with train.max_steps=4 leaves nothing to train")):
        assert main(["train", str(config), *extra]) == 2
        err = capsys.readouterr().err
        assert "dsft: error: train.output_dir:" in err and "holds a finished run (completed at step 4" in err
        assert why in err and "--overwrite" in err and "Traceback" not in err
    assert {p.name: _digests(p) for p in list_checkpoints(out)} == before
    assert (out / "dsft_done.json").read_text() == done

    # continuing it (more steps) is a resume: checkpoint-4 -> step 5, finished again at step 5
    assert main(["train", str(config), "--set", "train.resume_from_checkpoint=auto",
                 "--set", "train.max_steps=5"]) == 0
    assert [r["step"] for r in _logged(out) if "loss" in r][-1] == 5
    assert json.loads((out / "dsft_done.json").read_text())["global_step"] == 5

    # --overwrite: the old checkpoints and markers go, a fresh 1-step run takes the dir
    assert main(["train", str(config), "--overwrite", "--set", "train.max_steps=1"]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]  # the Trainer saves the last step
    assert json.loads((out / "dsft_done.json").read_text())["global_step"] == 1


def test_resume_with_changed_model_or_data_is_refused_with_a_diff(finished_run, tmp_path, tiny_model_dir,
                                                                   data_file, capsys):
    import shutil

    from dsft.cli import main

    other_data = write_jsonl(tmp_path / "other.jsonl", copy_task_rows(40, seed=7))
    shutil.copytree(finished_run / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-2")
    saved = _digests(tmp_path / "out" / "checkpoint-2")
    config = _config(tmp_path, tiny_model_dir, str(other_data), deepspeed=None, max_steps=3, save_strategy="no",
                     resume_from_checkpoint="auto")
    capsys.readouterr()
    rc = main(["train", str(config), "--set", "data.max_seq_len=48", "--set", "model.attn_implementation=eager"])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = next(x for x in err.splitlines() if x.startswith("dsft: error:"))
    assert "train.resume_from_checkpoint:" in line and "checkpoint-2 was written with a different config" in line
    assert f"data.train: '{data_file}' -> '{other_data}'" in line
    assert "data.max_seq_len: 64 -> 48" in line and "model.attn_implementation: 'sdpa' -> 'eager'" in line
    assert "--force" in line and "Traceback" not in err
    assert not (tmp_path / "out" / "dsft_config.yaml").exists()  # refused before anything was written

    # train.* changes (batch size, accumulation: e.g. a new world size) are a legitimate resume
    assert main(["train", str(config), "--set", f"data.train={data_file}",
                 "--set", "train.gradient_accumulation_steps=2"]) == 0
    assert _digests(tmp_path / "out" / "checkpoint-2") == saved
    steps = [r["step"] for r in _logged(tmp_path / "out") if "loss" in r]
    assert steps == [3]


def test_force_resumes_despite_the_diff(finished_run, tmp_path, tiny_model_dir, data_file, caplog):
    import logging
    import shutil

    from dsft.cli import main

    shutil.copytree(finished_run / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-2")
    config = _config(tmp_path, tiny_model_dir, data_file, deepspeed=None, max_steps=3, save_strategy="no",
                     resume_from_checkpoint="last")
    with caplog.at_level(logging.WARNING, logger="dsft"):
        assert main(["train", str(config), "--force", "--set", "data.max_seq_len=48"]) == 0
    assert "resuming" in caplog.text and "data.max_seq_len: 64 -> 48" in caplog.text
    assert [r["step"] for r in _logged(tmp_path / "out") if "loss" in r] == [3]


def test_a_fresh_start_does_not_write_over_an_unfinished_runs_checkpoints(finished_run, tmp_path, tiny_model_dir,
                                                                          data_file, capsys):
    import shutil

    from dsft.cli import main

    shutil.copytree(finished_run / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-2")
    config = _config(tmp_path, tiny_model_dir, data_file, deepspeed=None, max_steps=2)
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints (checkpoint-2) of an unfinished run" in err
    assert "resume_from_checkpoint: auto" in err and "--overwrite" in err
