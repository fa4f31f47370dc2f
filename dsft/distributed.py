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


def export_local_world_size(environ: dict | None = None) -> None:
    """The deepspeed launcher sets LOCAL_SIZE but not LOCAL_WORLD_SIZE; on CPU, accelerate then writes
    LOCAL_WORLD_SIZE=1 into the environment, and every later reader (a second run in the same process, thread
    counts) sees one local rank. Export the launcher's value first so all agree."""
    env = os.environ if environ is None else environ
    if "LOCAL_WORLD_SIZE" not in env and "LOCAL_SIZE" in env:
        env["LOCAL_WORLD_SIZE"] = env["LOCAL_SIZE"]


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


def apply_collective_timeout(timeout_s: float, use_cpu: bool, backend: str | None = None) -> None:
    """Make every process group of the run give up on a silent peer after ``timeout_s`` (train.ddp_timeout).

    Two gaps measured here (one rank SIGSTOPped, ddp_timeout 15 s, still waiting after 150 s): DeepSpeed builds
    its own groups with ``torch.distributed.new_group`` and no timeout, so they take torch's module default
    (30 min gloo, 10 min NCCL), which is set here; and transformers 5.23 passes ddp_timeout to accelerate only on
    accelerators, so on CPU the default group is started here (env://) with it. accelerate and DeepSpeed reuse
    a group that exists.
    """
    from datetime import timedelta

    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=timeout_s)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if hasattr(distributed_c10d, name):
            setattr(distributed_c10d, name, timeout)
    if use_cpu and topology().world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend or "gloo", timeout=timeout)


def init_deepspeed_distributed(timeout_s: float | None = None) -> None:
    """Start DeepSpeed's process group on the accelerator's backend (NCCL on CUDA, gloo/ccl on CPU).

    Needed before ZeRO-3 loading: zero.Init partitions weights across the group while they load, and
    building its config before deepspeed.comm knows the group fails ("... 8 != 4 * 1 * 1") on CPU.
    ``timeout_s``: how long a collective waits for a peer (train.ddp_timeout), as for the Trainer's group.
    """
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), **kwargs)


def shutdown(barrier: bool = True) -> bool:
    """Tear the process group down; True if there was one. ``barrier=False`` after a failure: a dead or
    failed peer would never arrive, and the barrier would wait for the whole timeout."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if barrier:
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
