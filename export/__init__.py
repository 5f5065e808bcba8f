"""Export a SuperGlobal model to a bundle (installed as sgengine.export).

    from sgengine.export import export_bundle
    bundle = export_bundle(model, "bundle/")          # ONNX graph, weights, parity check, manifest

    python -m sgengine.export model.pt -o bundle/     # or: sgengine export ...
"""
from .cli import main
from .onnx_export import DEFAULT_OPSET, export_onnx
from .parity import Tolerance, check_parity
from .writer import export_bundle

__all__ = ["export_bundle", "main", "export_onnx", "check_parity", "Tolerance", "DEFAULT_OPSET"]
