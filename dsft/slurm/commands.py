"""The Slurm subcommands of ``dsft``: submit, status, sweep, sbatch (thin: parse, call dsft.slurm, print)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from dsft.errors import DsftError
from dsft.slurm.sbatch import render
from dsft.slurm.submit import JOB_INFO_NAME, effective_config, format_job_status, follow, job_dir_of, submit
from dsft.slurm.sweep import SWEEP_INFO_NAME, collect, read_sweep_info, submit_sweep, wait_sweep, write_results

# flag -> slurm config field; every flag overrides the config's `slurm:` section
SLURM_FLAGS = {
    "--nodes": ("nodes", int, "nodes per job"),
    "--gpus-per-node": ("gpus_per_node", int, "GPUs per node (0: CPU nodes)"),
    "--tasks-per-node": ("tasks_per_node", int, "ranks per node (default: gpus per node, or 1)"),
    "--cpus-per-task": ("cpus_per_task", int, "CPU cores per rank"),
    "--partition": ("partition", str, "partition"),
    "--time": ("time_min", int, "time limit in minutes"),
    "--account": ("account", str, "account to charge"),
    "--qos": ("qos", str, "quality of service"),
    "--constraint": ("constraint", str, "node features, e.g. a100"),
    "--mem": ("mem", str, "memory per node, e.g. 64G"),
    "--job-dir": ("job_dir", str, "where scripts and per-rank logs go (default: <output_dir>/slurm)"),
}


def _add_run_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", help="run config YAML")
    sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (YAML syntax), repeatable")
    for flag, (dest, kind, help) in SLURM_FLAGS.items():
        sp.add_argument(flag, dest=f"slurm_{dest}", type=kind, help=help)
    sp.add_argument("--exclusive", dest="slurm_exclusive", action="store_true", default=None, help="whole nodes")


def _slurm_flags(a: argparse.Namespace) -> dict:
    return {k[len("slurm_"):]: v for k, v in vars(a).items() if k.startswith("slurm_")}


def cmd_submit(a: argparse.Namespace) -> int:
    sub = submit(a.config, a.set, _slurm_flags(a))
    code, results = follow(sub, f"{sub.info['tasks']} rank(s) on {sub.info['nodes']} node(s)", "per-rank logs",
                           a.wait)
    if results is None:
        return code
    for r in results:
        print(f"rank {r['rank']}: step {r['global_step']} loss {r['loss']} eval_loss {r['eval_loss']} "
              f"(host {r['host']}, restarts {r['restart']})")
    print(f"job {sub.job.job_id} completed; outputs in {sub.info['output_dir']}")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    path = Path(a.path)
    if (path / SWEEP_INFO_NAME).is_file():
        rows = collect(read_sweep_info(path))
        md, csv_path = write_results(path, rows)
        print(md.read_text(encoding="utf-8"), end="")
        print(f"(written to {md} and {csv_path})")
        return 0
    if not (path / JOB_INFO_NAME).is_file():
        raise DsftError(f"{path}: neither a job folder ({JOB_INFO_NAME}) nor a sweep directory ({SWEEP_INFO_NAME})")
    print(format_job_status(path))
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    flags = _slurm_flags(a)
    if a.parallel is not None:
        flags["array_parallelism"] = a.parallel
    info = submit_sweep(a.config, a.set, flags, a.grid, a.range, a.random, a.seed)
    base = Path(info["points"][0]["output_dir"]).parent
    print(f"submitted job array {info['array_job_id']}: {len(info['points'])} point(s)")
    for p in info["points"]:
        print(f"  {p['job_id']}: {', '.join(f'{k}={v}' for k, v in p['params'].items())} -> {p['output_dir']}")
    print(f"sweep directory: {base}   (dsft status {base})")
    if not a.wait:
        return 0
    ok = wait_sweep(info)
    md, csv_path = write_results(base, collect(info))
    print(md.read_text(encoding="utf-8"), end="")
    print(f"(written to {md} and {csv_path})")
    return 0 if ok else 1


def cmd_sbatch(a: argparse.Namespace) -> int:
    _, cfg = effective_config(a.config, a.set, _slurm_flags(a))
    job_dir = job_dir_of(cfg)
    script = render(cfg, str(Path(a.config).absolute()), a.launcher, a.set, port=a.port)
    job_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the directory of its --output
    if a.out:
        Path(a.out).write_text(script, encoding="utf-8")
        print(f"wrote {a.out}; submit it with: sbatch {a.out}", file=sys.stderr)
    else:
        print(script, end="")
    return 0


def add_slurm_commands(add: Callable[[str, Callable, str], argparse.ArgumentParser]) -> None:
    sp = add("submit", cmd_submit, "Submit a training job to Slurm (submitit); requeued jobs resume by themselves.")
    _add_run_args(sp)
    sp.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 if it completed, else 1")

    sp = add("status", cmd_status, "State, last logged step and loss of a submitted job; a sweep's results table.")
    sp.add_argument("path", help="a job folder (printed by dsft submit) or a sweep directory")

    sp = add("sweep", cmd_sweep, "Grid or random search as one Slurm job array, with a results table.")
    _add_run_args(sp)
    sp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="values to try for a config key (all combinations; with --random: drawn from)")
    sp.add_argument("--range", action="append", default=[], metavar="KEY=LOW:HIGH[:log]",
                    help="with --random: sample a config key uniformly (or log-uniformly)")
    sp.add_argument("--random", type=int, metavar="N", help="random search: N points instead of the full grid")
    sp.add_argument("--seed", type=int, default=0, help="seed of the random search")
    sp.add_argument("--parallel", type=int, help="points running at the same time (slurm.array_parallelism)")
    sp.add_argument("--wait", action="store_true", help="block until all points end, then write the results table")

    sp = add("sbatch", cmd_sbatch, "Render an sbatch script (srun+torchrun or the deepspeed launcher) for a config.")
    _add_run_args(sp)
    sp.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    sp.add_argument("--port", type=int, default=29500, help="rendezvous / master port on the first node")
    sp.add_argument("--out", help="write the script here (default: print it)")
