"""Indexing on a Ray cluster: the folder's files become a Ray dataset, an actor pool of engines
embeds them, and the driver commits the rows as segments under the index's commit protocol.

The job, for `build_index_ray(bundle, folder, index)`::

    driver                                   cluster
    list_images(folder), skip ids already    ray.data.from_items([{id, path}, ...])
    committed (the resume)                     .map_batches(_Embedder, ActorPoolStrategy(size=workers))
    iter_batches -> Index.add every            _Embedder.__init__: Engine.load(bundle) once per actor
    commit_every rows, in list order           _Embedder.__call__: decode + embed a batch (embed_files)

What it needs from the cluster: sgengine (with the bundle's backend) installed on every node, and
the bundle and the folder at the same absolute paths on every node (one machine, a shared
filesystem, or the same mount everywhere). Workers read the image files themselves; only paths
travel through the object store on the way in, and descriptors on the way out.

Results are the one-process build's (sgengine.indexing.build_index): the same ids, the same rows
in the same order (the dataset preserves order, so commits follow `list_images` order), the same
unreadable files with the same reasons, and descriptors equal to the last bit when workers run the
same backend with the same thread count as the one-process build (tests/test_indexing_ray.py).

Fault tolerance. Actors run with Ray's actor restarts and task retries (max_restarts=-1,
max_task_retries=-1): a worker process that dies is restarted (the bundle is loaded again) and its
batch is run again. The driver only commits rows it has received, each id once, and at start skips
ids already committed, so neither a dead worker nor a dead driver loses or duplicates a row: rerun
the same command and the build resumes after the last commit. A job that Ray gives up on (an
actor that cannot even load the bundle) raises SgengineError after committing what had arrived.

Test hook: the environment variable SGENGINE_RAY_CRASH_ONCE names a file; when a worker finds it
after embedding a batch, the one worker that renames it to `<file>.fired` first exits at once
(os._exit(77)) without returning the batch. tests/test_indexing_ray.py sets it in the cluster's
runtime environment to kill a real worker mid-job.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from ._checks import check_choice, check_int
from .errors import BackendUnavailableError, BundleError, InputError, SgengineError
from .index import DTYPES
from .indexing import BuildReport, embed_files, open_or_create_index, pending_images

__all__ = ["build_index_ray"]

_CRASH_ENV = "SGENGINE_RAY_CRASH_ONCE"
# Blocks in the dataset, at most: a block is the unit Ray schedules and retries. Small folders get
# one batch per block (work spreads over every worker); large ones get bigger blocks, so the driver
# and the object store track thousands of blocks, not millions.
MAX_BLOCKS = 2000


def _crash_once() -> None:
    marker = os.environ.get(_CRASH_ENV)
    if not marker:
        return
    try:
        os.rename(marker, marker + ".fired")  # atomic: exactly one worker wins
    except OSError:
        return
    os._exit(77)


class _Embedder:
    """One engine per actor, loaded once; each call embeds one batch of (id, path) rows.

    Returns one row per input row: the id, its descriptor (zeros when it failed), the reason it
    failed ("" when embedded) and its notes as a JSON list. Trusts its inputs (the driver made them).
    """

    def __init__(self, bundle: str, fingerprint: str, batch_size: int, engine_kwargs: dict) -> None:
        from .engine import Engine
        self.engine = Engine.load(bundle, **engine_kwargs)
        if self.engine.bundle.fingerprint != fingerprint:
            # Another node holds another bundle at the same path: its rows would not be comparable.
            import socket
            raise BundleError(f"{bundle} on {socket.gethostname()} is bundle {self.engine.bundle.fingerprint[:12]}, "
                              f"not the driver's {fingerprint[:12]}: put the same bundle at that path on every node")
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["id"]]
        got = embed_files(self.engine, list(zip(ids, (str(p) for p in batch["path"]))), batch_size=self.batch_size)
        _crash_once()
        row = {rel: i for i, rel in enumerate(got.ids)}
        reason = dict(got.failed)
        desc = np.zeros((len(ids), self.engine.dim), np.float32)
        for k, rel in enumerate(ids):
            if rel in row:
                desc[k] = got.descriptors[row[rel]]
        return {"id": np.array(ids, dtype=object),
                "descriptor": desc,
                "error": np.array([reason.get(rel, "") for rel in ids], dtype=object),
                "notes": np.array([json.dumps(got.notes[row[rel]]) if rel in row else "[]" for rel in ids],
                                  dtype=object)}


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise BackendUnavailableError("indexing on Ray needs Ray Data: pip install 'sgengine[ray]' "
                                      f"({e})") from e
    return ray


def build_index_ray(bundle: str | os.PathLike, folder: str | os.PathLike, index_path: str | os.PathLike, *,
                    address: str | None = None, workers: int | None = None, device: str = "cpu",
                    backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                    dtype: str = "float32", commit_every: int = 64, batch_size: int = 8, progress: bool = True,
                    **engine_kwargs) -> BuildReport:
    """Embed every image under `folder` into the index at `index_path` with a pool of `workers`
    Ray actors; the same result as `build_index(Engine.load(bundle, ...), folder, index_path)`.

    address: where the cluster is, when this process is not connected yet (if `ray.init` was
    already called, that connection is used whatever the address). None or "local": a new local
    cluster sized for the workers; "auto", "HOST:PORT" or "ray://HOST:PORT":
    `ray.init(address=...)`. A cluster this function started is stopped, and a connection it
    opened closed, when it returns.
    workers: actors in the pool (default: the cluster's CPUs // threads, or its GPUs on CUDA).
    device: "cpu", or "cuda" for one GPU per actor (Ray assigns it; the driver needs none).
    threads: CPUs per actor, and the backend's intra-op threads in it (default 1).
    backend, precision and **engine_kwargs (max_side, head_impl, plan_cache, ...) go to
    `Engine.load` in each actor; dtype, commit_every, batch_size, progress are build_index's.
    """
    bundle_dir = Path(bundle).resolve()
    root = Path(folder).resolve()
    if not root.is_dir():
        raise InputError(f"{folder}: not a directory")
    check_choice(device, "device (on Ray: each actor gets its own GPU, so no index)", ("cpu", "cuda"))
    check_choice(dtype, "dtype", DTYPES)
    commit_every = check_int(commit_every, "commit_every", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    threads = 1 if threads is None else check_int(threads, "threads", 1)
    if workers is not None:
        workers = check_int(workers, "workers", 1)
    if address is not None and not isinstance(address, str):
        raise InputError(f"address must be a string ('local', 'auto', 'HOST:PORT', 'ray://HOST:PORT'), got {address!r}")
    ray = _import_ray()

    from .bundle import Bundle
    b = Bundle.load(bundle_dir)
    index = open_or_create_index(index_path, bundle_fingerprint=b.fingerprint, dim=b.dim, dtype=dtype)
    todo, report = pending_images(root, index)
    if not todo:
        return report

    opened = False
    if not ray.is_initialized():
        if address in (None, "local"):
            cpus = (workers or max(1, (os.cpu_count() or 1) // threads)) * threads
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=address, logging_level="WARNING")
        opened = True
    try:
        if workers is None:
            res = ray.cluster_resources()
            workers = int(res.get("GPU", 0)) if device == "cuda" else int(res.get("CPU", 1) // threads)
        if device == "cuda" and workers < 1:
            raise BackendUnavailableError("device='cuda' asked for, but the Ray cluster has no GPU: "
                                          "start its nodes with GPUs, or index with device='cpu'")
        workers = max(1, workers)
        _run(ray, todo, index, report, bundle_dir, b.fingerprint, workers=workers, device=device, threads=threads,
             commit_every=commit_every, batch_size=batch_size, progress=progress,
             engine_kwargs=dict(engine_kwargs, device=device, backend=backend, precision=precision, threads=threads))
    finally:
        if opened:
            ray.shutdown()
    if report.added and index.segments > 1:
        index.compact()  # one segment: searches then map a single file instead of concatenating
    return report


def _run(ray, todo, index, report: BuildReport, bundle_dir: Path, fingerprint: str, *, workers: int, device: str,
         threads: int, commit_every: int, batch_size: int, progress: bool, engine_kwargs: dict) -> None:
    """The dataset job; commits as results arrive, so whatever was committed stays if it fails."""
    blocks = min(math.ceil(len(todo) / batch_size), MAX_BLOCKS)
    workers = min(workers, blocks)  # an actor with no block to run would only cost its start-up
    ds = ray.data.from_items([{"id": rel, "path": str(f)} for rel, f in todo], override_num_blocks=blocks)
    ds = ds.map_batches(
        _Embedder, fn_constructor_kwargs={"bundle": str(bundle_dir), "fingerprint": fingerprint,
                                          "batch_size": batch_size, "engine_kwargs": engine_kwargs},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        # Ray Data restarts a dead actor and retries its batch by default (max_restarts=-1,
        # max_task_retries=-1); passing them here is deprecated. The no-loss test relies on it.
        num_cpus=threads, num_gpus=1 if device == "cuda" else None)
    ctx = ds.context  # this dataset's copy: the caller's DataContext is left alone
    ctx.execution_options.preserve_order = True  # commits in list_images order: the one-process rows
    ctx.enable_progress_bars = False  # the driver's bar counts committed work
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc=f"indexing on Ray ({workers} worker(s))", unit="img")
    seen: set[str] = set()
    ids: list[str] = []
    rows: list[np.ndarray] = []

    def commit(n: int) -> None:
        added = index.add(np.stack(rows[:n]), ids[:n], skip_existing=True)  # another build may have added some
        report.added += added
        report.skipped += n - added
        del ids[:n], rows[:n]

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for rel, desc, err, notes in zip(batch["id"], batch["descriptor"], batch["error"], batch["notes"]):
                rel = str(rel)
                if rel in seen:
                    warnings.warn(f"{rel}: delivered twice by the Ray job; kept once", RuntimeWarning, stacklevel=2)
                    continue
                seen.add(rel)
                if err:
                    report.failed.append((rel, str(err)))
                    continue
                report.notes += [(rel, n) for n in json.loads(notes)]
                ids.append(rel)
                rows.append(np.asarray(desc, dtype=np.float32))
            while len(ids) >= commit_every:
                commit(commit_every)
            if bar is not None:
                bar.update(len(batch["id"]))
        if ids:
            commit(len(ids))
    except ray.exceptions.RayError as e:
        if ids:
            commit(len(ids))  # rows received before the failure are good: keep them
        raise SgengineError(f"the Ray indexing job failed after committing {report.added} new image(s) to "
                            f"{index.path}: {e}. Committed images are kept: run the same build again to "
                            "resume") from e
    finally:
        if bar is not None:
            bar.close()
