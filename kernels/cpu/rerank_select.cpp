// The certified bfloat16 rerank on the CPU (SPEC 6): sgengine.kernels._rerank_cpu, called by
// sgengine.kernels.rerank_cpu (whose docstring holds the derivation of the error bound; the
// constants here follow it). Per query:
//
//   prepare:  Y [M, D] float32 -> the bfloat16 GEMM operand L = [bf16(Y) | 1 | 0...] (row stride
//             ld >= D + 1), d = Y q, the shift c (the K'-th largest of d, as a bfloat16 value), and
//             the bound's row terms from each row's norm ||y_i|| and rounding residual
//             ||y_i - bf16(y_i)|| (float64);
//   gram:     the approximate Gram A = L R^T with R = [bf16(Y) | -c | 0...], so that
//             A = bf16(Y) bf16(Y)^T - c with c summed inside the fp32 accumulation; the upper
//             triangle only, with AVX512_BF16;
//   select:   per row i, the K'-th largest approximate value t, the cut lo = (t + c) - e(t) that the
//             exact K'-th largest value cannot be below, the candidates j whose approximate value
//             plus its bound reaches lo (every other column is provably outside the exact top K'),
//             exact float32 dots y_i . y_j for the candidates only (a pair both rows hold is dotted
//             once), and the top K' of those, descending (ties: lower index), with float64 dots
//             deciding the cut where float32 ones cannot. A row with more than `cap` candidates
//             computes its whole exact row instead;
//   finish:   SPEC 6.4-6.8 from the neighbours: weights, s1, the expansion, s2 and the order.
//
// Entries (typed arrays, checked here; scratch lives here and is kept per thread between calls):
// certified_rerank (the whole rerank of a batch), certified_neighbours (prepare, gram, select:
// SPEC 6.3 alone) and approx_gram_bound (prepare and gram: the approximate Gram and its bound).
//
// Why a kernel: torch.topk over a 400 x 400 Gram costs about as much as the bfloat16 product
// itself, a gather of the candidate rows for a batched dot writes M' x L x D floats, and torch
// multiplies only full rectangles of a symmetric product.
//
// ISA: portable scalar loops and an AVX-512 variant of the inner loops (intrinsics, compiled with
// a target attribute), picked at run time with __builtin_cpu_supports, so the wheel needs no
// -march (as kernels/cpu/gem.cpp). The Gram needs AVX512_BF16; without it the entries refuse and
// sgengine.kernels.rerank_cpu runs the float32 path instead.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>
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
// The AVX512_BF16 intrinsics of the Gram need GCC >= 10 or Clang >= 9; older compilers build
// without it (gram_bf16_available() is then false and the certified path does not run).
#if RS_X86_DISPATCH && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define RS_BF16_KERNEL 1
#else
#define RS_BF16_KERNEL 0
#endif

namespace py = pybind11;

namespace {

RS_INLINE float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
RS_INLINE uint32_t as_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
RS_INLINE float bf16_value(uint16_t h) { return as_float(static_cast<uint32_t>(h) << 16); }
RS_INLINE uint32_t bf16_rne_bits(uint32_t u) { return u + 0x7FFFu + ((u >> 16) & 1u); }
// The bfloat16 value nearest to x (ties to even), as a float.
RS_INLINE float bf16_round(float x) { return as_float(bf16_rne_bits(as_bits(x)) & 0xFFFF0000u); }

// ---------------------------------------------------------------------------- row kernels
// Two variants of the inner loops: portable scalar code, and AVX-512 intrinsics. GCC vectorized
// neither of the two hot ones on its own (it interchanged the multi-dot loops and left the
// bfloat16 split scalar), so the fast variant is written out. The certified path only pays off
// on CPUs with AVX512_BF16, which all have AVX-512F/BW/VL/DQ.
//
// split_row: bfloat16 of a float32 row (nearest even) into L, the squared norms of the row
// and of its rounding residual, summed in float64 (the squares of float32 values are exact in
// float64 and never underflow, so the sums err by a relative ~D 2^-53 only), and the row's
// float32 dot with q (when q is given). Returns nonzero when a value is NaN/inf or rounds to inf.
// dots: out[j] = a . b[j] for n rows b[j], kDots at a time, so that each load of `a` feeds kDots
// fused multiply-adds (about one load per FMA instead of two: the loop is load-bound).
constexpr int kDots = 8;

int split_row_scalar(const float* __restrict y, const float* __restrict q, uint16_t* __restrict L, int64_t D,
                     double* n2, double* r2, float* dq) {
  double sn = 0.0, sr = 0.0;
  float sd = 0.0f;
  int bad = 0;
  for (int64_t k = 0; k < D; ++k) {
    const float f = y[k];
    if (q) sd += f * q[k];
    const uint32_t hb = bf16_rne_bits(as_bits(f)) & 0xFFFF0000u;
    bad |= (hb & 0x7F800000u) == 0x7F800000u;
    L[k] = static_cast<uint16_t>(hb >> 16);
    const double d = static_cast<double>(f) - static_cast<double>(as_float(hb));
    sn += static_cast<double>(f) * f;
    sr += d * d;
  }
  *n2 = sn;
  *r2 = sr;
  *dq = sd;
  return bad;
}

void dots_scalar(const float* __restrict a, const float* const* b, int n, int64_t D, float* out) {
  for (int j = 0; j < n; ++j) {
    float acc = 0.0f;
    for (int64_t k = 0; k < D; ++k) acc += a[k] * b[j][k];
    out[j] = acc;
  }
}

// kth_largest: the K'-th largest of M bfloat16 values, through a descending buffer top[K'] that
// a value enters only if it beats the current K'-th (rarely, after the first few dozen).
// collect_ge: the indices of the values >= thr, ascending, into out (room for M + 16); returns
// how many.
RS_INLINE void insert_top(float* top, int64_t Kp, float x) {
  int64_t p = Kp - 1;
  while (p > 0 && top[p - 1] < x) { top[p] = top[p - 1]; --p; }
  top[p] = x;
}

float kth_largest_scalar(const uint16_t* __restrict a, int64_t M, int64_t Kp, float* top) {
  for (int64_t k = 0; k < Kp; ++k) top[k] = -INFINITY;
  for (int64_t j = 0; j < M; ++j) {
    const float x = bf16_value(a[j]);
    if (x > top[Kp - 1]) insert_top(top, Kp, x);
  }
  return top[Kp - 1];
}

int64_t collect_ge_scalar(const uint16_t* __restrict a, int64_t M, float thr, int32_t* out) {
  int64_t n = 0;
  for (int64_t j = 0; j < M; ++j)
    if (bf16_value(a[j]) >= thr) out[n++] = static_cast<int32_t>(j);
  return n;
}

#if RS_X86_DISPATCH
RS_TARGET_AVX512 RS_INLINE __m512 bf16x16(const uint16_t* a, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a)), 16));
}

RS_TARGET_AVX512 RS_INLINE __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// The K' <= 16 largest values live in one register, sorted: an insertion is a compare, a lane
// shift and two blends, with no branch (the scalar insertion's mispredicted loop exits made
// this ~25% of the kernel). A value inserted below the K'-th only moves lanes >= K'.
RS_TARGET_AVX512 float kth_largest_avx512(const uint16_t* __restrict a, int64_t M, int64_t Kp, float* top) {
  if (Kp > 16) return kth_largest_scalar(a, M, Kp, top);
  const __m512i prev = _mm512_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
  const __m512i kth = _mm512_set1_epi32(static_cast<int>(Kp - 1));
  __m512 t = _mm512_set1_ps(-INFINITY), floor_v = t;
  for (int64_t j = 0; j < M; j += 16) {
    const __mmask16 m = tail_mask(M - j);
    uint32_t gt = _mm512_mask_cmp_ps_mask(m, bf16x16(a + j, m), floor_v, _CMP_GT_OQ);
    if (!gt) continue;
    while (gt) {
      const __m512 x = _mm512_set1_ps(bf16_value(a[j + __builtin_ctz(gt)]));
      gt &= gt - 1;
      const uint32_t lt = _mm512_cmp_ps_mask(t, x, _CMP_LT_OQ);  // a suffix of the lanes
      const __mmask16 first = static_cast<__mmask16>(lt & (0u - lt));
      t = _mm512_mask_blend_ps(static_cast<__mmask16>(lt), t, _mm512_permutexvar_ps(prev, t));
      t = _mm512_mask_blend_ps(first, t, x);
    }
    floor_v = _mm512_permutexvar_ps(kth, t);
  }
  return _mm512_cvtss_f32(floor_v);
}

RS_TARGET_AVX512 int64_t collect_ge_avx512(const uint16_t* __restrict a, int64_t M, float thr, int32_t* out) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 t = _mm512_set1_ps(thr);
  int64_t n = 0;
  for (int64_t j = 0; j < M; j += 16) {
    const __mmask16 m = tail_mask(M - j);
    const __mmask16 ge = _mm512_mask_cmp_ps_mask(m, bf16x16(a + j, m), t, _CMP_GE_OQ);
    if (!ge) continue;
    // Compress in a register, then a plain store (out has 16 spare slots): a compressing store to
    // memory is microcoded on AMD Zen 4 and cost ~40% of this kernel.
    const __m512i idx = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(j)));
    _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi32(ge, idx));
    n += __builtin_popcount(ge);
  }
  return n;
}

RS_TARGET_AVX512 int split_row_avx512(const float* __restrict y, const float* __restrict q, uint16_t* __restrict L,
                                      int64_t D, double* n2, double* r2, float* dq) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), expo = _mm512_set1_epi32(0x7F800000);
  __m512d sn0 = _mm512_setzero_pd(), sn1 = sn0, sr0 = sn0, sr1 = sn0;
  __m512 sd = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t k = 0; k < D; k += 16) {
    const __mmask16 m = D - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (D - k)) - 1u);
    const __m512 f = _mm512_maskz_loadu_ps(m, y + k);
    if (q) sd = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, q + k), sd);
    const __m512i u = _mm512_castps_si512(f);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    const __m512i hb = _mm512_and_si512(r, hi);
    bad |= _mm512_mask_cmpeq_epi32_mask(m, _mm512_and_si512(hb, expo), expo);
    const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(hb, 16));
    _mm256_mask_storeu_epi16(L + k, m, h);
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
  *dq = _mm512_reduce_add_ps(sd);
  return bad != 0;
}

template <int N>
RS_TARGET_AVX512 RS_INLINE void dots_n_avx512(const float* __restrict a, const float* const* b, int64_t D,
                                              float* out) {
  __m512 acc[N];
  const float* bj[N];
  for (int j = 0; j < N; ++j) {
    acc[j] = _mm512_setzero_ps();
    bj[j] = b[j];
  }
  int64_t k = 0;
  for (; k + 16 <= D; k += 16) {  // unmasked: masked loads measured ~20% slower here
    const __m512 x = _mm512_loadu_ps(a + k);
    for (int j = 0; j < N; ++j) acc[j] = _mm512_fmadd_ps(x, _mm512_loadu_ps(bj[j] + k), acc[j]);
  }
  if (k < D) {
    const __mmask16 m = tail_mask(D - k);
    const __m512 x = _mm512_maskz_loadu_ps(m, a + k);
    for (int j = 0; j < N; ++j) acc[j] = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m, bj[j] + k), acc[j]);
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

// ---------------------------------------------------------------------------- the triangle Gram
// The approximate Gram A = L R^T of one query's bfloat16 operand L ([M, ld], ld even; R is L with
// column D set to bf16(-c)), as bfloat16 (nearest even), with AVX512_BF16 pair dot products
// (VDPBF16PS): each output lane accumulates its column's ld / 2 pair products in float32, in
// order. That is the model the bound assumes (exact bfloat16 products, float32 additions,
// nearest-even output).
//
// Why a kernel: A is symmetric (L R^T = bf16(Y) bf16(Y)^T - c), but torch only multiplies full
// rectangles, and a block-triangle split of them ran at ~60% of the full product's speed on the
// 2-core EPYC (small products scale badly over threads). Here each column panel of kGramNR columns
// multiplies only the rows up to its last column (56% of the entries at M' = 400) at about the
// full product's efficiency, and writes the strictly upper entries' mirror images as it goes.
//
// Register tile: kGramMR rows x kGramNZ zmm (16 columns each) = 24 float32 accumulators; per pair
// of depth, kGramNZ loads of the packed panel and kGramMR broadcasts of a row's pair.
constexpr int kGramMR = 12;
constexpr int kGramNZ = 2;
constexpr int kGramNR = 16 * kGramNZ;
static_assert(kGramNZ == 2, "gram_panel dispatches panels of 2 zmm columns (or a 1-zmm tail) only");

#if RS_BF16_KERNEL
#define RS_TARGET_BF16 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")))

// Packs columns [j0, j0 + w) of the product (rows of R) as pk[p][c] = the pair (R[j0 + c][2p],
// R[j0 + c][2p + 1]) for c < nr (zeros past w), so that one zmm load holds 16 columns' pair p.
// R is read from L ([h | 1 | 0..]) with column shift_col (= D) replaced by shift_bits (the
// bfloat16 of -c): R = [h | -c | 0..] without a second array to write and read.
void gram_pack(const uint16_t* L, int64_t ld, int64_t j0, int w, int nr, uint32_t* pk, int64_t shift_col,
               uint16_t shift_bits) {
  // Depth-major: each pass reads one pair from each of the w rows (their lines stay in L1
  // across 16 passes) and writes one contiguous run.
  const int64_t P = ld / 2;
  const uint32_t* r[kGramNR];
  for (int c = 0; c < w; ++c) r[c] = reinterpret_cast<const uint32_t*>(L + (j0 + c) * ld);
  for (int64_t p = 0; p < P; ++p) {
    uint32_t* o = pk + p * nr;
    int c = 0;
    for (; c < w; ++c) o[c] = r[c][p];
    for (; c < nr; ++c) o[c] = 0u;
  }
  // The pair holding column shift_col: low half for an even column (little-endian).
  uint32_t* o = pk + (shift_col / 2) * nr;
  const bool high = shift_col & 1;
  for (int c = 0; c < w; ++c)
    o[c] = high ? (o[c] & 0xFFFFu) | (static_cast<uint32_t>(shift_bits) << 16) : (o[c] & 0xFFFF0000u) | shift_bits;
}

// Rows [i0, i0 + MR) against the packed panel of NZ x 16 columns starting at column j0 (w of them
// real): stores A[i][j] for every real column, and A[j][i] for the ones with j > i (the mirror).
template <int MR, int NZ>
RS_TARGET_BF16 void gram_tile(const uint16_t* L, int64_t ld, int64_t i0, const uint32_t* pk, int64_t j0, int w,
                              uint16_t* A, int64_t M) {
  const int64_t P = ld / 2;
  __m512 acc[MR][NZ];
  const uint32_t* a[MR];
  for (int r = 0; r < MR; ++r) {
    a[r] = reinterpret_cast<const uint32_t*>(L + (i0 + r) * ld);
    for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < P; ++p) {
    __m512bh bz[NZ];
    for (int z = 0; z < NZ; ++z) bz[z] = (__m512bh)_mm512_loadu_si512(pk + p * (16 * NZ) + 16 * z);
    for (int r = 0; r < MR; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r][p]));
      for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], x, bz[z]);
    }
  }
  alignas(64) uint16_t tile[MR][16 * NZ];
  for (int r = 0; r < MR; ++r)
    for (int z = 0; z < NZ; ++z) {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(acc[r][z]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(&tile[r][16 * z]), h);
      const int left = w - 16 * z;
      if (left <= 0) continue;
      const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      _mm256_mask_storeu_epi16(A + (i0 + r) * M + j0 + 16 * z, m, h);
    }
  for (int c = 0; c < w; ++c) {
    const int64_t j = j0 + c;
    for (int r = 0; r < MR; ++r)
      if (j > i0 + r) A[j * M + i0 + r] = tile[r][c];
  }
}

// gram_tile<rows, NZ> for a run-time row count 1 <= rows <= MR (the last tile of a panel).
template <int MR, int NZ>
RS_TARGET_BF16 void gram_rows(const uint16_t* L, int64_t ld, int64_t i0, int rows, const uint32_t* pk, int64_t j0,
                              int w, uint16_t* A, int64_t M) {
  if constexpr (MR > 1) {
    if (rows < MR) return gram_rows<MR - 1, NZ>(L, ld, i0, rows, pk, j0, w, A, M);
  }
  gram_tile<MR, NZ>(L, ld, i0, pk, j0, w, A, M);
}

// One column panel of one query: rows 0 .. j0 + w - 1 (the upper triangle and the diagonal block).
RS_TARGET_BF16 void gram_panel(const uint16_t* L, uint16_t* A, int64_t M, int64_t ld, int64_t j0,
                               std::vector<uint32_t>& pk, int64_t shift_col, uint16_t shift_bits) {
  const int w = static_cast<int>(std::min<int64_t>(kGramNR, M - j0));
  const int nz = (w + 15) / 16;
  pk.resize(static_cast<size_t>(ld / 2 * 16 * nz));
  gram_pack(L, ld, j0, w, 16 * nz, pk.data(), shift_col, shift_bits);
  const int64_t end = j0 + w;
  for (int64_t i0 = 0; i0 < end; i0 += kGramMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kGramMR, end - i0));
    if (nz == 2) gram_rows<kGramMR, 2>(L, ld, i0, rows, pk.data(), j0, w, A, M);
    else gram_rows<kGramMR, 1>(L, ld, i0, rows, pk.data(), j0, w, A, M);
  }
}
#endif

bool gram_bf16_available() {
#if RS_BF16_KERNEL
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// Summation depth of one dot in each variant: the scalar loop adds D products in sequence; the
// AVX-512 one accumulates ceil(D / 16) fused products per lane, then a 4-level tree over lanes.
int64_t dot_depth_scalar(int64_t D) { return D; }
int64_t dot_depth_avx512(int64_t D) { return (D + 15) / 16 + 4; }

// A float64 dot of float32 rows: the products are exact, and the sum errs by ~D 2^-53 relative,
// which decides the near-ties a float32 dot cannot (see select_row).
double dot_f64(const float* __restrict a, const float* __restrict b, int64_t D) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t k = 0;
  for (; k + 4 <= D; k += 4) {
    s0 += static_cast<double>(a[k]) * b[k];
    s1 += static_cast<double>(a[k + 1]) * b[k + 1];
    s2 += static_cast<double>(a[k + 2]) * b[k + 2];
    s3 += static_cast<double>(a[k + 3]) * b[k + 3];
  }
  for (; k < D; ++k) s0 += static_cast<double>(a[k]) * b[k];
  return (s0 + s1) + (s2 + s3);
}

struct Kernels {
  int64_t (*dot_depth)(int64_t D);  // additions any one dot result went through (its error bound)
  int (*split_row)(const float*, const float*, uint16_t*, int64_t, double*, double*, float*);
  float (*kth_largest)(const uint16_t*, int64_t, int64_t, float*);
  int64_t (*collect_ge)(const uint16_t*, int64_t, float, int32_t*);
  void (*dots)(const float*, const float* const*, int, int64_t, float*);  // out[j] = a . b[j], j < n
};

// ---------------------------------------------------------------------------- prepare
struct PrepareJob {
  const float* y;       // [b * M, D]
  const float* q;       // [b, D] or null
  uint16_t* left;       // [b * M, ld]
  float* shift;         // [b]: c, computed from d when q is given, else read (a bfloat16 value)
  float* d;             // [b * M]: y_i . q (when q is given)
  double* base;         // [b * M]: the row terms of the bound
  double* norm;         // [b * M]: ||y_i||
  double safety;
  int64_t b, M, D, ld, Kp;
};

// The bound's row terms for one query (see kernels/rerank_cpu.py for the derivation):
// base_i = safety * (n_i rmax + r_i nmax + r_i rmax + gamma_{D+1} ((n_i + r_i)(nmax + rmax) + |c|))
//          + (D + 1) 2^-125   (flushed subnormal products and sums),
// gamma_n = n 2^-24 / (1 - n 2^-24).
void bound_rows(const PrepareJob& jb, int64_t q, const double* norm, const double* resid) {
  const int64_t M = jb.M;
  double nmax = 0.0, rmax = 0.0;
  for (int64_t i = 0; i < M; ++i) {
    nmax = std::max(nmax, norm[i]);
    rmax = std::max(rmax, resid[i]);
  }
  const double n1 = static_cast<double>(jb.D + 1), u = std::ldexp(1.0, -24);
  const double gamma = n1 * u / (1.0 - n1 * u), c = std::fabs(static_cast<double>(jb.shift[q]));
  for (int64_t i = 0; i < M; ++i) {
    const double n = norm[i], r = resid[i];
    jb.base[q * M + i] = jb.safety * (n * rmax + r * nmax + r * rmax + gamma * ((n + r) * (nmax + rmax) + c)) +
                         n1 * std::ldexp(1.0, -125);
  }
}

// ---------------------------------------------------------------------------- select
struct SelectJob {
  const uint16_t* a;      // [b, M, M] bfloat16: L R^T (approximate G - c)
  const float* y;         // [b, M, D] float32
  const float* shift;     // [b]: c
  const double* base;     // [b * M]: the row's input + accumulation bound (see rerank_cpu.py)
  const double* norm;     // [b * M]: ||y_i||
  double out_rel;         // output rounding bound, relative to |a_ij|
  float* v;               // [b, M, Kp] exact values, descending
  int64_t* n;             // [b, M, Kp] their columns
  int64_t b, M, D, Kp, cap;
};

// Per query: candidate columns (ascending) and their exact values, row by row. Dense rows keep no
// list: they are dotted whole and selected in one go.
struct QueryScratch {
  std::vector<std::vector<int32_t>> cand;
  std::vector<std::vector<float>> val;
  std::vector<uint8_t> dense;
  std::vector<uint64_t> bits;  // [M][words]: bit (i, j) set when j is a candidate of (non-dense) row i
  int64_t words = 0;
  double nmax = 0.0;           // largest row norm of the query
  bool has(int64_t i, int64_t j) const { return (bits[i * words + (j >> 6)] >> (j & 63)) & 1u; }
};

// Per worker thread.
struct RowScratch {
  std::vector<float> top, out;
  std::vector<int32_t> tmp, mine;
  std::vector<std::pair<float, int32_t>> best;
  std::vector<std::pair<double, int32_t>> amb;
};

// Phase 1, row i of query q: the candidates (every column that may be in the exact top K').
void candidates_row(const SelectJob& jb, const Kernels& kn, int64_t q, int64_t i, RowScratch& rs, QueryScratch& qs) {
  const int64_t M = jb.M, Kp = jb.Kp, row = q * M + i;
  const uint16_t* __restrict a = jb.a + row * M;
  rs.top.resize(static_cast<size_t>(Kp));
  const double t = kn.kth_largest(a, M, Kp, rs.top.data());  // the K'-th largest approximate value
  const double c = jb.shift[q], base = jb.base[row], rel = jb.out_rel;
  // x - e(x) and x + e(x) are increasing in x (rel < 1), so the K' largest approximate values are
  // all >= lo after subtracting their bounds: the exact K'-th largest value is >= lo. A column whose
  // approximate value plus its bound stays below lo is therefore below the exact K'-th value.
  const double lo = (t + c) - (base + rel * std::fabs(t));
  // a + rel |a| >= lo - c - base  <=>  a >= thr (solved for the sign of the right-hand side).
  const double rhs = lo - c - base;
  const double thr = rhs >= 0 ? rhs / (1.0 + rel) : rhs / (1.0 - rel);
  // Rounded down to float: a comparison of the float a_j against it can only add candidates.
  const float thr_f = std::nextafter(static_cast<float>(thr), -INFINITY);
  rs.tmp.resize(static_cast<size_t>(M + 16));
  const int64_t count = kn.collect_ge(a, M, thr_f, rs.tmp.data());
  // Too many to be worth a gather (or fewer than K', which finite input cannot give; kept as the
  // safe path): the whole exact row, in phase 2.
  qs.dense[i] = count > jb.cap || count < Kp;
  uint64_t* bits = qs.bits.data() + i * qs.words;
  std::fill(bits, bits + qs.words, uint64_t{0});
  std::vector<int32_t>& cand = qs.cand[i];
  if (qs.dense[i]) {
    cand.clear();
    return;
  }
  cand.assign(rs.tmp.begin(), rs.tmp.begin() + count);
  qs.val[i].resize(cand.size());
  for (int32_t j : cand) bits[j >> 6] |= uint64_t{1} << (j & 63);
}

RS_INLINE int64_t position(const std::vector<int32_t>& sorted, int32_t x) {
  auto it = std::lower_bound(sorted.begin(), sorted.end(), x);
  return it != sorted.end() && *it == x ? it - sorted.begin() : -1;
}

// The top K' of a row's exact values, descending, ties by lower column (torch.topk leaves ties
// unspecified; SPEC 6, ties), into the outputs. cols[p] is value p's column (null: p itself).
//
// The float32 dots err by at most tau = gamma_depth ||y_i|| ||y_j|| (|sum of products| <=
// ||y_i|| ||y_j||), ~8e-6 for unit rows at D = 2048 in the AVX-512 variant: far above the ~1e-7
// they typically err by, but two candidates within float32 rounding of each other at the cut
// (the K'-th and (K'+1)-th) do occur (~1 row in 500 on clustered data), and a float32 path then
// picks either. So every candidate within 2 tau of the K'-th value is recomputed in float64 and
// the cut is made on those: the set is then the exact top K' (in real arithmetic, up to float64
// rounding). Candidates above that window are in the top K' whatever their error (fewer than K'
// candidates even look larger than the K'-th); those below are out.
void select_row(const SelectJob& jb, const Kernels& kn, const QueryScratch& qs, int64_t q, int64_t i,
                const int32_t* cols, const float* val, size_t n, RowScratch& rs) {
  const int64_t Kp = jb.Kp, M = jb.M, D = jb.D, row = q * M + i;
  auto col = [cols](size_t p) { return cols ? cols[p] : static_cast<int32_t>(p); };
  // Insertion into a sorted buffer of K' + 1 (values come in ascending column order, so a later
  // equal value goes after: ties keep the lower column first).
  const int64_t nb = Kp + 1;
  std::vector<std::pair<float, int32_t>>& best = rs.best;
  best.assign(static_cast<size_t>(nb), {-INFINITY, INT32_MAX});
  for (size_t p = 0; p < n; ++p) {
    const float x = val[p];
    if (!(x > best[nb - 1].first)) continue;
    int64_t k = nb - 1;
    while (k > 0 && best[k - 1].first < x) { best[k] = best[k - 1]; --k; }
    best[k] = {x, col(p)};
  }
  const double depth = static_cast<double>(kn.dot_depth(D)), u = std::ldexp(1.0, -24);
  const double tau = (depth * u / (1.0 - depth * u)) * jb.norm[row] * qs.nmax * (1.0 + 1.0 / 64);
  const double vk = best[Kp - 1].first;
  if (static_cast<int64_t>(n) > Kp && static_cast<double>(best[Kp].first) >= vk - 2 * tau) {
    // A near-tie at the cut: float64 for the window, the cut made on it.
    const float* yq = jb.y + q * M * D;
    int64_t above = 0;
    std::vector<std::pair<double, int32_t>>& amb = rs.amb;
    amb.clear();
    for (size_t p = 0; p < n; ++p) {
      const double x = val[p];
      if (x > vk + 2 * tau) {
        ++above;
      } else if (x >= vk - 2 * tau) {
        amb.emplace_back(dot_f64(yq + i * D, yq + static_cast<int64_t>(col(p)) * D, D), col(p));
      }
    }
    std::sort(amb.begin(), amb.end(), [](const std::pair<double, int32_t>& x, const std::pair<double, int32_t>& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);
    });
    // The output: the `above` ones and the best K' - above of the window, by value (float64 ones
    // rounded to float32), descending.
    best.clear();
    for (size_t p = 0; p < n; ++p)
      if (static_cast<double>(val[p]) > vk + 2 * tau) best.emplace_back(val[p], col(p));
    for (int64_t k = 0; k < Kp - above; ++k) best.emplace_back(static_cast<float>(amb[k].first), amb[k].second);
    std::stable_sort(best.begin(), best.end(), [](const std::pair<float, int32_t>& x, const std::pair<float, int32_t>& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);
    });
  }
  float* vo = jb.v + row * Kp;
  int64_t* no = jb.n + row * Kp;
  for (int64_t k = 0; k < Kp; ++k) { vo[k] = best[k].first; no[k] = best[k].second; }
}

RS_INLINE void dots_into(const Kernels& kn, const float* yi, const float* yq, int64_t D, const int32_t* cols,
                         size_t n, float* out) {
  const float* bs[kDots];
  for (size_t g = 0; g < n; g += kDots) {
    const int nb = static_cast<int>(std::min<size_t>(kDots, n - g));
    for (int j = 0; j < nb; ++j) bs[j] = yq + static_cast<int64_t>(cols ? cols[g + j] : static_cast<int32_t>(g + j)) * D;
    kn.dots(yi, bs, nb, D, out + g);
  }
}

// Phase 2, row i: exact dots. G is symmetric, so a pair that both rows hold as candidates is
// dotted once, by the lower row, which also writes the upper row's copy (~30% fewer dots on
// clustered data). Every value slot has exactly one writer. A dense row is dotted whole and
// selected here.
int64_t dots_row(const SelectJob& jb, const Kernels& kn, int64_t q, int64_t i, QueryScratch& qs, RowScratch& rs) {
  const int64_t D = jb.D, M = jb.M;
  const float* yq = jb.y + q * M * D;
  if (qs.dense[i]) {
    rs.out.resize(static_cast<size_t>(M));
    dots_into(kn, yq + i * D, yq, D, nullptr, static_cast<size_t>(M), rs.out.data());
    select_row(jb, kn, qs, q, i, nullptr, rs.out.data(), static_cast<size_t>(M), rs);
    return M;
  }
  const std::vector<int32_t>& cand = qs.cand[i];
  std::vector<int32_t>& mine = rs.mine;
  mine.clear();
  for (int32_t j : cand)
    if (!(j < i && qs.has(j, i))) mine.push_back(j);
  rs.out.resize(mine.size());
  dots_into(kn, yq + i * D, yq, D, mine.data(), mine.size(), rs.out.data());
  // Scatter: own slots (both lists ascending: one merge pass), then the mirrored ones.
  std::vector<float>& val = qs.val[i];
  for (size_t p = 0, k = 0; p < cand.size() && k < mine.size(); ++p)
    if (cand[p] == mine[k]) val[p] = rs.out[k++];
  for (size_t k = 0; k < mine.size(); ++k) {
    const int32_t j = mine[k];
    if (j > i && qs.has(j, i)) qs.val[j][position(qs.cand[j], static_cast<int32_t>(i))] = rs.out[k];
  }
  return static_cast<int64_t>(mine.size());
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
    throw py::value_error("isa '" + isa + "' is not available on this CPU (have: " +
                          py::str(py::cast(ok)).cast<std::string>() + ")");
#if RS_X86_DISPATCH
  if (want == "avx512") return {dot_depth_avx512, split_row_avx512, kth_largest_avx512, collect_ge_avx512, dots_avx512};
#endif
  return {dot_depth_scalar, split_row_scalar, kth_largest_scalar, collect_ge_scalar, dots_scalar};
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

// ---------------------------------------------------------------------------- finish
// SPEC 6.4-6.8 from the neighbours (see kernels/rerank_cpu.py for the rearrangement): weights
// w = beta v with slot 0 set to 1, s1 = sum_k w d[n] / W, the expansion q' = the elementwise max of
// the refined rows of the K' best by s1, e = Y q', s2 = sum_k w e[n] / W, f = (s1 + s2) / 2 and the
// order by f descending (ties: lower position). The same float32 arithmetic as rerank_cpu_fp32's
// torch steps, with no temporary [M', K'] tensors: those ~12 small ops cost ~0.45 ms at M' = 400,
// about a fifth of the rerank.
//
// Adaptive mode (likely_slot >= 0; docs/adaptive_rerank.md): neighbour k > 0 of row i weighs 0 when
// v[k] < d_i, and a row among the K' best by s1 joins q' only when d_j >= v_j[likely_slot]; with no
// such row, s2 = s1.
struct FinishJob {
  const float* v;      // [b, M, Kp]
  const int64_t* n;    // [b, M, Kp]
  const float* d;      // [b, M]: y_i . q
  const float* y;      // [b, M, D]
  float* w;            // scratch [b, M, Kp]
  float* wsum;         // scratch [b, M]
  float* s1;           // scratch [b, M]
  float* qe;           // scratch [b, D]
  float* e;            // scratch [b, M]
  int64_t* order;      // [b, M]
  float* scores;       // [b, M]
  uint8_t* has;        // scratch [b]: the expansion has a row (always, in the faithful mode)
  int32_t* mem;        // scratch [b, Kp]: positions of the expansion's members (adaptive mode)
  int64_t* nmem;       // scratch [b]: how many
  float beta;
  int64_t b, M, D, Kp;
  int64_t likely_slot;  // -1: faithful; else the adaptive mode's slot
};

// Weights, s1, and q' for query q.
void finish_expand(const FinishJob& jb, int64_t q, std::vector<std::pair<float, int32_t>>& tmp) {
  const int64_t M = jb.M, Kp = jb.Kp, D = jb.D;
  const bool adaptive = jb.likely_slot >= 0;
  const float* yq = jb.y + q * M * D;
  for (int64_t i = q * M; i < (q + 1) * M; ++i) {
    float* w = jb.w + i * Kp;
    const float* v = jb.v + i * Kp;
    const int64_t* n = jb.n + i * Kp;
    const float di = jb.d[i];
    float ws = 0.0f, s = 0.0f;
    for (int64_t k = 0; k < Kp; ++k) {
      w[k] = k == 0 ? 1.0f : (adaptive && v[k] < di ? 0.0f : v[k] * jb.beta);
      ws += w[k];
      s += w[k] * jb.d[q * M + n[k]];
    }
    jb.wsum[i] = ws;
    jb.s1[i] = s / ws;
  }
  // The K' best by s1 (ties: lower position; which of equal rows is taken does not change q').
  tmp.resize(static_cast<size_t>(M));
  for (int64_t i = 0; i < M; ++i) tmp[i] = {jb.s1[q * M + i], static_cast<int32_t>(i)};
  auto desc = [](const std::pair<float, int32_t>& x, const std::pair<float, int32_t>& y) {
    return x.first > y.first || (x.first == y.first && x.second < y.second);
  };
  std::partial_sort(tmp.begin(), tmp.begin() + Kp, tmp.end(), desc);
  float* qe = jb.qe + q * D;
  std::vector<float> acc(static_cast<size_t>(D));
  int64_t members = 0;
  for (int64_t t = 0; t < Kp; ++t) {
    const int64_t i = q * M + tmp[t].second;
    if (adaptive && !(jb.d[i] >= jb.v[i * Kp + jb.likely_slot])) continue;
    jb.mem[q * Kp + members] = tmp[t].second;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = 0; k < Kp; ++k) {
      const float wk = jb.w[i * Kp + k];
      const float* r = yq + jb.n[i * Kp + k] * D;
      for (int64_t x = 0; x < D; ++x) acc[x] += wk * r[x];
    }
    const float ws = jb.wsum[i];
    for (int64_t x = 0; x < D; ++x) {
      const float r = acc[x] / ws;
      qe[x] = members == 0 ? r : std::max(qe[x], r);
    }
    ++members;
  }
  jb.has[q] = members > 0;
  jb.nmem[q] = members;
  if (!members) std::fill(qe, qe + D, 0.0f);
}

// s2, f and the order for query q (e filled).
void finish_order(const FinishJob& jb, int64_t q, std::vector<std::pair<float, int32_t>>& tmp) {
  const int64_t M = jb.M, Kp = jb.Kp;
  tmp.resize(static_cast<size_t>(M));
  for (int64_t i = q * M; i < (q + 1) * M; ++i) {
    const float* w = jb.w + i * Kp;
    const int64_t* n = jb.n + i * Kp;
    float s = 0.0f;
    for (int64_t k = 0; k < Kp; ++k) s += w[k] * jb.e[q * M + n[k]];
    const float s2 = jb.has[q] ? s / jb.wsum[i] : jb.s1[i];
    tmp[i - q * M] = {(jb.s1[i] + s2) * 0.5f, static_cast<int32_t>(i - q * M)};
  }
  // Adaptive step F: the expansion's members keep their first-stage order among themselves (their
  // f values, sorted descending, go to them in ascending position).
  const int64_t nm = jb.likely_slot >= 0 ? jb.nmem[q] : 0;
  if (nm > 1) {
    std::vector<int32_t> pos(jb.mem + q * Kp, jb.mem + q * Kp + nm);
    std::vector<float> val(static_cast<size_t>(nm));
    for (int64_t t = 0; t < nm; ++t) val[t] = tmp[pos[t]].first;
    std::sort(pos.begin(), pos.end());
    std::sort(val.begin(), val.end(), std::greater<float>());
    for (int64_t t = 0; t < nm; ++t) tmp[pos[t]].first = val[t];
  }
  std::sort(tmp.begin(), tmp.end(), [](const std::pair<float, int32_t>& x, const std::pair<float, int32_t>& y) {
    return x.first > y.first || (x.first == y.first && x.second < y.second);
  });
  for (int64_t r = 0; r < M; ++r) {
    jb.order[q * M + r] = tmp[r].second;
    jb.scores[q * M + r] = tmp[r].first;
  }
}

// Scratch of finish for b queries (kept by the batch path between queries).
struct FinishScratch {
  std::vector<float> w, wsum, s1, qe, e;
  std::vector<uint8_t> has;
  std::vector<int32_t> mem;
  std::vector<int64_t> nmem;
  void size(int64_t b, int64_t M, int64_t D, int64_t Kp) {
    has.resize(static_cast<size_t>(b));
    mem.resize(static_cast<size_t>(b * Kp));
    nmem.resize(static_cast<size_t>(b));
    w.resize(static_cast<size_t>(b * M * Kp));
    wsum.resize(static_cast<size_t>(b * M));
    s1.resize(static_cast<size_t>(b * M));
    qe.resize(static_cast<size_t>(b * D));
    e.resize(static_cast<size_t>(b * M));
  }
};

void finish_impl(const float* v, const int64_t* n, const float* d, const float* y, int64_t b, int64_t M, int64_t D,
                 int64_t Kp, double beta, int64_t likely_slot, int64_t* order, float* scores, int threads,
                 const Kernels& kn, FinishScratch& fs) {
  fs.size(b, M, D, Kp);
  FinishJob jb{v, n, d, y, fs.w.data(), fs.wsum.data(), fs.s1.data(), fs.qe.data(), fs.e.data(), order, scores,
               fs.has.data(), fs.mem.data(), fs.nmem.data(), static_cast<float>(beta), b, M, D, Kp, likely_slot};
  run_threads<int>(b, threads, [&](int64_t s, int64_t t) {
    std::vector<std::pair<float, int32_t>> tmp;
    for (int64_t q = s; q < t; ++q) finish_expand(jb, q, tmp);
    return 0;
  }, 1);
  // e = Y q' row by row, over all rows at once (one query's rows split over the threads too).
  run_threads<int>(b * M, threads, [&](int64_t s, int64_t t) {
    const float* bs[kDots];
    float out[kDots];
    for (int64_t i = s; i < t;) {
      const int64_t q = i / M;
      const int nb = static_cast<int>(std::min<int64_t>({kDots, t - i, (q + 1) * M - i}));
      for (int j = 0; j < nb; ++j) bs[j] = jb.y + (i + j) * D;
      kn.dots(jb.qe + q * D, bs, nb, D, out);
      for (int j = 0; j < nb; ++j) jb.e[i + j] = out[j];
      i += nb;
    }
    return 0;
  }, 64);
  run_threads<int>(b, threads, [&](int64_t s, int64_t t) {
    std::vector<std::pair<float, int32_t>> tmp;
    for (int64_t q = s; q < t; ++q) finish_order(jb, q, tmp);
    return 0;
  }, 1);
}

// ---------------------------------------------------------------------------- prepare (the pass)
// The operands, d, c and the bound's row terms of jb's b queries on `threads` threads. Returns how
// many rows are not finite or too large for the bound's model (then nothing else is valid).
int64_t prepare_impl(const PrepareJob& jb, const Kernels& kn, int threads) {
  const int64_t b = jb.b, M = jb.M, D = jb.D, ld = jb.ld, Kp = jb.Kp;
  double* norm = jb.norm;
  std::vector<double> resid(static_cast<size_t>(b * M));
  int64_t bad = 0;
  for (int64_t x : run_threads<int64_t>(b * M, threads, [&](int64_t s, int64_t e) {
         int64_t bad_rows = 0;
         for (int64_t i = s; i < e; ++i) {
           uint16_t* L = jb.left + i * ld;
           const float* qi = jb.q ? jb.q + (i / M) * D : nullptr;
           double n2 = 0.0, r2 = 0.0;
           float dq = 0.0f;
           bad_rows += kn.split_row(jb.y + i * D, qi, L, D, &n2, &r2, &dq) != 0;
           if (jb.q) jb.d[i] = dq;
           L[D] = 0x3F80u;  // 1.0; the Gram reads R[D] = -c in its place
           for (int64_t k = D + 1; k < ld; ++k) L[k] = 0;
           norm[i] = std::sqrt(n2);
           resid[i] = std::sqrt(r2);
           // Norms up to 1e15 keep the Gram and every term of the bound far from float32 overflow.
           bad_rows += !(norm[i] <= 1e15);
         }
         return bad_rows;
       }, 32))
    bad += x;
  if (bad) return bad;
  std::vector<float> dd(static_cast<size_t>(M));
  for (int64_t qq = 0; qq < b; ++qq) {
    if (jb.q) {
      // c: the K'-th largest first-stage similarity, as a bfloat16 value so that 1 * -c is exact.
      std::copy(jb.d + qq * M, jb.d + (qq + 1) * M, dd.begin());
      std::nth_element(dd.begin(), dd.begin() + (Kp - 1), dd.end(), std::greater<float>());
      const float c = std::min(std::max(dd[Kp - 1], -1e30f), 1e30f);
      jb.shift[qq] = bf16_round(c);
    }
    bound_rows(jb, qq, norm + qq * M, resid.data() + qq * M);
  }
  return 0;
}


#if RS_BF16_KERNEL
// ---------------------------------------------------------------------------- gram
// A = L R^T for b queries (see the triangle Gram section): L [b, M, ld] bfloat16 with R = L but for
// column D = bf16(-c[q]); A [b, M, M] bfloat16. Work items are (query, column panel), largest
// first, taken from a shared counter, so two threads split one query's triangle evenly; every
// entry has one writer.
void gram_impl(const uint16_t* L, uint16_t* A, int64_t b, int64_t M, int64_t ld, int threads, int64_t D,
               const float* c) {
  const int64_t panels = (M + kGramNR - 1) / kGramNR, n = b * panels;
  std::atomic<int64_t> next{0};
  run_threads<int>(std::min<int64_t>(threads, n), threads, [&](int64_t, int64_t) {
    static thread_local std::vector<uint32_t> pk;
    for (int64_t k = next.fetch_add(1); k < n; k = next.fetch_add(1)) {
      const int64_t q = k % b, panel = panels - 1 - k / b;
      const uint16_t neg_c = static_cast<uint16_t>(bf16_rne_bits(as_bits(-c[q])) >> 16);  // c is bfloat16: exact
      gram_panel(L + q * M * ld, A + q * M * M, M, ld, panel * kGramNR, pk, D, neg_c);
    }
    return 0;
  }, 1);
}
#else
void gram_impl(const uint16_t*, uint16_t*, int64_t, int64_t, int64_t, int, int64_t, const float*) {
  throw std::runtime_error("sgengine.kernels._rerank_cpu was built without the AVX512_BF16 Gram");
}
#endif

// The certified top K' of every row of jb's b queries, on `threads` threads; returns (exact dots, dense rows).
std::pair<int64_t, int64_t> select_impl(const SelectJob& jb, const Kernels& kn, int threads, QueryScratch& qs) {
  const int64_t b = jb.b, M = jb.M;
  int64_t dots = 0, dense = 0;
  {
    qs.cand.resize(static_cast<size_t>(M));
    qs.val.resize(static_cast<size_t>(M));
    qs.dense.resize(static_cast<size_t>(M));
    qs.words = (M + 63) / 64;
    qs.bits.resize(static_cast<size_t>(M * qs.words));
    for (int64_t q = 0; q < b; ++q) {
      qs.nmax = 0.0;
      for (int64_t j = 0; j < M; ++j) qs.nmax = std::max(qs.nmax, jb.norm[q * M + j]);
      // Row scratch lives in each worker thread between calls (threads persist in OpenMP's pool).
      run_threads<int>(M, threads, [&](int64_t s, int64_t e) {
        static thread_local RowScratch rs;
        for (int64_t i = s; i < e; ++i) candidates_row(jb, kn, q, i, rs, qs);
        return 0;
      }, 16);
      // Rows in chunks of 16 from a shared counter: lower rows dot the pairs they share with
      // higher ones, so equal row ranges are unequal work (~60/40 over two threads).
      std::atomic<int64_t> next{0};
      const int64_t chunks = (M + 15) / 16;
      for (int64_t d : run_threads<int64_t>(std::min<int64_t>(threads, chunks), threads, [&](int64_t, int64_t) {
             static thread_local RowScratch rs;
             int64_t count = 0;
             for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
               for (int64_t i = c * 16; i < std::min<int64_t>(M, c * 16 + 16); ++i) count += dots_row(jb, kn, q, i, qs, rs);
             return count;
           }, 1))
        dots += d;
      run_threads<int>(M, threads, [&](int64_t s, int64_t e) {
        static thread_local RowScratch rs;
        for (int64_t i = s; i < e; ++i)
          if (!qs.dense[i]) select_row(jb, kn, qs, q, i, qs.cand[i].data(), qs.val[i].data(), qs.cand[i].size(), rs);
        return 0;
      }, 16);
      for (uint8_t x : qs.dense) dense += x;
    }
  }
  return {dots, dense};
}

// ---------------------------------------------------------------------------- one query
struct Stats {
  int64_t rows = 0, dots = 0, dense = 0;
  Stats& operator+=(const Stats& o) {
    rows += o.rows;
    dots += o.dots;
    dense += o.dense;
    return *this;
  }
};

struct Setup {
  int64_t M, D, ld, Kp, cap;
  double safety, out_rel;
};

// One query's scratch, kept per thread between calls (an OpenMP worker keeps its own): a fresh
// large buffer is mmapped, and faulting its pages in cost ~2 ms of a 7 ms rerank at M' = 400.
struct QueryWork {
  std::vector<uint16_t> L, A;
  std::vector<double> base, norm;
  std::vector<float> d, v;
  std::vector<int64_t> n;
  QueryScratch qs;
  FinishScratch fs;
  void size(const Setup& st) {
    L.resize(static_cast<size_t>(st.M * st.ld));
    A.resize(static_cast<size_t>(st.M * st.M));
    base.resize(static_cast<size_t>(st.M));
    norm.resize(static_cast<size_t>(st.M));
    d.resize(static_cast<size_t>(st.M));
    v.resize(static_cast<size_t>(st.M * st.Kp));
    n.resize(static_cast<size_t>(st.M * st.Kp));
  }
};

QueryWork& thread_work(const Setup& st) {
  static thread_local QueryWork w;
  w.size(st);
  return w;
}

// prepare and gram for one query y [M, D] on `threads` threads: with q, c is computed (the K'-th
// largest of d = y q, as a bfloat16 value); without, *c is used (a bfloat16 value). False when a
// row is not finite or too large for the bound's model (then nothing else is valid).
bool approx_one(const float* y, const float* q, float* c, const Setup& st, const Kernels& kn, int threads,
                QueryWork& w) {
  const PrepareJob pj{y, q, w.L.data(), c, q ? w.d.data() : nullptr, w.base.data(), w.norm.data(), st.safety,
                      1, st.M, st.D, st.ld, st.Kp};
  if (prepare_impl(pj, kn, threads)) return false;
  gram_impl(w.L.data(), w.A.data(), 1, st.M, st.ld, threads, st.D, c);
  return true;
}

// approx_one, then the certified top K' of every row into v, n [M, K'].
bool neighbours_one(const float* y, const float* q, float* c, const Setup& st, const Kernels& kn, int threads,
                    QueryWork& w, float* v, int64_t* n, Stats& stats) {
  if (!approx_one(y, q, c, st, kn, threads, w)) return false;
  const SelectJob sj{w.A.data(), y, c, w.base.data(), w.norm.data(), st.out_rel, v, n, 1, st.M, st.D, st.Kp, st.cap};
  const std::pair<int64_t, int64_t> dd = select_impl(sj, kn, threads, w.qs);
  stats.rows += st.M;
  stats.dots += dd.first;
  stats.dense += dd.second;
  return true;
}

// The whole rerank of one query into order, scores [M]. False (nothing written) as above.
bool rerank_one(const float* y, const float* q, double beta, int64_t likely_slot, const Setup& st, const Kernels& kn,
                int threads, QueryWork& w, int64_t* order, float* scores, Stats& stats) {
  float c = 0.0f;
  if (!neighbours_one(y, q, &c, st, kn, threads, w, w.v.data(), w.n.data(), stats)) return false;
  finish_impl(w.v.data(), w.n.data(), w.d.data(), y, 1, st.M, st.D, st.Kp, beta, likely_slot, order, scores, threads,
              kn, w.fs);
  return true;
}

// ---------------------------------------------------------------------------- entry checks
std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t k = 0; k < a.ndim(); ++k) s += (k ? ", " : "") + std::to_string(a.shape(k));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string err(const char* fn, const std::string& msg) { return std::string(fn) + ": " + msg; }

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

// A C-contiguous array of T with `ndim` dimensions, or a ValueError naming the argument. No
// conversion: a wrong dtype or layout is the caller's mistake, not something to copy silently.
template <class T>
py::array_t<T> typed_array(const py::array& a, const char* fn, const char* name, int ndim, const char* dims,
                           const char* dtype) {
  if (a.ndim() != ndim)
    throw py::value_error(err(fn, std::string(name) + " must have " + std::to_string(ndim) + " dimensions " + dims +
                                      ", got shape " + shape_str(a)));
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::value_error(err(fn, std::string(name) + " must be " + dtype + ", got " +
                                      py::str(a.dtype()).cast<std::string>()));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(err(fn, std::string(name) + " must be C-contiguous (shape " + shape_str(a) +
                                      "); pass a contiguous copy"));
  return py::reinterpret_borrow<py::array_t<T>>(a);
}

// Y [nq, M, D] float32 and the settings every entry shares.
Setup check_setup(const char* fn, const py::array_t<float>& Y, int64_t Kp, int64_t cap, double safety, double out_rel,
                  int threads) {
  const int64_t M = Y.shape(1), D = Y.shape(2);
  if (M < 1) throw py::value_error(err(fn, "Y has no candidates (shape " + shape_str(Y) + ")"));
  if (D < 1) throw py::value_error(err(fn, "Y has D = 0 (shape " + shape_str(Y) + ")"));
  if (M > INT32_MAX) throw py::value_error(err(fn, "Y has more than 2^31 - 1 candidates per query"));
  if (Kp < 1 || Kp > M)
    throw py::value_error(err(fn, "Kp must be in [1, M] = [1, " + std::to_string(M) + "], got " + std::to_string(Kp)));
  if (cap < 0) throw py::value_error(err(fn, "cap must be >= 0, got " + std::to_string(cap)));
  if (!(safety >= 0.0 && std::isfinite(safety)))
    throw py::value_error(err(fn, "safety must be a finite number >= 0, got " + num(safety)));
  if (!(out_rel >= 0.0 && out_rel < 0.5))
    throw py::value_error(err(fn, "out_rel must be in [0, 0.5), got " + num(out_rel)));
  if (threads < 1) throw py::value_error(err(fn, "threads must be >= 1, got " + std::to_string(threads)));
  if (!gram_bf16_available())
    throw std::runtime_error(err(fn, "this CPU has no AVX512_BF16 (or the module was built without it): check "
                                     "gram_bf16_available() first"));
  return Setup{M, D, (D + 1 + 15) / 16 * 16, Kp, cap, safety, out_rel};  // ld: the shift column, 32-byte rows
}

// q [nq, D] float32 matching Y [nq, M, D].
py::array_t<float> check_queries(const char* fn, const py::array& q_in, const py::array_t<float>& Y) {
  py::array_t<float> q = typed_array<float>(q_in, fn, "q", 2, "[nq, D]", "float32");
  if (q.shape(0) != Y.shape(0) || q.shape(1) != Y.shape(2))
    throw py::value_error(err(fn, "q has shape " + shape_str(q) + " but Y has " + shape_str(Y) +
                                      ": expected q [nq, D] for Y [nq, M, D]"));
  return q;
}

Kernels pick_checked(const char* fn, const std::string& isa) {
  try {
    return pick(isa);
  } catch (const py::value_error& e) {
    throw py::value_error(err(fn, e.what()));
  }
}

std::string bad_rows_message(int64_t k) {
  return "Y[" + std::to_string(k) + "] holds a row that is not finite or whose norm is above 1e15 (outside the "
         "bound's model)";
}

// ---------------------------------------------------------------------------- entries
// The certified rerank of nq queries. One query (or one thread): each kernel runs threaded over
// rows. Several: a query per thread at a time, each kernel single-threaded, taken from a shared
// counter, so a query's operands, Gram and lists never move between cores (on the 2-core EPYC VM
// the two ways tie at best, but the VM goes through phases in which writes to lines the other core
// has just read are slow: then the row split took ~185 ms for 70 queries at M' = 400, the query
// split still ~130 ms).
py::tuple certified_rerank(const py::array& Y_in, const py::array& q_in, int64_t Kp, double beta, double safety,
                           double out_rel, int64_t cap, int threads, const std::string& isa, int64_t likely_slot) {
  const char* fn = "certified_rerank";
  const py::array_t<float> Y = typed_array<float>(Y_in, fn, "Y", 3, "[nq, M, D]", "float32");
  const py::array_t<float> q = check_queries(fn, q_in, Y);
  if (!std::isfinite(beta)) throw py::value_error(err(fn, "beta must be finite, got " + num(beta)));
  const Setup st = check_setup(fn, Y, Kp, cap, safety, out_rel, threads);
  if (likely_slot < -1 || likely_slot >= Kp)
    throw py::value_error(err(fn, "likely_slot must be -1 (faithful) or in [0, Kp) = [0, " + std::to_string(Kp) +
                                      "), got " + std::to_string(likely_slot)));
  const Kernels kn = pick_checked(fn, isa);
  const int64_t nq = Y.shape(0), M = st.M, D = st.D;
  py::array_t<int64_t> order({nq, M});
  py::array_t<float> scores({nq, M});
  py::array_t<uint8_t> status(nq);
  const float* y = Y.data();
  const float* qp = q.data();
  int64_t* ord = order.mutable_data();
  float* sco = scores.mutable_data();
  uint8_t* sts = status.mutable_data();
  Stats total;
  {
    py::gil_scoped_release release;
    auto one = [&](int64_t k, int nt, QueryWork& w, Stats& s) {
      const bool ok = rerank_one(y + k * M * D, qp + k * D, beta, likely_slot, st, kn, nt, w, ord + k * M, sco + k * M,
                                 s);
      sts[k] = ok ? 0 : 1;
      if (!ok)  // nothing valid: first-stage order, NaN scores
        for (int64_t i = 0; i < M; ++i) {
          ord[k * M + i] = i;
          sco[k * M + i] = NAN;
        }
    };
    if (nq <= 1 || threads == 1) {
      QueryWork& w = thread_work(st);
      for (int64_t k = 0; k < nq; ++k) one(k, threads, w, total);
    } else {
      std::atomic<int64_t> next{0};
      for (const Stats& s : run_threads<Stats>(std::min<int64_t>(threads, nq), threads, [&](int64_t, int64_t) {
             QueryWork& w = thread_work(st);
             Stats mine;
             for (int64_t k = next.fetch_add(1); k < nq; k = next.fetch_add(1)) one(k, 1, w, mine);
             return mine;
           }, 1))
        total += s;
    }
  }
  return py::make_tuple(order, scores, status, py::make_tuple(total.rows, total.dots, total.dense));
}

// SPEC 6.3 alone, query by query: the certified top K' of each Gram row.
py::tuple certified_neighbours(const py::array& Y_in, std::optional<py::array> q_in, int64_t Kp, double safety,
                               double out_rel, int64_t cap, int threads, const std::string& isa) {
  const char* fn = "certified_neighbours";
  const py::array_t<float> Y = typed_array<float>(Y_in, fn, "Y", 3, "[nq, M, D]", "float32");
  py::array_t<float> q;
  if (q_in) q = check_queries(fn, *q_in, Y);
  const Setup st = check_setup(fn, Y, Kp, cap, safety, out_rel, threads);
  const Kernels kn = pick_checked(fn, isa);
  const int64_t nq = Y.shape(0), M = st.M, D = st.D;
  py::array_t<float> v({nq, M, Kp});
  py::array_t<int64_t> n({nq, M, Kp});
  const float* y = Y.data();
  const float* qp = q_in ? q.data() : nullptr;
  float* vp = v.mutable_data();
  int64_t* np_ = n.mutable_data();
  Stats total;
  int64_t bad = -1;
  {
    py::gil_scoped_release release;
    QueryWork& w = thread_work(st);
    for (int64_t k = 0; k < nq && bad < 0; ++k) {
      float c = 0.0f;
      if (!neighbours_one(y + k * M * D, qp ? qp + k * D : nullptr, &c, st, kn, threads, w, vp + k * M * Kp,
                          np_ + k * M * Kp, total))
        bad = k;
    }
  }
  if (bad >= 0) throw py::value_error(err(fn, bad_rows_message(bad)));
  return py::make_tuple(v, n, py::make_tuple(total.rows, total.dots, total.dense));
}

// The approximate Gram and its bound, query by query: x = a + c and e = base_i + out_rel |a_ij|
// (float64 [nq, M, M] each), so that |x - Y Y^T| <= e entrywise if the bound is right.
py::tuple approx_gram_bound(const py::array& Y_in, const py::array& c_in, double safety, double out_rel, int threads,
                            const std::string& isa) {
  const char* fn = "approx_gram_bound";
  const py::array_t<float> Y = typed_array<float>(Y_in, fn, "Y", 3, "[nq, M, D]", "float32");
  const py::array_t<float> c = typed_array<float>(c_in, fn, "c", 1, "[nq]", "float32");
  if (c.shape(0) != Y.shape(0))
    throw py::value_error(err(fn, "c has shape " + shape_str(c) + " but Y has " + shape_str(Y) + ": expected c [nq]"));
  const Setup st = check_setup(fn, Y, 1, 0, safety, out_rel, threads);
  const Kernels kn = pick_checked(fn, isa);
  const int64_t nq = Y.shape(0), M = st.M, D = st.D;
  py::array_t<double> x({nq, M, M}), e({nq, M, M});
  const float* y = Y.data();
  const float* cp = c.data();
  double* xp = x.mutable_data();
  double* ep = e.mutable_data();
  int64_t bad = -1;
  {
    py::gil_scoped_release release;
    QueryWork& w = thread_work(st);
    for (int64_t k = 0; k < nq && bad < 0; ++k) {
      float ck = bf16_round(std::min(std::max(cp[k], -1e30f), 1e30f));
      if (!approx_one(y + k * M * D, nullptr, &ck, st, kn, threads, w)) {
        bad = k;
        break;
      }
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < M; ++j) {
          const double a = bf16_value(w.A[i * M + j]);
          xp[(k * M + i) * M + j] = a + ck;
          ep[(k * M + i) * M + j] = w.base[i] + out_rel * std::fabs(a);
        }
    }
  }
  if (bad >= 0) throw py::value_error(err(fn, bad_rows_message(bad)));
  return py::make_tuple(x, e);
}

}  // namespace

PYBIND11_MODULE(_rerank_cpu, m) {
  m.doc() = "The certified bfloat16 rerank on the CPU (sgengine.kernels.rerank_cpu wraps it)";
  m.def("certified_rerank", &certified_rerank, py::arg("Y"), py::arg("q"), py::arg("Kp"), py::arg("beta"),
        py::arg("safety"), py::arg("out_rel"), py::arg("cap"), py::arg("threads") = 1, py::arg("isa") = "auto",
        py::arg("likely_slot") = -1,
        "SPEC 6 steps 2-8 for Y [nq, M, D] and q [nq, D] (float32, C-contiguous) with K' = Kp:\n"
        "(order int64 [nq, M], scores float32 [nq, M], status uint8 [nq], (rows, exact_dots, dense_rows)).\n"
        "status 1: a row of that query is not finite or too large; its order and scores are not valid.\n"
        "likely_slot >= 0: the adaptive mode (docs/adaptive_rerank.md) with that slot; -1: SPEC 6 as written.");
  m.def("certified_neighbours", &certified_neighbours, py::arg("Y"), py::arg("q"), py::arg("Kp"), py::arg("safety"),
        py::arg("out_rel"), py::arg("cap"), py::arg("threads") = 1, py::arg("isa") = "auto",
        "SPEC 6.3 alone: (v float32 [nq, M, Kp] descending, n int64 [nq, M, Kp], (rows, exact_dots, dense_rows)).\n"
        "q [nq, D] sets the shift as the rerank does; None: c = 0. ValueError for a row outside the bound's model.");
  m.def("approx_gram_bound", &approx_gram_bound, py::arg("Y"), py::arg("c"), py::arg("safety"), py::arg("out_rel"),
        py::arg("threads") = 1, py::arg("isa") = "auto",
        "The bfloat16 Gram with shift c [nq] (rounded to bfloat16) and its bound: (x, e), float64 [nq, M, M] each,\n"
        "x = bf16 Gram, e = the bound the selection uses. ValueError for a row outside the bound's model.");
  m.def("gram_bf16_available", &gram_bf16_available,
        "Whether the certified entries run here (AVX512_BF16 and AVX-512F/BW/VL/DQ, and a compiler that has them).");
  m.def("isas", &supported_isas, "Instruction sets this CPU runs, best first ('auto' picks the first).");
  m.def("bf16_hardware", &bf16_hardware, "Whether the CPU has bfloat16 dot-product instructions (AVX512_BF16 or AMX).");
#ifdef _OPENMP
  m.attr("threading") = "openmp";
#else
  m.attr("threading") = "std::thread";
#endif
}
