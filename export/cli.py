"""`python -m sgengine.export` / `sgengine export`: checkpoint (or the built-in default) -> bundle."""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from sgengine.errors import ParityError, SgengineError

from .onnx_export import DEFAULT_OPSET, EXPORTERS
from .parity import DEFAULT_MAX_RATIO, DEFAULT_MIN_COSINE

EXIT_OK, EXIT_PARITY, EXIT_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sgengine.export",
        description="Export a CVNet/SuperGlobal checkpoint (or the built-in EfficientNet-Lite0 default) to a "
                    "bundle: backbone.onnx + weights + manifest.json, after checking the ONNX graph against "
                    "PyTorch on real photos.")
    p.add_argument("checkpoint", nargs="?", help="CVNet/SuperGlobal checkpoint (.pt/.pth); omit for the default model")
    p.add_argument("-o", "--output", required=True, help="bundle directory to write")
    p.add_argument("--default", action="store_true", help="export the built-in default (EfficientNet-Lite0, ImageNet weights)")
    p.add_argument("--trunk", help="a TorchScript trunk file (image [B,3,H,W] -> feature map [B,C,h,w]) instead of a checkpoint")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a checkpoint that only loads with full pickle (can run code: only for files you trust)")
    p.add_argument("--no-relu-plus", action="store_true", help="plain ReLU everywhere (original CVNet) instead of ReLU+")
    p.add_argument("--tensorrt", action="store_true", help="also build a TensorRT plan for this GPU (needs tensorrt and CUDA)")
    p.add_argument("--fp16", action="store_true", help="build the TensorRT plan in fp16 (opt-in; fp32 is the fidelity mode)")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="ONNX exporter: torch.export-based (dynamo), TorchScript tracer (legacy), or auto (dynamo, then legacy)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_MAX_RATIO,
                   help=f"parity: max |diff| of descriptors as a fraction of the smallest distance between "
                        f"different photos (default {DEFAULT_MAX_RATIO:g})")
    p.add_argument("--min-cosine", type=float, default=DEFAULT_MIN_COSINE,
                   help=f"parity: minimum cosine between ONNX and PyTorch descriptors (default {DEFAULT_MIN_COSINE})")
    p.add_argument("--parity-max-side", type=int, default=None,
                   help="shrink the parity photos to this long side (faster; default: their own sizes)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check (recorded in the manifest)")
    return p


def _call(fn, *args, **kwargs):
    """Pass only the keyword arguments `fn` accepts (relu_plus is optional in the model factory)."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def _print_report(report) -> None:
    if report is None:
        return
    if hasattr(report, "summary") and callable(report.summary):
        print("  " + str(report.summary()).replace("\n", "\n  "))
        return
    fields = getattr(report, "__dict__", None) or (report if isinstance(report, dict) else {"report": report})
    for k, v in fields.items():
        if isinstance(v, (list, tuple, set)) and len(v) > 12:
            v = list(v)[:12] + [f"... {len(v) - 12} more"]
        print(f"  {k}: {v}")


def load_model(args):
    from sgengine.model import factory
    relu_plus = not args.no_relu_plus
    if args.trunk:
        import torch
        path = Path(args.trunk)
        if not path.is_file():
            raise SgengineError(f"{path}: no such TorchScript file")
        print(f"loading TorchScript trunk {path}")
        return _call(factory.from_trunk, torch.jit.load(str(path), map_location="cpu"), relu_plus=relu_plus)
    if args.checkpoint and not args.default:
        path = Path(args.checkpoint)
        if not path.is_file():
            raise SgengineError(f"{path}: no such checkpoint file")
        print(f"loading checkpoint {path}")
        model, report = _call(factory.load_checkpoint, str(path), trust_pickle=args.trust_pickle, relu_plus=relu_plus)
        _print_report(report)
        return model
    print("using the built-in default model (EfficientNet-Lite0, ImageNet weights)")
    return _call(factory.default_model, relu_plus=relu_plus)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.checkpoint and args.default:
        print("error: give a checkpoint or --default, not both", file=sys.stderr)
        return EXIT_INPUT
    if args.checkpoint and args.trunk:
        print("error: give a checkpoint or --trunk, not both", file=sys.stderr)
        return EXIT_INPUT
    from .parity import Tolerance
    from .writer import export_bundle
    try:
        model = load_model(args)
        export_bundle(model, args.output, opset=args.opset, check=not args.no_check,
                      tolerance=Tolerance(min_cosine=args.min_cosine, max_ratio=args.tolerance),
                      tensorrt=args.tensorrt, tensorrt_fp16=args.fp16, exporter=args.exporter,
                      parity_max_side=args.parity_max_side)
    except ParityError as e:
        print(f"error: parity check failed, no manifest written ({args.output} is not a bundle):\n{e}", file=sys.stderr)
        return EXIT_PARITY
    except (SgengineError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    print(f"bundle ready: {args.output}")
    return EXIT_OK
