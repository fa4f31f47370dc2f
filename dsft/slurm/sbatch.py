"""``dsft sbatch``: render the sbatch templates (``slurm/`` in the repo, installed as ``dsft.templates.slurm``)
from a run config, for users who submit by hand. The scripts start the module entry (``torchrun -m dsft.run``,
``deepspeed --module dsft.run``), so they work wherever dsft is installed, not only in a clone.

Placeholders are ``{{name}}``; every value is quoted when it is put in: ``shlex.quote`` in the shell part, and in
``#SBATCH`` lines the quoting sbatch's own parser understands (shlex quoting, with backslashes doubled: sbatch
reads a backslash as an escape even inside single quotes) and ``%`` doubled in file names (sbatch patterns).
The ``#SBATCH`` lines come from ``dsft.slurm.resources``, as ``dsft submit``'s do.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from dsft import templates
from dsft.config import RunConfig
from dsft.errors import DsftError
from dsft.slurm.resources import per_node_launcher_resources, tasks_per_node
from dsft.slurm.submit import job_dir_of

TEMPLATES_DIR = templates.directory("slurm")  # or $DSFT_SLURM_TEMPLATES
LAUNCHERS = ("torchrun", "deepspeed")
ENTRY_MODULE = "dsft.run"  # the training entry every rank runs (python -m)
DEFAULT_PORT = 29500
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def sbatch_quote(value: Any) -> str:
    """A value for an #SBATCH line, as sbatch's parser reads it back unchanged."""
    return shlex.quote(str(value).replace("\\", "\\\\"))


def directives(options: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        lines.append(f"#SBATCH {flag}" if value is True else f"#SBATCH {flag}={sbatch_quote(value)}")
    return lines


def _executable(name: str) -> str:
    # the launcher of the environment dsft runs in (the venv's), else whatever is on PATH on the nodes
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def render(cfg: RunConfig, config_path: str, launcher: str, overrides: list[str] = (), port: int = DEFAULT_PORT,
           job_dir: str | None = None, workdir: str | None = None, executables: dict[str, str] | None = None,
           module: str = ENTRY_MODULE) -> str:
    """The sbatch script for ``launcher`` (torchrun | deepspeed). ``config_path`` is what the job reads at run
    time; ``overrides`` are passed on as ``--set``; the job runs in ``workdir`` (default: here), which relative
    paths in the config are relative to. When Slurm requeues the job (``--requeue``) it resumes from the newest
    checkpoint in output_dir (``train.resume_from_checkpoint=auto`` unless the config sets it). The script requeues
    itself when its step fails, and stops requeueing after ``slurm.max_requeues`` requeues of any cause. A user
    error (dsft's exit code 2: config, data, a full disk) is final: the script runs ``dsft validate`` before the
    step, and a step that stops on such an error (dsft.run.USER_ERROR_FILE_ENV) leaves the job failed with exit
    code 2, not requeued."""
    if launcher not in LAUNCHERS:
        raise DsftError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    template = TEMPLATES_DIR / f"{launcher}.sbatch"
    if not template.is_file():
        raise DsftError(f"{template}: sbatch template not found (set $DSFT_SLURM_TEMPLATES to a copy of slurm/)")
    s = cfg.slurm
    if job_dir is None:
        job_dir = str(job_dir_of(cfg))
    options = per_node_launcher_resources(s)
    options.update({"chdir": workdir or os.getcwd(), "output": job_dir.replace("%", "%%") + "/%x-%j.out",
                    "open_mode": "append"})
    # the script itself stops requeueing once slurm.max_requeues is used up (SLURM_RESTART_COUNT); with a budget
    # of 0 Slurm is not to requeue it at all
    options["requeue" if s.max_requeues > 0 else "no_requeue"] = True
    sets = list(overrides)
    if cfg.train.get("resume_from_checkpoint") in (None, False, "auto") and not any(
            item.startswith("train.resume_from_checkpoint=") for item in sets):
        sets.append("train.resume_from_checkpoint=auto")
    executables = executables or {name: _executable(name) for name in LAUNCHERS}
    values = {
        "directives": "\n".join(directives(options)),
        "tasks_per_node": str(tasks_per_node(s)),
        "port": str(int(port)),
        "job_dir": shlex.quote(job_dir),
        "torchrun": shlex.quote(executables["torchrun"]),
        "deepspeed": shlex.quote(executables["deepspeed"]),
        "python": shlex.quote(executables.get("python") or sys.executable),  # runs `dsft validate` before the step
        "module": shlex.quote(module),
        "config": shlex.quote(config_path),
        "overrides": "".join(f" --set {shlex.quote(item)}" for item in sets),
        "max_requeues": str(int(s.max_requeues)),
    }

    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise DsftError(f"{template}: unknown placeholder {match.group(0)}")
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, template.read_text(encoding="utf-8"))
