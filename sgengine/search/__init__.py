"""The first stage (SPEC 5): exact top-k over the index rows, and where those rows live.

- exact: `topk_similarity` (exact scan: "upcast" the reference, "split" on CUDA, "cpu_native" the
  one-pass C++ scan on the CPU; `resolve_impl`)
- rows: `DeviceRows` (an Index's rows as its mapped segments, or resident on a GPU) and `search_index`
"""
from .exact import IMPLS, check_queries_and_database, default_chunk_rows, resolve_impl, topk_similarity
from .rows import DeviceRows, device_room_shortfall, index_segments, search_index

__all__ = ["topk_similarity", "resolve_impl", "IMPLS", "check_queries_and_database", "default_chunk_rows",
           "DeviceRows", "search_index", "device_room_shortfall", "index_segments"]
