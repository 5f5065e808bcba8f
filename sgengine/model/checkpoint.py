"""Reading CVNet / SuperGlobal checkpoints into the pycls ResNet + SuperGlobal head.

Accepted layouts: `{"model_state": state_dict, ...}` (CVNet's trainer; other top-level entries
such as the optimizer are not read), `{"state_dict": state_dict}`, or a bare state dict. Keys may
carry any combination of the prefixes `module.` (DataParallel), `encoder_q.` (CVNet's query
encoder) and `globalmodel.` (SuperGlobal's wrapper), e.g. `module.encoder_q.s1.b1.f.a.weight`.

Ignored on purpose, and listed in the report: CVNet's correlation-verification reranker
(`conv2ds.*`, `cv_learner.*`), the momentum encoder (`encoder_k.*`), and the learned GeM exponent
`head.pool.p` (SuperGlobal fixes p = 4.6, SPEC 3.4).

Files are read with `torch.load(weights_only=True)`: a pickle that needs anything beyond tensors
and plain containers is refused unless the caller passes `trust_pickle=True`, because unpickling
can run arbitrary code.
"""
from __future__ import annotations

import os
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError

KNOWN_PREFIXES = ("module.", "encoder_q.", "globalmodel.")
IGNORED_PREFIXES = ("conv2ds.", "cv_learner.", "encoder_k.")
IGNORED_KEYS = ("head.pool.p",)
RESNET_DEPTH_BY_S3_BLOCKS = {6: 50, 23: 101}
WHITENING_KEYS = ("head.fc.weight", "head.fc.bias")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the int torch's legacy (pre-1.6, non-zip) format pickles first


@dataclass
class CheckpointReport:
    """What `load_checkpoint` found and did."""

    path: str
    depth: int
    prefixes: tuple[str, ...]          # distinct prefixes stripped ("" not listed)
    ignored: tuple[str, ...]           # original keys not loaded on purpose
    whitening: bool                    # head.fc present and loaded
    loaded: int = 0                    # tensors loaded
    unexpected: tuple[str, ...] = ()   # original keys neither loaded nor known-ignorable
    container: str = "model_state"     # "model_state", "state_dict" or "bare"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{self.path}: pycls ResNet-{self.depth}, {self.loaded} tensors loaded from "
            + (f"'{self.container}'" if self.container != "bare" else "a bare state dict"),
            "prefixes stripped: " + (", ".join(repr(p) for p in self.prefixes) if self.prefixes else "none"),
            "whitening: " + ("head.fc loaded" if self.whitening
                             else "absent (no head.fc in the checkpoint): descriptors are unwhitened GeM, dim 2048"),
        ]
        if self.ignored:
            groups: dict[str, int] = {}
            for k in self.ignored:
                groups[_ignore_group(k)] = groups.get(_ignore_group(k), 0) + 1
            lines.append("ignored: " + ", ".join(f"{g} ({n})" for g, n in sorted(groups.items())))
        if self.unexpected:
            shown = ", ".join(self.unexpected[:5]) + (" ..." if len(self.unexpected) > 5 else "")
            lines.append(f"not used ({len(self.unexpected)} unrecognised tensors): {shown}")
        lines.extend(self.notes)
        return "\n".join(lines)


def _ignore_group(key: str) -> str:
    _, rest = split_prefix(key)
    for p in IGNORED_PREFIXES:
        if rest.startswith(p):
            return p + "*"
    return rest


def split_prefix(key: str) -> tuple[str, str]:
    """('module.encoder_q.', 's1.b1.f.a.weight') for 'module.encoder_q.s1.b1.f.a.weight'."""
    prefix = ""
    stripped = True
    while stripped:
        stripped = False
        for p in KNOWN_PREFIXES:
            if key.startswith(p):
                prefix, key, stripped = prefix + p, key[len(p):], True
    return prefix, key


def is_ignored(name: str) -> bool:
    """True for an (unprefixed) tensor name that CVNet checkpoints carry and sgengine does not use."""
    return name in IGNORED_KEYS or name.startswith(IGNORED_PREFIXES)


def read_checkpoint_file(path: str | os.PathLike, trust_pickle: bool = False) -> object:
    """torch.load with weights_only unless trusted; every failure becomes a CheckpointError naming `path`."""
    p = Path(path)
    name = os.fspath(path)
    if not p.exists():
        raise CheckpointError(f"{name}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{name}: is a directory; expected a checkpoint file (.pth / .pt)")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{name}: file is empty (0 bytes)")
    try:
        return torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError, ... here
        msg = str(e)
        if not trust_pickle and _needs_full_pickle(p, msg):
            found = re.search(r"GLOBAL ([\w.]+)", msg)
            what = f" (it references {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{name}: the checkpoint holds Python objects beyond tensors{what}, which the safe loader "
                "(torch.load weights_only=True) refuses because unpickling them can run code. If you trust "
                "the file's source, pass trust_pickle=True (CLI: --trust-pickle); better, re-save just the "
                "state dict: torch.save({'model_state': ckpt['model_state']}, 'clean.pth')"
            ) from e
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(msg)})") from e


def _first_line(msg: str) -> str:
    line = msg.strip().splitlines()[0] if msg.strip() else "no detail"
    return line[:200]


def _needs_full_pickle(p: Path, msg: str) -> bool:
    """Did weights_only refuse a real pickle (rather than fail on a file that is no checkpoint at all)?"""
    if "Unsupported global" in msg:
        return True
    if "Weights only load failed" not in msg:
        return False
    # torch reports "Weights only load failed" for any bytes (a JPEG too): only a zip archive or
    # torch's legacy format is a checkpoint that the full unpickler might read.
    return zipfile.is_zipfile(p) or _is_legacy_torch_file(p)


def _is_legacy_torch_file(p: Path) -> bool:
    """Does the file start with torch's legacy magic number? Parsed with pickletools: nothing is executed."""
    try:
        with open(p, "rb") as f:
            for i, (op, arg, _) in enumerate(pickletools.genops(f)):
                if op.name in ("LONG1", "LONG4", "LONG", "INT"):
                    return arg == _LEGACY_MAGIC
                if i > 2:
                    return False
    except Exception:  # not a pickle at all
        return False
    return False


def extract_state_dict(obj: object, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a loaded checkpoint object, and which container they came from."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name}: not a checkpoint (the file holds a {type(obj).__name__}, "
                              "expected a dict with 'model_state' or a state dict)")
    container = "bare"
    for key in ("model_state", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj, container = obj[key], key
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(f"{name}: no tensors found (top-level keys: {keys or 'none'}); expected "
                              "{'model_state': state_dict} or a state dict")
    if container == "bare" and len(tensors) != len(obj):
        others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
        raise CheckpointError(f"{name}: a dict mixing tensors with other entries ({', '.join(others)}) and no "
                              "'model_state'; expected {'model_state': state_dict} or a bare state dict")
    return tensors, container


def strip_prefixes(sd: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(unprefixed kept tensors, distinct prefixes stripped, original keys ignored on purpose)."""
    kept: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    prefixes: list[str] = []
    ignored: list[str] = []
    clashes: list[str] = []
    for key, t in sd.items():
        prefix, rest = split_prefix(key)
        if is_ignored(rest):
            ignored.append(key)
            continue
        if rest in kept:
            clashes.append(f"{origin[rest]} and {key}")
            continue
        kept[rest], origin[rest] = t, key
        if prefix and prefix not in prefixes:
            prefixes.append(prefix)
    if clashes:
        raise CheckpointError(f"{name}: several tensors map to the same name once prefixes are stripped: "
                              + "; ".join(clashes[:10]) + (" ..." if len(clashes) > 10 else ""))
    return kept, prefixes, ignored


def infer_depth(names: list[str] | set[str], name: str) -> int:
    """ResNet depth from the number of s3 blocks (6 -> 50, 23 -> 101)."""
    blocks = {int(m.group(1)) for n in names if (m := re.match(r"s3\.b(\d+)\.", n))}
    if not blocks:
        sample = ", ".join(sorted(names)[:5])
        raise CheckpointError(f"{name}: no pycls ResNet tensors (no 's3.bN.*' keys after stripping prefixes "
                              f"{', '.join(KNOWN_PREFIXES)}); first keys: {sample}")
    n = max(blocks)
    if n not in RESNET_DEPTH_BY_S3_BLOCKS:
        raise CheckpointError(f"{name}: stage s3 has {n} blocks; expected 6 (ResNet-50) or 23 (ResNet-101)")
    return RESNET_DEPTH_BY_S3_BLOCKS[n]


def check_tensors(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], name: str) -> None:
    """Raise one CheckpointError listing every missing, mis-shaped or non-finite tensor (pycls names)."""
    problems = []
    for k, shape in expected.items():
        if k.endswith("num_batches_tracked"):
            continue  # a counter; older checkpoints lack it and it does not change eval results
        if k not in got:
            problems.append(f"  {k}: missing (expected {list(shape)})")
        elif tuple(got[k].shape) != tuple(shape):
            problems.append(f"  {k}: expected {list(shape)}, got {list(got[k].shape)}")
        elif not got[k].is_floating_point():
            problems.append(f"  {k}: expected a floating-point tensor, got {got[k].dtype}")
        elif not torch.isfinite(got[k]).all():
            bad = int((~torch.isfinite(got[k])).sum())
            problems.append(f"  {k}: {bad} NaN/inf values")
    if problems:
        raise CheckpointError(f"{name}: {len(problems)} backbone/head tensors missing, mis-shaped or "
                              "non-finite:\n" + "\n".join(problems))
