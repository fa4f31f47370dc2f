"""Process topology and the per-process settings every launcher needs (torchrun, deepspeed, Slurm)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topology:
    """Where this process sits, as the launcher's environment says (single process when unset)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def topology(environ: dict | None = None) -> Topology:
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", 1))
    # torchrun sets LOCAL_WORLD_SIZE; the deepspeed launcher sets LOCAL_SIZE (its CPU device count)
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
    return Topology(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                    world_size=world, local_world_size=max(1, min(local_world, world)))


def accelerator_is_cpu() -> bool:
    # DS_ACCELERATOR=cpu is DeepSpeed's switch to its CPU accelerator; honour it for the Trainer too.
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return True
    return not torch.accelerator.is_available()


def configure_cpu_threads(topo: Topology) -> int | None:
    """On CPU, give each rank cores / local ranks threads. Two ranks each using every core run ~8x slower
    here; the deepspeed launcher sets OMP_NUM_THREADS=2 per rank. DSFT_CPU_THREADS overrides."""
    if not accelerator_is_cpu():
        return None
    wanted = os.environ.get("DSFT_CPU_THREADS")
    threads = int(wanted) if wanted else max(1, (os.cpu_count() or 1) // topo.local_world_size)
    torch.set_num_threads(threads)
    return threads


def init_deepspeed_distributed() -> None:
    """Start DeepSpeed's process group on the accelerator's backend (NCCL on CUDA, gloo/ccl on CPU).

    Needed before ZeRO-3 loading: zero.Init partitions weights across the group while they load, and
    building its config before deepspeed.comm knows the group fails ("... 8 != 4 * 1 * 1") on CPU.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def shutdown() -> bool:
    """Tear the process group down; True if there was one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return True
    return False


def exit_now(code: int) -> None:
    """Exit a finished multi-process run without interpreter teardown: after a successful ZeRO-3 run on
    CPU, a rank aborted there intermittently ("terminate called without an active exception", a native
    thread still joinable), turning a good run into a failed launch. Everything is saved and flushed."""
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
