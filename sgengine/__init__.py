"""sgengine: SuperGlobal image retrieval as a low-latency engine.

    engine = sgengine.Engine.load("bundle/", index="index/")
    result = engine.search("query.jpg", k=10)
"""
__version__ = "0.2.0"

from .engine import Engine, SearchResult  # noqa: E402
from .errors import (BackendUnavailableError, BundleError, CheckpointError, ImageDecodeError,  # noqa: E402
                     IndexMismatchError, InputError, ParityError, SgengineError)
from .index import Index  # noqa: E402
from .head import gem_pool  # noqa: E402
from .rerank import superglobal_rerank  # noqa: E402

__all__ = [
    "Engine", "SearchResult", "Index", "superglobal_rerank", "gem_pool",
    "SgengineError", "InputError", "ImageDecodeError", "CheckpointError", "BundleError",
    "IndexMismatchError", "BackendUnavailableError", "ParityError", "__version__",
]
