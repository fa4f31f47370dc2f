"""Waiting for the tokenized cache without a collective: one process per node prepares, the others watch the
file system.

Why not ``TrainingArguments.main_process_first`` (a barrier): the waiting ranks sit in a collective whose
deadline is ``ddp_timeout``, so any dataset that takes longer than that to tokenize kills the run (measured: 2
ranks, 30 s of tokenizing, ddp_timeout 10 -> gloo "Timed out waiting 10000ms"). Here the local rank 0 of each
node prepares into the cache (tmp dir + atomic rename + ``complete`` marker, dsft.data) while it keeps a small
status file up to date; the node's other ranks poll for the marker with no deadline as long as the preparer is
alive, and stop within seconds when it dies or writes a ``failed`` file (its one-line error, which they raise
too).

Files, next to the cache dir ``<root>/<key>`` (``<tag>`` = host name + the pid of the ranks' common parent, the
launcher: torchrun's agent, the deepspeed launcher, slurmstepd. It names one launch on one node, so files left by
an earlier run or by another node sharing the cache are never mistaken for this one's)::

    <key>.preparing.<tag>   {"pid", "host", "started", "heartbeat"}; removed when the preparer is done
    <key>.failed.<tag>      {"error", "exit_code", "pid", "host"}; the preparer's error, read by the waiters

Same node, so ``os.kill(pid, 0)`` tells whether the preparer lives; the heartbeat (rewritten every few seconds
by a thread) catches a process that is alive but stopped, or a pid namespace where kill cannot see it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from dsft.errors import DsftError
from dsft.fsutil import atomic_write_json

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0        # how often the preparer rewrites its heartbeat
STALE_S = 60.0           # a heartbeat older than this: the preparer is stopped (SIGSTOP, swapped out, ...)
STARTUP_GRACE_S = 300.0  # how long a waiter waits for its node's preparer to show up at all
POLL_S = 0.5


class PreparerFailed(DsftError):
    """The process preparing the data failed; the waiters report its error with its exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PreparerGone(DsftError):
    """The process preparing the data died (killed, out of memory) without a word."""

    exit_code = 1


def launch_tag() -> str:
    # the ranks of one node share their parent (the launcher); a stale file from an earlier launch has another
    return f"{socket.gethostname()}-{os.getppid()}"


def status_paths(target: Path, tag: str | None = None) -> tuple[Path, Path]:
    tag = tag or launch_tag()
    return (target.with_name(f"{target.name}.preparing.{tag}"), target.with_name(f"{target.name}.failed.{tag}"))


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)  # readers never see half a file


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or being replaced right now


def is_complete(target: Path) -> bool:
    return (target / "complete").is_file()


@contextlib.contextmanager
def preparing(target: Path, tag: str | None = None, heartbeat_s: float = HEARTBEAT_S):
    """Around the preparation on a node's local rank 0: announce it, keep the heartbeat, and leave the error for
    the waiters if it fails."""
    busy, failed = status_paths(target, tag)
    busy.parent.mkdir(parents=True, exist_ok=True)
    failed.unlink(missing_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    _write_json(busy, {**me, "heartbeat": time.time()})
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            with contextlib.suppress(OSError):
                _write_json(busy, {**me, "heartbeat": time.time()})

    thread = threading.Thread(target=beat, name="dsft-data-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    except BaseException as e:
        if isinstance(e, DsftError):
            error, code = str(e), e.exit_code
        else:
            first = (str(e).strip().splitlines() or [""])[0]
            error = f"preparing the data failed on {me['host']} (pid {me['pid']}): {type(e).__name__}: {first}"
            code = 1
        with contextlib.suppress(OSError):
            _write_json(failed, {**me, "error": error, "exit_code": code})
        raise
    finally:
        stop.set()
        thread.join()
        busy.unlink(missing_ok=True)  # after the rename (or the failed file): waiters see one or the other


def wait_for_cache(target: Path, tag: str | None = None, poll_s: float = POLL_S, stale_s: float = STALE_S,
                   startup_grace_s: float = STARTUP_GRACE_S) -> None:
    """Block until ``target`` is complete (any node may have finished it), this node's preparer failed (raise its
    error) or died (raise within about ``poll_s``). No deadline while the preparer is alive and beating."""
    busy, failed = status_paths(target, tag)
    start, seen, last_note = time.monotonic(), None, time.monotonic()
    while True:
        if is_complete(target):
            return
        info = _read_json(failed)
        if info is not None:
            raise PreparerFailed(info.get("error", "preparing the data failed"), int(info.get("exit_code", 2)))
        status = _read_json(busy)
        if status is not None:
            seen = status
            problem = _not_alive(status, stale_s)
            if problem:
                raise PreparerGone(f"data: the process preparing the tokenized data ({problem}) stopped before "
                                   f"finishing {target}; see its log. Nothing was cached: start the run again")
        elif seen is not None and not busy.exists():
            # the preparer removed its file: it finished (complete) or failed (failed file) just now -- or died
            # between; look once more at both before calling it dead
            time.sleep(poll_s)
            if is_complete(target):
                return
            if (info := _read_json(failed)) is not None:
                raise PreparerFailed(info.get("error", "preparing the data failed"), int(info.get("exit_code", 2)))
            raise PreparerGone(f"data: the process preparing the tokenized data (pid {seen.get('pid')}) ended "
                               f"without completing {target} or reporting an error; see its log")
        elif time.monotonic() - start > startup_grace_s:
            raise PreparerGone(f"data: waited {startup_grace_s:.0f} s for local rank 0 of this node to start "
                               f"preparing {target} (it announces itself in {busy.name}); the ranks of a node must "
                               "be started by one launcher (torchrun, deepspeed, srun)")
        if time.monotonic() - last_note > 60:
            logger.info("still waiting for local rank 0 to prepare the data (%s)", target)
            last_note = time.monotonic()
        time.sleep(poll_s)


def _not_alive(status: dict, stale_s: float) -> str | None:
    """Why the preparer described by ``status`` is not working any more, or None if it is."""
    pid = int(status.get("pid", 0))
    if status.get("host") == socket.gethostname() and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"pid {pid}, gone"
        except PermissionError:
            pass  # exists, owned by someone else
        if _zombie(pid):  # dead, not yet reaped by its parent: kill(0) still succeeds
            return f"pid {pid}, exited"
    age = time.time() - float(status.get("heartbeat", 0))
    if age > stale_s:
        return f"pid {pid}, no heartbeat for {age:.0f} s"
    return None


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS) or just gone; kill(0) and the heartbeat decide
    return stat.rpartition(")")[2].split()[:1] == ["Z"]
