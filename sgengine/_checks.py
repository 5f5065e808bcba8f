"""The input checks every public entry point shares.

Each public entry (`Engine.load/search/embed`, `Index.*`, `gem_pool`, `rerank_candidates`,
`superglobal_rerank`, `topk_similarity`, the CLI) checks its arguments once with these; the
functions below those entries trust what they are given. Every error names the argument.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .errors import BackendUnavailableError, InputError


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as a Python int (bools refused), within [minimum, maximum] where given."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise InputError(f"{name} must be <= {maximum}, got {v}")
    return v


def check_real(value: Any, name: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """`value` as a finite float (bools and strings refused), within [minimum, maximum] where given."""
    if isinstance(value, (bool, str, bytes)):
        raise InputError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise InputError(f"{name} must be finite, got {value!r}")
    if minimum is not None and v < minimum:
        raise InputError(f"{name} must be >= {minimum:g}, got {v:g}")
    if maximum is not None and v > maximum:
        raise InputError(f"{name} must be <= {maximum:g}, got {v:g}")
    return v


def check_bool(value: Any, name: str) -> bool:
    """`value` if it is a bool (numpy's included); "yes", 1 or None are refused rather than guessed."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(value: Any, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_finite(x: torch.Tensor | np.ndarray, name: str) -> None:
    """InputError naming `name` when `x` holds NaN or inf."""
    ok = bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else bool(np.isfinite(x).all())
    if not ok:
        raise InputError(f"{name}: contains NaN or inf values")


def check_unit_rows(x: torch.Tensor, name: str, tolerance: float) -> None:
    """InputError naming `name` and the first bad row of the floating x [n, D]: a row holding NaN
    or inf, an all-zero row, or one whose L2 norm (in float64) is off 1 by more than `tolerance`."""
    if not x.numel():
        return
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        raise InputError(f"{name} row {int(torch.nonzero(~finite)[0, 0])} contains NaN or inf values")
    norms = torch.linalg.vector_norm(x.double(), dim=1)
    bad = (norms - 1).abs() > tolerance
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        what = "is all zeros" if float(norms[i]) == 0 else f"has L2 norm {float(norms[i]):.6g}"
        raise InputError(f"{name} row {i} {what}; descriptors must be L2-normalized (|norm - 1| <= {tolerance:g}), "
                         "as Engine.embed returns them")


def check_tensor(x: Any, name: str, ndim: int, shape_doc: str) -> torch.Tensor:
    """A floating torch.Tensor of `ndim` dimensions, or an InputError naming it."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise InputError(f"{name} must be {ndim}-D {shape_doc}, got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be floating point, got {x.dtype}")
    return x


def parse_device(device: Any) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device that exists here; bare 'cuda' is the current GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device={device!r} asked for, but torch sees no CUDA GPU on this machine")
    if dev.type == "cuda" and dev.index is None:
        # One GPU for every part (ORT's device_id, streams, Triton, graphs): "cuda" is the current one, now.
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise BackendUnavailableError(f"device={device!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    return dev


__all__ = ["check_int", "check_real", "check_bool", "check_choice", "check_finite", "check_unit_rows",
           "check_tensor", "parse_device"]
