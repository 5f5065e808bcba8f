"""Embedding a folder of images into an index: resumable, append-only, tolerant of bad files."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._checks import check_int
from .errors import InputError, SgengineError
from .index import Index

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".jfif"}


@dataclass
class BuildReport:
    added: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (id, what was adjusted: capped, upscaled)
    total: int = 0


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under folder (recursive, sorted, by suffix; hidden folders skipped)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith("."):
                out.append(Path(dirpath) / f)
    return out


@dataclass
class EmbeddedFiles:
    """What `embed_files` made of a list of (id, path): the embedded ones in input order, and the rest."""
    ids: list[str]
    descriptors: np.ndarray  # float32 [len(ids), D], unit rows
    notes: list[list[str]]  # per embedded id: what was adjusted (capped, upscaled)
    failed: list[tuple[str, str]]  # (id, reason): undecodable, or non-finite features


def open_or_create_index(index_path: str | os.PathLike, *, bundle_fingerprint: str, dim: int,
                         dtype: str = "float32") -> Index:
    """The index at `index_path` (it must come from the same bundle), or a new empty one there."""
    path = Path(index_path)
    if (path / "manifest.json").exists():
        return Index.open(path, bundle_fingerprint=bundle_fingerprint)
    return Index.create(path, dim=dim, bundle_fingerprint=bundle_fingerprint, dtype=dtype)


def pending_images(folder: str | os.PathLike, index: Index) -> tuple[list[tuple[str, Path]], int, int]:
    """(todo, skipped, total): the (id, path) of every image under `folder` not yet in `index`, in
    `list_images` order; ids are paths relative to `folder` with POSIX separators."""
    root = Path(folder)
    files = list_images(root)
    todo = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel not in index:
            todo.append((rel, f))
    return todo, len(files) - len(todo), len(files)


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
    if not decoded:
        return EmbeddedFiles([], np.empty((0, engine.dim), np.float32), [], failed)
    try:
        desc, notes = engine.embed_decoded(decoded, batch_size=batch_size)
    except InputError:
        # One image with non-finite features: embed the chunk one by one so only it is lost.
        desc, notes, keep = [], [], []
        for im, rel in zip(decoded, ids):
            try:
                d1, n1 = engine.embed_decoded([im], batch_size=1)
            except InputError as e:
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
    so an interrupted build resumes where its last commit left off; every `commit_every` images are
    committed as one segment. Unreadable files are collected in the report, never fatal.
    (sgengine.indexing_ray.build_index_ray does the same on a Ray cluster.)
    """
    commit_every = check_int(commit_every, "commit_every", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    index = open_or_create_index(index_path, bundle_fingerprint=engine.bundle.fingerprint, dim=engine.dim,
                                 dtype=dtype)
    todo, skipped, total = pending_images(folder, index)
    report = BuildReport(skipped=skipped, total=total)
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
            index.add(got.descriptors, got.ids)
        report.added += len(got.ids)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if report.added and index.segments > 1:
        index.compact()  # one segment: searches then map a single file instead of concatenating
    return report
