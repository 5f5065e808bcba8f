"""The fused C++ pooling head (sgengine.kernels._cpu via gem_pool_native) against the float64 head.

Yardsticks, none of them the code under test:
- `ref64`: sgengine.model.head's regional_gem / gem_plus in float64 on exactly the values the
  kernel received (a float16 map is compared with the float64 head of that float16 map);
- the error rule (STYLE.md): the kernel's error against ref64 is at most twice the error of
  plain PyTorch (the float32 head `gem_pool_reference`) on the same input, plus ATOL, with the
  per-row floor of tests/test_gem_kernels.py (channels below 1e-4 of the row's strongest are
  measured against that floor);
- for NaN/inf/negative maps: PyTorch's float32 head, element for element (which outputs are
  NaN, which inf).

Every compiled variant this CPU runs (AVX-512, AVX2, x86-64 baseline) is tested, not only the
one "auto" picks. Maps are fresh random ReLU'd normals each run (seed printed on failure; pin it
with SGENGINE_TEST_SEED). The extension is optional: without it these tests skip, except
`test_native_is_built_when_required`, which fails when SGENGINE_REQUIRE_NATIVE=1 (set in CI).
"""
from __future__ import annotations

import os

import pytest
import torch

from sgengine.errors import BackendUnavailableError, InputError
from sgengine.kernels.gem_cpu import gem_pool_chain, native_info
from sgengine.model.head import gem_plus, gem_pool_reference, regional_gem

SEED = int(os.environ.get("SGENGINE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
ATOL = 1e-6  # relative units, as in tests/test_gem_kernels.py


def test_native_is_built_when_required():
    """CI sets SGENGINE_REQUIRE_NATIVE=1 so that a build that silently lost the extension fails."""
    info = native_info()
    if os.environ.get("SGENGINE_REQUIRE_NATIVE", "") in ("", "0"):
        pytest.skip(f"SGENGINE_REQUIRE_NATIVE not set (extension available: {info['available']})")
    assert info["available"], f"sgengine.kernels._cpu is required but does not import: {info['error']}"


try:
    from sgengine.kernels import _cpu
except ImportError:
    _cpu = None
from sgengine.kernels.gem_cpu import gem_pool_native  # noqa: E402
from sgengine.ops import available_impls, cpu_path, gem_pool, resolve_impl  # noqa: E402

ISAS = list(_cpu.isas()) if _cpu is not None else ["auto"]


@pytest.fixture(autouse=True)
def _needs_native(request):
    # A module-level importorskip would skip the test above as well.
    if request.node.originalname != "test_native_is_built_when_required":
        pytest.importorskip("sgengine.kernels._cpu", reason="the C++ extension is not built", exc_type=ImportError)


# ----------------------------------------------------------------------------- yardsticks
def ref64(x: torch.Tensor) -> torch.Tensor:
    return gem_plus(regional_gem(x.double()))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    ref = ref.double()
    floor = 1e-4 * ref.abs().amax(dim=-1, keepdim=True)
    return (out.double() - ref).abs() / torch.maximum(ref.abs(), floor)


def check(out: torch.Tensor, x: torch.Tensor, what: str) -> None:
    B, C = x.shape[:2]
    assert out.shape == (B, C) and out.dtype == torch.float32, f"{what}: {tuple(out.shape)} {out.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output at {(~torch.isfinite(out)).nonzero()[:5].tolist()}"
    r = ref64(x)
    err = rel_err(out, r)
    base = rel_err(gem_pool_reference(x), r).max().item()
    bound = 2 * base + ATOL
    if err.max().item() > bound:
        i = int(err.flatten().argmax())
        pytest.fail(f"{what}: max rel err {err.max().item():.3e} > 2 * {base:.3e} + {ATOL:g} (seed {SEED}); "
                    f"worst at {divmod(i, C)}: got {out.flatten()[i].item():.8g}, float64 {r.flatten()[i].item():.8g}")


def random_map(B, C, h, w, dtype=torch.float32, *, salt=0, channels_last=False, scale=1.0) -> torch.Tensor:
    """ReLU'd normal map spanning 0..~20 (times `scale`) with a spike, a zero plane and a zero window."""
    g = torch.Generator().manual_seed(SEED + salt)
    x = torch.relu(torch.randn(B, C, h, w, generator=g) * 7.0).clamp_(max=22.0)
    x.view(-1)[torch.randint(x.numel(), (1,), generator=g)] = 20.0
    x[0, 0] = 0.0                   # R = 0 everywhere: the GeM+ clamp alone
    if C > 1:
        x[-1, 1, :3, :3] = 0.0      # a window of zeros inside a live plane (box sum floor)
    x = (x * scale).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


# C not a power of two (and not a multiple of the 16-channel channels-last block), h, w in
# {3, 4, 5, 7, 13}, non-square, B 1..3, plus the real 2048-channel sizes.
SHAPES = [(1, 7, 3, 3), (2, 5, 3, 7), (3, 13, 13, 5), (1, 33, 4, 7), (2, 19, 7, 13), (3, 6, 5, 4),
          (1, 37, 3, 13), (2, 130, 45, 32)]


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_head(shape, layout, isa):
    x = random_map(*shape, salt=1, channels_last=layout == "channels_last")
    check(gem_pool_native(x, isa=isa), x, f"native[{isa}] {shape} {layout}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 2048, 32, 24), (2, 2048, 45, 32)], ids=lambda s: "x".join(map(str, s)))
def test_real_shapes(shape, layout):
    x = random_map(*shape, salt=2, channels_last=layout == "channels_last")
    check(gem_pool_native(x), x, f"native {shape} {layout}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_other_dtypes(dtype, layout):
    x = random_map(2, 37, 7, 13, dtype, salt=3, channels_last=layout == "channels_last")
    check(gem_pool_native(x), x, f"native {dtype} {layout}")


@pytest.mark.parametrize("scale", [1e-9, 1e-3, 1e5])
@pytest.mark.parametrize("isa", ISAS)
def test_value_ranges(scale, isa):
    """Far from 0..20: values under the GeM+ clamp, near it, and x^4.6 near 1e37 (log2/exp2 range)."""
    x = random_map(2, 21, 6, 9, salt=4, scale=scale, channels_last=isa == ISAS[-1])
    check(gem_pool_native(x, isa=isa), x, f"native[{isa}] scale {scale:g}")


def test_within_issue_tolerance_of_chain():
    """Issue 3's yardstick: within 1e-4 relative of the official module chain at 2048x32x24."""
    x = random_map(1, 2048, 32, 24, salt=5)
    err = rel_err(gem_pool_native(x), gem_pool_chain(x).double()).max().item()
    assert err <= 1e-4, f"native vs chain: max rel err {err:.3e} (seed {SEED})"


def test_exact_zeros_give_the_clamp():
    x = torch.zeros(2, 19, 4, 6)
    for layout in (x, x.to(memory_format=torch.channels_last)):
        out = gem_pool_native(layout)
        torch.testing.assert_close(out, torch.full((2, 19), 1e-8), rtol=1e-6, atol=0)


def test_single_spikes():
    """One non-zero value in a plane: windows that are zero except at an edge, and the corner."""
    x = torch.zeros(1, 18, 7, 5)
    x[0, 1, 0, 0] = 13.0
    x[0, 2, 3, 2] = 0.25
    x[0, 17, 6, 4] = 1e-7
    check(gem_pool_native(x), x, "native spike nchw")
    check(gem_pool_native(x.to(memory_format=torch.channels_last)), x, "native spike channels_last")


# ----------------------------------------------------------------------------- layouts, threads
def test_strided_views():
    """Row-strided NCHW (a column crop), a channel slice of a channels-last map, and a layout with
    neither unit stride (copied first) all equal the head on the same values."""
    x = random_map(2, 23, 9, 11, salt=6)
    crop = x[:, :, 1:, 2:]
    assert crop.stride(-1) == 1 and crop.stride(-2) != crop.shape[-1]
    check(gem_pool_native(crop), crop.contiguous(), "native column crop")
    cl = random_map(2, 40, 5, 7, salt=7, channels_last=True)[:, 3:37]
    assert cl.stride(1) == 1 and cl.stride(-1) == 40
    check(gem_pool_native(cl), cl.contiguous(), "native channels-last channel slice")
    odd = x.transpose(2, 3)
    assert odd.stride(1) != 1 and odd.stride(-1) != 1
    check(gem_pool_native(odd), odd.contiguous(), "native transposed map")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_threads_give_identical_results(layout):
    """Each output comes from one plane's work alone: any thread count gives the same bits."""
    x = random_map(3, 67, 9, 10, salt=8, channels_last=layout == "channels_last")
    one = gem_pool_native(x, threads=1)
    for n in (2, 3, 7):
        assert torch.equal(gem_pool_native(x, threads=n), one), f"threads={n} differs from threads=1"


def test_layouts_agree():
    x = random_map(2, 53, 8, 6, salt=9)
    a = gem_pool_native(x)
    b = gem_pool_native(x.to(memory_format=torch.channels_last))
    assert (a - b).abs().max().item() <= 2e-6 * a.abs().max().item()


# ----------------------------------------------------------------------------- non-finite maps
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("isa", ISAS)
def test_non_finite_like_pytorch(layout, isa):
    """NaN gives NaN, inf gives inf (or NaN where PyTorch's head makes one), a negative value gives
    NaN (x^2.5), only in the planes that hold them; every other plane stays exact, including the
    neighbours of a bad plane inside one 16-channel channels-last block."""
    x = random_map(2, 37, 6, 7, salt=10)
    x[0, 3, 2, 2] = float("nan")
    x[1, 20, 0, 6] = float("inf")
    x[1, 5, 5, 0] = -0.5
    x[1, 30, 1, 1] = 1e9            # finite, but x^4.6 overflows float32: inf as in PyTorch
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    out = gem_pool_native(x, isa=isa)
    ref = gem_pool_reference(x)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"NaN pattern: {torch.isnan(out).nonzero().tolist()} vs {torch.isnan(ref).nonzero().tolist()}"
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), f"inf pattern: {torch.isinf(out).nonzero().tolist()} vs {torch.isinf(ref).nonzero().tolist()}"
    assert torch.isnan(out[0, 3]) and torch.isnan(out[1, 5]) and not torch.isfinite(out[1, 20])
    good = torch.isfinite(ref)
    r = torch.where(good, ref64(x), 0.0)  # the row floors from the finite planes only
    err = rel_err(torch.where(good, out, 0.0), r).max().item()
    base = rel_err(torch.where(good, ref, 0.0), r).max().item()
    assert good.sum() == good.numel() - 4 and err <= 2 * base + ATOL, \
        f"finite planes: max rel err {err:.3e} > 2 * {base:.3e} + {ATOL:g} (seed {SEED})"


def test_dispatch_rejects_nan_through_native():
    x = random_map(2, 5, 4, 6, salt=11)
    x[1, 3, 2, 2] = float("nan")
    with pytest.raises(InputError, match=r"NaN or inf.*\[1\]"):
        gem_pool(x, impl="cpu_native")


# ----------------------------------------------------------------------------- dispatch, errors
def test_cpu_impl_runs_native():
    assert cpu_path("cpu") == "cpu_native"
    assert {"cpu_native", "cpu_torch", "cpu"} <= set(available_impls("cpu"))
    assert resolve_impl("auto", "cpu") == "cpu"
    x = random_map(2, 19, 7, 13, salt=12)
    for impl in ("cpu", "cpu_native", "cpu_torch"):
        check(gem_pool(x, impl=impl), x, f"gem_pool impl={impl}")
    assert torch.equal(gem_pool(x, impl="cpu"), gem_pool_native(x))


def test_native_refuses_other_devices():
    assert cpu_path("cuda") == "cpu_torch" and "cpu_native" not in available_impls("cuda")
    with pytest.raises(BackendUnavailableError, match="cpu_native.*cuda"):
        resolve_impl("cpu_native", "cuda")
    with pytest.raises(BackendUnavailableError, match="meta"):
        gem_pool_native(torch.empty(1, 4, 5, 5, device="meta"))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"h, w >= 3"):
        gem_pool_native(torch.rand(1, 4, 2, 9))
    with pytest.raises(ValueError, match="isa 'sse9'"):
        gem_pool_native(torch.rand(1, 4, 5, 5), isa="sse9")
    with pytest.raises(InputError, match="threads"):
        gem_pool_native(torch.rand(1, 4, 5, 5), threads=0)
    # The binding's own checks, for callers that bypass the wrapper.
    x, out = torch.rand(1, 4, 5, 2), torch.empty(1, 4)
    with pytest.raises(ValueError, match="below 3x3"):
        _cpu.gem_pool(x.data_ptr(), list(x.shape), list(x.stride()), out.data_ptr())
    x = torch.rand(1, 4, 5, 6).transpose(2, 3)
    with pytest.raises(ValueError, match="unit stride"):
        _cpu.gem_pool(x.data_ptr(), list(x.shape), list(x.stride()), out.data_ptr())


def test_empty_batch():
    assert gem_pool_native(torch.rand(0, 4, 5, 5)).shape == (0, 4)
