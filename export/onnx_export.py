"""Trunk -> backbone.onnx: input "image" [B,3,H,W] float32 -> output "fmap" [B,C,h,w], dynamic B/H/W.

Exporter choice (measured with torch 2.13 on this project's trunks; both calls exist unchanged
in torch 2.11): the torch.export-based exporter (`dynamo=True`) is the default. It gives a clean
graph (ResNet-50: 53 Conv + 49 Clip + 16 Add + 1 MaxPool, BatchNorm folded, no Identity or
Constant clutter), records the output dims as expressions of the input dims, and, unlike the
TorchScript tracer, refuses rather than silently bakes in a shape-dependent branch (TF "SAME"
padding depends on the parity of H and W). The legacy tracer (`dynamo=False`, deprecated since
torch 2.9) is the fallback for TorchScript trunks, which torch.export cannot take, and for trunks
torch.export fails on; a traced graph is only accepted after it is checked at shapes other than
the one it was traced at (the parity check does that on photos of several sizes).
The opset is pinned (DEFAULT_OPSET) so torch 2.11 and 2.13 write the same operator set.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Callable

import torch

from sgengine.errors import SgengineError

DEFAULT_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "fmap"
EXPORTERS = ("auto", "dynamo", "legacy")


class ExportFailed(SgengineError, RuntimeError):
    """Neither exporter produced a valid graph (the message lists each one's error)."""


def _holds_torchscript(trunk: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.jit.ScriptModule) for m in trunk.modules())


def _example(trunk: torch.nn.Module, stride: int) -> torch.Tensor:
    # Batch 2 and a non-square size that is not a multiple of the stride, so neither the batch
    # nor H/W can be specialized to a "nice" value during tracing.
    h, w = 7 * stride + 5, 9 * stride + 3
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, h, w, generator=g)


def _export_dynamo(trunk: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    from torch.export import Dim
    batch = Dim("batch", min=1, max=1024)
    height = Dim("height", min=8, max=16384)
    width = Dim("width", min=8, max=16384)
    # torch.onnx prints its own progress lines and logs a warning per missing torchvision op; keep
    # the export's output to sgengine's own steps (failures still raise).
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                trunk, (example,), str(path), dynamo=True, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch, 2: height, 3: width},),
                external_data=False, optimize=True, verbose=False,
            )
    finally:
        onnx_log.setLevel(level)


def _export_legacy(trunk: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            trunk, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                          OUTPUT_NAME: {0: "batch", 2: "h", 3: "w"}},
            do_constant_folding=True,
        )


def check_graph(path: Path) -> dict:
    """onnx.checker (with shape inference) plus the interface sgengine relies on. Returns a summary."""
    import onnx
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    ins = {i.name: i for i in model.graph.input}
    outs = {o.name: o for o in model.graph.output}
    if list(ins) != [INPUT_NAME] or list(outs) != [OUTPUT_NAME]:
        raise ExportFailed(f"{path}: graph interface is {list(ins)} -> {list(outs)}, expected [{INPUT_NAME!r}] -> [{OUTPUT_NAME!r}]")

    def dims(v):
        return [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]

    in_dims, out_dims = dims(ins[INPUT_NAME]), dims(outs[OUTPUT_NAME])
    # torch.export names output dims by their formula in the input dims, which grows to kilobytes
    # for trunks with per-layer padding arithmetic: summarize those as "dynamic".
    out_dims = [d if not isinstance(d, str) or len(d) <= 48 else "dynamic" for d in out_dims]
    static = [i for i in (0, 2, 3) if not isinstance(in_dims[i], str)]
    if len(in_dims) != 4 or static:
        raise ExportFailed(f"{path}: input dims {in_dims} are not dynamic in batch/height/width")
    if ins[INPUT_NAME].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ExportFailed(f"{path}: input is not float32")
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"input": {"name": INPUT_NAME, "dims": in_dims}, "output": {"name": OUTPUT_NAME, "dims": out_dims},
            "opset": opset, "nodes": len(model.graph.node), "ops": dict(sorted(ops.items()))}


def export_onnx(trunk: torch.nn.Module, path: str | Path, *, stride: int = 32, opset: int | None = None,
                exporter: str = "auto", progress: Callable[[str], None] = print) -> dict:
    """Write the trunk as ONNX and check it. Returns {exporter, opset, graph summary}.

    exporter: "auto" (torch.export-based, falling back to the tracer), "dynamo" or "legacy".
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    opset = int(opset or DEFAULT_OPSET)
    trunk = trunk.eval()
    example = _example(trunk, stride)
    scripted = _holds_torchscript(trunk)
    if scripted and not isinstance(trunk, torch.jit.ScriptModule):
        # A module wrapping a TorchScript trunk (from_trunk's clamp wrapper): the tracer cannot
        # enter a ScriptModule it was not given, so script the wrapper as a whole.
        try:
            trunk = torch.jit.script(trunk)
        except Exception as e:
            raise ExportFailed(f"the trunk wraps TorchScript and cannot be scripted as a whole: {e}") from e
    order = {"auto": ["legacy"] if scripted else ["dynamo", "legacy"], "dynamo": ["dynamo"], "legacy": ["legacy"]}[exporter]
    errors = []
    for name in order:
        try:
            if path.exists():
                path.unlink()
            (_export_dynamo if name == "dynamo" else _export_legacy)(trunk, example, path, opset)
            summary = check_graph(path)
        except Exception as e:  # exporters raise many types; the message says which step failed
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours its messages
            first = text.splitlines()[0] if text else type(e).__name__
            errors.append(f"{name}: {type(e).__name__}: {first}")
            if len(order) > 1 and name != order[-1]:
                progress(f"  torch.export-based exporter failed ({first[:200]}); trying the TorchScript tracer")
            continue
        return {"exporter": name, "opset": summary["opset"], "graph": summary}
    raise ExportFailed("ONNX export failed: " + " | ".join(errors))
