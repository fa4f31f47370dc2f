"""Multi-process training on CPU with gloo: real torchrun and deepspeed launchers, 2 ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_task_rows, free_port, write_jsonl

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dist_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("dist-data")
    rows = copy_task_rows(160, seed=1)
    return {"train": str(write_jsonl(d / "train.jsonl", rows))}


TEMPLATES = ("zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload", "zero3_multinode")


def _config(tmp_path: Path, model_dir: Path, data: dict, deepspeed: str | None, dtype: str, steps: int = 10,
            peft: dict | None = None, **train) -> Path:
    """A 2-rank-sized run config in ``tmp_path`` (created) writing to ``tmp_path/out``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {"train": data["train"], "format": "prompt_completion", "max_seq_len": 64, "packing": True,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "out"), "learning_rate": 2e-3, "max_steps": steps,
                  "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1,
                  "seed": 0, "data_seed": 0, "report_to": "none", "save_strategy": "no",
                  "gradient_checkpointing": True, "bf16": dtype == "bf16", **train},
    }
    if deepspeed:
        raw["deepspeed"] = deepspeed
    if peft:
        raw["peft"] = peft
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    return env


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def _logs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "dsft_log.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _logs(out) if "loss" in r]


def _run_info(out: Path) -> dict:
    return json.loads((out / "dsft_run_info.json").read_text())


def torchrun(config: Path, nproc: int = 2) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "dsft.run", "--config", str(config)]  # the module entry


def deepspeed_launcher(config: Path, nproc: int = 2) -> list[str]:
    # the module entry as sbatch scripts start it; the launcher appends --local_rank=N, which dsft.run accepts
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "--module", "dsft.run", "--config", str(config)]


def _matrix_configs(root: Path, model_dir: Path, data: dict, with_resume: bool) -> list[Path]:
    """Per template: fp32 (checkpoints at 5 and 10), [fp32 resumed from checkpoint-5 in a new dir], bf16."""
    configs = []
    for template in TEMPLATES:
        fp32 = root / f"{template}-fp32"
        configs.append(_config(fp32, model_dir, data, template, "fp32", save_strategy="steps", save_steps=5))
        if with_resume:
            configs.append(_config(root / f"{template}-resumed", model_dir, data, template, "fp32",
                                   resume_from_checkpoint=str(fp32 / "out" / "checkpoint-5")))
        configs.append(_config(root / f"{template}-bf16", model_dir, data, template, "bf16"))
    return configs


@pytest.fixture(scope="module")
def torchrun_matrix(tmp_path_factory, tiny_model_dir, dist_data) -> Path:
    """Every template, fp32 and bf16, plus a resume from step 5, under torchrun: one launch runs them one after
    another through dsft.train.run (tests/run_configs.py), since each launch costs ~15 s of start-up here."""
    root = tmp_path_factory.mktemp("matrix-torchrun")
    configs = _matrix_configs(root, tiny_model_dir, dist_data, with_resume=True)
    _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
          str(free_port()), "tests/run_configs.py", *map(str, configs)], timeout=1200)
    return root


@pytest.fixture(scope="module")
def deepspeed_matrix(tmp_path_factory, tiny_model_dir, dist_data) -> Path:
    """Every template, fp32 and bf16, under the deepspeed launcher given a hostfile of localhost slots."""
    root = tmp_path_factory.mktemp("matrix-deepspeed")
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    configs = _matrix_configs(root, tiny_model_dir, dist_data, with_resume=False)
    # one host in the hostfile: the launcher starts both ranks locally (no ssh); skip its ssh reachability probe
    _run([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
          "--master_port", str(free_port()), "tests/run_configs.py", *map(str, configs)], timeout=1200)
    return root


def _check_trained_in_one_world(out: Path, template: str) -> list[float]:
    info = _run_info(out)
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert sorted(r["rank"] for r in info["ranks"]) == [0, 1]
    assert len({r["pid"] for r in info["ranks"]}) == 2
    assert all(r["threads"] == 1 for r in info["ranks"])  # cores / local ranks on this 2-core machine
    assert all(r["activation_checkpointing"] for r in info["ranks"])
    assert info["deepspeed_zero_stage"] == int(template[4])
    losses = _losses(out)
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    return losses


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_trains_under_torchrun(torchrun_matrix, template):
    for dtype in ("fp32", "bf16"):
        _check_trained_in_one_world(torchrun_matrix / f"{template}-{dtype}" / "out", template)
    from transformers import AutoModelForCausalLM

    # the final save is a normal HF dir (ZeRO-3: 16-bit weights gathered on save)
    model = AutoModelForCausalLM.from_pretrained(str(torchrun_matrix / f"{template}-fp32" / "out"))
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_trains_under_the_deepspeed_launcher(deepspeed_matrix, torchrun_matrix, template):
    for dtype in ("fp32", "bf16"):
        losses = _check_trained_in_one_world(deepspeed_matrix / f"{template}-{dtype}" / "out", template)
        # same code under either launcher: the same losses
        reference = _losses(torchrun_matrix / f"{template}-{dtype}" / "out")
        assert losses == pytest.approx(reference, rel=1e-5), (losses, reference)


def test_zero_stages_and_accumulation_give_the_same_losses(tmp_path, tiny_model_dir, dist_data, torchrun_matrix):
    """Same seed and global batch: every template agrees with ZeRO-0 (fp32, rel 1e-3), and 1 rank x accumulation 2
    agrees with 2 ranks x accumulation 1."""
    runs = {t: _losses(torchrun_matrix / f"{t}-fp32" / "out") for t in TEMPLATES}
    _run(torchrun(_config(tmp_path / "one-rank", tiny_model_dir, dist_data, "zero0", "fp32",
                          gradient_accumulation_steps=2), nproc=1))
    runs["1x2"] = _losses(tmp_path / "one-rank" / "out")
    reference = runs["zero0"]
    assert len(reference) == 10
    worst = {n: max(abs(a - b) / abs(b) for a, b in zip(l, reference)) for n, l in runs.items() if n != "zero0"}
    print("max relative loss difference vs ZeRO-0 over 10 steps:", worst)
    for name, losses in runs.items():
        assert len(losses) == 10, name
        for step, (a, b) in enumerate(zip(losses, reference), start=1):
            assert abs(a - b) / abs(b) < 1e-3, f"{name} step {step}: {a} vs zero0 {b}"


@pytest.mark.parametrize("template", TEMPLATES)
def test_resume_continues_step_optimizer_and_schedule(torchrun_matrix, template):
    """10 straight steps vs resume from checkpoint-5: steps 6-10 have the same loss (optimizer state restored) and
    the same learning rate (scheduler restored)."""
    straight = {r["step"]: r for r in _logs(torchrun_matrix / f"{template}-fp32" / "out") if "loss" in r}
    resumed = {r["step"]: r for r in _logs(torchrun_matrix / f"{template}-resumed" / "out") if "loss" in r}
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    for step, r in resumed.items():
        assert abs(r["loss"] - straight[step]["loss"]) / straight[step]["loss"] < 1e-3, (step, r, straight[step])
        assert r["learning_rate"] == pytest.approx(straight[step]["learning_rate"], rel=1e-6)


def test_two_nodes_over_loopback_torchrun_c10d(tmp_path, tiny_model_dir, dist_data):
    """2 nodes x 1 rank: two torchrun agents joined by a c10d rendezvous on 127.0.0.1."""
    config = _config(tmp_path, tiny_model_dir, dist_data, "zero2", "fp32", steps=4)
    port = free_port()
    cmds = [[str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
             "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "dsft-loopback", "launch/train.py",
             "--config", str(config)] for _ in range(2)]
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n=====\n".join(o[-3000:] for o in outputs)
    info = _run_info(tmp_path / "out")
    assert info["world_size"] == 2
    assert sorted(r["node_rank"] for r in info["ranks"]) == [0, 1]
    assert all(r["local_rank"] == 0 for r in info["ranks"])
    assert len(_losses(tmp_path / "out")) == 4


def test_two_nodes_deepspeed_launcher_no_ssh(tmp_path, tiny_model_dir, dist_data):
    """2 nodes x 1 rank with the deepspeed launcher's no-ssh mode: one launcher per node, same hostfile."""
    config = _config(tmp_path, tiny_model_dir, dist_data, "zero3", "fp32", steps=4)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    cmds = [[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
             "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py", "--config", str(config)]
            for rank in range(2)]
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n=====\n".join(o[-3000:] for o in outputs)
    info = _run_info(tmp_path / "out")
    assert info["world_size"] == 2 and info["deepspeed_zero_stage"] == 3
    assert sorted(r["rank"] for r in info["ranks"]) == [0, 1]
    assert len(_losses(tmp_path / "out")) == 4


@pytest.fixture(params=["zero2", "zero3"])
def checkpointed_run(request, torchrun_matrix) -> tuple[str, Path, list[float]]:
    """A 10-step 2-rank fp32 run that saved checkpoint-5 and checkpoint-10: (template, output dir, losses)."""
    out = torchrun_matrix / f"{request.param}-fp32" / "out"
    return request.param, out, _losses(out)


def _resume_from_step_5(checkpointed_run, workdir: Path, tiny_model_dir, dist_data, nproc: int = 2,
                        **train) -> dict[int, float]:
    """Copy checkpoint-5 into a new output dir, resume there, and return the losses logged after it."""
    import shutil

    template, out, _ = checkpointed_run
    workdir.mkdir()
    shutil.copytree(out / "checkpoint-5", workdir / "out" / "checkpoint-5")
    _run(torchrun(_config(workdir, tiny_model_dir, dist_data, template, "fp32", save_strategy="steps",
                          save_steps=5, resume_from_checkpoint="last", **train), nproc=nproc))
    logs = [json.loads(line) for line in (workdir / "out" / "dsft_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in logs if "loss" in r}


def _assert_continues(after: dict[int, float], reference: list[float]) -> None:
    assert sorted(after) == [6, 7, 8, 9, 10]
    for step, loss in after.items():
        assert abs(loss - reference[step - 1]) / reference[step - 1] < 1e-3, (step, loss, reference[step - 1])


def test_consolidate_gives_the_weights_of_the_final_save(tmp_path, checkpointed_run):
    _, out, _ = checkpointed_run

    # dsft consolidate (zero_to_fp32) of the last checkpoint gives the weights the final save wrote
    import torch
    from transformers import AutoModelForCausalLM

    proc = _run([sys.executable, "-m", "dsft", "consolidate", str(out / "checkpoint-10"),
                 "--out", str(tmp_path / "consolidated")])
    assert "consolidated model saved" in proc.stdout
    final = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "consolidated"), dtype=torch.float32).state_dict()
    assert final.keys() == merged.keys()
    for key in final:
        assert torch.equal(final[key], merged[key]), key


def test_resume_on_a_different_world_size_goes_through_universal_checkpoint(tmp_path, tiny_model_dir, dist_data,
                                                                             checkpointed_run):
    """2 ranks saved at step 5; 1 rank x accumulation 2 (same global batch) resumes: dsft notices the world-size
    change, converts with ds_to_universal and continues the same loss trajectory; then back to 2 ranks."""
    template, _, reference = checkpointed_run
    one = tmp_path / "one"
    after = _resume_from_step_5(checkpointed_run, one, tiny_model_dir, dist_data, nproc=1,
                                gradient_accumulation_steps=2)
    assert (one / "out" / "checkpoint-5" / "latest_universal").is_file()
    _assert_continues(after, reference)

    # and back: the 1-rank checkpoint-10 resumes on 2 ranks for 2 more steps
    back = _config(one, tiny_model_dir, dist_data, template, "fp32", steps=12, save_strategy="no",
                   resume_from_checkpoint=str(one / "out" / "checkpoint-10"))
    _run(torchrun(back))
    assert (one / "out" / "checkpoint-10" / "latest_universal").is_file()
    steps = [json.loads(line).get("step") for line in (one / "out" / "dsft_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps[-2:] == [11, 12]


def test_zero3_loads_partitioned_and_lora_saves_a_real_adapter(tmp_path, tiny_model_dir, dist_data):
    """Under the deepspeed launcher with ZeRO-3: from_pretrained runs inside zero.Init, so after loading each rank holds about half of the
    parameters; LoRA under ZeRO-3 saves a non-empty, trained adapter."""
    import torch
    from safetensors.torch import load_file

    config = _config(tmp_path, tiny_model_dir, dist_data, "zero3", "bf16", peft={"lora": {"r": 4, "alpha": 8}})
    _run(deepspeed_launcher(config))  # deepspeed --num_gpus 2 --module dsft.run
    info = _run_info(tmp_path / "out")
    for r in info["ranks"]:
        share = r["param_elements_held"] / r["param_elements_total"]
        assert 0.4 < share < 0.6, (r, share)
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.numel() > 0 for t in adapter.values())
    assert any(t.float().abs().sum() > 0 for t in lora_b)  # trained away from its zero init
    assert torch.isfinite(torch.tensor(_losses(tmp_path / "out"))).all()




def _with_unexpected_weight(src: Path, dst: Path) -> Path:
    """A copy of the tiny model whose checkpoint holds one tensor the architecture lacks: transformers' LOAD REPORT
    (UNEXPECTED) then has something to say on every rank that loads outside zero.Init."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights["model.unused_probe.weight"] = torch.zeros(2)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _launch(cmd: list[str]) -> tuple[int, str]:
    """stdout and stderr of a launch as one text, as a user sees it on a console."""
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout


def test_multi_rank_console_shows_each_fact_once_and_a_bad_config_as_one_line(tmp_path, tiny_model_dir, dist_data):
    """Issue 13 point 6, under torchrun with 2 ranks: a ZeRO-3 run (2 steps, accumulation 2, an eval) prints no
    deprecation warnings (DeepSpeed's use of torch's deprecated collectives), not accelerate's by-design "gradient
    accumulation steps mismatch", and each fact once: the data summary, the eval, "saved to".
    A bad config is one ``dsft: error:`` line from rank 0, no traceback from dsft, every rank exiting 2."""
    model = _with_unexpected_weight(tiny_model_dir, tmp_path / "model")
    config = _config(tmp_path / "good", model, dist_data, "zero3", "fp32", steps=2, gradient_accumulation_steps=2,
                     eval_strategy="no")
    raw = yaml.safe_load(config.read_text())
    raw["data"]["eval_fraction"] = 0.1
    config.write_text(yaml.safe_dump(raw))
    rc, out = _launch(torchrun(config))
    assert rc == 0, out[-5000:]
    lines = out.splitlines()

    def count(text: str) -> int:
        return sum(text in line for line in lines)

    assert count("FutureWarning") == 0 and count("DeprecationWarning") == 0, out[-5000:]
    assert count("Gradient accumulation steps mismatch") == 0
    # transformers 5.23 reports an unexpected weight when it loads outside zero.Init (ZeRO-0/1/2), not under ZeRO-3:
    # at most rank 0's (the filter on the other ranks: test_load_report_is_left_to_rank_0)
    assert count("LOAD REPORT") <= 1
    # transformers' "The tokenizer has new PAD/BOS/EOS tokens" line (Trainer.train(), every rank) reported the pad id
    # the model config lacked; dsft sets it first (dsft.model.align_pad_token), so for this model it has nothing to
    # say on any rank (a contradicting BOS/EOS would still show, rank 0's only: tests/test_console.py)
    assert count("The tokenizer has new PAD/BOS/EOS tokens") == 0, out[-5000:]
    assert count("built successfully") == 0  # DeepSpeed's shm op line, every rank every run
    assert count("INFO dsft: data train:") == 1
    assert sum(line.startswith("eval_loss ") for line in lines) == 1
    assert count("saved to ") == 1

    bad = _config(tmp_path / "bad", tiny_model_dir, dist_data, "zero3", "fp32", steps=2, learning_rat=1e-3)
    rc, out = _launch(torchrun(bad))
    errors = [line for line in out.splitlines() if line.startswith("dsft: error:")]
    assert errors == ["dsft: error: unknown key 'learning_rat' in section 'train': did you mean 'learning_rate'? "
                      "(TrainingArguments field)"], out
    assert not [line for line in out.splitlines() if 'File "' in line and "/dsft/" in line], out  # no dsft frames
    # torchrun turns any child failure into its own ChildFailedError report (with its own traceback) and exit
    # status 1. Its root cause is rank 0 exiting 2 after printing (before the fix, rank 1 exited first and torchrun
    # killed rank 0 before it printed). Rank 1 exits 2 too, unless torchrun's SIGTERM reaches it while it is still
    # importing (under load): then -15, which says nothing about dsft.
    assert rc == 1, out
    root = out[out.index("Root Cause"):]
    assert "rank      : 0" in root and "exitcode  : 2 " in root, out
