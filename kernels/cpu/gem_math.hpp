// Pointwise math of the fused pooling head (kernels/cpu/gem.cpp): vectorizable log2/exp2 and the
// per-position term. Header-only and free of Python so a C++ check can include it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define SG_INLINE inline __attribute__((always_inline))
#else
#define SG_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SG_X86_DISPATCH 1
#define SG_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SG_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#else
#define SG_X86_DISPATCH 0
#endif

namespace sgengine_gem {

constexpr int kSize = 5;                     // R-GeM window (SPEC 3.3)
constexpr float kTiny = 1e-30f;              // box-sum floor before log2 (see gem_term)
constexpr float kTwoEps = 2e-8f;             // GeM+ clamp on 2R (the 0.5 of the mix is moved out)
constexpr float kInvRgemP = 0.4f;            // 1 / 2.5
constexpr float kLog2MeanScale = -1.8575424759098897f;  // 0.4 * log2(1/25): (box/25)^0.4
constexpr float kGemP = 4.6f;
constexpr double kInvGemP = 1.0 / 4.6;
constexpr int kLanes = 16;                   // channels per channels-last block; sum lanes per plane

SG_INLINE float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
SG_INLINE uint32_t as_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// log2 of a positive normal float (or +inf, which gives 128: only reached when F^2.5 overflowed,
// and then R^4.6 overflows too). a = 2^k m with m in [2/3, 4/3), found with integer ops only
// (no select, so the vectorizer does not evaluate two tails); then ln m = 2 atanh(t),
// t = (m-1)/(m+1) in [-0.2, 0.143], as t * g(t^2) with g a degree-3 fit (relative error
// 2.4e-9; fitted near-minimax on [0, 0.04] by Lawson-reweighted least squares).
SG_INLINE float fast_log2(float a) {
  const uint32_t b = as_bits(a);
  const int32_t k = static_cast<int32_t>(b - 0x3f2aaaabu) >> 23;  // arithmetic shift: floor
  const float m = as_float(b - (static_cast<uint32_t>(k) << 23));
  const float t = (m - 1.0f) / (m + 1.0f);  // m - 1 is exact (Sterbenz)
  const float t2 = t * t;
  const float g = 2.8853900749e+00f +
                  t2 * (9.6180220084e-01f + t2 * (5.7639523822e-01f + t2 * 4.3908309666e-01f));
  return static_cast<float>(k) + t * g;
}

// 2^y for y in [-150, 130] (clamped): n = round(y) by the 1.5*2^23 trick (exact in
// round-to-nearest, no libm), 2^f for |f| <= 1/2 by a degree-6 fit (relative error 1.9e-9),
// and 2^n applied as two normal factors so results reach inf (and the subnormals) correctly.
SG_INLINE float fast_exp2(float y) {
  y = y < -150.0f ? -150.0f : y;
  y = y > 130.0f ? 130.0f : y;
  const float n = (y + 12582912.0f) - 12582912.0f;
  const float f = y - n;
  const float p = 1.0f + f * (6.9314720574e-01f +
                  f * (2.4022646890e-01f +
                  f * (5.5503287774e-02f +
                  f * (9.6184890229e-03f +
                  f * (1.3399931076e-03f +
                  f * 1.5345794297e-04f)))));
  const int ni = static_cast<int>(n);
  const int n1 = ni >> 1;
  const int n2 = ni - n1;
  const float s1 = as_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = as_float(static_cast<uint32_t>(n2 + 127) << 23);
  return p * s1 * s2;
}

SG_INLINE float pow25(float v) { return v * v * std::sqrt(v); }

// y[k] = (2R)^4.6 from the window sum y[k] and the centre value x[k], in place over n positions:
// P = (box / 25)^0.4, 2R = P + F, clamped at 2e-8.
// The box floor only bites where the whole window is ~0 (box < 1e-30 means every F < 1e-12),
// where 2R < 2e-8 and the GeM+ clamp decides the value anyway.
// Four loops instead of one: a single loop chains log2 -> exp2 -> log2 -> exp2 (~150 cycles of
// latency per vector) and measured 1.75x slower than these short independent chains over a
// plane that stays in L1 (2.27 vs 1.31 ms for 2048 planes of 32x24, AVX-512, EPYC).
SG_INLINE void gem_terms(float* __restrict y, const float* __restrict x, int n) {
  for (int k = 0; k < n; ++k) {
    const float b = y[k] > kTiny ? y[k] : kTiny;
    y[k] = fast_log2(b) * kInvRgemP + kLog2MeanScale;
  }
  for (int k = 0; k < n; ++k) {
    const float r = fast_exp2(y[k]) + x[k];
    y[k] = r > kTwoEps ? r : kTwoEps;
  }
  for (int k = 0; k < n; ++k) y[k] = fast_log2(y[k]) * kGemP;
  for (int k = 0; k < n; ++k) y[k] = fast_exp2(y[k]);
}

}  // namespace sgengine_gem
