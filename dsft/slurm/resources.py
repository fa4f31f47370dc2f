"""The ``slurm:`` section -> Slurm resource requests: one mapping used by ``dsft submit`` / ``dsft sweep``
(through submitit) and by the rendered sbatch templates, so both ask for the same allocation."""

from __future__ import annotations

import dataclasses
from typing import Any

from dsft.config import SlurmConfig, check_slurm_config


def with_overrides(s: SlurmConfig | None, **flags: Any) -> SlurmConfig:
    """The section (or its defaults) with the command-line flags that were given (not None) on top, checked."""
    s = dataclasses.replace(s or SlurmConfig(), **{k: v for k, v in flags.items() if v is not None})
    check_slurm_config(s)
    return s


def tasks_per_node(s: SlurmConfig) -> int:
    """Ranks per node: one per device, or the configured number (CPU)."""
    if s.tasks_per_node is not None:
        return s.tasks_per_node
    return s.gpus_per_node or 1


def resources(s: SlurmConfig) -> dict[str, Any]:
    """Per-job resource requests as sbatch long options (with underscores, as submitit names them), one task per
    rank. Only what is set: the cluster's defaults apply to the rest."""
    out: dict[str, Any] = {"job_name": s.job_name, "nodes": s.nodes, "ntasks_per_node": tasks_per_node(s),
                           "time": s.time_min}
    if s.cpus_per_task is not None:
        out["cpus_per_task"] = s.cpus_per_task
    if s.gpus_per_node:
        out["gpus_per_node"] = s.gpus_per_node
    if s.mem is not None:
        out["mem"] = str(s.mem)
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key) is not None:
            out[key] = getattr(s, key)
    if s.exclusive:
        out["exclusive"] = True
    return out


def per_node_launcher_resources(s: SlurmConfig) -> dict[str, Any]:
    """The same allocation for scripts that start ONE launcher task per node (torchrun, deepspeed) which then
    starts the ranks: one task per node holding all of the node's rank CPUs."""
    out = resources(s)
    ranks = out["ntasks_per_node"]
    out["ntasks_per_node"] = 1
    out["cpus_per_task"] = ranks * (s.cpus_per_task or 1)
    return out
