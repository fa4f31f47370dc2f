"""What a multi-rank run prints: library noise silenced, facts shown once (rank 0), DeepSpeed's one-time CPU op
build announced, and a user error reported once with the same exit status on every rank.

Each filter names one message of one library and says why it goes; anything else a library says still shows.
Imports nothing from dsft at module level (dsft.distributed, torch and DeepSpeed only inside the functions that
need them), so the entry can install the filters before any library loads.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import signal
import sys
import time
import warnings

logger = logging.getLogger("dsft")

# DeepSpeed's CPU communication op, JIT-built with ninja/g++ on the first multi-rank DeepSpeed run on CPU
SHM_OP = "deepspeed_shm_comm"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose text contains one of ``needles``."""

    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not any(n in text for n in self.needles)


def _drop(logger_name: str, *needles: str) -> None:
    target = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and f.needles == needles for f in target.filters):  # once per process
        target.addFilter(_DropMessages(*needles))


def quiet_library_messages(rank: int | None = None) -> None:
    """Install the filters, before the libraries run (their loggers need not exist yet). Idempotent."""
    rank = _rank() if rank is None else rank
    # DeepSpeed 0.19 calls torch's deprecated collectives itself (ZeRO-2 and thousands of times per run under ZeRO-3);
    # the user can do nothing about it
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger",
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    # transformers hands accelerate gradient_accumulation_steps=1 on purpose (the Trainer accumulates itself) while
    # the DeepSpeed config carries the user's value; accelerate then "fixes" a mismatch that is by design
    _drop("accelerate.accelerator", "Gradient accumulation steps mismatch")
    if rank != 0:
        # Same files, same model on every rank: the other ranks would repeat rank 0's report word for word.
        # The load report (missing/unexpected weights) matters to the user: rank 0 still shows it.
        _drop("transformers.modeling_utils", "LOAD REPORT")
        # model config's pad/bos/eos aligned to the tokenizer's: a fact about the run, shown once by rank 0
        _drop("transformers.trainer_utils", "The tokenizer has new PAD/BOS/EOS tokens")
        # transformers' "Loading weights" bar (outside zero.Init) would interleave with rank 0's; read at import
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def shm_op_built() -> bool:
    """Whether DeepSpeed's CPU communication op is already built (installed with DeepSpeed, or JIT-built into
    torch's extensions dir: $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/py<ver>_<cpu|cuXY>)."""
    # deferred: torch (~1 s); this module is imported by every command. DeepSpeed is optional.
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get(SHM_OP):
            return True
    except ImportError:
        pass
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:  # the layout torch.utils.cpp_extension.load uses (its _get_build_directory, which also mkdirs)
        kind = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{py}_{kind}")
    return os.path.isfile(os.path.join(root, SHM_OP, f"{SHM_OP}.so"))


def announce_cpu_comm_op(rank: int | None = None) -> None:
    """Wrap DeepSpeed's shm op loader (deepspeed.comm.torch.build_shm_op, called when its communication backend
    starts): rank 0 says so before a first-time build (~1 min of silence otherwise, once per machine), and the
    "... built successfully" line DeepSpeed prints on every rank of every run is swallowed. Idempotent."""
    rank = _rank() if rank is None else rank
    # deferred: importing DeepSpeed costs seconds; only DeepSpeed runs on CPU get here
    # import_module: `import deepspeed.comm.torch as m` binds the torch package (deepspeed.comm re-exports it)
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    original = getattr(ds_torch, "build_shm_op", None)
    if original is None or getattr(original, "dsft_wrapped", False):  # another DeepSpeed version, or done
        return

    def build_shm_op():
        if rank == 0 and not shm_op_built():
            logger.info("building DeepSpeed's CPU communication op (%s), 1-2 min, once: later runs load it", SHM_OP)
        # only Python-level prints: DeepSpeed's success line; a failed build still raises with the compiler output
        with contextlib.redirect_stdout(io.StringIO()):
            return original()

    build_shm_op.dsft_wrapped = True
    ds_torch.build_shm_op = build_shm_op


# How long a rank other than 0 waits, after a config/data error, for the launcher to stop it once rank 0 (which
# reads the same files and prints the error) has exited; after that it prints the error itself.
PEER_ERROR_WAIT_S = 30.0


def exit_after_user_error(message: str, code: int, rank_zero_reports: bool) -> None:
    """End a multi-rank process after a user error (DsftError) so that the error shows once and every rank exits
    with ``code``. Never returns.

    ``rank_zero_reports``: the error is the same on every rank (config, data: each rank reads the same files), so
    rank 0 prints it and the others print nothing and wait: had they exited at once, the launcher could kill rank 0 before it printed (seen with
    torchrun: no message at all). A launcher stopping them (SIGTERM) ends them with ``code`` too. A rank whose
    error rank 0 does not share (not stopped within PEER_ERROR_WAIT_S) prints it itself, naming its rank.
    Otherwise every rank prints its error and exits at once."""
    from dsft.distributed import exit_now  # deferred: torch

    rank = _rank()
    if rank == 0 or not rank_zero_reports:
        # (not also into $TORCHELASTIC_ERROR_FILE: tried, torchrun's report then quotes the message but adds three
        # log lines of its own about the file, one at ERROR level)
        print(f"dsft: error: {message}", file=sys.stderr)
        exit_now(code)
    signal.signal(signal.SIGTERM, lambda *_: exit_now(code))
    time.sleep(PEER_ERROR_WAIT_S)
    print(f"dsft: error: rank {rank}: {message}", file=sys.stderr)
    exit_now(code)
