"""Durable file writes and file hashes, shared by the bundle, the index, the plan cache and eval.

A write goes to a temporary file beside its target, is fsynced, renamed over the target
(`os.replace`, atomic on POSIX) and the directory is fsynced: a reader sees the old file or the
new one, never half of one, and after a crash the new file is either wholly there or absent.

`os_error_text` is the one place an OSError becomes words: public entry points turn the OSErrors
they meet into sgengine errors with it (naming the path and the reason), and so does the CLI.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["sha256_file", "fsync_dir", "write_stream_atomic", "write_bytes_atomic", "write_json_atomic",
           "os_error_text", "os_error_reason", "display_path"]

_BLOCK = 1 << 22

# What the OS's terse strerror means for someone pointing sgengine at a path, and what to do.
_REASONS = {
    errno.ENAMETOOLONG: "a name in the path is longer than the file system allows (usually 255 bytes per name, "
                        "4096 per path): use a shorter name",
    errno.EACCES: "permission denied: this user may not read (or write) it, or may not enter a folder above it",
    errno.EPERM: "operation not permitted for this user",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EISDIR: "is a directory, not a file",
    errno.EEXIST: "already exists, and is not what belongs here",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop)",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EMFILE: "too many open files in this process (raise the limit: ulimit -n)",
    errno.EIO: "input/output error (a failing disk or network file system)",
}


def display_path(path: str | bytes | os.PathLike) -> str:
    """A path as printable text: bytes that are not valid UTF-8 (in a file name) appear as \\xNN escapes."""
    try:
        p = os.fsencode(path)
    except UnicodeEncodeError:  # a str with surrogates that no file name decodes to
        return os.fspath(path).encode("utf-8", "backslashreplace").decode("utf-8")
    return p.decode("utf-8", "backslashreplace")


def os_error_reason(e: OSError) -> str:
    """Why the OS refused, in words a user can act on."""
    return _REASONS.get(e.errno) or e.strerror or str(e) or type(e).__name__


def os_error_text(e: OSError) -> str:
    """"<path>: <reason>" for an OSError (just the reason when the OS named no path)."""
    reason = os_error_reason(e)
    if e.filename is None:
        return reason
    where = display_path(e.filename)
    if e.filename2 is not None:
        where += f" -> {display_path(e.filename2)}"
    return f"{where}: {reason}"


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
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would make the file its owner's only
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


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only set it,
    and setting it for a moment would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes, **kw) -> str:
    """`data` written durably to `path` (write_stream_atomic's options); returns its sha256."""
    return write_stream_atomic(path, lambda w: w.write(data), **kw)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2, **kw) -> str:
    """`obj` as indented JSON (ASCII, non-ASCII escaped) with a final newline, written durably; returns its sha256."""
    data = (json.dumps(obj, indent=indent) + "\n").encode("utf-8")
    return write_bytes_atomic(path, data, **kw)
