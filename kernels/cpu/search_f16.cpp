// Exact first stage on the CPU (SPEC 5): sgengine.kernels._search_cpu, called by
// sgengine.kernels.search_cpu. Top-k of S = X q over float16 (or float32) rows X, for a batch of
// float32 queries, reading every row once per batch and never materializing S or a float32 copy
// of X.
//
//   rows:    one or more segments [n_i, D] (an index's .npy segments, memory-mapped or not),
//            numbered one after the other as one [N, D] matrix;
//   threads: split the N rows into contiguous ranges; each keeps its own top-k per query, and
//            the lists are merged at the end;
//   tiles:   a thread walks its range in tiles of `tile` rows (about 192 KiB, so a tile stays in
//            L2 while every query group passes over it). Per tile and slice of KC columns, each
//            group of Q <= 6 queries (their slice in L1) meets the tile's rows R at a time: an
//            R x Q register block of 16-lane float32 accumulators, the rows converted in
//            registers (vcvtph2ps) and the queries loaded from L1, while the next block's rows
//            are prefetched (each row of 2048 float16 is its own 4 KiB page, where hardware
//            prefetchers stop). Only the tile's scores [nq, tile] are written, to a buffer the
//            top-k pass then reads from L1;
//   top-k:   per query, a candidate buffer of capacity 2k: a score enters only when it beats the
//            k-th best kept so far (a threshold), and a full buffer is cut back to its k best
//            (nth_element). After the first ~k ln(N/k) rows almost nothing enters.
//
// Order: the result is the first k rows in the order (score descending, row ascending), so among
// exactly tied scores the lower rows are kept, whatever the threads and tiles. NaN (which finite
// inputs do not produce) ranks above everything, as in torch.topk.
//
// Numerics: float32 products and float32 accumulation in 16 (AVX-512) or 8 (AVX2) lanes, each
// lane summing its columns in order (the lanes are carried, not reduced, from one slice of KC
// columns to the next), then one horizontal sum: the scores equal the "upcast" reference
// (float16 rows converted to float32, then a float32 GEMM) up to float32 reassociation, and a
// row's score is the same bits whatever the threads, tiles, slices or the other queries of the
// batch. Conversion of float16 to float32 is exact.
//
// ISA: AVX-512 (F, BW, VL, with F16C), AVX2 + FMA + F16C, and a portable scalar baseline, picked at
// run time with __builtin_cpu_supports (the hot loops are compiled with target attributes), so the
// wheel needs no -march, as kernels/cpu/gem.cpp. Only the tile's scoring runs under them; the
// top-k bookkeeping is plain code.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__)
#define SF_INLINE inline __attribute__((always_inline))
#else
#define SF_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define SF_X86 1
#define SF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SF_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#else
#define SF_X86 0
#endif

namespace py = pybind11;

namespace {

constexpr int kMaxGroup = 6;              // queries per register block (AVX-512: 4 rows x 6 queries = 24 zmm)
constexpr int64_t kTileBytes = 192 << 10;  // rows per tile: this many bytes of rows (stays in L2)
constexpr int64_t kSliceCols = 512;       // columns per slice when there are several query groups
constexpr int kPrefetchBlocks = 1;         // AVX-512: prefetch the rows this many register blocks ahead

// ---------------------------------------------------------------------------- the work
struct Segment {
  const void* data;  // [rows, d], C-contiguous, float16 (uint16_t bits) or float32
  int64_t rows;
  int64_t first;  // global number of its row 0
};

struct Plan {
  std::vector<Segment> segs;
  int64_t n = 0, d = 0;
  bool half = true;
  const float* q = nullptr;  // [nq, d], C-contiguous
  int64_t nq = 0, k = 0;
  int64_t tile = 0;  // rows per tile
  int64_t kc = 0;    // columns per slice
  std::vector<std::pair<int, int>> groups;  // (first query, count <= kMaxGroup)
};

// Scores of rows x[0..m) (row stride plan.d) for every query: S[j * plan.tile + i]. V: room for
// the accumulators carried between column slices ([nq, tile, 16] floats) when there are several.
using TileFn = void (*)(const Plan&, const void* x, int64_t m, float* S, float* V);

// ---------------------------------------------------------------------------- baseline
SF_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0) {
    const float f = static_cast<float>(m) * 5.9604644775390625e-8f;  // subnormal: m * 2^-24, exact
    return sign ? -f : f;
  }
  if (e == 31)
    bits = sign | 0x7f800000u | (m << 13);
  else
    bits = sign | ((e + 112) << 23) | (m << 13);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <class T>
SF_INLINE float scalar_load(const T* p) {
  if constexpr (std::is_same_v<T, uint16_t>)
    return half_to_float(*p);
  else
    return *p;
}

template <class T>
void tile_baseline(const Plan& p, const void* xv, int64_t m, float* S, float*) {
  const T* x = static_cast<const T*>(xv);
  constexpr int L = 8;  // independent partial sums per dot product
  for (int64_t i = 0; i < m; ++i) {
    const T* xr = x + i * p.d;
    for (int64_t j = 0; j < p.nq; ++j) {
      const float* qr = p.q + j * p.d;
      float acc[L] = {0.0f};
      int64_t c = 0;
      for (; c + L <= p.d; c += L)
        for (int l = 0; l < L; ++l) acc[l] += scalar_load(xr + c + l) * qr[c + l];
      for (int l = 0; c < p.d; ++c, ++l) acc[l] += scalar_load(xr + c) * qr[c];
      float s = 0.0f;
      for (int l = 0; l < L; ++l) s += acc[l];
      S[j * p.tile + i] = s;
    }
  }
}

#if SF_X86
// One register block's operands within a tile: R rows x Q queries over one slice of columns.
struct Block {
  const void* x;     // row 0 of the block, at the slice's first column (rows D apart)
  const float* q;    // query 0 of the group, at the slice's first column (queries D apart)
  int64_t d;         // row stride of x and q
  int64_t kc;        // columns in the slice
  float* s;          // scores: s[j * lds + i] for row i, query j (written at the last slice)
  float* v;          // accumulators carried between slices: v[(j * lds + i) * lanes + lane]
  int64_t lds;       // rows in the tile
  bool first, last;  // the row's first / last slice
};

SF_INLINE Block shifted(const Block& b, int64_t rows, size_t item, int lanes) {
  Block o = b;
  o.x = static_cast<const char*>(b.x) + rows * b.d * static_cast<int64_t>(item);
  o.s = b.s + rows;
  o.v = b.v ? b.v + rows * lanes : nullptr;
  return o;
}

// ---------------------------------------------------------------------------- AVX-512
template <class T>
SF_TARGET_AVX512 SF_INLINE __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, uint16_t>)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  else
    return _mm512_loadu_ps(p);
}

template <class T>
SF_TARGET_AVX512 SF_INLINE __m512 load16_tail(const T* p, __mmask16 mk) {
  // Masked loads do not touch the masked-off lanes: safe at the end of a mapped file.
  if constexpr (std::is_same_v<T, uint16_t>)
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, p));
  else
    return _mm512_maskz_loadu_ps(mk, p);
}

SF_TARGET_AVX512 SF_INLINE float hsum16(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_extractf32x8_ps(v, 0), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}

// Each lane sums its columns in order across all slices (accumulators carried in b.v between
// slices), then one horizontal sum (header: Numerics). Prefetch: the rows kPrefetchBlocks blocks
// ahead are requested while these are multiplied; measured on the 2-core EPYC, 1M x 2048 float16
// rows, 20 queries: 253 ms with it, 328 ms without.
template <int R, int Q, class T, bool Prefetch>
SF_TARGET_AVX512 SF_INLINE void block512(const Block& b) {
  const T* x = static_cast<const T*>(b.x);
  const uintptr_t ahead = static_cast<uintptr_t>(kPrefetchBlocks * R * b.d) * sizeof(T);
  __m512 acc[R][Q];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < Q; ++j)
      acc[i][j] = b.first ? _mm512_setzero_ps() : _mm512_loadu_ps(b.v + (j * b.lds + i) * 16);
  int64_t c = 0;
  for (; c + 16 <= b.kc; c += 16) {
    __m512 qv[Q];
#pragma GCC unroll 8
    for (int j = 0; j < Q; ++j) qv[j] = _mm512_loadu_ps(b.q + j * b.d + c);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      if constexpr (Prefetch)
        if ((c * sizeof(T)) % 64 == 0)
          _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(x + i * b.d + c) + ahead),
                       _MM_HINT_T0);  // may point past the rows: a prefetch never faults
      const __m512 xv = load16(x + i * b.d + c);
#pragma GCC unroll 8
      for (int j = 0; j < Q; ++j) acc[i][j] = _mm512_fmadd_ps(xv, qv[j], acc[i][j]);
    }
  }
  if (c < b.kc) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (b.kc - c)) - 1u);
    __m512 qv[Q];
#pragma GCC unroll 8
    for (int j = 0; j < Q; ++j) qv[j] = _mm512_maskz_loadu_ps(mk, b.q + j * b.d + c);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 xv = load16_tail(x + i * b.d + c, mk);
#pragma GCC unroll 8
      for (int j = 0; j < Q; ++j) acc[i][j] = _mm512_fmadd_ps(xv, qv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < Q; ++j) {
      if (b.last)
        b.s[j * b.lds + i] = hsum16(acc[i][j]);
      else
        _mm512_storeu_ps(b.v + (j * b.lds + i) * 16, acc[i][j]);
    }
}

// Rows per register block for Q queries: R * Q accumulators + Q query vectors + 1 row <= 32 zmm.
template <int Q>
constexpr int rows512() { return Q <= 3 ? 8 : 4; }

template <int Q, class T>
SF_TARGET_AVX512 SF_INLINE void rows_avx512(const Block& b, int64_t m, bool prefetch) {
  constexpr int R = rows512<Q>();
  int64_t i = 0;
  if (kPrefetchBlocks > 0 && prefetch)
    for (; i + R <= m; i += R) block512<R, Q, T, true>(shifted(b, i, sizeof(T), 16));
  for (; i + R <= m; i += R) block512<R, Q, T, false>(shifted(b, i, sizeof(T), 16));
  for (; i < m; ++i) block512<1, Q, T, false>(shifted(b, i, sizeof(T), 16));
}

template <class T>
SF_TARGET_AVX512 void tile_avx512(const Plan& p, const void* xv, int64_t m, float* S, float* V) {
  for (int64_t c0 = 0; c0 < p.d; c0 += p.kc) {
    const int64_t kc = std::min(p.kc, p.d - c0);
    bool prefetch = true;  // the first group of a slice brings the tile's rows in; the rest find them in L2
    for (const auto& [q0, nqg] : p.groups) {
      const Block b{static_cast<const T*>(xv) + c0, p.q + q0 * p.d + c0, p.d, kc, S + q0 * p.tile,
                    V ? V + q0 * p.tile * 16 : nullptr, p.tile, c0 == 0, c0 + kc >= p.d};
      switch (nqg) {
        case 1: rows_avx512<1, T>(b, m, prefetch); break;
        case 2: rows_avx512<2, T>(b, m, prefetch); break;
        case 3: rows_avx512<3, T>(b, m, prefetch); break;
        case 4: rows_avx512<4, T>(b, m, prefetch); break;
        case 5: rows_avx512<5, T>(b, m, prefetch); break;
        default: rows_avx512<6, T>(b, m, prefetch); break;
      }
      prefetch = false;
    }
  }
}

// ---------------------------------------------------------------------------- AVX2 + F16C
template <class T>
SF_TARGET_AVX2 SF_INLINE __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, uint16_t>)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  else
    return _mm256_loadu_ps(p);
}

template <class T>
SF_TARGET_AVX2 SF_INLINE float load1(const T* p) {
  if constexpr (std::is_same_v<T, uint16_t>)
    return _cvtsh_ss(*p);
  else
    return *p;
}

SF_TARGET_AVX2 SF_INLINE float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// As block512 with 8 lanes; the last D mod 8 columns are summed in scalar after the lanes.
template <int R, int Q, class T>
SF_TARGET_AVX2 SF_INLINE void block256(const Block& b) {
  const T* x = static_cast<const T*>(b.x);
  __m256 acc[R][Q];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < Q; ++j)
      acc[i][j] = b.first ? _mm256_setzero_ps() : _mm256_loadu_ps(b.v + (j * b.lds + i) * 8);
  int64_t c = 0;
  for (; c + 8 <= b.kc; c += 8) {
    __m256 qv[Q];
#pragma GCC unroll 8
    for (int j = 0; j < Q; ++j) qv[j] = _mm256_loadu_ps(b.q + j * b.d + c);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 xv = load8(x + i * b.d + c);
#pragma GCC unroll 8
      for (int j = 0; j < Q; ++j) acc[i][j] = _mm256_fmadd_ps(xv, qv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < Q; ++j) {
      if (!b.last) {
        _mm256_storeu_ps(b.v + (j * b.lds + i) * 8, acc[i][j]);
        continue;
      }
      float v = hsum8(acc[i][j]);
      for (int64_t t = c; t < b.kc; ++t) v += load1(x + i * b.d + t) * b.q[j * b.d + t];
      b.s[j * b.lds + i] = v;
    }
}

// 16 ymm: R * Q accumulators + Q query vectors + 1 row.
template <int Q>
constexpr int rows256() { return Q == 1 ? 8 : Q == 2 ? 4 : 3; }

template <int Q, class T>
SF_TARGET_AVX2 SF_INLINE void rows_avx2(const Block& b, int64_t m) {
  constexpr int R = rows256<Q>();
  int64_t i = 0;
  for (; i + R <= m; i += R) block256<R, Q, T>(shifted(b, i, sizeof(T), 8));
  for (; i < m; ++i) block256<1, Q, T>(shifted(b, i, sizeof(T), 8));
}

template <class T>
SF_TARGET_AVX2 void tile_avx2(const Plan& p, const void* xv, int64_t m, float* S, float* V) {
  for (int64_t c0 = 0; c0 < p.d; c0 += p.kc) {
    const int64_t kc = std::min(p.kc, p.d - c0);
    for (const auto& [q0, nqg] : p.groups) {
      // Up to 3 queries per register block (16 registers): a group of 4..6 runs as two.
      for (int j = 0; j < nqg;) {
        const int take = std::min(3, nqg - j), qj = q0 + j;
        const Block b{static_cast<const T*>(xv) + c0, p.q + qj * p.d + c0, p.d, kc, S + qj * p.tile,
                      V ? V + qj * p.tile * 8 : nullptr, p.tile, c0 == 0, c0 + kc >= p.d};
        if (take == 1)
          rows_avx2<1, T>(b, m);
        else if (take == 2)
          rows_avx2<2, T>(b, m);
        else
          rows_avx2<3, T>(b, m);
        j += take;
      }
    }
  }
}
#endif  // SF_X86

// ---------------------------------------------------------------------------- top-k
struct Cand {
  float s;
  int64_t row;
};

// NaN ranks as the largest score (torch.topk's order); a strict weak order either way.
SF_INLINE float rank_key(float s) { return s != s ? std::numeric_limits<float>::infinity() : s; }

SF_INLINE bool before(const Cand& a, const Cand& b) {
  const float ka = rank_key(a.s), kb = rank_key(b.s);
  return ka > kb || (ka == kb && a.row < b.row);
}

// One query's running top-k over rows offered in increasing row order.
class TopK {
 public:
  void reset(int64_t k) {
    k_ = k;
    n_ = 0;
    bounded_ = false;
    thr_ = 0.0f;
    buf_.resize(static_cast<size_t>(std::max<int64_t>(2 * k, k + 64)));
  }

  // Scores s[0..m) of rows first..first+m-1.
  SF_INLINE void offer(const float* s, int64_t m, int64_t first) {
    int64_t i = 0;
    while (!bounded_ && i < m) push(s[i], first + i), ++i;
    // A row that does not beat the k-th kept score is not in the top k: the k kept ones all come
    // before it (higher score, or equal score and a lower row). NaN compares false: it enters.
    const float thr = thr_;
    for (; i < m; ++i)
      if (!(s[i] <= thr)) {
        push(s[i], first + i);
      }
  }

  // Cut to the k best; the kept candidates stay in buf()[0..size()).
  void shrink() {
    if (n_ > k_) {
      std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.begin() + n_, before);
      n_ = k_;
    }
    if (n_ == k_) {
      float worst = rank_key(buf_[0].s);
      for (int64_t i = 1; i < n_; ++i) worst = std::min(worst, rank_key(buf_[i].s));
      thr_ = worst;
      bounded_ = true;
    }
  }

  const Cand* data() const { return buf_.data(); }
  int64_t size() const { return n_; }

 private:
  SF_INLINE void push(float s, int64_t row) {
    buf_[n_++] = Cand{s, row};
    if (n_ == static_cast<int64_t>(buf_.size())) shrink();
  }

  std::vector<Cand> buf_;
  int64_t k_ = 0, n_ = 0;
  bool bounded_ = false;
  float thr_ = 0.0f;
};

// A thread's buffers: a tile's scores [nq, tile] and, when rows are sliced, its carried
// accumulators [nq, tile, 16].
struct Scratch {
  std::vector<float> s, v;
};

// One thread's share: rows [begin, end) of the global numbering. tops: p.nq lists, reset; the
// scratch is sized by the caller, outside the threads, so nothing here throws.
void scan_range(const Plan& p, TileFn tile_fn, int64_t begin, int64_t end, std::vector<TopK>& tops,
                Scratch& scratch) {
  float* S = scratch.s.data();
  float* V = scratch.v.empty() ? nullptr : scratch.v.data();
  for (const Segment& sg : p.segs) {
    const int64_t lo = std::max(begin, sg.first), hi = std::min(end, sg.first + sg.rows);
    const size_t item = p.half ? 2 : 4;
    for (int64_t r = lo; r < hi; r += p.tile) {
      const int64_t m = std::min(p.tile, hi - r);
      const char* x = static_cast<const char*>(sg.data) + static_cast<size_t>(r - sg.first) * p.d * item;
      tile_fn(p, x, m, S, V);
      for (int64_t j = 0; j < p.nq; ++j) tops[j].offer(S + j * p.tile, m, r);
    }
  }
  for (auto& t : tops) t.shrink();
}

// ---------------------------------------------------------------------------- dispatch
std::vector<std::string> supported_isas() {
  std::vector<std::string> isas;
#if SF_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("fma"))
    isas.push_back("avx512");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    isas.push_back("avx2");
#endif
  isas.push_back("baseline");
  return isas;
}

TileFn pick(const std::string& isa, bool half) {
  const auto ok = supported_isas();
  const std::string want = isa == "auto" ? ok.front() : isa;
  if (std::find(ok.begin(), ok.end(), want) == ok.end())
    throw py::value_error("topk_inner_product: isa '" + isa + "' is not available on this CPU (have: " +
                          py::str(py::cast(ok)).cast<std::string>() + ")");
#if SF_X86
  if (want == "avx512") return half ? tile_avx512<uint16_t> : tile_avx512<float>;
  if (want == "avx2") return half ? tile_avx2<uint16_t> : tile_avx2<float>;
#endif
  return half ? tile_baseline<uint16_t> : tile_baseline<float>;
}

// ---------------------------------------------------------------------------- binding
std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t k = 0; k < a.ndim(); ++k) s += (k ? ", " : "") + std::to_string(a.shape(k));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

[[noreturn]] void fail(const std::string& what) { throw py::value_error("topk_inner_product: " + what); }

void check_2d_contiguous(const py::array& a, const std::string& name, const char* dims) {
  if (a.ndim() != 2) fail(name + " must be 2-D " + dims + ", got shape " + shape_str(a));
  if (!(a.flags() & py::array::c_style))
    fail(name + " must be C-contiguous (shape " + shape_str(a) + "); pass a contiguous copy");
}

py::tuple topk_inner_product(const py::list& segments, const py::array& queries, int64_t k, int threads,
                             const std::string& isa, int64_t tile_rows) {
  // Keep a reference to every array for the duration of the call (the GIL is released below).
  std::vector<py::array> arrays;
  Plan p;
  if (segments.empty()) fail("segments is empty: pass at least one [n, D] array of rows");
  char kind = 0;
  int itemsize = 0;
  for (size_t i = 0; i < segments.size(); ++i) {
    const std::string name = "segments[" + std::to_string(i) + "]";
    if (!py::isinstance<py::array>(segments[i]))
      throw py::type_error("topk_inner_product: " + name + " must be a numpy array, got " +
                           py::str(py::type::of(segments[i])).cast<std::string>());
    py::array a = py::reinterpret_borrow<py::array>(segments[i]);
    check_2d_contiguous(a, name, "[n, D]");
    const char kd = a.dtype().kind();
    const int sz = static_cast<int>(a.dtype().itemsize());
    if (kd != 'f' || (sz != 2 && sz != 4)) fail(name + " must be float16 or float32, got " + dtype_str(a));
    if (i == 0) {
      kind = kd;
      itemsize = sz;
      p.d = a.shape(1);
    } else if (sz != itemsize) {
      fail(name + " is " + dtype_str(a) + " but segments[0] is " +
           py::str(py::reinterpret_borrow<py::array>(segments[0]).dtype()).cast<std::string>() +
           ": every segment must have one dtype");
    }
    if (a.shape(1) != p.d)
      fail(name + " has " + std::to_string(a.shape(1)) + " columns but segments[0] has " + std::to_string(p.d));
    p.segs.push_back(Segment{a.data(), a.shape(0), p.n});
    p.n += a.shape(0);
    arrays.push_back(std::move(a));
  }
  (void)kind;
  p.half = itemsize == 2;
  check_2d_contiguous(queries, "queries", "[nq, D]");
  if (!queries.dtype().is(py::dtype::of<float>())) fail("queries must be float32, got " + dtype_str(queries));
  if (queries.shape(1) != p.d)
    fail("queries have dimension " + std::to_string(queries.shape(1)) + " but the rows (segments) have " +
         std::to_string(p.d));
  if (p.d < 1) fail("the rows have no columns (D = 0)");
  p.nq = queries.shape(0);
  p.q = static_cast<const float*>(queries.data());
  if (k < 1 || k > p.n)
    fail("k = " + std::to_string(k) + " must be between 1 and the number of rows (" + std::to_string(p.n) + ")");
  p.k = k;
  if (threads < 1) fail("threads must be >= 1, got " + std::to_string(threads));
  if (tile_rows < 0) fail("tile_rows must be >= 0 (0: automatic), got " + std::to_string(tile_rows));
  TileFn tile_fn = pick(isa, p.half);

  py::array_t<float> out_s({p.nq, k});
  py::array_t<int64_t> out_r({p.nq, k});
  if (p.nq == 0) return py::make_tuple(out_s, out_r);

  const int64_t row_bytes = p.d * itemsize;
  p.tile = tile_rows > 0 ? tile_rows : std::clamp<int64_t>(kTileBytes / row_bytes / 8 * 8, 8, 512);
  const int ngroups = static_cast<int>((p.nq + kMaxGroup - 1) / kMaxGroup);
  for (int g = 0, q0 = 0; g < ngroups; ++g) {  // balanced groups: 20 queries -> 5, 5, 5, 5
    const int cnt = static_cast<int>((p.nq * (g + 1)) / ngroups - (p.nq * g) / ngroups);
    p.groups.emplace_back(q0, cnt);
    q0 += cnt;
  }
  // One query group: whole rows at a time (one sequential stream per row). Several: slices of the
  // columns, so a group's query slices stay in L1 while the tile's rows come from L2.
  p.kc = ngroups == 1 ? p.d : std::min<int64_t>(kSliceCols, p.d);

  const int64_t tiles = (p.n + p.tile - 1) / p.tile;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
  std::vector<std::vector<TopK>> tops(nt, std::vector<TopK>(p.nq));
  std::vector<Scratch> scratch(nt);
  for (auto& sc : scratch) {
    sc.s.resize(static_cast<size_t>(p.nq * p.tile));
    if (p.kc < p.d) sc.v.resize(static_cast<size_t>(p.nq * p.tile * 16));
  }
  for (auto& per : tops)
    for (auto& t : per) t.reset(p.k);
  {
    py::gil_scoped_release release;
    auto run = [&](int t, int count) {
      const int64_t b = p.n * t / count, e = p.n * (t + 1) / count;
      scan_range(p, tile_fn, b, e, tops[t], scratch[t]);
    };
    if (nt == 1) {
      run(0, 1);
    } else {
#ifdef _OPENMP
      int used = nt;
#pragma omp parallel num_threads(nt)
      {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
#pragma omp single
        used = count;
        run(t, count);
      }
      tops.resize(used);
#else
      std::vector<std::thread> pool;
      for (int t = 1; t < nt; ++t) pool.emplace_back(run, t, nt);
      run(0, nt);
      for (auto& th : pool) th.join();
#endif
    }
    // Merge the threads' lists: each holds its range's first min(k, rows) in the order.
    float* os = out_s.mutable_data();
    int64_t* orow = out_r.mutable_data();
    std::vector<Cand> all;
    for (int64_t j = 0; j < p.nq; ++j) {
      all.clear();
      for (const auto& tt : tops) all.insert(all.end(), tt[j].data(), tt[j].data() + tt[j].size());
      std::partial_sort(all.begin(), all.begin() + k, all.end(), before);
      for (int64_t i = 0; i < k; ++i) {
        os[j * k + i] = all[i].s;
        orow[j * k + i] = all[i].row;
      }
    }
  }
  return py::make_tuple(out_s, out_r);
}

}  // namespace

PYBIND11_MODULE(_search_cpu, m) {
  m.doc() = "Exact first-stage top-k over float16/float32 rows on the CPU (sgengine.kernels.search_cpu wraps it)";
  m.def("topk_inner_product", &topk_inner_product, py::arg("segments"), py::arg("queries"), py::arg("k"),
        py::arg("threads") = 1, py::arg("isa") = "auto", py::arg("tile_rows") = 0,
        "Top-k of queries [nq, D] (float32) . rows over the segments (a list of [n_i, D] float16 or float32\n"
        "arrays, one dtype, numbered one after the other): (scores float32 [nq, k] descending, rows int64 [nq, k]).\n"
        "Ties: lower rows first. Arrays are C-contiguous and of exactly these dtypes (no conversion); anything\n"
        "else, k outside 1..N, threads < 1 or an isa this CPU lacks is a ValueError naming the argument.\n"
        "tile_rows: rows per tile (0: about 192 KiB of rows). Releases the GIL while it runs.");
  m.def("isas", &supported_isas, "Instruction sets this CPU runs, best first ('auto' picks the first).");
#ifdef _OPENMP
  m.attr("threading") = "openmp";
#else
  m.attr("threading") = "std::thread";
#endif
}
