"""A bundle on disk: everything the runtime needs to compute descriptors (DESIGN.md "Files on disk").

    bundle/
      manifest.json          what the files are, how to preprocess, hashes, parity figures; written last
      backbone.onnx          input "image" [B,3,H,W] float32 (normalized) -> output "fmap" [B,C,h,w]
      head.safetensors       whitening `fc.weight` [D,D], `fc.bias` [D] (no tensors without whitening)
      backbone.safetensors   the trunk's state dict (families "resnet", "efficientnet-lite0"), or
      backbone.pt            a TorchScript trunk (any other family), for the torch backend
      backbone.*.plan        optional TensorRT plans, one per GPU model / TensorRT version

The manifest is written last and atomically by `sgengine.export`, only after the exported graph
matched PyTorch: a directory without `manifest.json` is not a bundle. `fingerprint` identifies
what computes descriptors (the hashes of the model files plus the model, head and preprocess
blocks); an index records it and refuses descriptors from any other bundle. TensorRT plans are
derived caches of backbone.onnx, so they are hashed but left out of the fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ._io import sha256_file
from .errors import BundleError
from .model.head import HeadConfig, SuperGlobalHead
from .preprocess import Normalization

FORMAT = "sgengine-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ONNX_FILE = "backbone.onnx"
HEAD_FILE = "head.safetensors"
TRUNK_STATE_FILE = "backbone.safetensors"
TRUNK_SCRIPT_FILE = "backbone.pt"
ONNX_INPUT = "image"
ONNX_OUTPUT = "fmap"
# Families whose trunk sgengine can rebuild from a state dict (sgengine.model.factory.build_trunk).
STATE_DICT_FAMILIES = ("resnet", "efficientnet-lite0")
RERANK_DEFAULTS = {"M": 400, "K": 9, "beta": 0.15}


def is_derived_file(name: str) -> bool:
    """Files that are caches of another file (TensorRT plans): hashed, not part of the identity."""
    return name.endswith(".plan")


def compute_fingerprint(manifest: dict) -> str:
    """sha256 over the sorted identity-file hashes and the model, head and preprocess blocks."""
    files = sorted((name, entry["sha256"]) for name, entry in manifest["files"].items() if not is_derived_file(name))
    ident = {"files": files, "model": manifest["model"], "head": manifest["head"], "preprocess": manifest["preprocess"]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_REQUIRED = ("format", "format_version", "model", "head", "preprocess", "files", "fingerprint")
# A manifest is a few kilobytes; anything far larger is not one, and is not read whole.
MAX_MANIFEST_BYTES = 16 << 20
MAX_SCALE = 4.0


def _check_manifest(mpath: Path, m: dict) -> None:
    """BundleError naming the field of a manifest whose blocks have the wrong type or range, so the
    views below (dim, min_side, rerank defaults...) never meet a string or a negative size."""
    def bad(field: str, what: str):
        raise BundleError(f"{mpath}: {field} {what} (a manifest edited by hand, or damaged? re-export the bundle)")

    for block in ("model", "head", "preprocess", "files"):
        if not isinstance(m[block], dict):
            bad(block, f"is a {type(m[block]).__name__}, not an object")
    for name, entry in m["files"].items():
        if not name or name != Path(name).name or name in (".", ".."):
            bad(f"files[{name!r}]", "is not a plain file name inside the bundle")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and type(entry.get("bytes")) is int):
            bad(f"files[{name!r}]", "must be an object with a sha256 string and a bytes count")
    for block, key, low in (("model", "dim", 1), ("model", "channels", 1), ("model", "stride", 1),
                            ("preprocess", "max_side", 1), ("preprocess", "min_side", 1)):
        v = m[block].get(key)
        if type(v) is not int or v < low:
            bad(f"{block}.{key}", f"is {v!r}, not an integer >= {low}")
    if m["preprocess"]["min_side"] > m["preprocess"]["max_side"]:
        bad("preprocess.min_side", f"({m['preprocess']['min_side']}) is above preprocess.max_side")
    for block, parse in (("head", HeadConfig.from_dict), ("preprocess", Normalization.from_dict)):
        try:
            parse(m[block])
        except (KeyError, TypeError, ValueError) as e:
            bad(block, f"cannot be read ({type(e).__name__}: {e})")
    # Each scale's input is s^2 times the image: SPEC's are 1/sqrt(2), 1, sqrt(2).
    scales = HeadConfig.from_dict(m["head"]).scales
    if not scales or not all(0 < x <= MAX_SCALE for x in scales):
        bad("head.scales", f"are {list(scales)}; each must be in (0, {MAX_SCALE:g}]")
    rerank = m.get("rerank", RERANK_DEFAULTS)
    if not isinstance(rerank, dict):
        bad("rerank", "is not an object")
    for key, low, kind in (("M", 1, int), ("K", 0, int), ("beta", 0, (int, float))):
        v = rerank.get(key)
        if isinstance(v, bool) or not isinstance(v, kind) or not (low <= v < float("inf")):
            bad(f"rerank.{key}", f"is {v!r}, not a finite number >= {low}")


class Bundle:
    """A verified bundle directory. Build with `Bundle.load(path)`."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        """Read manifest.json, check the format and version and (verify=True) every file's sha256.

        Raises BundleError naming the bundle and the file (with expected and actual hash) at fault.
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise BundleError(f"{path}: not a directory (a bundle is a directory written by `python -m sgengine.export`)")
        if not mpath.is_file():
            raise BundleError(f"{path}: no {MANIFEST}; not a bundle, or its export did not finish "
                              "(the manifest is written last, after the parity check passed)")
        try:
            size = mpath.stat().st_size
            if size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{mpath}: {size:,} bytes, not a manifest (those are a few kilobytes; the limit is "
                                  f"{MAX_MANIFEST_BYTES:,})")
            manifest = json.loads(mpath.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON
            raise BundleError(f"{mpath}: unreadable manifest ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise BundleError(f"{mpath}: format is {got!r}, expected {FORMAT!r}")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            hint = ("written by a newer sgengine: upgrade sgengine" if isinstance(version, int) and version > FORMAT_VERSION
                    else "re-export the model with this sgengine")
            raise BundleError(f"{mpath}: format_version {version!r} is not supported (this sgengine reads "
                              f"version {FORMAT_VERSION}); {hint}")
        missing = [k for k in _REQUIRED if k not in manifest]
        if missing:
            raise BundleError(f"{mpath}: manifest lacks {missing}")
        _check_manifest(mpath, manifest)
        for name, entry in manifest["files"].items():
            fpath = path / name
            if not fpath.is_file():
                raise BundleError(f"{path}: file {name} listed in the manifest is missing")
            if not verify:
                continue
            size = fpath.stat().st_size
            if size != entry.get("bytes"):
                raise BundleError(f"{path}: {name} is {size} bytes, manifest says {entry.get('bytes')} "
                                  "(file changed or truncated since export)")
            actual = sha256_file(fpath)
            if actual != entry.get("sha256"):
                raise BundleError(f"{path}: {name} sha256 mismatch: expected {entry.get('sha256')}, actual {actual} "
                                  "(file changed since export; re-export the bundle)")
        if verify:
            fp = compute_fingerprint(manifest)
            if fp != manifest["fingerprint"]:
                raise BundleError(f"{mpath}: fingerprint mismatch: manifest says {manifest['fingerprint']}, "
                                  f"its contents give {fp} (manifest edited by hand?)")
        if ONNX_FILE not in manifest["files"]:
            raise BundleError(f"{mpath}: no {ONNX_FILE} listed")
        return cls(path, manifest)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, {self.name}, fingerprint={self.fingerprint[:12]})"

    # ------------------------------------------------------------------ manifest views
    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def model_info(self) -> dict:
        return self.manifest["model"]

    @property
    def family(self) -> str:
        return self.model_info["family"]

    @property
    def depth(self) -> int | None:
        return self.model_info.get("depth")

    @property
    def name(self) -> str:
        return self.model_info.get("name") or self.family

    @property
    def relu_plus(self) -> bool:
        return bool(self.model_info.get("relu_plus", True))

    @property
    def dim(self) -> int:
        return int(self.model_info["dim"])

    @property
    def channels(self) -> int:
        return int(self.model_info["channels"])

    @property
    def stride(self) -> int:
        return int(self.model_info["stride"])

    @property
    def head_config(self) -> HeadConfig:
        return HeadConfig.from_dict(self.manifest["head"])

    @property
    def has_whitening(self) -> bool:
        return bool(self.manifest["head"].get("whitening", False))

    @property
    def normalization(self) -> Normalization:
        return Normalization.from_dict(self.manifest["preprocess"])

    @property
    def max_side(self) -> int:
        return int(self.manifest["preprocess"]["max_side"])

    @property
    def min_side(self) -> int:
        return int(self.manifest["preprocess"]["min_side"])

    @property
    def rerank_defaults(self) -> dict:
        return dict(self.manifest.get("rerank", RERANK_DEFAULTS))

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def tensorrt_plans(self) -> list[dict]:
        """Plans built at export: [{file, gpu, tensorrt, fp16, profile}]."""
        return list(self.manifest.get("tensorrt", {}).get("plans", []))

    @property
    def torch_unavailable_reason(self) -> str | None:
        """Why the torch backend cannot rebuild this bundle's trunk (None when it can)."""
        t = self.manifest.get("torch_trunk", {})
        if t.get("file"):
            return None
        return t.get("reason") or "the bundle stores no PyTorch trunk"

    # ------------------------------------------------------------------ weights
    def whitening(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W [D, D], b [D]) float32 on the CPU, or None when the model has no whitening FC."""
        if not self.has_whitening:
            return None
        t = _load_safetensors(self.path / HEAD_FILE)
        try:
            return t["fc.weight"].float(), t["fc.bias"].float()
        except KeyError as e:
            raise BundleError(f"{self.path / HEAD_FILE}: manifest says whitening, but tensor {e} is missing") from e

    def build_head(self) -> SuperGlobalHead:
        wb = self.whitening()
        head = SuperGlobalHead(self.dim, whitening=wb is not None, config=self.head_config)
        if wb is not None:
            with torch.no_grad():
                head.fc.weight.copy_(wb[0])
                head.fc.bias.copy_(wb[1])
        return head.eval()

    def build_trunk(self) -> torch.nn.Module:
        """The reference PyTorch trunk, from backbone.safetensors (known families) or backbone.pt."""
        t = self.manifest.get("torch_trunk", {})
        fname = t.get("file")
        if not fname:
            raise BundleError(f"{self.path}: no PyTorch trunk in this bundle: {self.torch_unavailable_reason}")
        fpath = self.path / fname
        if t.get("kind") == "torchscript":
            try:
                return torch.jit.load(str(fpath), map_location="cpu").eval()
            except (RuntimeError, OSError, ValueError) as e:
                raise BundleError(f"{fpath}: not a loadable TorchScript trunk ({e}); re-export the bundle") from e
        trunk = _build_known_trunk(self.family, self.depth, self.relu_plus)
        state = _load_safetensors(fpath)
        try:
            trunk.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BundleError(f"{fpath}: does not fit the {self.name} trunk: {e}") from e
        return trunk.eval()

    def build_torch_model(self):
        """The reference SuperGlobalModel (trunk + head + Scale-GeM) rebuilt from the bundle's files."""
        from .model.superglobal import SuperGlobalModel
        model = SuperGlobalModel(self.build_trunk(), self.build_head(), stride=self.stride, channels=self.channels,
                                 family=self.family, depth=self.depth, relu_plus=self.relu_plus,
                                 normalization=self.normalization, name=self.name)
        return model.eval()


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A bundle's .safetensors file, or BundleError naming it (missing, truncated, not safetensors)."""
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ValueError...
        raise BundleError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e}); "
                          "re-export the bundle") from e


def _build_known_trunk(family: str, depth: int | None, relu_plus: bool) -> torch.nn.Module:
    from .model.factory import build_trunk
    try:
        return build_trunk(family, depth, relu_plus)
    except ValueError as e:
        raise BundleError(f"cannot rebuild the trunk: {e}") from e
