"""dsft's one way to write a file that others read while it may be rewritten (markers, configs, caches, data).

A leaf module: it imports nothing from dsft, so any module may use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's entry to disk (a directory: so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` so that readers see the old content or the new one, never a torn one, even after a crash:
    a temp file next to ``path``, fsync, rename over, fsync of the directory. Creates the parent directory.

    The temp name is unique per process and call (several ranks or hosts may write the same shared path), opened
    with ``x`` so it honours the umask (unlike mkstemp's fixed 0600) and never reuses a stray file; it is removed
    if the write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> Path:
    """``atomic_write_text`` of ``json.dumps(data, **dumps_kwargs)``."""
    return atomic_write_text(path, json.dumps(data, **dumps_kwargs))


def write_if_changed(path: str | os.PathLike, text: str) -> bool:
    """``atomic_write_text`` unless ``path`` already holds exactly ``text``; True if written. Leaving an identical
    file untouched keeps its mtime, so caches keyed on it stay valid."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == text.encode("utf-8"):
        return False
    atomic_write_text(path, text)
    return True
