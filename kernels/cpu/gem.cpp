// Fused Regional-GeM + GeM+ pooling head on the CPU (SPEC 3.3-3.4): sgengine.kernels._cpu.
//
//   R = 0.5 P + 0.5 F,  P = (mean over the 5x5 window of F^2.5, ReflectionPad 2)^(1/2.5)
//   g = (mean over positions of max(R, 1e-8)^4.6)^(1/4.6)                     -> [B, C] float32
//
// One pass per channel plane (or per block of 16 channels for channels-last maps), all in L1/L2:
// F^2.5 as F*F*sqrt(F) into a row-padded buffer, 5-row sums into a column-padded buffer, 5-column
// sums, then the mix, clamp, ^4.6 and the mean. The two fractional powers go through log2/exp2
// polynomials written so that GCC vectorizes them (no libm calls in the inner loops).
//
// Numerics (why the build needs no -ffast-math):
// - the polynomials are accurate to a few float32 ulps on the ranges they see (box >= 1e-30 after
//   the clamp, 2R >= 2e-8), and the sum over positions is taken in double, so the result sits
//   within the float32 PyTorch head's own rounding error of the float64 head;
// - planes holding NaN, inf or negative values never reach the polynomials: a per-plane check
//   sends them to a scalar std::pow path that propagates NaN/inf exactly as PyTorch's float32 head
//   does (the Python wrapper then rejects the descriptor);
// - finite maps whose powers overflow float32 (F above ~1e15 for F^2.5, R above ~2e8 for R^4.6)
//   give inf, as the float32 reference does: exp2 saturates to inf past 2^128.
//
// ISA: the kernel is compiled three times (x86-64 baseline, AVX2+FMA, AVX-512) from the same
// inline code and picked at run time with __builtin_cpu_supports, so the wheel needs no -march.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "gem_math.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace sgengine_gem;

namespace {

SG_INLINE bool outside_domain(float v) {
  // NaN, +-inf and negatives: the scalar path handles them like PyTorch does.
  return !(v >= 0.0f && v <= 3.4028234663852886e38f);
}

SG_INLINE int reflect(int k, int n) {
  k = k < 0 ? -k : k;
  return k >= n ? 2 * (n - 1) - k : k;
}

SG_INLINE float finish(double sum, int hw) {
  return static_cast<float>(0.5 * std::pow(sum / hw, kInvGemP));
}

// The float32 reference, one plane at a time, with std::pow: for planes outside the domain.
float plane_scalar(const float* x, int64_t sh, int64_t sw, int h, int w) {
  const float inv_area = 1.0f / (kSize * kSize);
  double sum = 0.0;
  for (int i = 0; i < h; ++i) {
    for (int j = 0; j < w; ++j) {
      float acc = 0.0f;
      for (int di = -2; di <= 2; ++di)
        for (int dj = -2; dj <= 2; ++dj)
          acc += std::pow(x[reflect(i + di, h) * sh + reflect(j + dj, w) * sw], 2.5f);
      const float f = x[i * sh + j * sw];
      const float r = 0.5f * std::pow(acc * inv_area, 0.4f) + 0.5f * f;
      const float c = std::isnan(r) ? r : std::max(r, 1e-8f);
      sum += std::pow(c, kGemP);
    }
  }
  return static_cast<float>(std::pow(sum / (h * w), kInvGemP));
}

struct Scratch {
  std::vector<float> u, v, y, x;
  void reserve(size_t nu, size_t nv, size_t ny) {
    if (u.size() < nu) u.resize(nu);
    if (v.size() < nv) v.resize(nv);
    if (y.size() < ny) y.resize(ny);
    if (x.size() < ny) x.resize(ny);
  }
};

// ---------------------------------------------------------------------------- NCHW planes
// x: one plane, rows sh apart, columns contiguous. Lanes of the sum run along positions.
SG_INLINE float plane_rows(const float* __restrict x, int64_t sh, int h, int w, Scratch& s) {
  const int wp = w + 4;
  float* __restrict U = s.u.data();  // [h + 4][w]  F^2.5, rows reflected
  float* __restrict V = s.v.data();  // [h][w + 4]  5-row sums, columns reflected
  float* __restrict Y = s.y.data();  // [h * w]     window sums, then (2R)^4.6
  int bad = 0;
  for (int i = 0; i < h; ++i) {
    const float* __restrict xr = x + i * sh;
    float* __restrict ur = U + (i + 2) * w;
    for (int j = 0; j < w; ++j) {
      const float f = xr[j];
      bad |= outside_domain(f);
      ur[j] = pow25(f);
    }
  }
  if (bad) return plane_scalar(x, sh, 1, h, w);
  std::memcpy(U, U + 4 * w, w * sizeof(float));
  std::memcpy(U + w, U + 3 * w, w * sizeof(float));
  std::memcpy(U + (h + 2) * w, U + h * w, w * sizeof(float));
  std::memcpy(U + (h + 3) * w, U + (h - 1) * w, w * sizeof(float));
  for (int i = 0; i < h; ++i) {
    const float* __restrict a = U + i * w;
    float* __restrict vr = V + i * wp + 2;
    for (int j = 0; j < w; ++j) vr[j] = a[j] + a[j + w] + a[j + 2 * w] + a[j + 3 * w] + a[j + 4 * w];
    float* r = V + i * wp;
    r[0] = r[4];
    r[1] = r[3];
    r[w + 2] = r[w];
    r[w + 3] = r[w - 1];
  }
  // Column sums for the whole plane first, then the pointwise tail over h*w contiguous positions:
  // full-width vectors instead of one vector plus a remainder per row.
  for (int i = 0; i < h; ++i) {
    const float* __restrict a = V + i * wp;
    float* __restrict yr = Y + i * w;
    for (int j = 0; j < w; ++j) yr[j] = a[j] + a[j + 1] + a[j + 2] + a[j + 3] + a[j + 4];
  }
  const float* __restrict X = x;
  if (sh != w) {  // rows of a strided plane packed once, so the tail reads one contiguous run
    float* __restrict xc = s.x.data();
    for (int i = 0; i < h; ++i) std::memcpy(xc + i * w, x + i * sh, w * sizeof(float));
    X = xc;
  }
  const int n = h * w;
  gem_terms(Y, X, n);
  // Sum in double lanes: no reassociation is needed for the vectorizer, and the total over up to
  // thousands of positions keeps full float32 accuracy.
  double lane[kLanes] = {0.0};
  int k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += static_cast<double>(Y[k + l]);
  for (int l = 0; k + l < n; ++l) lane[l] += static_cast<double>(Y[k + l]);
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  return finish(sum, n);
}

// ---------------------------------------------------------------------------- channels-last
// x points at channel c0 of position (0, 0); positions sh / sw apart, channels contiguous.
// L channels are carried side by side through every step, so each step is L-wide vector work
// and the map is read in 4*L-byte runs with no layout copy.
template <int L>
SG_INLINE void block_cl(const float* __restrict x, int64_t sh, int64_t sw, int h, int w,
                        Scratch& s, float* out) {
  const int wp = w + 4;
  const size_t row = static_cast<size_t>(w) * L;
  float* __restrict U = s.u.data();  // [h + 4][w][L]  F^2.5, rows reflected
  float* __restrict V = s.v.data();  // [h][w + 4][L]  5-row sums, columns reflected
  float* __restrict X = s.x.data();  // [h][w][L]      F, packed
  float* __restrict Y = s.y.data();  // [w][L]         one row of window sums, then (2R)^4.6
  int bad = 0;
  for (int i = 0; i < h; ++i)
    for (int j = 0; j < w; ++j) {
      const float* __restrict xp = x + i * sh + j * sw;
      float* __restrict up = U + (i + 2) * row + j * L;
      float* __restrict xq = X + i * row + j * L;
      for (int l = 0; l < L; ++l) {
        const float f = xp[l];
        bad |= outside_domain(f);
        xq[l] = f;
        up[l] = pow25(f);
      }
    }
  if (bad) {
    for (int l = 0; l < L; ++l) out[l] = plane_scalar(x + l, sh, sw, h, w);
    return;
  }
  std::memcpy(U, U + 4 * row, row * sizeof(float));
  std::memcpy(U + row, U + 3 * row, row * sizeof(float));
  std::memcpy(U + (h + 2) * row, U + h * row, row * sizeof(float));
  std::memcpy(U + (h + 3) * row, U + (h - 1) * row, row * sizeof(float));
  for (int i = 0; i < h; ++i) {
    const float* __restrict a = U + i * row;
    float* __restrict vr = V + (static_cast<size_t>(i) * wp + 2) * L;
    for (size_t k = 0; k < row; ++k)
      vr[k] = a[k] + a[k + row] + a[k + 2 * row] + a[k + 3 * row] + a[k + 4 * row];
    float* r = V + static_cast<size_t>(i) * wp * L;
    std::memcpy(r, r + 4 * L, L * sizeof(float));
    std::memcpy(r + L, r + 3 * L, L * sizeof(float));
    std::memcpy(r + (w + 2) * L, r + w * L, L * sizeof(float));
    std::memcpy(r + (w + 3) * L, r + (w - 1) * L, L * sizeof(float));
  }
  double sum[L];
  for (int l = 0; l < L; ++l) sum[l] = 0.0;
  for (int i = 0; i < h; ++i) {  // row by row: the row buffer stays in L1
    const float* __restrict a = V + static_cast<size_t>(i) * wp * L;
    for (size_t k = 0; k < row; ++k) Y[k] = a[k] + a[k + L] + a[k + 2 * L] + a[k + 3 * L] + a[k + 4 * L];
    gem_terms(Y, X + i * row, static_cast<int>(row));
    for (int j = 0; j < w; ++j)
      for (int l = 0; l < L; ++l) sum[l] += static_cast<double>(Y[j * L + l]);
  }
  for (int l = 0; l < L; ++l) out[l] = finish(sum[l], h * w);
}

// ---------------------------------------------------------------------------- work ranges
struct Job {
  const float* x;
  float* out;  // [B, C] contiguous
  int64_t B, C, h, w, sb, sc, sh, sw;
  bool channels_last;
  int64_t blocks_per_item() const { return channels_last ? (C + kLanes - 1) / kLanes : C; }
  int64_t items() const { return B * blocks_per_item(); }
};

SG_INLINE void run_range(const Job& jb, int64_t begin, int64_t end) {
  const int h = static_cast<int>(jb.h), w = static_cast<int>(jb.w);
  Scratch s;
  const size_t lanes = jb.channels_last ? kLanes : 1;
  s.reserve((h + 4) * w * lanes, h * (w + 4) * lanes, static_cast<size_t>(h) * w * lanes);
  const int64_t per = jb.blocks_per_item();
  for (int64_t it = begin; it < end; ++it) {
    const int64_t b = it / per, blk = it % per;
    if (!jb.channels_last) {
      jb.out[b * jb.C + blk] = plane_rows(jb.x + b * jb.sb + blk * jb.sc, jb.sh, h, w, s);
      continue;
    }
    const int64_t c0 = blk * kLanes;
    const float* xb = jb.x + b * jb.sb + c0;
    float* ob = jb.out + b * jb.C + c0;
    if (c0 + kLanes <= jb.C) {
      block_cl<kLanes>(xb, jb.sh, jb.sw, h, w, s, ob);
    } else {
      for (int64_t c = c0; c < jb.C; ++c) block_cl<1>(xb + (c - c0), jb.sh, jb.sw, h, w, s, ob + (c - c0));
    }
  }
}

void run_range_baseline(const Job& jb, int64_t begin, int64_t end) { run_range(jb, begin, end); }
#if SG_X86_DISPATCH
SG_TARGET_AVX2 void run_range_avx2(const Job& jb, int64_t begin, int64_t end) { run_range(jb, begin, end); }
SG_TARGET_AVX512 void run_range_avx512(const Job& jb, int64_t begin, int64_t end) { run_range(jb, begin, end); }
#endif

using RangeFn = void (*)(const Job&, int64_t, int64_t);

std::vector<std::string> supported_isas() {
  std::vector<std::string> isas;
#if SG_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    isas.push_back("avx512");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back("avx2");
#endif
  isas.push_back("baseline");
  return isas;
}

RangeFn pick(const std::string& isa) {
  const auto ok = supported_isas();
  std::string want = isa == "auto" ? ok.front() : isa;
  if (std::find(ok.begin(), ok.end(), want) == ok.end())
    throw py::value_error("sgengine.kernels._cpu: isa '" + isa + "' is not available on this CPU (have: " +
                          py::str(py::cast(ok)).cast<std::string>() + ")");
#if SG_X86_DISPATCH
  if (want == "avx512") return run_range_avx512;
  if (want == "avx2") return run_range_avx2;
#endif
  return run_range_baseline;
}

void gem_pool(uintptr_t data, std::vector<int64_t> sizes, std::vector<int64_t> strides, uintptr_t out,
              int threads, const std::string& isa) {
  if (sizes.size() != 4 || strides.size() != 4)
    throw py::value_error("gem_pool: expected sizes and strides of a [B, C, h, w] map");
  Job jb{reinterpret_cast<const float*>(data), reinterpret_cast<float*>(out),
         sizes[0], sizes[1], sizes[2], sizes[3], strides[0], strides[1], strides[2], strides[3], false};
  if (jb.h < 3 || jb.w < 3)
    throw py::value_error("gem_pool: map " + std::to_string(jb.h) + "x" + std::to_string(jb.w) +
                          " is below 3x3 (reflection padding needs h, w >= 3)");
  if (jb.B < 0 || jb.C < 0) throw py::value_error("gem_pool: negative sizes");
  // A row-contiguous plane runs the NCHW path; channel-contiguous positions the channels-last
  // path (size-1 channel dims count as either). Anything else: the caller makes it contiguous.
  if (jb.sw == 1 && jb.C > 1 && jb.sc != 1) {
    jb.channels_last = false;
  } else if (jb.sc == 1 || jb.C == 1) {
    jb.channels_last = jb.sw != 1;
    if (jb.C == 1 && jb.sw != 1 && jb.sc != 1) jb.sc = 1;  // unused stride of a size-1 dim
  } else {
    throw py::value_error("gem_pool: the map needs unit stride along w (NCHW) or C (channels-last), got strides (" +
                          std::to_string(jb.sb) + ", " + std::to_string(jb.sc) + ", " + std::to_string(jb.sh) +
                          ", " + std::to_string(jb.sw) + ")");
  }
  RangeFn fn = pick(isa);
  const int64_t n = jb.items();
  if (n == 0) return;
  int nt = std::max(1, std::min<int>(threads, static_cast<int>(std::min<int64_t>(n, 1 << 16))));
  py::gil_scoped_release release;
  if (nt == 1) {
    fn(jb, 0, n);
    return;
  }
  // Contiguous static ranges: one scratch per thread, neighbouring planes on one core.
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), k = omp_get_num_threads();
    fn(jb, n * t / k, n * (t + 1) / k);
  }
#else
  std::vector<std::thread> pool;
  for (int t = 1; t < nt; ++t) pool.emplace_back(fn, std::cref(jb), n * t / nt, n * (t + 1) / nt);
  fn(jb, 0, n / nt);
  for (auto& th : pool) th.join();
#endif
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "Fused R-GeM + GeM+ pooling head on the CPU (sgengine.kernels.gem_cpu wraps it)";
  m.def("gem_pool", &gem_pool, py::arg("data_ptr"), py::arg("sizes"), py::arg("strides"), py::arg("out_ptr"),
        py::arg("threads") = 1, py::arg("isa") = "auto",
        "R-GeM + GeM+ of a float32 [B, C, h, w] map at data_ptr (element strides; unit stride along w or C)\n"
        "into a contiguous float32 [B, C] buffer at out_ptr. The caller keeps both alive; the GIL is released.");
  m.def("isas", &supported_isas, "Instruction sets this CPU runs, best first ('auto' picks the first).");
#ifdef _OPENMP
  m.attr("threading") = "openmp";
#else
  m.attr("threading") = "std::thread";
#endif
}
