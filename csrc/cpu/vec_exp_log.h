// exp2 / log2 of SIMD vectors for the CPU kernels: inline for float with AVX2, at::vec's
// otherwise (Sleef for double with AVX2, libm per lane in the portable build).
//
// at::vec's float exp2 / log2 with AVX2 are out-of-line Sleef calls, and a call (with every live
// vector spilled around it) costs more than the function itself in the kernels' element loops.
// These are Cephes' exp2f / log2f, within 2 ulp (tests/cpp/test_cpu_math.cpp), with IEEE
// results for the special arguments the kernels meet: exp2(-inf) = 0, exp2(+large) = inf,
// subnormal results, NaN -> NaN; log2 of zero, subnormal, negative, inf and NaN lanes goes to
// Sleef.
//
// Included under namespace dsnt_cuda::cpu::DSNT_CPU_NS by csrc/cpu/vec_arith.h.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <limits>

#ifndef DSNT_CPU_NS
#error "define DSNT_CPU_NS (the namespace of this instruction-set build) before including vec_exp_log.h"
#endif

namespace dsnt_cuda::cpu::DSNT_CPU_NS {

template <typename T>
using Vec = at::vec::Vectorized<T>;

#if defined(CPU_CAPABILITY_AVX2)

inline Vec<float> vec_exp2(const Vec<float>& v) {
  // Clamp to [-150, 128] (max / min return their second operand for NaN: NaN stays NaN).
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(128.0f), _mm256_max_ps(_mm256_set1_ps(-150.0f), v));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);  // [-1/2, 1/2]
  // 2^f = 1 + f P(f) (Cephes exp2f), P in Estrin's scheme: 4 dependent FMAs instead of 7 (the
  // element loops are bound by these chains' latency)
  const __m256 f2 = _mm256_mul_ps(f, f);
  const __m256 p01 =
      _mm256_fmadd_ps(_mm256_set1_ps(1.535336188319500e-4f), f, _mm256_set1_ps(1.339887440266574e-3f));
  const __m256 p23 =
      _mm256_fmadd_ps(_mm256_set1_ps(9.618437357674640e-3f), f, _mm256_set1_ps(5.550332471162809e-2f));
  const __m256 p45 =
      _mm256_fmadd_ps(_mm256_set1_ps(2.402264791363012e-1f), f, _mm256_set1_ps(6.931472028550421e-1f));
  const __m256 p25 = _mm256_fmadd_ps(p23, f2, p45);
  const __m256 p05 = _mm256_fmadd_ps(p01, _mm256_mul_ps(f2, f2), p25);
  const __m256 p = _mm256_fmadd_ps(p05, f, _mm256_set1_ps(1.0f));
  // 2^n as 2^h 2^(n-h), h = n/2: both factors are normal for n in [-150, 128], so results down
  // to the subnormals round once and 2^128 overflows to inf.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
  const __m256 s2 =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

inline Vec<float> vec_log2(const Vec<float>& v) {
  const __m256 x = v;
  // x = m 2^e, m in [sqrt(1/2), sqrt(2)) (x positive, normal, finite; other lanes below)
  const __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_or_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x007fffff))),
                          _mm256_set1_ps(1.0f));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237309505f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));        // all-ones lanes: e + 1
  const __m256 t = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));  // exact (Sterbenz)
  const __m256 z = _mm256_mul_ps(t, t);
  // log(1 + t) = t - t^2/2 + t^3 P(t) (Cephes logf), P in Estrin's scheme
  const __m256 p01 = _mm256_fmadd_ps(_mm256_set1_ps(7.0376836292e-2f), t, _mm256_set1_ps(-1.1514610310e-1f));
  const __m256 p23 = _mm256_fmadd_ps(_mm256_set1_ps(1.1676998740e-1f), t, _mm256_set1_ps(-1.2420140846e-1f));
  const __m256 p45 = _mm256_fmadd_ps(_mm256_set1_ps(1.4249322787e-1f), t, _mm256_set1_ps(-1.6668057665e-1f));
  const __m256 p67 = _mm256_fmadd_ps(_mm256_set1_ps(2.0000714765e-1f), t, _mm256_set1_ps(-2.4999993993e-1f));
  const __m256 p03 = _mm256_fmadd_ps(p01, z, p23);
  const __m256 p47 = _mm256_fmadd_ps(p45, z, p67);
  const __m256 p07 = _mm256_fmadd_ps(p03, _mm256_mul_ps(z, z), p47);
  __m256 y = _mm256_fmadd_ps(p07, t, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, t), z);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  // (t + y) log2(e) + e, with log2(e) = 1 + 0.44269504... so that t and y enter unrounded
  const __m256 log2e_m1 = _mm256_set1_ps(0.44269504088896340736f);
  __m256 r = _mm256_mul_ps(y, log2e_m1);
  r = _mm256_fmadd_ps(t, log2e_m1, r);
  r = _mm256_add_ps(r, y);
  r = _mm256_add_ps(r, t);
  r = _mm256_add_ps(r, _mm256_cvtepi32_ps(e));
  // Zero, subnormal, negative, NaN (unordered compare) or +inf lanes: Sleef.
  const __m256 special =
      _mm256_or_ps(_mm256_cmp_ps(x, _mm256_set1_ps(std::numeric_limits<float>::min()), _CMP_NGE_UQ),
                   _mm256_cmp_ps(x, _mm256_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ));
  if (_mm256_movemask_ps(special) == 0) return r;
  return _mm256_blendv_ps(r, v.log2(), special);
}

#else

inline Vec<float> vec_exp2(const Vec<float>& x) { return x.exp2(); }
inline Vec<float> vec_log2(const Vec<float>& x) { return x.log2(); }

#endif

inline Vec<double> vec_exp2(const Vec<double>& x) { return x.exp2(); }
inline Vec<double> vec_log2(const Vec<double>& x) { return x.log2(); }

}  // namespace dsnt_cuda::cpu::DSNT_CPU_NS
