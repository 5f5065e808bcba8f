"""Evaluation: revisited Oxford/Paris and GLDv2 metrics, dataset readers, and `sgengine eval`.

`metrics` and `datasets` need only numpy (and Pillow for images); `run` loads the engine lazily,
so importing the metrics never builds a model.
"""
from .metrics import compute_map, compute_map_protocols, gldv2_map_at_100

__all__ = ["compute_map", "compute_map_protocols", "gldv2_map_at_100"]
