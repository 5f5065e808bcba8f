// Fused Regional-GeM + GeM+ pooling head on the CPU (SPEC 3.3-3.4): sgengine.kernels._cpu.
//
//   R = m P + (1 - m) F,  P = (mean over the 5x5 window of F^p, ReflectionPad 2)^(1/p)
//   g = (mean over positions of max(R, eps)^q)^(1/q)                          -> [B, C] float32
//
// p, m, q, eps come in as arguments (sgengine.head owns them: 2.5, 0.5, 4.6, 1e-8). One pass per
// channel plane (or per block of 16 channels for channels-last maps), all in L1/L2: F^p into a
// row-padded buffer, 5-row sums into a column-padded buffer, 5-column sums, then the mix, clamp,
// ^q and the mean. The fractional powers go through log2/exp2 polynomials written so that GCC
// vectorizes them (no libm calls in the inner loops); F^2.5 is F*F*sqrt(F).
//
// Numerics (why the build needs no -ffast-math):
// - the polynomials are accurate to a few float32 ulps on the ranges they see (box >= the floor,
//   R' >= eps'), and the sum over positions is taken in double, so the result sits within the
//   float32 PyTorch head's own rounding error of the float64 head;
// - planes holding NaN, inf or negative values never reach the polynomials: a per-plane check
//   sends them to a scalar std::pow path that propagates NaN/inf exactly as PyTorch's float32 head
//   does (sgengine.head.gem_pool then rejects the descriptor);
// - finite maps whose powers overflow float32 (F above ~1e15 for F^2.5, R above ~2e8 for R^4.6)
//   give inf, as the float32 reference does: exp2 saturates to inf past 2^128.
//
// ISA: the kernel is compiled three times (x86-64 baseline, AVX2+FMA, AVX-512) from the same
// inline code and picked at run time with __builtin_cpu_supports, so the wheel needs no -march.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "gem_math.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
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

SG_INLINE float finish(double sum, int hw, const Head& hd) {
  return static_cast<float>(hd.out_scale * std::pow(sum / hw, hd.inv_gemp_p));
}

// The float32 reference, one plane at a time, with std::pow: for planes outside the domain.
float plane_scalar(const float* x, int64_t sh, int64_t sw, int h, int w, const Head& hd) {
  const float inv_area = 1.0f / (kWindow * kWindow);
  const int r = kWindow / 2;
  double sum = 0.0;
  for (int i = 0; i < h; ++i) {
    for (int j = 0; j < w; ++j) {
      float acc = 0.0f;
      for (int di = -r; di <= r; ++di)
        for (int dj = -r; dj <= r; ++dj)
          acc += std::pow(x[reflect(i + di, h) * sh + reflect(j + dj, w) * sw], hd.rgem_p);
      const float f = x[i * sh + j * sw];
      const float v = hd.rgem_mix * std::pow(acc * inv_area, hd.inv_rgem_p) + (1.0f - hd.rgem_mix) * f;
      const float c = std::isnan(v) ? v : std::max(v, hd.gemp_eps);
      sum += std::pow(c, hd.gemp_p);
    }
  }
  return static_cast<float>(std::pow(sum / (h * w), hd.inv_gemp_p));
}

struct Scratch {
  std::vector<float> u, v, y, x;
  void reserve(size_t nu, size_t nv, size_t ny, size_t nx) {
    if (u.size() < nu) u.resize(nu);
    if (v.size() < nv) v.resize(nv);
    if (y.size() < ny) y.resize(ny);
    if (x.size() < nx) x.resize(nx);
  }
};

// ---------------------------------------------------------------------------- NCHW planes
// x: one contiguous h x w plane. Lanes of the sum run along positions.
template <bool Pow25>
SG_INLINE float plane_rows(const float* __restrict x, int h, int w, Scratch& s, const Head& hd) {
  const int wp = w + 4;
  float* __restrict U = s.u.data();  // [h + 4][w]  F^p, rows reflected
  float* __restrict V = s.v.data();  // [h][w + 4]  5-row sums, columns reflected
  float* __restrict Y = s.y.data();  // [h * w]     window sums, then R'^q
  const float p = hd.rgem_p;
  int bad = 0;
  for (int i = 0; i < h; ++i) {
    const float* __restrict xr = x + i * w;
    float* __restrict ur = U + (i + 2) * w;
    for (int j = 0; j < w; ++j) {
      const float f = xr[j];
      bad |= outside_domain(f);
      ur[j] = rgem_pow<Pow25>(f, p);
    }
  }
  if (bad) return plane_scalar(x, w, 1, h, w, hd);
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
  const int n = h * w;
  gem_terms<Pow25>(Y, x, n, hd);
  // Sum in double lanes: no reassociation is needed for the vectorizer, and the total over up to
  // thousands of positions keeps full float32 accuracy.
  double lane[kLanes] = {0.0};
  int k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += static_cast<double>(Y[k + l]);
  for (int l = 0; k + l < n; ++l) lane[l] += static_cast<double>(Y[k + l]);
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  return finish(sum, n, hd);
}

// ---------------------------------------------------------------------------- channels-last
// x points at channel c0 of position (0, 0) of a [h][w][C] map; positions sh / sw apart.
// L channels are carried side by side through every step, so each step is L-wide vector work
// and the map is read in 4*L-byte runs with no layout copy.
template <int L, bool Pow25>
SG_INLINE void block_cl(const float* __restrict x, int64_t sh, int64_t sw, int h, int w,
                        Scratch& s, float* out, const Head& hd) {
  const int wp = w + 4;
  const size_t row = static_cast<size_t>(w) * L;
  float* __restrict U = s.u.data();  // [h + 4][w][L]  F^p, rows reflected
  float* __restrict V = s.v.data();  // [h][w + 4][L]  5-row sums, columns reflected
  float* __restrict X = s.x.data();  // [h][w][L]      F, packed
  float* __restrict Y = s.y.data();  // [w][L]         one row of window sums, then R'^q
  const float p = hd.rgem_p;
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
        up[l] = rgem_pow<Pow25>(f, p);
      }
    }
  if (bad) {
    for (int l = 0; l < L; ++l) out[l] = plane_scalar(x + l, sh, sw, h, w, hd);
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
    gem_terms<Pow25>(Y, X + i * row, static_cast<int>(row), hd);
    for (int j = 0; j < w; ++j)
      for (int l = 0; l < L; ++l) sum[l] += static_cast<double>(Y[j * L + l]);
  }
  for (int l = 0; l < L; ++l) out[l] = finish(sum[l], h * w, hd);
}

// ---------------------------------------------------------------------------- work ranges
struct Job {
  const float* x;  // [B, C, h, w] or, channels-last, [B, h, w, C]; contiguous
  float* out;      // [B, C] contiguous
  int64_t B, C, h, w;
  bool channels_last;
  Head head;
  int64_t blocks_per_item() const { return channels_last ? (C + kLanes - 1) / kLanes : C; }
  int64_t items() const { return B * blocks_per_item(); }
};

template <bool Pow25>
SG_INLINE void run_range(const Job& jb, int64_t begin, int64_t end) {
  const int h = static_cast<int>(jb.h), w = static_cast<int>(jb.w);
  const int64_t plane = jb.h * jb.w;
  Scratch s;
  const size_t lanes = jb.channels_last ? kLanes : 1;
  s.reserve((h + 4) * w * lanes, h * (w + 4) * lanes, static_cast<size_t>(w) * lanes * (jb.channels_last ? 1 : h),
            jb.channels_last ? static_cast<size_t>(h) * w * lanes : 0);
  const int64_t per = jb.blocks_per_item();
  for (int64_t it = begin; it < end; ++it) {
    const int64_t b = it / per, blk = it % per;
    if (!jb.channels_last) {
      jb.out[b * jb.C + blk] = plane_rows<Pow25>(jb.x + (b * jb.C + blk) * plane, h, w, s, jb.head);
      continue;
    }
    const int64_t c0 = blk * kLanes, sw = jb.C, sh = jb.w * jb.C;
    const float* xb = jb.x + b * plane * jb.C + c0;
    float* ob = jb.out + b * jb.C + c0;
    if (c0 + kLanes <= jb.C) {
      block_cl<kLanes, Pow25>(xb, sh, sw, h, w, s, ob, jb.head);
    } else {
      for (int64_t c = c0; c < jb.C; ++c)
        block_cl<1, Pow25>(xb + (c - c0), sh, sw, h, w, s, ob + (c - c0), jb.head);
    }
  }
}

using RangeFn = void (*)(const Job&, int64_t, int64_t);

void range_baseline_p25(const Job& jb, int64_t b, int64_t e) { run_range<true>(jb, b, e); }
void range_baseline_any(const Job& jb, int64_t b, int64_t e) { run_range<false>(jb, b, e); }
#if SG_X86_DISPATCH
SG_TARGET_AVX2 void range_avx2_p25(const Job& jb, int64_t b, int64_t e) { run_range<true>(jb, b, e); }
SG_TARGET_AVX2 void range_avx2_any(const Job& jb, int64_t b, int64_t e) { run_range<false>(jb, b, e); }
SG_TARGET_AVX512 void range_avx512_p25(const Job& jb, int64_t b, int64_t e) { run_range<true>(jb, b, e); }
SG_TARGET_AVX512 void range_avx512_any(const Job& jb, int64_t b, int64_t e) { run_range<false>(jb, b, e); }
#endif

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

RangeFn pick(const std::string& isa, bool pow25) {
  const auto ok = supported_isas();
  std::string want = isa == "auto" ? ok.front() : isa;
  if (std::find(ok.begin(), ok.end(), want) == ok.end())
    throw py::value_error("gem_pool: isa '" + isa + "' is not available on this CPU (have: " +
                          py::str(py::cast(ok)).cast<std::string>() + ")");
#if SG_X86_DISPATCH
  if (want == "avx512") return pow25 ? range_avx512_p25 : range_avx512_any;
  if (want == "avx2") return pow25 ? range_avx2_p25 : range_avx2_any;
#endif
  return pow25 ? range_baseline_p25 : range_baseline_any;
}

// ---------------------------------------------------------------------------- binding
std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t k = 0; k < a.ndim(); ++k) s += (k ? ", " : "") + std::to_string(a.shape(k));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A float32, C-contiguous array of `ndim` dimensions, or a ValueError that names the argument.
// No conversion: a wrong dtype or layout is the caller's mistake, not something to copy silently.
py::array_t<float> float_array(const py::array& a, const char* name, int ndim, const char* dims) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string("gem_pool: ") + name + " must have " + std::to_string(ndim) + " dimensions " +
                          dims + ", got shape " + shape_str(a));
  if (!a.dtype().is(py::dtype::of<float>()))
    throw py::value_error(std::string("gem_pool: ") + name + " must be float32, got " +
                          py::str(a.dtype()).cast<std::string>());
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string("gem_pool: ") + name + " must be C-contiguous (shape " + shape_str(a) +
                          "); pass a contiguous copy");
  return py::reinterpret_borrow<py::array_t<float>>(a);
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

void check_positive(double v, const char* name) {
  if (!(v > 0.0 && std::isfinite(v)))
    throw py::value_error(std::string("gem_pool: ") + name + " must be a positive finite number, got " + num(v));
}

py::array_t<float> gem_pool(const py::array& x_in, bool channels_last, double rgem_p, int rgem_size,
                            double rgem_mix, double gemp_p, double gemp_eps, int threads, const std::string& isa) {
  py::array_t<float> x = float_array(x_in, "x", 4, channels_last ? "[B, h, w, C]" : "[B, C, h, w]");
  check_positive(rgem_p, "rgem_p");
  check_positive(gemp_p, "gemp_p");
  if (rgem_size != kWindow)
    throw py::value_error("gem_pool: rgem_size = " + std::to_string(rgem_size) + " is not implemented (the kernel's "
                          "window is " + std::to_string(kWindow) + "x" + std::to_string(kWindow) + ", SPEC 3.3)");
  if (!(rgem_mix > 0.0 && rgem_mix < 1.0))
    throw py::value_error("gem_pool: rgem_mix must be in (0, 1), got " + num(rgem_mix));
  if (!(gemp_eps / (1.0 - rgem_mix) >= FLT_MIN && std::isfinite(gemp_eps)))
    throw py::value_error("gem_pool: gemp_eps must be a positive normal float32, got " + num(gemp_eps));
  if (threads < 1) throw py::value_error("gem_pool: threads must be >= 1, got " + std::to_string(threads));
  const int64_t B = x.shape(0);
  const int64_t C = channels_last ? x.shape(3) : x.shape(1);
  const int64_t h = channels_last ? x.shape(1) : x.shape(2);
  const int64_t w = channels_last ? x.shape(2) : x.shape(3);
  if (h < 3 || w < 3)
    throw py::value_error("gem_pool: x has h x w = " + std::to_string(h) + "x" + std::to_string(w) +
                          " (shape " + shape_str(x) + "), but reflection padding needs h, w >= 3");
  if (h * w > (int64_t{1} << 30)) throw py::value_error("gem_pool: x has over 2^30 positions per plane");
  RangeFn fn = pick(isa, rgem_p == 2.5);
  py::array_t<float> out({B, C});
  Job jb{x.data(), out.mutable_data(), B, C, h, w, channels_last, make_head(rgem_p, rgem_mix, gemp_p, gemp_eps)};
  const int64_t n = jb.items();
  if (n == 0) return out;
  const int nt = std::max(1, std::min<int>(threads, static_cast<int>(std::min<int64_t>(n, 1 << 16))));
  py::gil_scoped_release release;
  if (nt == 1) {
    fn(jb, 0, n);
    return out;
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
  return out;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "Fused R-GeM + GeM+ pooling head on the CPU (sgengine.kernels.gem_cpu.gem_pool_cpu_native wraps it)";
  m.def("gem_pool", &gem_pool, py::arg("x"), py::arg("channels_last"), py::arg("rgem_p"), py::arg("rgem_size"),
        py::arg("rgem_mix"), py::arg("gemp_p"), py::arg("gemp_eps"), py::arg("threads") = 1, py::arg("isa") = "auto",
        "R-GeM + GeM+ of a float32 C-contiguous map x: [B, C, h, w], or [B, h, w, C] with channels_last\n"
        "-> float32 [B, C]. The head's constants come from sgengine.head. Raises ValueError naming the\n"
        "argument for a wrong dtype, layout or shape (h, w >= 3), an unsupported constant, threads < 1 or an\n"
        "isa this CPU lacks. Releases the GIL while it runs.");
  m.def("isas", &supported_isas, "Instruction sets this CPU runs, best first ('auto' picks the first).");
#ifdef _OPENMP
  m.attr("threading") = "openmp";
#else
  m.attr("threading") = "std::thread";
#endif
}
