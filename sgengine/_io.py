"""Durable file writes and file hashes, shared by the bundle, the index, the plan cache and eval.

A write goes to a temporary file beside its target, is fsynced, renamed over the target
(`os.replace`, atomic on POSIX) and the directory is fsynced: a reader sees the old file or the
new one, never half of one, and after a crash the new file is either wholly there or absent.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["sha256_file", "fsync_dir", "write_stream_atomic", "write_bytes_atomic", "write_json_atomic"]

_BLOCK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory's entries (a rename into it) durable; a no-op where the OS cannot (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HashingWriter:
    """Write-only stream that hashes what passes through, so the sha256 costs no second read."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def write(self, b) -> int:
        self.sha256.update(b)
        return self._f.write(b)


def write_stream_atomic(path: str | os.PathLike, write: Callable[[Any], None], *, tmp: str | os.PathLike | None = None,
                        before_replace: Callable[[], None] | None = None) -> str:
    """Call `write(stream)` to fill `path` durably (module docstring); return the sha256 of the bytes.

    `stream` has only `write(bytes)`: the bytes go out in order, once, which is what makes the
    hash right. `tmp`: the temporary file's path, for a caller that holds a lock and cleans up
    after crashes by name; by default a unique name in the target's directory, so concurrent
    writers of one path never share a temporary file. `before_replace` runs after the
    temporary file is durable and before the rename (a crash-test hook).
    """
    path = Path(path)
    if tmp is None:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        f = os.fdopen(fd, "wb")
    else:
        tmp_name = os.fspath(tmp)
        f = open(tmp_name, "wb")
    try:
        with f:
            w = _HashingWriter(f)
            write(w)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return w.sha256.hexdigest()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, **kw) -> str:
    """`data` written durably to `path` (write_stream_atomic's options); returns its sha256."""
    return write_stream_atomic(path, lambda w: w.write(data), **kw)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2, **kw) -> str:
    """`obj` as indented JSON (ASCII, non-ASCII escaped) with a final newline, written durably; returns its sha256."""
    data = (json.dumps(obj, indent=indent) + "\n").encode("utf-8")
    return write_bytes_atomic(path, data, **kw)
