"""export_bundle: a SuperGlobalModel -> a verified bundle directory (see sgengine/bundle.py for the layout).

Order matters: graph, weights, parity, optional TensorRT plan, and the manifest last (atomic),
so a directory whose export failed or did not match PyTorch never looks like a bundle.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path
from typing import Callable

import torch

import sgengine
from sgengine._io import sha256_file, write_json_atomic
from sgengine.bundle import (FORMAT, FORMAT_VERSION, HEAD_FILE, MANIFEST, ONNX_FILE, RERANK_DEFAULTS,
                             STATE_DICT_FAMILIES, TRUNK_SCRIPT_FILE, TRUNK_STATE_FILE, Bundle, compute_fingerprint)
from sgengine._io import current_umask
from sgengine.errors import ParityError
from sgengine.preprocess import DEFAULT_MAX_SIDE, Normalization, min_input_side

from .onnx_export import export_onnx
from .parity import Tolerance, check_parity, parity_inputs, require


def _publish(paths) -> None:
    """Give bundle files the mode a plain open() would (0644 under umask 022): the safetensors
    writer and the atomic manifest write create 0600 temporary files and rename them, which
    would leave a bundle only its owner can load."""
    mode = 0o666 & ~current_umask()
    for p in paths:
        os.chmod(p, mode)


def _mb(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} bytes"


def _model_name(model) -> str:
    name = getattr(model, "name", None)
    if name:
        return str(name)
    return f"{model.family}-{model.depth}" if model.depth else str(model.family)


def _descriptor_dim(model) -> int:
    fc = getattr(model.head, "fc", None)
    return int(fc.out_features) if fc is not None else int(model.channels)


def _save_head(model, path: Path) -> bool:
    from safetensors.torch import save_file
    fc = getattr(model.head, "fc", None)
    if fc is None:
        save_file({}, str(path), metadata={"whitening": "false"})
        return False
    save_file({"fc.weight": fc.weight.detach().float().contiguous().clone(),
               "fc.bias": fc.bias.detach().float().contiguous().clone()}, str(path), metadata={"whitening": "true"})
    return True


def _save_trunk(model, out: Path, example_stride: int, progress) -> dict:
    """Store what the torch backend needs to rebuild the trunk; say why not when it cannot."""
    trunk = model.trunk
    if isinstance(trunk, torch.jit.ScriptModule):
        torch.jit.save(trunk, str(out / TRUNK_SCRIPT_FILE))
        return {"file": TRUNK_SCRIPT_FILE, "kind": "torchscript"}
    if model.family in STATE_DICT_FAMILIES:
        from safetensors.torch import save_file
        from sgengine.bundle import _build_known_trunk
        state = {k: v.detach().contiguous().clone() for k, v in trunk.state_dict().items()}
        # The torch backend rebuilds the trunk by family; prove now that it can, not at load time.
        _build_known_trunk(model.family, model.depth, model.relu_plus).load_state_dict(state, strict=True)
        save_file(state, str(out / TRUNK_STATE_FILE))
        return {"file": TRUNK_STATE_FILE, "kind": "state_dict", "family": model.family}
    try:
        scripted = torch.jit.script(trunk)
        how = "scripted"
    except Exception as e_script:
        # A trace records one input size; accept it only if it also reproduces another size.
        g = torch.Generator().manual_seed(1)
        a = torch.randn(1, 3, 5 * example_stride + 3, 6 * example_stride + 1, generator=g)
        b = torch.randn(1, 3, 8 * example_stride + 7, 4 * example_stride + 5, generator=g)
        try:
            with torch.no_grad():
                scripted = torch.jit.trace(trunk, a, check_trace=False)
                ok = torch.allclose(scripted(b), trunk(b), rtol=1e-4, atol=1e-5)
        except Exception as e_trace:
            return {"file": None, "reason": f"trunk {type(trunk).__name__} can be neither scripted "
                    f"({str(e_script).splitlines()[0][:160]}) nor traced ({str(e_trace).splitlines()[0][:160]})"}
        if not ok:
            return {"file": None, "reason": f"trunk {type(trunk).__name__} cannot be scripted and its trace "
                    "depends on the input size; give a TorchScript trunk (--trunk) for the torch backend"}
        how = "traced"
    torch.jit.save(scripted, str(out / TRUNK_SCRIPT_FILE))
    progress(f"  generic trunk {type(trunk).__name__} stored as TorchScript ({how})")
    return {"file": TRUNK_SCRIPT_FILE, "kind": "torchscript"}


def _versions(opset: int, exporter: str) -> dict:
    import onnx
    import onnxruntime
    v = {"sgengine": sgengine.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
         "onnxruntime": onnxruntime.__version__, "opset": opset, "exporter": exporter}
    try:
        import onnxscript
        v["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return v


def export_bundle(model, out_dir: str | os.PathLike, *, opset: int | None = None, check: bool = True,
                  tolerance: Tolerance | float = Tolerance(), min_cosine: float | None = None,
                  tensorrt: bool = False, tensorrt_fp16: bool = False, exporter: str = "auto",
                  parity_max_side: int | None = None, progress: Callable[[str], None] = print) -> Bundle:
    """Export `model` (a SuperGlobalModel) to the bundle directory `out_dir` and return it loaded.

    check: run the parity check (ONNX Runtime vs PyTorch on real photos; see export/parity.py) and
    raise sgengine.errors.ParityError, writing no manifest, when it fails. tolerance: a Tolerance,
    or a float giving the max-diff / smallest-inter-photo-distance ratio (min_cosine sets the other
    bound). parity_max_side: shrink the parity photos (tests). tensorrt: also build a TensorRT plan
    for this GPU when TensorRT and a CUDA GPU are present (otherwise says why not and goes on).
    """
    from .tensorrt import build_plan, tensorrt_unavailable_reason

    t_all = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest_path.unlink()  # an old manifest must never describe the files we are about to replace
    if not isinstance(tolerance, Tolerance):
        tolerance = Tolerance(max_ratio=float(tolerance))
    if min_cosine is not None:
        tolerance = Tolerance(min_cosine=float(min_cosine), max_ratio=tolerance.max_ratio)
    model = model.eval()
    norm: Normalization = getattr(model, "normalization", None) or Normalization()
    scales = tuple(model.scales)
    min_side = min_input_side(model.stride, scales)
    name = _model_name(model)
    steps = 5 if tensorrt else 4
    progress(f"exporting {name} ({model.family}, ReLU+ {'on' if model.relu_plus else 'off'}, "
             f"{'with' if getattr(model.head, 'fc', None) is not None else 'no'} whitening) to {out}")

    t0 = time.perf_counter()
    progress(f"[1/{steps}] ONNX graph of the trunk (input 'image' [B,3,H,W] -> output 'fmap', dynamic B/H/W)")
    info = export_onnx(model.trunk, out / ONNX_FILE, stride=model.stride, opset=opset, exporter=exporter,
                       progress=progress)
    g = info["graph"]
    progress(f"  {ONNX_FILE}: {_mb(out / ONNX_FILE)}, opset {info['opset']}, {info['exporter']} exporter, "
             f"{g['nodes']} nodes {g['ops']}; output dims {g['output']['dims']} ({time.perf_counter() - t0:.1f} s)")

    progress(f"[2/{steps}] weights")
    whitening = _save_head(model, out / HEAD_FILE)
    progress(f"  {HEAD_FILE}: {_mb(out / HEAD_FILE)} ({'whitening fc.weight, fc.bias' if whitening else 'no whitening'})")
    torch_trunk = _save_trunk(model, out, model.stride, progress)
    if torch_trunk.get("file"):
        progress(f"  {torch_trunk['file']}: {_mb(out / torch_trunk['file'])} (PyTorch trunk for the torch backend)")
    else:
        progress(f"  no PyTorch trunk stored: {torch_trunk['reason']}")

    parity: dict = {"checked": False}
    if check:
        from sgengine.backbone.onnxruntime_backend import OnnxRuntimeBackbone
        t0 = time.perf_counter()
        progress(f"[3/{steps}] parity: ONNX Runtime (CPU) vs PyTorch, full pipeline "
                 f"({len(scales)} scales, head, Scale-GeM) on real photos")
        backbone = OnnxRuntimeBackbone(out / ONNX_FILE, device="cpu")
        inputs = parity_inputs(norm, max_side=parity_max_side, min_side=min_side)
        report = check_parity(model, backbone, inputs, tolerance)
        progress(report.table())
        progress(f"  ({time.perf_counter() - t0:.1f} s)")
        require(report, f"{out}/{ONNX_FILE}")
        parity = {"checked": True, "backend": "onnxruntime CPUExecutionProvider", **report.to_dict()}
    else:
        progress(f"[3/{steps}] parity check skipped (check=False): the manifest records that")

    plans = []
    if tensorrt:
        progress(f"[4/{steps}] TensorRT plan")
        reason = tensorrt_unavailable_reason()
        if reason:
            progress(f"  skipped: {reason}")
        else:
            try:
                plans.append(build_plan(out / ONNX_FILE, out, min_side=min_side, max_side=DEFAULT_MAX_SIDE,
                                        scales=scales, fp16=tensorrt_fp16, progress=progress))
            except RuntimeError as e:
                progress(f"  skipped: {e}")

    progress(f"[{steps}/{steps}] manifest")
    files = [ONNX_FILE, HEAD_FILE] + ([torch_trunk["file"]] if torch_trunk.get("file") else []) + [p["file"] for p in plans]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"family": model.family, "depth": model.depth, "name": name, "relu_plus": bool(model.relu_plus),
                  "channels": int(model.channels), "stride": int(model.stride), "dim": _descriptor_dim(model)},
        "head": {**model.config.to_dict(), "whitening": whitening},
        "preprocess": {**norm.to_dict(), "max_side": DEFAULT_MAX_SIDE, "min_side": int(min_side)},
        "rerank": dict(RERANK_DEFAULTS),
        "onnx": {"file": ONNX_FILE, "input": g["input"], "output": g["output"], "opset": info["opset"],
                 "exporter": info["exporter"]},
        "torch_trunk": torch_trunk,
        "tensorrt": {"plans": plans},
        "files": {f: {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size} for f in files},
        "versions": _versions(info["opset"], info["exporter"]),
        "parity": parity,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest["fingerprint"] = compute_fingerprint(manifest)
    _publish(out / f for f in files)
    write_json_atomic(manifest_path, manifest)
    _publish([manifest_path])
    bundle = Bundle.load(out)
    progress(f"  {MANIFEST} written; fingerprint {bundle.fingerprint[:16]}; done in {time.perf_counter() - t_all:.1f} s")
    return bundle


__all__ = ["export_bundle", "ParityError", "Tolerance"]
