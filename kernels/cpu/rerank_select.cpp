// Certified neighbour selection for the SuperGlobal rerank on the CPU (SPEC 6.3):
// sgengine.kernels._rerank_cpu, driven by sgengine.kernels.rerank_cpu (which holds the derivation
// of the error bound in its docstring; the constants here follow it).
//
//   split_bf16: the candidates Y [rows, D] float32 -> two bfloat16 GEMM operands
//               L = [bf16(Y) | 1 | 0...], R = [bf16(Y) | -c | 0...]  (row stride ld >= D + 1),
//               so that L R^T = bf16(Y) bf16(Y)^T - c with c summed inside the fp32 accumulation;
//               plus each row's norm ||y_i|| and rounding residual ||y_i - bf16(y_i)|| (double).
//   certified_topk: given that approximate Gram A (bfloat16 [b, M, M], any fp32-accumulating
//               GEMM of L and R) and the bound parameters, per row i: the K'-th largest approximate
//               value t, the cut lo = (t + c) - e(t) that the exact K'-th largest value cannot be
//               below, the candidates j whose approximate value plus its bound reaches lo (every
//               other column is provably outside the exact top K'), exact float32 dots y_i . y_j
//               for the candidates only (a pair both rows hold is dotted once), and the top K' of
//               those, descending (ties: lower index). A row with more than `cap` candidates
//               computes its whole exact row instead.
//
// Why a kernel: torch.topk over a 400 x 400 Gram costs about as much as the bfloat16 product
// itself, and a gather of the candidate rows for a batched dot writes M' x L x D floats.
//
// ISA: portable scalar loops and an AVX-512 variant of the two inner loops (intrinsics, compiled
// with a target attribute), picked at run time with __builtin_cpu_supports, so the wheel needs no
// -march (as kernels/cpu/gem.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define RS_INLINE inline __attribute__((always_inline))
#else
#define RS_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RS_X86_DISPATCH 1
#define RS_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#else
#define RS_X86_DISPATCH 0
#endif

namespace py = pybind11;

namespace {

RS_INLINE float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
RS_INLINE uint32_t as_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
RS_INLINE float bf16_value(uint16_t h) { return as_float(static_cast<uint32_t>(h) << 16); }

// ---------------------------------------------------------------------------- row kernels
// Two variants of the two inner loops: portable scalar code, and AVX-512 intrinsics. GCC does not
// vectorize either loop on its own (it interchanged the multi-dot loops and left the bfloat16
// split scalar), so the fast variant is written out. The certified path only pays off on CPUs
// with AVX512_BF16, which all have AVX-512F/BW/VL/DQ.
//
// split_row: bfloat16 of a float32 row (nearest even) into L and R, and the squared norms of the
// row and of its rounding residual, summed in float64 (the squares of float32 values are exact in
// float64 and never underflow, so the sums err by a relative ~D 2^-53 only). Returns nonzero when
// a value is NaN/inf or rounds to inf.
// dots: out[j] = a . b[j] for n rows b[j], kDots at a time, so that each load of `a` feeds kDots
// fused multiply-adds (about one load per FMA instead of two: the loop is load-bound).
constexpr int kDots = 8;

RS_INLINE uint32_t bf16_rne_bits(uint32_t u) { return u + 0x7FFFu + ((u >> 16) & 1u); }

int split_row_scalar(const float* __restrict y, uint16_t* __restrict L, uint16_t* __restrict R, int64_t D,
                     double* n2, double* r2) {
  double sn = 0.0, sr = 0.0;
  int bad = 0;
  for (int64_t k = 0; k < D; ++k) {
    const float f = y[k];
    const uint32_t hb = bf16_rne_bits(as_bits(f)) & 0xFFFF0000u;
    bad |= (hb & 0x7F800000u) == 0x7F800000u;
    L[k] = R[k] = static_cast<uint16_t>(hb >> 16);
    const double d = static_cast<double>(f) - static_cast<double>(as_float(hb));
    sn += static_cast<double>(f) * f;
    sr += d * d;
  }
  *n2 = sn;
  *r2 = sr;
  return bad;
}

void dots_scalar(const float* __restrict a, const float* const* b, int n, int64_t D, float* out) {
  for (int j = 0; j < n; ++j) {
    float acc = 0.0f;
    for (int64_t k = 0; k < D; ++k) acc += a[k] * b[j][k];
    out[j] = acc;
  }
}

#if RS_X86_DISPATCH
RS_TARGET_AVX512 int split_row_avx512(const float* __restrict y, uint16_t* __restrict L, uint16_t* __restrict R,
                                      int64_t D, double* n2, double* r2) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), expo = _mm512_set1_epi32(0x7F800000);
  __m512d sn0 = _mm512_setzero_pd(), sn1 = sn0, sr0 = sn0, sr1 = sn0;
  __mmask16 bad = 0;
  for (int64_t k = 0; k < D; k += 16) {
    const __mmask16 m = D - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (D - k)) - 1u);
    const __m512 f = _mm512_maskz_loadu_ps(m, y + k);
    const __m512i u = _mm512_castps_si512(f);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    const __m512i hb = _mm512_and_si512(r, hi);
    bad |= _mm512_mask_cmpeq_epi32_mask(m, _mm512_and_si512(hb, expo), expo);
    const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(hb, 16));
    _mm256_mask_storeu_epi16(L + k, m, h);
    _mm256_mask_storeu_epi16(R + k, m, h);
    const __m512 d = _mm512_sub_ps(f, _mm512_castsi512_ps(hb));  // exact (Sterbenz); 0 in masked lanes
    const __m512d f0 = _mm512_cvtps_pd(_mm512_castps512_ps256(f)), f1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1));
    const __m512d d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(d)), d1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(d, 1));
    sn0 = _mm512_fmadd_pd(f0, f0, sn0);
    sn1 = _mm512_fmadd_pd(f1, f1, sn1);
    sr0 = _mm512_fmadd_pd(d0, d0, sr0);
    sr1 = _mm512_fmadd_pd(d1, d1, sr1);
  }
  *n2 = _mm512_reduce_add_pd(_mm512_add_pd(sn0, sn1));
  *r2 = _mm512_reduce_add_pd(_mm512_add_pd(sr0, sr1));
  return bad != 0;
}

template <int N>
RS_TARGET_AVX512 RS_INLINE void dots_n_avx512(const float* __restrict a, const float* const* b, int64_t D,
                                              float* out) {
  __m512 acc[N];
  for (int j = 0; j < N; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < D; k += 16) {
    const __mmask16 m = D - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (D - k)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(m, a + k);
    for (int j = 0; j < N; ++j) acc[j] = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m, b[j] + k), acc[j]);
  }
  for (int j = 0; j < N; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
}

RS_TARGET_AVX512 void dots_avx512(const float* __restrict a, const float* const* b, int n, int64_t D, float* out) {
  for (; n >= kDots; n -= kDots, b += kDots, out += kDots) dots_n_avx512<kDots>(a, b, D, out);
  if (n >= 4) { dots_n_avx512<4>(a, b, D, out); n -= 4; b += 4; out += 4; }
  if (n >= 2) { dots_n_avx512<2>(a, b, D, out); n -= 2; b += 2; out += 2; }
  if (n == 1) dots_n_avx512<1>(a, b, D, out);
}
#endif

struct Kernels {
  int (*split_row)(const float*, uint16_t*, uint16_t*, int64_t, double*, double*);
  void (*dots)(const float*, const float* const*, int, int64_t, float*);  // out[j] = a . b[j], j < n
};

// ---------------------------------------------------------------------------- split_bf16
struct SplitJob {
  const float* y;       // [rows, D]
  uint16_t* left;       // [rows, ld]
  uint16_t* right;      // [rows, ld]
  const float* shift;   // [rows / M]: c per query (a bfloat16 value)
  double* norm;         // [rows]
  double* resid;        // [rows]
  int64_t rows, M, D, ld;
};

// Returns how many rows held a non-finite value (or one that rounds to inf in bfloat16).
int64_t split_range(const SplitJob& jb, const Kernels& kn, int64_t begin, int64_t end) {
  int64_t bad_rows = 0;
  for (int64_t i = begin; i < end; ++i) {
    uint16_t* L = jb.left + i * jb.ld;
    uint16_t* R = jb.right + i * jb.ld;
    double n2 = 0.0, r2 = 0.0;
    bad_rows += kn.split_row(jb.y + i * jb.D, L, R, jb.D, &n2, &r2) != 0;
    L[jb.D] = 0x3F80u;  // 1.0
    R[jb.D] = static_cast<uint16_t>(bf16_rne_bits(as_bits(-jb.shift[i / jb.M])) >> 16);
    for (int64_t k = jb.D + 1; k < jb.ld; ++k) L[k] = R[k] = 0;
    jb.norm[i] = std::sqrt(n2);
    jb.resid[i] = std::sqrt(r2);
  }
  return bad_rows;
}

// ---------------------------------------------------------------------------- certified_topk
struct SelectJob {
  const uint16_t* a;      // [b, M, M] bfloat16: L R^T (approximate G - c)
  const float* y;         // [b, M, D] float32
  const float* shift;     // [b]: c
  const double* base;     // [b * M]: the row's input + accumulation bound (see rerank_cpu.py)
  double out_rel;         // output rounding bound, relative to |a_ij|
  float* v;               // [b, M, Kp] exact values, descending
  int64_t* n;             // [b, M, Kp] their columns
  int64_t b, M, D, Kp, cap;
};

// Per query: candidate columns (ascending) and their exact values, row by row.
struct QueryScratch {
  std::vector<std::vector<int32_t>> cand;
  std::vector<std::vector<float>> val;
  std::vector<uint8_t> dense;
};

// Phase 1, row i of query q: the candidates (every column that may be in the exact top K').
void candidates_row(const SelectJob& jb, int64_t q, int64_t i, std::vector<float>& top, QueryScratch& qs) {
  const int64_t M = jb.M, Kp = jb.Kp, row = q * M + i;
  const uint16_t* __restrict a = jb.a + row * M;
  // K'-th largest approximate value: a descending buffer of K' floats with an early reject.
  top.assign(static_cast<size_t>(Kp), -INFINITY);
  float floor_v = -INFINITY;
  for (int64_t j = 0; j < M; ++j) {
    const float x = bf16_value(a[j]);
    if (!(x > floor_v)) continue;
    int64_t p = Kp - 1;
    while (p > 0 && top[p - 1] < x) { top[p] = top[p - 1]; --p; }
    top[p] = x;
    floor_v = top[Kp - 1];
  }
  const double c = jb.shift[q], base = jb.base[row], rel = jb.out_rel;
  const double t = top[Kp - 1];
  // x - e(x) and x + e(x) are increasing in x (rel < 1), so the K' largest approximate values are
  // all >= lo after subtracting their bounds: the exact K'-th largest value is >= lo. A column whose
  // approximate value plus its bound stays below lo is therefore below the exact K'-th value.
  const double lo = (t + c) - (base + rel * std::fabs(t));
  // a + rel |a| >= lo - c - base  <=>  a >= thr (solved for the sign of the right-hand side).
  const double rhs = lo - c - base;
  const double thr = rhs >= 0 ? rhs / (1.0 + rel) : rhs / (1.0 - rel);
  // Rounded down to float: a comparison of the float a_j against it can only add candidates.
  const float thr_f = std::nextafter(static_cast<float>(thr), -INFINITY);
  std::vector<int32_t>& cand = qs.cand[i];
  cand.clear();
  for (int64_t j = 0; j < M; ++j)
    if (bf16_value(a[j]) >= thr_f) cand.push_back(static_cast<int32_t>(j));
  qs.dense[i] = static_cast<int64_t>(cand.size()) > jb.cap || static_cast<int64_t>(cand.size()) < Kp;
  if (qs.dense[i]) {
    // Too many to be worth a gather, or fewer than K' (cannot happen for finite input; kept as the
    // safe path): the whole exact row.
    cand.resize(static_cast<size_t>(M));
    for (int64_t j = 0; j < M; ++j) cand[j] = static_cast<int32_t>(j);
  }
  qs.val[i].resize(cand.size());
}

RS_INLINE int64_t position(const std::vector<int32_t>& sorted, int32_t x) {
  auto it = std::lower_bound(sorted.begin(), sorted.end(), x);
  return it != sorted.end() && *it == x ? it - sorted.begin() : -1;
}

// Phase 2, row i: exact dots. G is symmetric, so a pair that both rows hold as candidates is
// dotted once, by the lower row, which also writes the upper row's copy (~30% fewer dots on
// clustered data). Every value slot has exactly one writer.
int64_t dots_row(const SelectJob& jb, const Kernels& kn, int64_t q, int64_t i, QueryScratch& qs,
                 std::vector<int32_t>& mine, std::vector<float>& out) {
  const int64_t D = jb.D;
  const float* yq = jb.y + q * jb.M * D;
  const std::vector<int32_t>& cand = qs.cand[i];
  mine.clear();
  for (int32_t j : cand)
    if (!(j < i && position(qs.cand[j], static_cast<int32_t>(i)) >= 0)) mine.push_back(j);
  out.resize(mine.size());
  const float* bs[kDots];
  for (size_t g = 0; g < mine.size(); g += kDots) {
    const int nb = static_cast<int>(std::min<size_t>(kDots, mine.size() - g));
    for (int j = 0; j < nb; ++j) bs[j] = yq + static_cast<int64_t>(mine[g + j]) * D;
    kn.dots(yq + i * D, bs, nb, D, out.data() + g);
  }
  // Scatter: own slots (both lists ascending: one merge pass), then the mirrored ones.
  std::vector<float>& val = qs.val[i];
  for (size_t p = 0, k = 0; p < cand.size() && k < mine.size(); ++p)
    if (cand[p] == mine[k]) val[p] = out[k++];
  for (size_t k = 0; k < mine.size(); ++k) {
    const int32_t j = mine[k];
    if (j > i) {
      const int64_t p = position(qs.cand[j], static_cast<int32_t>(i));
      if (p >= 0) qs.val[j][p] = out[k];
    }
  }
  return static_cast<int64_t>(mine.size());
}

// Phase 3, row i: the top K' of the exact values, descending, ties by lower column (torch.topk
// leaves ties unspecified; SPEC 6, ties).
void topk_row(const SelectJob& jb, int64_t q, int64_t i, const QueryScratch& qs,
              std::vector<std::pair<float, int32_t>>& vals) {
  const std::vector<int32_t>& cand = qs.cand[i];
  vals.resize(cand.size());
  for (size_t p = 0; p < cand.size(); ++p) vals[p] = {qs.val[i][p], cand[p]};
  auto better = [](const std::pair<float, int32_t>& x, const std::pair<float, int32_t>& y) {
    return x.first > y.first || (x.first == y.first && x.second < y.second);
  };
  std::partial_sort(vals.begin(), vals.begin() + jb.Kp, vals.end(), better);
  const int64_t row = q * jb.M + i;
  float* vo = jb.v + row * jb.Kp;
  int64_t* no = jb.n + row * jb.Kp;
  for (int64_t k = 0; k < jb.Kp; ++k) { vo[k] = vals[k].first; no[k] = vals[k].second; }
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> isas;
#if RS_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    isas.push_back("avx512");
#endif
  isas.push_back("baseline");
  return isas;
}

Kernels pick(const std::string& isa) {
  const auto ok = supported_isas();
  const std::string want = isa == "auto" ? ok.front() : isa;
  if (std::find(ok.begin(), ok.end(), want) == ok.end())
    throw py::value_error("sgengine.kernels._rerank_cpu: isa '" + isa + "' is not available on this CPU (have: " +
                          py::str(py::cast(ok)).cast<std::string>() + ")");
#if RS_X86_DISPATCH
  if (want == "avx512") return {split_row_avx512, dots_avx512};
#endif
  return {split_row_scalar, dots_scalar};
}

// Hardware bfloat16 dot products (what makes a bfloat16 GEMM faster than float32 here).
bool bf16_hardware() {
#if RS_X86_DISPATCH
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

template <class R, class Fn>
std::vector<R> run_threads(int64_t n, int threads, Fn fn, int64_t grain) {
  int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, (n + grain - 1) / grain)));
  std::vector<R> out(static_cast<size_t>(nt));
  if (nt == 1) {
    out[0] = fn(0, n);
    return out;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), k = omp_get_num_threads();
    out[t] = fn(n * t / k, n * (t + 1) / k);
  }
#else
  std::vector<std::thread> pool;
  for (int t = 1; t < nt; ++t) pool.emplace_back([&, t] { out[t] = fn(n * t / nt, n * (t + 1) / nt); });
  out[0] = fn(0, n / nt);
  for (auto& th : pool) th.join();
#endif
  return out;
}

int64_t split_bf16(uintptr_t y, int64_t b, int64_t M, int64_t D, int64_t ld, uintptr_t left, uintptr_t right,
                   uintptr_t shift, uintptr_t norm, uintptr_t resid, int threads, const std::string& isa) {
  if (b < 0 || M < 1 || D < 1 || ld < D + 1) throw py::value_error("split_bf16: need M, D >= 1 and ld >= D + 1");
  SplitJob jb{reinterpret_cast<const float*>(y), reinterpret_cast<uint16_t*>(left), reinterpret_cast<uint16_t*>(right),
              reinterpret_cast<const float*>(shift), reinterpret_cast<double*>(norm), reinterpret_cast<double*>(resid),
              b * M, M, D, ld};
  const Kernels kn = pick(isa);
  py::gil_scoped_release release;
  int64_t bad = 0;
  for (int64_t x : run_threads<int64_t>(jb.rows, threads, [&](int64_t s, int64_t e) { return split_range(jb, kn, s, e); }, 32))
    bad += x;
  return bad;
}

py::tuple certified_topk(uintptr_t a, uintptr_t y, int64_t b, int64_t M, int64_t D, int64_t Kp, uintptr_t shift,
                         uintptr_t base, double out_rel, int64_t cap, uintptr_t v, uintptr_t n, int threads,
                         const std::string& isa) {
  if (b < 0 || M < 1 || D < 1 || Kp < 1 || Kp > M)
    throw py::value_error("certified_topk: need M, D >= 1 and 1 <= K' <= M");
  if (!(out_rel >= 0.0 && out_rel < 0.5)) throw py::value_error("certified_topk: out_rel must be in [0, 0.5)");
  if (M > INT32_MAX) throw py::value_error("certified_topk: M must fit in int32");
  SelectJob jb{reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const float*>(y),
               reinterpret_cast<const float*>(shift), reinterpret_cast<const double*>(base), out_rel,
               reinterpret_cast<float*>(v), reinterpret_cast<int64_t*>(n), b, M, D, Kp, cap};
  const Kernels kn = pick(isa);
  int64_t dots = 0, dense = 0;
  {
    py::gil_scoped_release release;
    QueryScratch qs;
    qs.cand.resize(static_cast<size_t>(M));
    qs.val.resize(static_cast<size_t>(M));
    qs.dense.resize(static_cast<size_t>(M));
    for (int64_t q = 0; q < b; ++q) {
      run_threads<int>(M, threads, [&](int64_t s, int64_t e) {
        std::vector<float> top;
        for (int64_t i = s; i < e; ++i) candidates_row(jb, q, i, top, qs);
        return 0;
      }, 16);
      for (int64_t d : run_threads<int64_t>(M, threads, [&](int64_t s, int64_t e) {
             std::vector<int32_t> mine;
             std::vector<float> out;
             int64_t count = 0;
             for (int64_t i = s; i < e; ++i) count += dots_row(jb, kn, q, i, qs, mine, out);
             return count;
           }, 16))
        dots += d;
      run_threads<int>(M, threads, [&](int64_t s, int64_t e) {
        std::vector<std::pair<float, int32_t>> vals;
        for (int64_t i = s; i < e; ++i) topk_row(jb, q, i, qs, vals);
        return 0;
      }, 16);
      for (uint8_t x : qs.dense) dense += x;
    }
  }
  return py::make_tuple(dots, dense);
}

}  // namespace

PYBIND11_MODULE(_rerank_cpu, m) {
  m.doc() = "Certified bfloat16 neighbour selection for the SuperGlobal rerank (sgengine.kernels.rerank_cpu wraps it)";
  m.def("split_bf16", &split_bf16, py::arg("y_ptr"), py::arg("b"), py::arg("M"), py::arg("D"), py::arg("ld"),
        py::arg("left_ptr"), py::arg("right_ptr"), py::arg("shift_ptr"), py::arg("norm_ptr"), py::arg("resid_ptr"),
        py::arg("threads") = 1, py::arg("isa") = "auto",
        "float32 [b*M, D] -> bfloat16 operands [b*M, ld] (L = [bf16(y) | 1 | 0], R = [bf16(y) | -c_q | 0]),\n"
        "float64 row norms and rounding residual norms. Returns how many rows were not finite.");
  m.def("certified_topk", &certified_topk, py::arg("a_ptr"), py::arg("y_ptr"), py::arg("b"), py::arg("M"),
        py::arg("D"), py::arg("Kp"), py::arg("shift_ptr"), py::arg("base_ptr"), py::arg("out_rel"), py::arg("cap"),
        py::arg("v_ptr"), py::arg("n_ptr"), py::arg("threads") = 1, py::arg("isa") = "auto",
        "Exact top-K' per Gram row from a bounded bfloat16 approximation; returns (exact dots, dense rows).");
  m.def("isas", &supported_isas, "Instruction sets this CPU runs, best first ('auto' picks the first).");
  m.def("bf16_hardware", &bf16_hardware, "Whether the CPU has bfloat16 dot-product instructions (AVX512_BF16 or AMX).");
#ifdef _OPENMP
  m.attr("threading") = "openmp";
#else
  m.attr("threading") = "std::thread";
#endif
}
