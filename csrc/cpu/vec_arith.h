// SIMD vectors as a value type of csrc/dsnt_math.h: Arith<at::vec::Vectorized<T>>, so the
// per-element math of every backend runs on 8 floats / 4 doubles at a time (AVX2) or on
// at::vec's portable arrays. Also the few vector primitives the CPU kernels add: partial loads,
// horizontal sums, row sums.
//
// Included by one translation unit per instruction set (csrc/cpu/kernels.h) after it has chosen
// the at::vec capability and defined DSNT_CPU_NS. Everything here is either in that namespace
// or a specialization on the capability's own Vectorized type, so the builds' symbols differ.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/vec_exp_log.h"
#include "dsnt_math.h"

#if defined(__GNUC__)
#define DSNT_ALWAYS_INLINE __attribute__((always_inline)) inline
#define DSNT_INLINE_LAMBDA __attribute__((always_inline))
#else
#define DSNT_ALWAYS_INLINE inline
#define DSNT_INLINE_LAMBDA
#endif

namespace dsnt_cuda {

// Masks are vectors whose lanes are all ones (true) or all zeros (false), as at::vec's compares
// return them.
template <typename V>
struct VecArith {
  using Scalar = typename V::value_type;
  using Mask = V;
  // float: log2_mid by its ratio form (a vector log2 costs ~30 instructions); double keeps the
  // logarithm (the ratio form's polynomial is fitted to float precision)
  static constexpr bool kLog2MidByRatio = std::is_same_v<Scalar, float>;
  static V splat(Scalar x) { return V(x); }
  static V select(const V& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static bool any(const V& m) { return m.zero_mask() != (1 << V::size()) - 1; }
  static bool all(const V& m) { return m.zero_mask() == 0; }
  static V abs(const V& x) { return x.abs(); }
  // x < lo ? lo : x (at::vec's clamp_min keeps a NaN x)
  static V floor_at(const V& x, const V& lo) { return at::vec::clamp_min(x, lo); }
  static V max(const V& a, const V& b) { return at::vec::clamp_min(a, b); }
  static V min(const V& a, const V& b) { return at::vec::clamp_max(a, b); }
  static V exp2(const V& x) { return cpu::DSNT_CPU_NS::vec_exp2(x); }
  static V log2(const V& x) { return cpu::DSNT_CPU_NS::vec_log2(x); }
};

template <>
struct Arith<at::vec::Vectorized<float>> : VecArith<at::vec::Vectorized<float>> {};
template <>
struct Arith<at::vec::Vectorized<double>> : VecArith<at::vec::Vectorized<double>> {};

}  // namespace dsnt_cuda

namespace dsnt_cuda::cpu::DSNT_CPU_NS {

template <typename T>
constexpr int64_t kLanes = Vec<T>::size();

// `count` (1..lanes) values from p; the other lanes hold `fill`.
template <typename T>
DSNT_ALWAYS_INLINE Vec<T> load_part(const T* p, int64_t count, T fill) {
  if (count == kLanes<T>) return Vec<T>::loadu(p);
  return Vec<T>::set(Vec<T>(fill), Vec<T>::loadu(p, count), count);
}

// Lanes >= count set to `fill` (Vec::set is out of line: not called for whole vectors).
template <typename T>
DSNT_ALWAYS_INLINE Vec<T> fill_tail(const Vec<T>& v, int64_t count, T fill) {
  if (count == kLanes<T>) return v;
  return Vec<T>::set(Vec<T>(fill), v, count);
}

// Lanes >= count set to 0.
template <typename T>
DSNT_ALWAYS_INLINE Vec<T> zero_tail(const Vec<T>& v, int64_t count) {
  return fill_tail(v, count, T(0));
}

// Calls step(x, count) over a row of `width` values: whole vectors, then one partial vector.
// `step` is inlined in both places, where count is a constant for the whole vectors.
template <typename T, typename Step>
DSNT_ALWAYS_INLINE void for_each_vector(int64_t width, Step&& step) {
  int64_t x = 0;
  for (; x + kLanes<T> <= width; x += kLanes<T>) step(x, kLanes<T>);
  if (x < width) step(x, width - x);
}

template <typename T>
inline T hsum(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

// The largest lane, NaN if any lane is NaN.
template <typename T>
inline T hmax(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, v);
}

// sums[r] = the sum of the lanes of vector r, for `rows` vectors stored one after the other
// (lanes values each). With AVX2, eight (float) or four (double) rows per transposing reduction
// instead of one horizontal sum per row: the kernels' rows are often only two vectors long.
template <typename T>
inline void row_sums(const T* vecs, int64_t rows, T* sums) {
  int64_t r = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    for (; r + 8 <= rows; r += 8) {
      const float* v = vecs + r * 8;
      const __m256 a = _mm256_hadd_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8));
      const __m256 b = _mm256_hadd_ps(_mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24));
      const __m256 c = _mm256_hadd_ps(_mm256_loadu_ps(v + 32), _mm256_loadu_ps(v + 40));
      const __m256 d = _mm256_hadd_ps(_mm256_loadu_ps(v + 48), _mm256_loadu_ps(v + 56));
      const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
      _mm256_storeu_ps(sums + r, _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20),
                                               _mm256_permute2f128_ps(ab, cd, 0x31)));
    }
  } else {
    for (; r + 4 <= rows; r += 4) {
      const double* v = vecs + r * 4;
      const __m256d a = _mm256_hadd_pd(_mm256_loadu_pd(v), _mm256_loadu_pd(v + 4));
      const __m256d b = _mm256_hadd_pd(_mm256_loadu_pd(v + 8), _mm256_loadu_pd(v + 12));
      _mm256_storeu_pd(sums + r,
                       _mm256_add_pd(_mm256_permute2f128_pd(a, b, 0x20), _mm256_permute2f128_pd(a, b, 0x31)));
    }
  }
#endif
  for (; r < rows; ++r) sums[r] = hsum(Vec<T>::loadu(vecs + r * kLanes<T>));
}

// Largest of n values, NaN if any is NaN (a NaN logit must poison its map, not be skipped).
template <typename T>
inline T max_of(const T* v, int64_t n) {
  constexpr T kLow = -std::numeric_limits<T>::infinity();
  Vec<T> m0(kLow), m1(kLow), nan(T(0));
  int64_t i = 0;
  // NaN-blind max in two chains; NaN found by its own unordered compare
  for (; i + 2 * kLanes<T> <= n; i += 2 * kLanes<T>) {
    const Vec<T> a = Vec<T>::loadu(v + i), b = Vec<T>::loadu(v + i + kLanes<T>);
    m0 = at::vec::clamp_min(a, m0);
    m1 = at::vec::clamp_min(b, m1);
    nan = nan | (a != a) | (b != b);
  }
  for (; i < n; i += kLanes<T>) {
    const Vec<T> a = load_part(v + i, std::min(kLanes<T>, n - i), kLow);
    m0 = at::vec::clamp_min(a, m0);
    nan = nan | (a != a);
  }
  if (nan.zero_mask() != (1 << kLanes<T>)-1) return std::numeric_limits<T>::quiet_NaN();
  return hmax(at::vec::maximum(m0, m1));
}

}  // namespace dsnt_cuda::cpu::DSNT_CPU_NS
