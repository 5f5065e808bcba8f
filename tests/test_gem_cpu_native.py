"""The fused C++ pooling head (sgengine.kernels._cpu via gem_pool_cpu_native) against the float64 head.

Yardsticks, none of them the code under test:
- `ref64`: sgengine.head's regional_gem / gem_plus in float64 on exactly the values the
  kernel received (a float16 map is compared with the float64 head of that float16 map);
- the error rule (STYLE.md): the kernel's error against ref64 is at most twice the error of
  plain PyTorch (the float32 head `gem_pool_reference`) on the same input, plus ATOL, with the
  per-row floor of tests/test_gem_kernels.py (channels below 1e-4 of the row's strongest are
  measured against that floor);
- for NaN/inf/negative maps: PyTorch's float32 head, element for element (which outputs are
  NaN, which inf).

Every compiled variant this CPU runs (AVX-512, AVX2, x86-64 baseline) is tested, not only the
one "auto" picks (tests pin `gem_cpu.ISA`). The binding's own checks (dtype, layout, shape, the
head's constants) are tested on `_cpu.gem_pool` directly, and so is its general path for head
constants other than SPEC's. Maps are fresh random ReLU'd normals each run (seed printed on failure; pin it
with SGENGINE_TEST_SEED). The extension is optional: without it these tests skip, except
`test_native_is_built_when_required`, which fails when SGENGINE_REQUIRE_NATIVE=1 (set in CI).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sgengine.errors import BackendUnavailableError, InputError
from sgengine.head import (GEMP_EPS, GEMP_P, RGEM_MIX, RGEM_P, RGEM_SIZE, available_impls, gem_plus, gem_pool,
                           gem_pool_chain, gem_pool_reference, regional_gem, resolve_impl)
from sgengine.kernels import gem_cpu
from sgengine.kernels.gem_cpu import gem_pool_cpu_native, native_info

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

ISAS = list(_cpu.isas()) if _cpu is not None else ["auto"]


@pytest.fixture(autouse=True)
def _needs_native(request):
    # A module-level importorskip would skip the test above as well.
    if request.node.originalname != "test_native_is_built_when_required":
        pytest.importorskip("sgengine.kernels._cpu", reason="the C++ extension is not built", exc_type=ImportError)


@pytest.fixture
def native(monkeypatch):
    """gem_pool_cpu_native with the compiled variant pinned: native(x, isa)."""
    def run(x: torch.Tensor, isa: str = "auto") -> torch.Tensor:
        monkeypatch.setattr(gem_cpu, "ISA", isa)
        return gem_pool_cpu_native(x)
    return run


def binding(x: torch.Tensor, *, threads: int = 1, isa: str = "auto", **head) -> torch.Tensor:
    """The C++ entry itself on a float32 map (NCHW- or channels-last-contiguous), with SPEC's head
    constants unless `head` overrides some."""
    consts = dict(rgem_p=RGEM_P, rgem_size=RGEM_SIZE, rgem_mix=RGEM_MIX, gemp_p=GEMP_P, gemp_eps=GEMP_EPS)
    consts.update(head)
    cl = not x.is_contiguous()
    arr = x.permute(0, 2, 3, 1).numpy() if cl else x.numpy()
    return torch.from_numpy(_cpu.gem_pool(arr, cl, threads=threads, isa=isa, **consts))


# ----------------------------------------------------------------------------- yardsticks
def ref64(x: torch.Tensor, p: float = RGEM_P, mix: float = RGEM_MIX, gp: float = GEMP_P,
          eps: float = GEMP_EPS) -> torch.Tensor:
    return gem_plus(regional_gem(x.double(), p=p, mix=mix), p=gp, eps=eps)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    ref = ref.double()
    floor = 1e-4 * ref.abs().amax(dim=-1, keepdim=True)
    return (out.double() - ref).abs() / torch.maximum(ref.abs(), floor)


def check(out: torch.Tensor, x: torch.Tensor, what: str, **head) -> None:
    """out against the float64 head under the error rule; `head` (p, mix, gp, eps) for other constants."""
    B, C = x.shape[:2]
    assert out.shape == (B, C) and out.dtype == torch.float32, f"{what}: {tuple(out.shape)} {out.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output at {(~torch.isfinite(out)).nonzero()[:5].tolist()}"
    r = ref64(x, **head)
    err = rel_err(out, r)
    h = dict(p=RGEM_P, mix=RGEM_MIX, gp=GEMP_P, eps=GEMP_EPS) | head
    ref32 = gem_plus(regional_gem(x.float(), p=h["p"], mix=h["mix"]), p=h["gp"], eps=h["eps"])  # plain PyTorch
    base = rel_err(ref32, r).max().item()
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
def test_matches_float64_head(native, shape, layout, isa):
    x = random_map(*shape, salt=1, channels_last=layout == "channels_last")
    check(native(x, isa), x, f"native[{isa}] {shape} {layout}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 2048, 32, 24), (2, 2048, 45, 32)], ids=lambda s: "x".join(map(str, s)))
def test_real_shapes(shape, layout):
    x = random_map(*shape, salt=2, channels_last=layout == "channels_last")
    check(gem_pool_cpu_native(x), x, f"native {shape} {layout}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_other_dtypes(dtype, layout):
    x = random_map(2, 37, 7, 13, dtype, salt=3, channels_last=layout == "channels_last")
    check(gem_pool_cpu_native(x), x, f"native {dtype} {layout}")


@pytest.mark.parametrize("scale", [1e-9, 1e-3, 1e5])
@pytest.mark.parametrize("isa", ISAS)
def test_value_ranges(native, scale, isa):
    """Far from 0..20: values under the GeM+ clamp, near it, and x^4.6 near 1e37 (log2/exp2 range)."""
    x = random_map(2, 21, 6, 9, salt=4, scale=scale, channels_last=isa == ISAS[-1])
    check(native(x, isa), x, f"native[{isa}] scale {scale:g}")


def test_within_1e4_of_chain():
    """Within 1e-4 relative of the official module chain at 2048x32x24 (the acceptance yardstick)."""
    x = random_map(1, 2048, 32, 24, salt=5)
    err = rel_err(gem_pool_cpu_native(x), gem_pool_chain(x).double()).max().item()
    assert err <= 1e-4, f"native vs chain: max rel err {err:.3e} (seed {SEED})"


def test_exact_zeros_give_the_clamp():
    x = torch.zeros(2, 19, 4, 6)
    for layout in (x, x.to(memory_format=torch.channels_last)):
        out = gem_pool_cpu_native(layout)
        torch.testing.assert_close(out, torch.full((2, 19), 1e-8), rtol=1e-6, atol=0)


def test_single_spikes():
    """One non-zero value in a plane: windows that are zero except at an edge, and the corner."""
    x = torch.zeros(1, 18, 7, 5)
    x[0, 1, 0, 0] = 13.0
    x[0, 2, 3, 2] = 0.25
    x[0, 17, 6, 4] = 1e-7
    check(gem_pool_cpu_native(x), x, "native spike nchw")
    check(gem_pool_cpu_native(x.to(memory_format=torch.channels_last)), x, "native spike channels_last")


# ----------------------------------------------------------------------------- layouts, threads
def test_strided_views():
    """Row-strided NCHW (a column crop), a channel slice of a channels-last map, and a layout with
    neither unit stride (copied first) all equal the head on the same values."""
    x = random_map(2, 23, 9, 11, salt=6)
    crop = x[:, :, 1:, 2:]
    assert crop.stride(-1) == 1 and crop.stride(-2) != crop.shape[-1]
    check(gem_pool_cpu_native(crop), crop.contiguous(), "native column crop")
    cl = random_map(2, 40, 5, 7, salt=7, channels_last=True)[:, 3:37]
    assert cl.stride(1) == 1 and cl.stride(-1) == 40
    check(gem_pool_cpu_native(cl), cl.contiguous(), "native channels-last channel slice")
    odd = x.transpose(2, 3)
    assert odd.stride(1) != 1 and odd.stride(-1) != 1
    check(gem_pool_cpu_native(odd), odd.contiguous(), "native transposed map")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_threads_give_identical_results(layout):
    """Each output comes from one plane's work alone: any thread count gives the same bits."""
    x = random_map(3, 67, 9, 10, salt=8, channels_last=layout == "channels_last")
    one = binding(x, threads=1)
    for n in (2, 3, 7):
        assert torch.equal(binding(x, threads=n), one), f"threads={n} differs from threads=1"
    assert torch.equal(gem_pool_cpu_native(x), one), "gem_pool_cpu_native differs from the binding"


def test_layouts_agree():
    x = random_map(2, 53, 8, 6, salt=9)
    a = gem_pool_cpu_native(x)
    b = gem_pool_cpu_native(x.to(memory_format=torch.channels_last))
    assert (a - b).abs().max().item() <= 2e-6 * a.abs().max().item()


# ----------------------------------------------------------------------------- other head constants
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("head", [dict(p=3.0), dict(p=1.7, mix=0.3), dict(gp=3.0, eps=1e-6), dict(mix=0.8),
                                  dict(p=2.5000002)], ids=lambda h: ",".join(f"{k}={v:g}" for k, v in h.items()))
def test_general_constants(head, layout, isa):
    """Constants other than SPEC's run the general path (F^p through log2/exp2 instead of
    F*F*sqrt(F); any mix, q, eps) and meet the same error rule against the float64 head with those
    constants, zero planes and zero windows included."""
    x = random_map(2, 37, 7, 13, salt=13, channels_last=layout == "channels_last")
    names = dict(p="rgem_p", mix="rgem_mix", gp="gemp_p", eps="gemp_eps")
    out = binding(x, isa=isa, **{names[k]: v for k, v in head.items()})
    check(out, x, f"binding[{isa}] {head} {layout}", **head)


def test_general_path_zero_windows_at_large_p():
    """p = 10: a window of exact zeros must give P = 0 (the GeM+ clamp), not FLT_MIN^(1/10) ~ 1.6e-4."""
    x = torch.zeros(1, 3, 6, 6)
    x[0, 1, 5, 5] = 1e-3     # one live corner: most windows are all zeros
    out = binding(x, rgem_p=10.0)
    check(out, x, "binding p=10 sparse", p=10.0)
    assert out[0, 0].item() == pytest.approx(GEMP_EPS, rel=1e-6)


# ----------------------------------------------------------------------------- non-finite maps
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("isa", ISAS)
def test_non_finite_like_pytorch(native, layout, isa):
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
    out = native(x, isa)
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
def test_auto_runs_native_on_the_cpu():
    assert resolve_impl("auto", "cpu") == "cpu_native"
    assert {"cpu_native", "cpu_torch"} <= set(available_impls("cpu"))
    x = random_map(2, 19, 7, 13, salt=12)
    for impl in ("auto", "cpu_native", "cpu_torch"):
        check(gem_pool(x, impl=impl), x, f"gem_pool impl={impl}")
    assert torch.equal(gem_pool(x, impl="auto"), gem_pool_cpu_native(x))


def test_native_refuses_other_devices():
    assert resolve_impl("auto", "cuda") != "cpu_native" and "cpu_native" not in available_impls("cuda")
    with pytest.raises(BackendUnavailableError, match="cpu_native.*cuda"):
        resolve_impl("cpu_native", "cuda")
    with pytest.raises(BackendUnavailableError, match="meta"):
        gem_pool(torch.empty(1, 4, 5, 5, device="meta"), impl="cpu_native")


def test_bad_arguments_are_named(native):
    with pytest.raises(InputError, match=r"h, w >= 3"):
        gem_pool(torch.rand(1, 4, 2, 9), impl="cpu_native")
    with pytest.raises(ValueError, match="isa 'sse9'"):
        native(torch.rand(1, 4, 5, 5), "sse9")


def _call(x, **kw):
    args = dict(channels_last=False, rgem_p=RGEM_P, rgem_size=RGEM_SIZE, rgem_mix=RGEM_MIX, gemp_p=GEMP_P,
                gemp_eps=GEMP_EPS, threads=1, isa="auto")
    args.update(kw)
    return _cpu.gem_pool(x, **args)


GOOD = np.random.default_rng(0).random((1, 4, 5, 6), dtype=np.float32)


@pytest.mark.parametrize("x,kw,match", [
    (GOOD.astype(np.float64), {}, r"x must be float32, got float64"),
    (GOOD.astype(np.float16), {}, r"x must be float32, got float16"),
    (GOOD.transpose(0, 1, 3, 2), {}, r"x must be C-contiguous"),
    (GOOD[:, :, :, ::2], {}, r"x must be C-contiguous"),
    (GOOD[0], {}, r"x must have 4 dimensions \[B, C, h, w\], got shape \(4, 5, 6\)"),
    (GOOD[None], {"channels_last": True}, r"x must have 4 dimensions \[B, h, w, C\]"),
    (GOOD[:, :, :, :2].copy(), {}, r"h x w = 5x2 .*h, w >= 3"),
    (GOOD[:, :2].copy(), {"channels_last": True}, r"h x w = 2x5 .*h, w >= 3"),  # [B, h, w, C] = [1, 2, 5, 6]
    (GOOD, {"threads": 0}, r"threads must be >= 1, got 0"),
    (GOOD, {"isa": "sse9"}, r"isa 'sse9' is not available"),
    (GOOD, {"rgem_size": 3}, r"rgem_size = 3 is not implemented"),
    (GOOD, {"rgem_p": 0.0}, r"rgem_p must be a positive finite number"),
    (GOOD, {"gemp_p": float("nan")}, r"gemp_p must be a positive finite number"),
    (GOOD, {"rgem_mix": 1.0}, r"rgem_mix must be in \(0, 1\)"),
    (GOOD, {"gemp_eps": 1e-45}, r"gemp_eps must be a positive normal float32, got 1e-45"),
], ids=["float64", "float16", "transposed", "strided", "3-D", "5-D", "h,w<3", "channels_last", "threads", "isa",
        "rgem_size", "rgem_p", "gemp_p", "rgem_mix", "gemp_eps"])
def test_binding_checks_its_arguments(x, kw, match):
    """The C++ entry checks dtype (no silent conversion), layout, shape and the head's constants,
    and names the argument."""
    with pytest.raises(ValueError, match=match):
        _call(x, **kw)


def test_binding_takes_only_numpy_arrays():
    with pytest.raises(TypeError):
        _call(torch.from_numpy(GOOD))
    with pytest.raises(TypeError):
        _call(GOOD.tolist())
    out = _call(GOOD)
    assert out.shape == (1, 4) and out.dtype == np.float32


def test_empty_batch():
    assert gem_pool_cpu_native(torch.rand(0, 4, 5, 5)).shape == (0, 4)
    assert _call(np.zeros((2, 0, 5, 5), np.float32)).shape == (2, 0)
