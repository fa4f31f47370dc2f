"""The training entry: what every launcher runs, and what ``dsft train`` and each Slurm task call.

    torchrun --nproc_per_node 2 -m dsft.run --config run.yaml [--set k=v ...] [--force] [--overwrite]
    deepspeed --num_gpus 2 --module dsft.run --config run.yaml
    python -m dsft.run --config run.yaml

A module rather than a script path, so launchers (and rendered sbatch scripts) find it in any environment where
dsft is installed, not only inside a clone. ``launch/train.py`` is the same entry as a script, for the repo.
Layering: this module sits above the recipe (dsft.train) and below the CLI and dsft.slurm, which import it;
it imports neither of them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dsft.config import load_config
from dsft.console import exit_after_user_error, quiet_library_messages
from dsft.errors import ConfigError, DataError, DsftError
from dsft.fsutil import atomic_write_text

# A file a rank writes its user error (exit code 2: config, data, a full disk) to, when the environment names one:
# the sbatch templates read it to leave such a job failed instead of requeueing it (a requeue fails the same way),
# as torchrun exits 1 whatever its ranks' exit codes were
USER_ERROR_FILE_ENV = "DSFT_USER_ERROR_FILE"


def quiet_libraries() -> None:
    # Offline by default: dsft never downloads at run time unless the user opts in.
    if os.environ.get("DSFT_ALLOW_HUB") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_messages()  # before the libraries load: their deprecations and per-rank repeats (dsft.console)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def train_entry(config: str, overrides: list[str], callbacks=(), force: bool = False, overwrite: bool = False):
    """Check the config, train, tear the process group down. The one training entry of `dsft train`, the module
    entry (torchrun, the deepspeed launcher, sbatch scripts) and every Slurm task (dsft.slurm.job).
    Returns (RunResult, whether there was a process group)."""
    # deferred: dsft.distributed loads torch and dsft.train transformers (~5 s together), which the CLI's other
    # commands (it imports this module) do not need; looked up at call time also lets tests/fault_entry.py wrap
    # dsft.train.run
    from dsft.distributed import shutdown
    from dsft.train import run

    quiet_libraries()
    setup_logging()
    cfg = load_config(config, overrides)
    ok = False
    try:
        result = run(cfg, callbacks, force=force, overwrite=overwrite)
        ok = True
    finally:
        # after a failure a peer may be gone or elsewhere: no barrier, which would wait for it until the timeout
        distributed = shutdown(barrier=ok)
    return result, distributed


def train_and_report(config: str, overrides: list[str], force: bool = False, overwrite: bool = False) -> int:
    """Train, print the final eval and where the run was saved; exit at once after a multi-rank run."""
    from dsft.distributed import exit_now  # deferred: torch (see train_entry)

    result, distributed = train_entry(config, overrides, force=force, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # every rank has the same result: rank 0 tells it
        result = None
    if result is not None and result.eval_metrics:
        print(f"eval_loss {result.eval_metrics.get('eval_loss'):.4f}  "
              f"perplexity {result.eval_metrics.get('eval_perplexity', float('nan')):.3f}")
    if result is not None:
        print(f"saved to {result.output_dir}")
    if distributed:
        exit_now(0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsft.run",
                                description="Train from a run config (the entry launchers start on every rank).")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML syntax), repeatable")
    p.add_argument("--force", action="store_true",
                   help="resume even if the checkpoint was written with a different model/data/peft config")
    p.add_argument("--overwrite", action="store_true",
                   help="start from scratch in an output_dir holding a finished run or an earlier run's checkpoints")
    # the deepspeed launcher appends --local_rank=N; the rank is read from the environment instead
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    quiet_libraries()
    setup_logging()
    try:
        return train_and_report(a.config, a.set, force=a.force, overwrite=a.overwrite)
    except DsftError as e:
        record_user_error(e)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # once, from rank 0, when every rank has the same error; every rank exits with its code, without the
            # interpreter teardown that can abort a multi-rank process (a SIGABRT instead of dsft's exit status)
            exit_after_user_error(str(e), e.exit_code, rank_zero_reports=isinstance(e, (ConfigError, DataError)))
        report_error(e)
        return e.exit_code


def record_user_error(e: DsftError) -> None:
    """Write a user error (exit code 2) to $DSFT_USER_ERROR_FILE if set (see USER_ERROR_FILE_ENV)."""
    path = os.environ.get(USER_ERROR_FILE_ENV)
    if path and e.exit_code == DsftError.exit_code:
        try:
            atomic_write_text(path, f"{e}\n")
        except OSError as write_error:  # the exit status still tells, except under torchrun
            print(f"dsft: warning: could not write {path}: {write_error}", file=sys.stderr)


def report_error(e: DsftError) -> None:
    """One ``dsft: error:`` line. Config and data errors are the same on every rank of a launch (each rank reads
    the same files), so only rank 0 prints them; any other error may be this rank's alone and is printed."""
    if isinstance(e, (ConfigError, DataError)) and int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"dsft: error: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
