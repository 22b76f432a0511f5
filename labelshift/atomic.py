"""Atomic files: every writer of the project goes through here (temporary file beside the target, fsync, rename).

A reader never sees a half-written file: it sees the old file, or the new one. ``atomic_path(path)`` serves
writers that need a file name (safetensors, cv2); the others write bytes, text or JSON.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

__all__ = ["atomic_path", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (best effort: some filesystems refuse to open directories)."""
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally, the file written there is fsynced
    and renamed to ``path``. On an exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def write_bytes_atomic(path: str | Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(payload)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, payload: Mapping[str, Any] | list, *, indent: int | None = 1) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(payload, indent=indent))
