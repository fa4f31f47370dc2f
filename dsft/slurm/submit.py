"""``dsft submit`` and ``dsft status``: a run config -> a submitit job on Slurm, and what became of it.

Layout of a submitted job (``slurm.job_dir``, default ``<train.output_dir>/slurm``)::

    <job_dir>/submitted-<time>-<id>.yaml   the config as submitted (overrides and flags applied, resume: auto)
    <job_dir>/<job id>/                    submitit's folder: sbatch script, pickles, per-rank logs
        <job id>_<rank>_log.out / .err
        dsft_job.json                      what `dsft status` reads
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft.config import (LOG_FILE_NAME, RESOLVED_CONFIG_NAME, RunConfig, apply_override, dump_yaml, from_dict,
                         read_yaml, validate)
from dsft.deepspeed import prepare_for_run
from dsft.errors import ConfigError, DsftError
from dsft.fsutil import atomic_write_text
from dsft.slurm.resources import resources, tasks_per_node, with_overrides

JOB_INFO_NAME = "dsft_job.json"
# train.resume_from_checkpoint values a Slurm job may keep: they resume from the newest checkpoint on requeue too
_REQUEUE_SAFE_RESUME = ("auto", "last", "true")


def require_slurm(command: str) -> None:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise DsftError(f"{command}: no Slurm on this machine (sbatch/srun not on PATH); run it on a Slurm login "
                        "node, or render a script with `dsft sbatch`")


def effective_config(config: str, overrides: list[str], slurm_flags: dict[str, Any]) -> tuple[dict, RunConfig]:
    """The run config as a job will see it: ``--set`` overrides and the Slurm flags applied, resuming set to
    ``auto`` (a requeued job continues from the newest checkpoint in output_dir), checked. Returns the raw dict
    (what is written for the job) and the typed config."""
    raw = read_yaml(config)
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw)
    slurm = with_overrides(cfg.slurm, **slurm_flags)
    resume = cfg.train.get("resume_from_checkpoint")
    if resume not in (None, False) and str(resume).lower() not in (*_REQUEUE_SAFE_RESUME, "false", "no", "none"):
        raise ConfigError(f"train.resume_from_checkpoint: {resume!r} would be resumed again after every requeue; "
                          "a Slurm job resumes from the newest checkpoint in train.output_dir by itself (copy the "
                          "checkpoint there, or leave the key out)")
    raw = dict(raw, slurm=dataclasses.asdict(slurm), train=dict(raw.get("train") or {}))
    if resume in (None, False) or str(resume).lower() in ("false", "no", "none"):
        raw["train"]["resume_from_checkpoint"] = "auto"
    cfg = from_dict(raw)
    validate(cfg)
    if cfg.deepspeed:  # the DeepSpeed linter for the job's real shape (world size, devices per node)
        prepare_for_run(cfg, slurm.nodes * tasks_per_node(slurm), tasks_per_node(slurm))
    return raw, cfg


def job_dir_of(cfg: RunConfig) -> Path:
    """Where job scripts and logs go. Slurm's --output cannot name a path with a backslash (one turns its file
    name patterns off and is dropped), so such a directory is refused."""
    path = Path(cfg.slurm.job_dir or Path(cfg.train["output_dir"]) / "slurm").absolute()
    if "\\" in str(path):
        key = "slurm.job_dir" if cfg.slurm.job_dir else "train.output_dir (the default slurm.job_dir is under it)"
        raise ConfigError(f"{key}: {path} has a backslash, which Slurm's --output file names cannot hold; "
                          "set slurm.job_dir to a path without one")
    return path


def write_submitted_config(raw: dict, directory: Path, name: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = name or f"submitted-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.yaml"
    path = directory / name
    return atomic_write_text(path, dump_yaml(raw))


def sbatch_refused(e: Exception) -> DsftError:
    """submitit raises FailedJobError with sbatch's stderr when sbatch refuses a job: one line of it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return DsftError(f"sbatch refused the job: {lines[-1] if lines else type(e).__name__}")


def make_executor(cfg: RunConfig, folder: Path):
    """submitit's Slurm executor with the job's resources (the same ones the sbatch templates request)."""
    import submitit  # deferred: the optional `slurm` extra; dsft sbatch and dsft status work without it

    s = cfg.slurm
    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=s.max_num_timeout)
    executor.update_parameters(**resources(s), signal_delay_s=s.signal_delay_s, array_parallelism=s.array_parallelism)
    return executor


@dataclass
class Submitted:
    job: Any  # submitit.slurm.slurm.SlurmJob
    folder: Path
    info: dict

    def log_paths(self) -> list[str]:
        from submitit.core.utils import JobPaths  # deferred: the optional `slurm` extra (see make_executor)

        return [str(JobPaths(self.folder, self.job.job_id, task_id=t).stdout) for t in range(self.info["tasks"])]


def write_job_info(folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / JOB_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def submit(config: str, overrides: list[str], slurm_flags: dict[str, Any]) -> Submitted:
    """Submit one training job: every task runs dsft.slurm.job.SlurmTraining (the training entry of dsft train)."""
    require_slurm("dsft submit")
    raw, cfg = effective_config(config, overrides, slurm_flags)
    # deferred: the worker module loads submitit (the optional `slurm` extra) and transformers (dsft.preemption's
    # TrainerCallback), which the other Slurm commands do not need
    from dsft.slurm.job import SlurmTraining
    from submitit.core.utils import FailedJobError

    job_dir = job_dir_of(cfg)
    submitted = write_submitted_config(raw, job_dir)
    executor = make_executor(cfg, job_dir / "%j")

    try:
        job = executor.submit(SlurmTraining(str(submitted), cfg.slurm.max_requeues))
    except FailedJobError as e:
        raise sbatch_refused(e) from None
    folder = Path(job.paths.folder)
    info = {"job_id": job.job_id, "config": str(submitted), "source_config": str(Path(config).absolute()),
            "output_dir": str(Path(cfg.train["output_dir"]).absolute()), "nodes": cfg.slurm.nodes,
            "tasks": cfg.slurm.nodes * tasks_per_node(cfg.slurm), "submitted_at": time.time()}
    write_job_info(folder, info)
    return Submitted(job, folder, info)


def wait(sub: Submitted) -> tuple[bool, list | str]:
    """Block until the job ends (through requeues). (True, per-rank results) or (False, the error's last line)."""
    try:
        return True, sub.job.results()
    except Exception as e:  # submitit re-raises the job's failure (its traceback text) here
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        return False, lines[-1] if lines else type(e).__name__


def follow(sub: Submitted, what: str, logs: str, block: bool) -> tuple[int, list | None]:
    """Print the submitted job (id, folder, logs); with ``block``, wait for its end: (0, results) on success,
    (1, None) on failure (said on stderr); (0, None) without ``block``."""
    print(f"submitted job {sub.job.job_id}: {what}")
    print(f"job folder: {sub.folder}   (dsft status {sub.folder})")
    print(f"{logs}: " + " ".join(sub.log_paths()))
    if not block:
        return 0, None
    ok, results = wait(sub)
    if not ok:
        print(f"job {sub.job.job_id} failed: {results}", file=sys.stderr)
        return 1, None
    return 0, results


# --------------------------------------------------------------------------------------------------
# status


def _run_quiet(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def job_state(job_id: str) -> str:
    """Slurm's state of a job: squeue while it is queued or running (works without accounting), then sacct
    (finished jobs; needs accounting). UNKNOWN if neither knows it."""
    out = _run_quiet(["squeue", "-h", "-j", job_id, "-o", "%T"]).split()
    if out:
        return out[0]
    lines = _run_quiet(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]).splitlines()
    states = [line.split()[0] for line in lines if line.strip()]
    return states[-1] if states else "UNKNOWN"


_SOURCE_EVAL_LOSS = re.compile(r"^eval_.+_loss$")


def last_logged(output_dir: str | Path) -> dict:
    """The last training step/loss and eval loss in a run's dsft_log.jsonl (empty if nothing logged yet)."""
    path = Path(output_dir) / LOG_FILE_NAME
    out: dict = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if "loss" in row:
            out["step"], out["loss"] = row.get("step"), row["loss"]
        if "eval_loss" in row:
            out["eval_step"], out["eval_loss"], out["eval_metric"] = row.get("step"), row["eval_loss"], "eval_loss"
        elif per_source := sorted(k for k in row if _SOURCE_EVAL_LOSS.match(k)):
            # named eval sources (data.eval entries with names) log eval_<name>_loss and no eval_loss: rank points
            # by their mean, and say so
            out["eval_step"] = row.get("step")
            out["eval_loss"] = sum(row[k] for k in per_source) / len(per_source)
            out["eval_metric"] = "mean of " + ", ".join(per_source)
    out["finished"] = (Path(output_dir) / RESOLVED_CONFIG_NAME).is_file() and _has_final_model(Path(output_dir))
    return out


def _has_final_model(output_dir: Path) -> bool:
    return any((output_dir / name).is_file() for name in ("model.safetensors", "adapter_model.safetensors",
                                                           "model.safetensors.index.json"))


def read_job_info(path: str | Path) -> dict:
    info_path = Path(path) / JOB_INFO_NAME
    if not info_path.is_file():
        raise DsftError(f"{path}: not a dsft job folder (no {JOB_INFO_NAME}); give the folder `dsft submit` printed")
    return json.loads(info_path.read_text(encoding="utf-8"))


def format_job_status(path: str | Path) -> str:
    info = read_job_info(path)
    logged = last_logged(info["output_dir"])
    lines = [f"job {info['job_id']}: {job_state(info['job_id'])}",
             f"output_dir: {info['output_dir']}"]
    if "step" in logged:
        lines.append(f"last logged step {logged['step']}: loss {logged['loss']:.4f}")
    else:
        lines.append("no training step logged yet")
    if "eval_loss" in logged:
        lines.append(f"last eval (step {logged['eval_step']}): eval_loss {logged['eval_loss']:.4f}")
    lines.append(f"logs: {Path(path).absolute()}/{info['job_id']}_<rank>_log.out|err")
    return "\n".join(lines)
