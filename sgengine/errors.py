"""Error types. Every error raised for bad input names the input and, where there is one, the fix."""


class SgengineError(Exception):
    """Base class of every error sgengine raises on purpose."""


class InputError(SgengineError, ValueError):
    """A query, image or descriptor that cannot be used (names the input)."""


class ImageDecodeError(InputError):
    """A file or buffer that is not a decodable image (unreadable, truncated, empty, not an image)."""


class CheckpointError(SgengineError, ValueError):
    """A checkpoint that cannot be loaded into the model (lists the offending tensors)."""


class BundleError(SgengineError):
    """A bundle directory that is missing files, has a wrong hash or an unknown format version."""


class IndexError_(SgengineError):
    """An index directory that cannot be opened or appended to (not Python's IndexError)."""


class IndexMismatchError(IndexError_):
    """An index built by another bundle, or with another descriptor dimension."""


class BackendUnavailableError(SgengineError, RuntimeError):
    """A backend or device that was asked for but cannot run here (says why)."""


class ParityError(SgengineError):
    """An exported graph whose output differs from PyTorch beyond the documented tolerance."""


class MemoryLimitError(SgengineError, MemoryError):
    """A query or image that needed more memory than the process could get (names it and its size)."""
