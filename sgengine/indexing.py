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


def build_index(engine, folder: str | os.PathLike, index_path: str | os.PathLike, *, dtype: str = "float32",
                commit_every: int = 64, batch_size: int = 8, progress: bool = True) -> BuildReport:
    """Embed every image under `folder` into the index at `index_path` (created if missing).

    Ids are paths relative to `folder` (POSIX separators). Files already in the index are skipped,
    so an interrupted build resumes where its last commit left off; every `commit_every` images are
    committed as one segment. Unreadable files are collected in the report, never fatal.
    """
    commit_every = check_int(commit_every, "commit_every", 1)
    root = Path(folder)
    files = list_images(root)
    path = Path(index_path)
    if (path / "manifest.json").exists():
        index = Index.open(path, bundle_fingerprint=engine.bundle.fingerprint)
    else:
        index = Index.create(path, dim=engine.dim, bundle_fingerprint=engine.bundle.fingerprint, dtype=dtype)
    report = BuildReport(total=len(files))
    todo = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel in index:
            report.skipped += 1
        else:
            todo.append((rel, f))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="indexing", unit="img")
    for start in range(0, len(todo), commit_every):
        chunk = todo[start:start + commit_every]
        decoded, ids = [], []
        for rel, f in chunk:
            try:
                decoded.append(engine.decode(f, name=str(f)))
                ids.append(rel)
            except SgengineError as e:
                report.failed.append((rel, str(e)))
        if decoded:
            try:
                desc, notes = engine.embed_decoded(decoded, batch_size=batch_size)
            except InputError:
                # One image with non-finite features: embed the chunk one by one so only it is lost.
                desc, notes, keep = [], [], []
                for im, rel in zip(decoded, ids):
                    try:
                        d1, n1 = engine.embed_decoded([im], batch_size=1)
                    except InputError as e:
                        report.failed.append((rel, str(e)))
                        continue
                    desc.append(d1)
                    notes += n1
                    keep.append(rel)
                ids = keep
                desc = np.concatenate(desc) if desc else np.empty((0, engine.dim), np.float32)
            report.notes += [(rel, n) for rel, ns in zip(ids, notes) for n in ns]
            if ids:
                index.add(desc, ids)
            report.added += len(ids)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if report.added and index.segments > 1:
        index.compact()  # one segment: searches then map a single file instead of concatenating
    return report
