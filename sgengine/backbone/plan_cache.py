"""TensorRT plan cache beside the bundle: which plan may run, and why a cached one may not.

A plan is only valid for the exact backbone graph, GPU model, TensorRT version, precision and
input-shape profile it was built for, and TensorRT itself only notices some of those mismatches
(a plan from another version fails to deserialize; a plan from an older backbone.onnx loads
and silently computes the old model). So every plan is written with a sidecar JSON that records
all of them, and a lookup compares the sidecar with what the engine needs now. Pure Python: the
checks run (and are tested) on machines without TensorRT.

    <bundle>/trt_cache/backbone.<gpu>.trt<version>.<precision>.plan
    <bundle>/trt_cache/backbone.<gpu>.trt<version>.<precision>.json   sidecar, written after the plan

With `plan_cache=DIR` (a read-only bundle, or one cache for many bundles) the same files go to
DIR/<bundle fingerprint[:16]>/.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

CACHE_DIRNAME = "trt_cache"
SIDECAR_VERSION = 1


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cache_dir(bundle, plan_cache: str | os.PathLike | None = None) -> Path:
    if plan_cache is None:
        return Path(bundle.path) / CACHE_DIRNAME
    return Path(plan_cache).expanduser() / bundle.fingerprint[:16]


def slot_name(gpu: str, trt_version: str, precision: str) -> str:
    return f"backbone.{gpu_slug(gpu)}.trt{trt_version}.{precision}"


@dataclass
class PlanKey:
    """Everything a plan depends on."""
    gpu: str
    tensorrt: str
    precision: str
    bundle_fingerprint: str
    onnx_sha256: str
    profile: dict  # {"min": [B,3,H,W], "opt": [...], "max": [...]}

    def as_dict(self) -> dict:
        return {"gpu": self.gpu, "tensorrt": self.tensorrt, "precision": self.precision,
                "bundle_fingerprint": self.bundle_fingerprint, "onnx_sha256": self.onnx_sha256,
                "profile": self.profile}


@dataclass
class PlanLookup:
    """status: "hit" (run it), "missing" (build it) or "stale" (never run it; rebuild): `reason` says why."""
    status: str
    plan: Path
    sidecar: Path
    reason: str = ""
    meta: dict = field(default_factory=dict)


def _covers(have: dict, need: dict) -> bool:
    """A profile covers another when its min is <= and its max is >= in every dimension."""
    try:
        return (all(a <= b for a, b in zip(have["min"], need["min"]))
                and all(a >= b for a, b in zip(have["max"], need["max"])))
    except (KeyError, TypeError):
        return False


def lookup(directory: str | os.PathLike, key: PlanKey) -> PlanLookup:
    """Classify the cached plan for `key`'s slot (GPU, TensorRT version, precision).

    "stale" when the sidecar is unreadable, records another bundle, graph, GPU, TensorRT version
    or precision, its profile does not cover key.profile, or the plan's size or hash differs
    from the one recorded (a truncated or overwritten file)."""
    d = Path(directory)
    base = slot_name(key.gpu, key.tensorrt, key.precision)
    plan, sidecar = d / f"{base}.plan", d / f"{base}.json"
    if not plan.exists():
        return PlanLookup("missing", plan, sidecar, f"no cached plan {plan}")
    try:
        meta = json.loads(sidecar.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return PlanLookup("stale", plan, sidecar, f"{plan.name} has no sidecar {sidecar.name} (interrupted build?)")
    except (OSError, ValueError) as e:
        return PlanLookup("stale", plan, sidecar, f"{sidecar} is unreadable ({e})")
    if meta.get("version") != SIDECAR_VERSION:
        return PlanLookup("stale", plan, sidecar, f"{sidecar.name} has sidecar version {meta.get('version')!r}, "
                          f"expected {SIDECAR_VERSION}", meta)
    want = key.as_dict()
    for name in ("bundle_fingerprint", "onnx_sha256", "gpu", "tensorrt", "precision"):
        if meta.get(name) != want[name]:
            have = str(meta.get(name))
            return PlanLookup("stale", plan, sidecar,
                              f"{plan.name} was built for {name} {have[:16]!r}, this engine needs {want[name][:16]!r}", meta)
    if not _covers(meta.get("profile", {}), key.profile):
        return PlanLookup("stale", plan, sidecar, f"{plan.name}'s input profile {meta.get('profile')} does not cover "
                          f"{key.profile} (max_side or scales changed)", meta)
    size = plan.stat().st_size
    if size != meta.get("plan_bytes"):
        return PlanLookup("stale", plan, sidecar, f"{plan.name} is {size} bytes, its sidecar says "
                          f"{meta.get('plan_bytes')} (overwritten or truncated)", meta)
    from .._io import sha256_file
    if sha256_file(plan) != meta.get("plan_sha256"):
        return PlanLookup("stale", plan, sidecar, f"{plan.name} does not match the sha256 in its sidecar", meta)
    return PlanLookup("hit", plan, sidecar, "", meta)


def store(directory: str | os.PathLike, key: PlanKey, plan_bytes: bytes, **extra) -> PlanLookup:
    """Write a plan and then its sidecar, each atomically. A crash between the two leaves a plan
    without a sidecar, which lookup() calls stale: never a sidecar vouching for a half plan."""
    from .._io import write_bytes_atomic
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    base = slot_name(key.gpu, key.tensorrt, key.precision)
    plan, sidecar = d / f"{base}.plan", d / f"{base}.json"
    try:
        sidecar.unlink()  # the old sidecar must not describe the new plan, even for a moment
    except FileNotFoundError:
        pass
    data = bytes(plan_bytes)
    plan_sha256 = write_bytes_atomic(plan, data)
    meta = {"version": SIDECAR_VERSION, **key.as_dict(), "plan_bytes": len(data),
            "plan_sha256": plan_sha256, **extra}
    write_bytes_atomic(sidecar, json.dumps(meta, indent=1, sort_keys=True).encode())
    return PlanLookup("hit", plan, sidecar, "", meta)


@dataclass
class PlanDecision:
    """What the TensorRT backend must do: "run" `path` (from the bundle manifest or the cache), or
    "build" a plan for `key` into `directory` (`note` says why when a stale plan is replaced)."""
    action: str
    key: PlanKey | None = None
    directory: Path | None = None
    path: Path | None = None
    profile: dict = field(default_factory=dict)
    note: str = ""


def decide(bundle, *, gpu: str, tensorrt: str, precision: str, plan_cache=None, max_side: int | None = None,
           build_plan: bool = True) -> PlanDecision:
    """Pick the plan for this GPU / TensorRT version / precision, or say one must be built.

    An export-time plan from the bundle manifest wins when the engine uses the bundle's own
    max_side; else the cache is consulted. A missing or stale cached plan with build_plan=False is
    a BackendUnavailableError naming the reason (never a silent run of a plan for another graph).
    """
    from sgengine.export.tensorrt import profile_shapes
    from .._io import sha256_file
    from ..errors import BackendUnavailableError
    for p in bundle.tensorrt_plans:
        if (p.get("gpu"), p.get("tensorrt"), p.get("precision", "fp32")) == (gpu, tensorrt, precision) \
                and max_side in (None, bundle.max_side):
            return PlanDecision("run", path=Path(bundle.path) / p["file"], profile=p.get("profile", {}).get("image", {}))
    shapes = profile_shapes(bundle.min_side, max_side or bundle.max_side, bundle.head_config.scales)
    onnx_entry = bundle.manifest.get("files", {}).get(bundle.onnx_path.name, {})
    key = PlanKey(gpu=gpu, tensorrt=tensorrt, precision=precision, bundle_fingerprint=bundle.fingerprint,
                  onnx_sha256=onnx_entry.get("sha256") or sha256_file(bundle.onnx_path), profile=shapes)
    directory = cache_dir(bundle, plan_cache)
    found = lookup(directory, key)
    if found.status == "hit":
        return PlanDecision("run", key=key, directory=directory, path=found.plan, profile=shapes)
    if not build_plan:
        raise BackendUnavailableError(
            f"tensorrt backend: {found.status} plan for {gpu}, TensorRT {tensorrt}, {precision}: {found.reason}; "
            "load with build_plan=True to build it (minutes)")
    note = f"rebuilt a stale plan: {found.reason}" if found.status == "stale" else ""
    return PlanDecision("build", key=key, directory=directory, path=found.plan, profile=shapes, note=note)
