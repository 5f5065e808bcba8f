// Pointwise math of the fused pooling head (kernels/cpu/gem.cpp): vectorizable log2/exp2, the
// head's constants as the kernel uses them, and the per-position term. Header-only and free of
// Python so a C++ check can include it.
#pragma once

#include <cfloat>
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

constexpr int kWindow = 5;    // the R-GeM window the kernel implements (ReflectionPad 2, 5 taps)
constexpr int kLanes = 16;    // channels per channels-last block; sum lanes per plane

// SPEC 3.3-3.4's constants (received from sgengine.head, never written here) in the form the
// kernel uses them. With m = rgem_mix and R' = R / (1 - m):
//   R' = F + 2^(log2(box) / p + log2_scale),  log2_scale = log2(m / (1 - m)) - 2 log2(size) / p
// (box: the window sum of F^p, so box / size^2 is the mean), clamped at eps' = eps / (1 - m), and
//   g = (1 - m) (mean R'^q)^(1/q).
// Moving the (1 - m) out of the per-position work costs nothing and changes no comparison.
struct Head {
  float rgem_p, inv_rgem_p, log2_scale, eps_scaled, gemp_p;
  double inv_gemp_p, out_scale;
  // Mix and eps as given, for the scalar path that follows the reference step by step.
  float rgem_mix, gemp_eps;
  // The box-sum floor before log2: fast_log2 needs a positive normal float. For p = 2.5 the floor
  // only bites where every F of the window is below 1e-12, where R < eps and the GeM+ clamp
  // decides the value anyway. Other p: FLT_MIN, and an exactly zero window gives P = 0.
  float box_floor;
  bool pow25;  // rgem_p == 2.5: F^p as F*F*sqrt(F)
};

inline Head make_head(double rgem_p, double rgem_mix, double gemp_p, double gemp_eps) {
  Head h;
  h.rgem_p = static_cast<float>(rgem_p);
  h.inv_rgem_p = static_cast<float>(1.0 / rgem_p);
  h.log2_scale = static_cast<float>(std::log2(rgem_mix / (1.0 - rgem_mix)) -
                                    2.0 * std::log2(static_cast<double>(kWindow)) / rgem_p);
  h.eps_scaled = static_cast<float>(gemp_eps / (1.0 - rgem_mix));
  h.gemp_p = static_cast<float>(gemp_p);
  h.inv_gemp_p = 1.0 / gemp_p;
  h.out_scale = 1.0 - rgem_mix;
  h.rgem_mix = static_cast<float>(rgem_mix);
  h.gemp_eps = static_cast<float>(gemp_eps);
  h.pow25 = rgem_p == 2.5;
  h.box_floor = h.pow25 ? 1e-30f : FLT_MIN;
  return h;
}

SG_INLINE float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
SG_INLINE uint32_t as_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// log2 of a positive normal float (or +inf, which gives 128: only reached when F^p overflowed,
// and then R^q overflows too). a = 2^k m with m in [2/3, 4/3), found with integer ops only
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

// F^p for 0 <= F <= FLT_MAX. p = 2.5 (SPEC) is F*F*sqrt(F): exact to rounding, and ~3x cheaper
// than the log2/exp2 pair. Other p: 0 stays 0; a subnormal F is raised to FLT_MIN, which moves
// the window's power mean by at most ~FLT_MIN.
template <bool Pow25>
SG_INLINE float rgem_pow(float v, float p) {
  if (Pow25) return v * v * std::sqrt(v);
  const float r = fast_exp2(p * fast_log2(v > FLT_MIN ? v : FLT_MIN));
  return v > 0.0f ? r : 0.0f;
}

// y[k] = R'^q from the window sum y[k] and the centre value x[k], in place over n positions:
// R' = F + 2^(log2(box) / p + log2_scale), clamped at eps'.
// Four loops instead of one: a single loop chains log2 -> exp2 -> log2 -> exp2 (~150 cycles of
// latency per vector) and measured 1.75x slower than these short independent chains over a
// plane that stays in L1 (2.27 vs 1.31 ms for 2048 planes of 32x24, AVX-512, EPYC).
template <bool Pow25>
SG_INLINE void gem_terms(float* __restrict y, const float* __restrict x, int n, const Head& hd) {
  const float floor_ = hd.box_floor, inv_p = hd.inv_rgem_p, scale = hd.log2_scale;
  const float eps = hd.eps_scaled, q = hd.gemp_p;
  for (int k = 0; k < n; ++k) {
    const float b = y[k] > floor_ ? y[k] : floor_;
    const float t = fast_log2(b) * inv_p + scale;
    // Other p: a window of exact zeros has P = 0 (2^-1000 saturates to 0), not FLT_MIN^(1/p).
    y[k] = Pow25 || y[k] > 0.0f ? t : -1000.0f;
  }
  for (int k = 0; k < n; ++k) {
    const float r = fast_exp2(y[k]) + x[k];
    y[k] = r > eps ? r : eps;
  }
  for (int k = 0; k < n; ++k) y[k] = fast_log2(y[k]) * q;
  for (int k = 0; k < n; ++k) y[k] = fast_exp2(y[k]);
}

}  // namespace sgengine_gem
