"""Test and benchmark entry: several run configs one after another in ONE launched process group.

    torchrun --nproc_per_node 2 tests/run_configs.py a.yaml b.yaml [--model-states]

Each config goes through the same ``dsft.train.run`` as the module entry ``dsft.run``. Starting a launcher costs
~15 s of imports and rendezvous per launch on 2 cores, which would dominate a matrix of short runs.
``--model-states`` adds the callback that counts held model-state bytes (``dsft.memory``). Not part of the
product: it resets a private DeepSpeed global between runs (``_forget_hpz_group``).
"""

from __future__ import annotations

import argparse
import sys

from dsft.config import load_config
from dsft.distributed import exit_now, shutdown
from dsft.errors import DsftError
from dsft.memory import ModelStateBytesCallback
from dsft.run import quiet_libraries, setup_logging
from dsft.sequence_parallel import release_groups
from dsft.train import run


def _forget_hpz_group() -> None:
    # DeepSpeed builds the ZeRO++ hpZ process group once per process and asserts on a second one; each run here
    # starts a fresh engine over the same ranks, so let it build the group again.
    try:
        from deepspeed.utils import groups
    except ImportError:
        return
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/run_configs.py")
    p.add_argument("configs", nargs="+")
    p.add_argument("--model-states", action="store_true", help="write held model-state bytes per rank")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    quiet_libraries()
    setup_logging()
    try:
        cfgs = [load_config(path) for path in a.configs]  # all checked before the first run starts
        for cfg in cfgs:
            _forget_hpz_group()
            release_groups()  # DeepSpeed's sequence-parallel groups are process-wide, built once per run
            run(cfg, [ModelStateBytesCallback()] if a.model_states else [])
    except DsftError as e:
        print(f"dsft: error: {e}", file=sys.stderr)
        return e.exit_code
    if shutdown():
        exit_now(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
