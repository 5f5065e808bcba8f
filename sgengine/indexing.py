"""Embedding a folder of images into an index: resumable, append-only, tolerant of bad files.

Which files: every file under the folder (recursive, in sorted order; hidden files and folders
skipped, symbolic links to folders not followed, so a link loop cannot trap the walk) whose
suffix names a format that the installed Pillow decodes (`image_suffixes()`). Nothing that one
file or folder can do stops a build; the report lists what was not indexed and why: files that
could not be decoded, file names that are not UTF-8 text (ids are text), folders that could not
be listed, and how many files of each other suffix were passed over.
"""
from __future__ import annotations

import functools
import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._checks import check_int
from ._io import display_path, os_error_reason
from .errors import InputError, SgengineError
from .index import Index


@dataclass
class BuildReport:
    added: int = 0
    skipped: int = 0  # already in the index: before this build, or committed meanwhile by another one
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, reason): files not indexed
    notes: list[tuple[str, str]] = field(default_factory=list)  # (id, what was adjusted: capped, upscaled)
    total: int = 0  # image files found
    ignored: dict[str, int] = field(default_factory=dict)  # suffix -> files passed over: not a decodable format
    unreadable_dirs: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason): not listed


@functools.cache
def image_suffixes() -> frozenset[str]:
    """The file suffixes (lower case, with the dot) of the formats this Pillow decodes: its
    registered extensions whose plugin opens files (not a save-only one such as PDF, nor a stub
    that needs an outside handler such as HDF5) and, for a plugin that also saves, whose codec is
    installed, shown by a 4x4 image saved and decoded again (EPS needs Ghostscript, AVIF and
    JPEG 2000 their libraries). Open-only plugins decode with Pillow's own code."""
    from PIL import Image, ImageFile

    Image.init()

    @functools.cache
    def decodes(fmt: str) -> bool:
        if fmt not in Image.OPEN:
            return False
        factory = Image.OPEN[fmt][0]
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            return False
        if fmt not in Image.SAVE:
            return True
        for mode in ("RGB", "L", "1", "RGBA", "P"):  # the first mode the format can write
            buf = io.BytesIO()
            try:
                with warnings.catch_warnings():  # deprecation notices of rarely used formats
                    warnings.simplefilter("ignore")
                    Image.new(mode, (4, 4)).save(buf, format=fmt)
                    buf.seek(0)
                    with Image.open(buf) as im:
                        im.load()
                return True
            except Exception:  # a probe: any failure means "not this mode" or "no codec here"
                continue
        return False

    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if decodes(fmt))


@dataclass
class FolderScan:
    """What `scan_folder` found: the image files, and what it passed over."""
    files: list[Path]
    ignored: dict[str, int]  # suffix ("" for none) -> files whose suffix no installed decoder reads
    unreadable_dirs: list[tuple[str, str]]  # (folder, reason)


def scan_folder(folder: str | os.PathLike) -> FolderScan:
    """The image files under folder (module docstring), the sub-folders that could not be listed
    (a permission, a path too long) and the other files by suffix. The folder itself must be a
    readable directory (InputError)."""
    root = Path(folder)
    try:
        if not root.is_dir():
            raise InputError(f"{display_path(root)}: not a directory" + (" (no such path)" if not root.exists() else ""))
    except OSError as e:
        raise InputError(f"{display_path(root)}: {os_error_reason(e)}") from e
    suffixes = image_suffixes()
    files: list[Path] = []
    ignored: Counter[str] = Counter()
    unreadable: list[tuple[str, str]] = []

    def onerror(e: OSError) -> None:
        if e.filename is None or os.fspath(e.filename) == os.fspath(root):
            raise InputError(f"{display_path(root)}: cannot list the folder: {os_error_reason(e)}") from e
        unreadable.append((display_path(e.filename), os_error_reason(e)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            suffix = os.path.splitext(f)[1].lower()
            if suffix in suffixes:
                files.append(Path(dirpath) / f)
            else:
                ignored[suffix] += 1
    return FolderScan(files, dict(sorted(ignored.items())), unreadable)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under folder (`scan_folder`'s files)."""
    return scan_folder(folder).files


@dataclass
class EmbeddedFiles:
    """What `embed_files` made of a list of (id, path): the embedded ones in input order, and the rest."""
    ids: list[str]
    descriptors: np.ndarray  # float32 [len(ids), D], unit rows
    notes: list[list[str]]  # per embedded id: what was adjusted (capped, upscaled)
    failed: list[tuple[str, str]]  # (id, reason): undecodable, or non-finite features


def open_or_create_index(index_path: str | os.PathLike, *, bundle_fingerprint: str, dim: int,
                         dtype: str = "float32") -> Index:
    """The index at `index_path` (it must come from the same bundle), or a new empty one there
    (if another build creates it at the same moment, that one)."""
    path = Path(index_path)
    if (path / "manifest.json").exists():
        return Index.open(path, bundle_fingerprint=bundle_fingerprint)
    return Index.create(path, dim=dim, bundle_fingerprint=bundle_fingerprint, dtype=dtype, exist_ok=True)


def pending_images(folder: str | os.PathLike, index: Index) -> tuple[list[tuple[str, Path]], BuildReport]:
    """(todo, report): the (id, path) of every image under `folder` not yet in `index`, in
    `scan_folder` order, and a report holding what the scan found (total, already-indexed count,
    files passed over, unreadable folders, and as failures the files whose name is not UTF-8).
    Ids are paths relative to `folder` with POSIX separators."""
    root = Path(folder)
    scan = scan_folder(root)
    report = BuildReport(total=len(scan.files), ignored=scan.ignored, unreadable_dirs=scan.unreadable_dirs)
    todo = []
    for f in scan.files:
        rel = f.relative_to(root).as_posix()
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            report.failed.append((display_path(rel), "the file name is not UTF-8 text, and ids are text: rename "
                                  "the file (e.g. with convmv) to index it"))
            continue
        if rel in index:
            report.skipped += 1
        else:
            todo.append((rel, f))
    return todo, report


def embed_files(engine, items, *, batch_size: int = 8) -> EmbeddedFiles:
    """Decode and embed (id, path) items; a file that cannot be decoded or embedded is listed in
    `failed` with the reason, never raised. Trusts its arguments (the callers check them)."""
    decoded, ids, failed = [], [], []
    for rel, f in items:
        try:
            decoded.append(engine.decode(f, name=str(f)))
            ids.append(rel)
        except SgengineError as e:
            failed.append((rel, str(e)))
        except OSError as e:  # the file system's refusal for one file must not stop a build
            failed.append((rel, f"cannot read {display_path(f)}: {os_error_reason(e)}"))
    if not decoded:
        return EmbeddedFiles([], np.empty((0, engine.dim), np.float32), [], failed)
    try:
        desc, notes = engine.embed_decoded(decoded, batch_size=batch_size)
    except SgengineError:
        # One image with non-finite features, or a chunk too large for memory: embed it one by one
        # so only what fails alone is lost.
        desc, notes, keep = [], [], []
        for im, rel in zip(decoded, ids):
            try:
                d1, n1 = engine.embed_decoded([im], batch_size=1)
            except SgengineError as e:
                failed.append((rel, str(e)))
                continue
            desc.append(d1)
            notes += n1
            keep.append(rel)
        ids = keep
        desc = np.concatenate(desc) if desc else np.empty((0, engine.dim), np.float32)
    return EmbeddedFiles(ids, desc, notes, failed)


def build_index(engine, folder: str | os.PathLike, index_path: str | os.PathLike, *, dtype: str = "float32",
                commit_every: int = 64, batch_size: int = 8, progress: bool = True) -> BuildReport:
    """Embed every image under `folder` into the index at `index_path` (created if missing).

    Ids are paths relative to `folder` (POSIX separators). Files already in the index are skipped,
    so an interrupted build resumes where its last commit left off, and two builds of one folder
    at once add each file once; every `commit_every` images are committed as one segment.
    Unreadable files and folders are collected in the report (module docstring), never fatal.
    (sgengine.indexing_ray.build_index_ray does the same on a Ray cluster.)
    """
    commit_every = check_int(commit_every, "commit_every", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    index = open_or_create_index(index_path, bundle_fingerprint=engine.bundle.fingerprint, dim=engine.dim,
                                 dtype=dtype)
    todo, report = pending_images(folder, index)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="indexing", unit="img")
    for start in range(0, len(todo), commit_every):
        chunk = todo[start:start + commit_every]
        got = embed_files(engine, chunk, batch_size=batch_size)
        report.failed += got.failed
        report.notes += [(rel, n) for rel, ns in zip(got.ids, got.notes) for n in ns]
        if got.ids:
            added = index.add(got.descriptors, got.ids, skip_existing=True)  # another build may have added some
            report.added += added
            report.skipped += len(got.ids) - added
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if report.added and index.segments > 1:
        index.compact()  # one segment: searches then map a single file instead of concatenating
    return report
