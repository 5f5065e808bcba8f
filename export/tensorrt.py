"""TensorRT plans from backbone.onnx, with TensorRT's own Python API (import-guarded).

A plan is specific to a GPU model and a TensorRT version, so its file name and its manifest entry
carry both; the runtime (sgengine.backbone.tensorrt_backend) only runs a plan whose GPU and
TensorRT version match. Written for TensorRT 8.6 to 11: EXPLICIT_BATCH is passed only where it
still means something, and BuilderFlag.FP16 (removed in 11, where networks are strongly typed)
is only set where it exists.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

from sgengine.backbone.plan_cache import gpu_slug  # one slug for export-time and cached plans

MAX_BATCH = 8
OPT_SIDE = 1024  # revisited Oxford/Paris images are ~1024 px on the long side


def tensorrt_unavailable_reason() -> str | None:
    """Why a plan cannot be built or run here (None when it can): missing module and/or no CUDA GPU."""
    reasons = []
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        reasons.append(f"the tensorrt Python package is not installed ({e}; pip install tensorrt)")
    import torch
    if not torch.cuda.is_available():
        reasons.append(f"torch sees no CUDA GPU (torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    return "; ".join(reasons) or None


def plan_filename(gpu_name: str, trt_version: str, fp16: bool) -> str:
    return f"backbone.{gpu_slug(gpu_name)}.trt{trt_version}.{'fp16' if fp16 else 'fp32'}.plan"


def profile_shapes(min_side: int, max_side: int, scales: Sequence[float], max_batch: int = MAX_BATCH,
                   input_side_min: int | None = None) -> dict:
    """min/opt/max input shapes covering every scale the engine feeds the backbone.

    The smallest input is the smallest scale of an image already raised to min_side (SPEC 9), so
    the profile starts at int(min_side * min(scales)), below min_side itself.
    """
    lo = input_side_min or max(1, int(min_side * min(scales)))
    hi = int(math.ceil(max_side * max(scales)))
    opt = min(max(OPT_SIDE, lo), hi)
    return {"min": [1, 3, lo, lo], "opt": [1, 3, opt, opt], "max": [max_batch, 3, hi, hi]}


def build_serialized(onnx_path: str | Path, *, shapes: dict, precision: str = "fp32", workspace_gib: float = 4.0,
                     input_name: str = "image", progress: Callable[[str], None] = print) -> tuple[bytes, str]:
    """Build a serialized plan for the current GPU from backbone.onnx; returns (bytes, precision built).

    precision: "fp32" (fidelity mode: TF32 switched off too), "fp16" or "bf16" (opt-in; TensorRT
    keeps fp32 accumulation in its fp16/bf16 convolution and reduction kernels, and the graph's
    output stays float32). shapes: {"min", "opt", "max"} input shapes ([B, 3, H, W]).
    Raises RuntimeError with the reason when TensorRT or the GPU is missing or the build fails.
    """
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be 'fp32', 'fp16' or 'bf16', got {precision!r}")
    reason = tensorrt_unavailable_reason()
    if reason:
        raise RuntimeError(f"TensorRT plan not built: {reason}")
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None and int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(explicit)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision != "fp32":
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise RuntimeError(f"TensorRT {trt.__version__} has no {precision.upper()} builder flag "
                               "(strongly typed networks only): build an fp32 plan or use backend='torch'")
        config.set_flag(flag)
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default; fp32 plans must match the ONNX graph
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
    config.add_optimization_profile(profile)
    gpu = torch.cuda.get_device_name()
    progress(f"  building TensorRT {trt.__version__} plan for {gpu} ({precision}, profile {shapes}); this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a plan from {onnx_path} (see the TensorRT log above)")
    return bytes(memoryview(serialized)), precision


def build_plan(onnx_path: str | Path, out_dir: str | Path, *, min_side: int, max_side: int,
               scales: Sequence[float], fp16: bool = False, max_batch: int = MAX_BATCH,
               workspace_gib: float = 4.0, input_name: str = "image",
               progress: Callable[[str], None] = print) -> dict:
    """Build and write a serialized plan for the current GPU at export. Returns its manifest entry.

    fp32 by default (fidelity mode); fp16=True is opt-in. The runtime's own cache
    (sgengine.backbone.plan_cache) builds plans on demand at Engine.load; this is the export-time
    variant, recorded in the bundle manifest.
    """
    shapes = profile_shapes(min_side, max_side, scales, max_batch)
    data, precision = build_serialized(onnx_path, shapes=shapes, precision="fp16" if fp16 else "fp32",
                                       workspace_gib=workspace_gib, input_name=input_name, progress=progress)
    import tensorrt as trt  # importable: build_serialized checked
    import torch

    from sgengine._io import write_bytes_atomic
    gpu = torch.cuda.get_device_name()
    name = plan_filename(gpu, trt.__version__, precision == "fp16")
    path = Path(out_dir) / name
    write_bytes_atomic(path, bytes(data))
    progress(f"  wrote {name} ({path.stat().st_size / 1e6:.1f} MB)")
    return {"file": name, "gpu": gpu, "tensorrt": trt.__version__, "precision": precision,
            "profile": {input_name: shapes}}
