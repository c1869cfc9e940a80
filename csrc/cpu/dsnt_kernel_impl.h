// The CPU kernels of dsnt_fwd / dsnt_bwd, one map at a time (csrc/OPS.md, shared/DESIGN.md §1-2).
//
// Included by exactly one translation unit per instruction set, after it has chosen the
// at::vec capability (CPU_CAPABILITY / CPU_CAPABILITY_AVX2) and defined DSNT_CPU_NS, the
// namespace that keeps each build's symbols apart. Vec<T> is at::vec::Vectorized<T>: 8 floats or
// 4 doubles with AVX2 (Sleef's 1-ulp log, at::vec's inline exp), a plain array otherwise.
//
// Passes over one map (it stays in L1/L2 between them; only the first reads memory):
//   forward:  [softmax: max] -> e = exp / rectify, x-marginal and row sums -> [js/kl: divergence]
//   backward: [js/kl: p, dDiv/dp, sum p dDiv/dp, target-gradient marginals] -> dLoss/dz
// For float JS only a box around the target takes the per-element divergence (FarField below):
// the forward's far field costs nothing beyond the exp pass, the backward's one exp pass that
// also writes dLoss/dz (softmax).
// Nothing of map size is kept between forward and backward: stats = [shift, denom] per map.
//
// Layout: a map of N = len0 * len1 * len2 values is len1 * len2 contiguous rows of len0 (x)
// values. Every per-element loop walks rows with full vectors plus one masked partial vector, so
// the same code handles 1-pixel axes and odd widths. The separable structure does the rest:
// - forward sums the (unnormalized) map into its x-marginal (a vector add per row) and its
//   row sums (then the y / z marginals); coordinates and variances come from the marginals in
//   O(sum S_k), the variance two-pass about the mean (never E[u^2] - E[u]^2);
// - the Gaussian target is q_i = gx(x) * row_factor(y, z): O(sum S_k) per map, never a map;
// - backward's dLoss/dp_i is a per-axis function of the index except for the divergence term,
//   so the coordinate and variance parts cost one add per element.
// Accumulation type T: double for float64 logits, float otherwise (half is widened on load).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/dsnt_cpu.h"

#ifndef DSNT_CPU_NS
#error "define DSNT_CPU_NS before including dsnt_kernel_impl.h"
#endif

// The per-row loops are lambdas called once or more per row; g++ calls them out of line with a
// stack frame each, which costs as much as the work on rows of one or two vectors.
#if defined(__GNUC__)
#define DSNT_INLINE_LAMBDA __attribute__((always_inline))
#else
#define DSNT_INLINE_LAMBDA
#endif

namespace dsnt_cuda::cpu::DSNT_CPU_NS {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// ----------------------------------------------------------------------------------------------
// Vector helpers
// ----------------------------------------------------------------------------------------------

// `count` (1..size) values from p; the other lanes hold `fill` (the neutral element of whatever
// the caller reduces), so partial vectors need no scalar tail code.
template <typename T>
inline Vec<T> load_part(const T* p, int64_t count, T fill) {
  if (count == Vec<T>::size()) return Vec<T>::loadu(p);
  return Vec<T>::set(Vec<T>(fill), Vec<T>::loadu(p, count), count);
}

template <typename T>
inline Vec<T> zero_tail(const Vec<T>& v, int64_t count) {
  if (count == Vec<T>::size()) return v;
  return Vec<T>::set(Vec<T>(T(0)), v, count);
}

template <typename T>
inline T hsum(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  T s = 0;
  for (int i = 0; i < Vec<T>::size(); ++i) s += lanes[i];
  return s;
}

// The largest (kMax) or smallest lane; NaN if any lane is NaN (a NaN logit must poison its map,
// not be skipped).
template <bool kMax, typename T>
inline T hextreme(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int i = 0; i < Vec<T>::size(); ++i) {
    if (std::isnan(lanes[i])) return lanes[i];
    m = kMax ? std::max(m, lanes[i]) : std::min(m, lanes[i]);
  }
  return m;
}

template <typename T>
inline T hmax(const Vec<T>& v) {
  return hextreme<true>(v);
}

template <typename T>
inline T hmin(const Vec<T>& v) {
  return hextreme<false>(v);
}

// Whether every lane is >= bound (a NaN lane is not), without leaving the vector registers.
template <typename T>
inline bool all_at_least(const Vec<T>& v, T bound) {
  return (v >= Vec<T>(bound)).zero_mask() == 0;
}

// log(x) of the divergence's eps-shifted arguments, inline: at::vec's log is an out-of-line Sleef
// call, and the call (with every live vector spilled around it) cost more than the logarithm.
// float, AVX2: Cephes' logf (frexp, then a degree-9 polynomial about 1), within 2 ulp
// (tests/cpp/test_cpu_math.cpp); lanes that are not positive normal finite numbers, and double,
// go to Sleef.
template <typename T>
inline Vec<T> log_eps_arg(const Vec<T>& x) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 v = x;
    // frexp: x = m 2^e with m in [0.5, 1) (x is normal: >= 1e-24)
    const __m256i bits = _mm256_castps_si256(v);
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126));
    __m256 m = _mm256_or_ps(_mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x807fffff))),
                            _mm256_set1_ps(0.5f));
    // m < sqrt(1/2): use 2m - 1 and e - 1, so the polynomial's argument stays in [-0.29, 0.41]
    const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_epi32(e, _mm256_and_si256(_mm256_castps_si256(small), _mm256_set1_epi32(1)));
    const __m256 t = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(m, small)), _mm256_set1_ps(1.0f));
    const __m256 fe = _mm256_cvtepi32_ps(e);
    const __m256 z = _mm256_mul_ps(t, t);
    __m256 y = _mm256_set1_ps(7.0376836292e-2f);
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.1514610310e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(1.1676998740e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.2420140846e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(1.4249322787e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.6668057665e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(2.0000714765e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-2.4999993993e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(3.3333331174e-1f));
    y = _mm256_mul_ps(_mm256_mul_ps(y, t), z);
    y = _mm256_fmadd_ps(fe, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
    __m256 r = _mm256_add_ps(t, y);
    r = _mm256_fmadd_ps(fe, _mm256_set1_ps(0.693359375f), r);
    // Zero, subnormal, negative, NaN or +inf lanes (never from x + eps with x >= 0): Sleef.
    const __m256 special =
        _mm256_or_ps(_mm256_cmp_ps(v, _mm256_set1_ps(std::numeric_limits<float>::min()), _CMP_NGE_UQ),
                     _mm256_cmp_ps(v, _mm256_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ));
    if (_mm256_movemask_ps(special) == 0) return r;
    return _mm256_blendv_ps(r, x.log(), special);
  }
#endif
  return x.log();
}

// ----------------------------------------------------------------------------------------------
// Per-element maps z -> unnormalized probability e (p = e * inv_denom)
// ----------------------------------------------------------------------------------------------

template <typename T>
struct SoftmaxExp {  // e = exp(beta (z - shift)), shift = max z: every e <= 1, the largest is 1
  T beta, shift;
  // beta (z - shift), not beta z - shift: the compiler may fuse the latter into an fma in one
  // pass and not in another, and for a large beta z its rounding left the largest term far from
  // 1 (logits of 1e30 with beta 1.3 overflowed to inf, then NaN).
  // at::vec's inline polynomial exp (~20 ulp in float, i.e. 1e-6 relative on p, well inside what
  // float accumulation of a map gives; std exp for double). It maps NaN to a number, so callers
  // run it only on maps with a finite shift (a NaN or +inf logit, or an all -inf map, gives a
  // non-finite shift and is handled as a NaN map before any exp).
  Vec<T> operator()(const Vec<T>& z) const {
    return ((z - Vec<T>(shift)) * Vec<T>(beta)).exp_u20();
  }
};

template <typename T>
struct Rectify {  // abs / relu / sigmoid of dsnt_math.h's rectify(), vectorized
  Normalization mode;
  Vec<T> operator()(const Vec<T>& z) const {
    switch (mode) {
      case Normalization::Abs:
        return z.abs();
      case Normalization::Relu:
        return at::vec::maximum(z, Vec<T>(T(0)));  // keeps NaN
      default:  // sigmoid: 1/(1+exp(-z)) is 0 at z = -inf (exp overflows to inf) and 1 at +inf
        return Vec<T>(T(1)) / (Vec<T>(T(1)) + z.neg().exp());
    }
  }
  // r'(z) with autograd's conventions at the kinks (dsnt_math.h's rectify_grad).
  Vec<T> grad(const Vec<T>& z) const {
    switch (mode) {
      case Normalization::Abs:
        return z.gt(Vec<T>(T(0))) - z.lt(Vec<T>(T(0)));
      case Normalization::Relu:
        return z.gt(Vec<T>(T(0)));
      default: {
        const Vec<T> s = (*this)(z);
        return s * (Vec<T>(T(1)) - s);
      }
    }
  }
};

template <typename T>
struct Identity {
  Vec<T> operator()(const Vec<T>& z) const { return z; }
};

// ----------------------------------------------------------------------------------------------
// Divergence terms: vectorized dsnt_math.h kl_term / js_term (same formulas, eps = 1e-24 added
// in the accumulation type, where it is a normal number: p = q = 0 gives 0 * (log eps - log eps)
// = 0, never 0 * log 0).
//
// Logarithms dominate the cost, so in float the kernels avoid most of them without changing a
// result beyond float rounding. fl(x + eps) == x once x >= kBandHi (eps is below half an ulp of
// x), and fl(x + eps) == eps once x <= kBandLo; only x in between needs log(x + eps) itself.
// Outside that band
//   log(p + eps) = max(beta (z - shift) - log(denom), log eps)   (softmax: p = exp(..) / denom)
//   log(q + eps) = max(log gx + log gy + log gz - log(prod G + eps), log eps)
// where log g_k = -(v - mu)^2 / (2 s^2) is known without a log. A vector takes the real log only
// if one of its lanes lies in the band. JS's third log, log(m + eps) with m = (p + q)/2, is
// log(max(p, q)) - ln 2 up to float rounding wherever min(p, q) <= 2^-25 max(p, q), and log eps
// where m is below the band: only where p and q overlap (near the target) is it computed. So a
// float JS costs a few logs per map instead of three per element.
// float64 always takes the real logs (its band is far wider, and it is the gradcheck dtype).
// ----------------------------------------------------------------------------------------------

// Built only with all three members given: g++ compiles implicitly defined members (here the
// default constructor) without the file's `#pragma GCC target`, so they could not inline
// Vec's constructor and each vector of a divergence pass paid three out-of-line calls.
template <typename T>
struct DivVec {
  Vec<T> value, d_p, d_q;
};

template <typename T>
struct LogBand {
  // Below half an ulp: eps < x * 2^-25 for float. kBandLo: x + eps rounds to eps.
  static constexpr T kBandHi = T(1e-24) * T(33554432.0);      // 2^25 eps ~ 3.4e-17
  static constexpr T kBandLo = T(1e-24) / T(33554432.0);      // eps / 2^25
};

// log(x + eps) from a cheap candidate `fast_log` (= log x whenever x >= kBandHi).
template <typename T>
inline Vec<T> log_eps_from(const Vec<T>& x, const Vec<T>& fast_log) {
  const Vec<T> log_eps(std::log(div_eps<T>()));
  // clamp_min(x, c) = max(c, x) keeps a NaN x like maximum() (c is never NaN), in one op.
  Vec<T> result = at::vec::clamp_min(fast_log, log_eps);
  const Vec<T> band = (x < Vec<T>(LogBand<T>::kBandHi)) & (x > Vec<T>(LogBand<T>::kBandLo));
  if (band.zero_mask() != (1 << Vec<T>::size()) - 1) {
    result = Vec<T>::blendv(result, log_eps_arg(x + Vec<T>(div_eps<T>())), band);
  }
  return result;
}

// log(m + eps) for m = (p + q)/2, given lp, lq (see above); exact logs unless fast.
template <typename T>
inline Vec<T> log_mid(const Vec<T>& p, const Vec<T>& q, const Vec<T>& m, const Vec<T>& lp,
                      const Vec<T>& lq, bool fast) {
  const Vec<T> eps(div_eps<T>());
  if (!fast) return log_eps_arg(m + eps);
  const Vec<T> lo = at::vec::minimum(p, q), hi = at::vec::maximum(p, q);
  const Vec<T> log_eps(std::log(div_eps<T>()));
  Vec<T> result =
      at::vec::clamp_min(at::vec::maximum(lp, lq) - Vec<T>(T(0.69314718055994530942)), log_eps);
  const Vec<T> exact = (lo > hi * Vec<T>(T(1.0 / 33554432.0))) |
                       ((m < Vec<T>(LogBand<T>::kBandHi)) & (m > Vec<T>(LogBand<T>::kBandLo)));
  if (exact.zero_mask() != (1 << Vec<T>::size()) - 1) {
    result = Vec<T>::blendv(result, log_eps_arg(m + eps), exact);
  }
  return result;
}

// x / (x + eps): exactly 1 above the band, x / eps below it (fast), else the division.
template <typename T>
inline Vec<T> eps_ratio(const Vec<T>& x, bool fast) {
  const Vec<T> eps(div_eps<T>());
  if (!fast) return x / (x + eps);
  Vec<T> result = Vec<T>::blendv(x * Vec<T>(T(1) / div_eps<T>()), Vec<T>(T(1)),
                                 x >= Vec<T>(LogBand<T>::kBandHi));  // NaN stays NaN
  const Vec<T> band = (x < Vec<T>(LogBand<T>::kBandHi)) & (x > Vec<T>(LogBand<T>::kBandLo));
  if (band.zero_mask() != (1 << Vec<T>::size()) - 1) {
    result = Vec<T>::blendv(result, x / (x + eps), band);
  }
  return result;
}

// Divergence summand and its partials from p, q and their logs lp = log(p + eps),
// lq = log(q + eps). d_q is only formed when asked (the target gradient).
template <typename T>
inline DivVec<T> divergence(const Vec<T>& p, const Vec<T>& q, const Vec<T>& lp, const Vec<T>& lq,
                            Regularizer reg, bool grads, bool want_dq, bool fast_lm) {
  const Vec<T> eps(div_eps<T>());
  const Vec<T> half(T(0.5));
  DivVec<T> r{Vec<T>(T(0)), Vec<T>(T(0)), Vec<T>(T(0))};
  if (reg == Regularizer::KL) {
    const Vec<T> lr = lp - lq;
    r.value = p * lr;
    if (grads) r.d_p = lr + eps_ratio(p, fast_lm);
    if (want_dq) r.d_q = (p / (q + eps)).neg();
    return r;
  }
  const Vec<T> m = half * (p + q);
  const Vec<T> lm = log_mid(p, q, m, lp, lq, fast_lm);
  r.value = half * (p * (lp - lm) + q * (lq - lm));
  if (grads) {
    const Vec<T> m_ratio = eps_ratio(m, fast_lm);
    r.d_p = half * (lp - lm + eps_ratio(p, fast_lm) - m_ratio);
    if (want_dq) r.d_q = half * (lq - lm + eps_ratio(q, fast_lm) - m_ratio);
  }
  return r;
}

// What a divergence pass needs to know to form p, lp and lq per element.
template <typename T>
struct DivPass {
  Regularizer reg;
  bool fast_lp;  // float softmax: lp from the logits (see above)
  bool fast_lq;  // float: lq from the separable log-Gaussian
  T beta, shift, log_denom;
};

template <typename T>
inline void divergence_logs(const DivPass<T>& c, const Vec<T>& z, const Vec<T>& p,
                            const Vec<T>& q, const Vec<T>& lq_fast, Vec<T>& lp, Vec<T>& lq) {
  if (c.fast_lp) {
    lp = log_eps_from(p, (z - Vec<T>(c.shift)) * Vec<T>(c.beta) - Vec<T>(c.log_denom));
  } else {
    lp = log_eps_arg(p + Vec<T>(div_eps<T>()));
  }
  lq = c.fast_lq ? log_eps_from(q, lq_fast) : log_eps_arg(q + Vec<T>(div_eps<T>()));
}

// ----------------------------------------------------------------------------------------------
// Per-call constants and per-thread scratch
// ----------------------------------------------------------------------------------------------

template <typename T>
struct Axes {
  int dims;
  int64_t len[kMaxSpatialDims];
  std::vector<T> grid[kMaxSpatialDims];  // v(j): coordinate grid of the op (normalized or pixels)
  std::vector<T> cent[kMaxSpatialDims];  // u(j) = j - (S-1)/2: centred pixels, for the variance
  std::vector<T> ngrid[kMaxSpatialDims]; // normalized grid, where the target Gaussian lives

  explicit Axes(const KernelArgs& a) : dims(a.dims) {
    for (int k = 0; k < kMaxSpatialDims; ++k) {
      len[k] = a.len[k];
      grid[k].resize(len[k]);
      cent[k].resize(len[k]);
      for (int64_t j = 0; j < len[k]; ++j) {
        grid[k][j] = grid_value<T>(j, len[k], a.normalized);
        ngrid[k].push_back(grid_value<T>(j, len[k], true));
        cent[k][j] = T(j) - T(len[k] - 1) / T(2);
      }
    }
  }
  int64_t rows() const { return len[1] * len[2]; }
  int64_t size() const { return len[0] * len[1] * len[2]; }
};

template <typename T>
struct Scratch {
  std::vector<T> z;      // logits widened to T (half / bf16 only)
  std::vector<T> e;      // unnormalized probabilities (forward) / p (backward)
  std::vector<T> d;      // backward: d(divergence)/dp per element
  std::vector<T> g_out;  // backward: dLoss/dz in T before narrowing (half / bf16 only)
  std::vector<T> marg[kMaxSpatialDims];  // marginals of e (forward) or of w (target gradient)
  std::vector<T> rows;                   // per-row sums
  std::vector<T> gauss[kMaxSpatialDims]; // per-axis Gaussian factors g_k(j) of the target
  std::vector<T> log_gauss[kMaxSpatialDims];  // their logs, -(v - mu)^2 / (2 s^2)
  std::vector<T> axis_g[kMaxSpatialDims];  // backward: per-axis part of dLoss/dp
  std::vector<T> row_q;                  // per-row factor of the target q
  std::vector<T> row_lq;                 // per-row term of log q
  std::vector<T> row_g;                  // backward: per-row part of dLoss/dp
  std::vector<int64_t> d_lo, d_hi;       // backward: per row, the x range where d holds d_p
  std::vector<int64_t> nx0, nx1;         // float JS: per row of the near box, its near columns
  bool uniform_fallback = false;         // forward: this map fell back to p = 1/N

  explicit Scratch(const Axes<T>& ax) {
    const int64_t n = ax.size(), r = ax.rows();
    e.resize(n);
    d.resize(n);
    rows.resize(r);
    row_q.resize(r);
    row_lq.resize(r);
    row_g.resize(r);
    d_lo.resize(r);
    d_hi.resize(r);
    nx0.resize(r);
    nx1.resize(r);
    for (int k = 0; k < kMaxSpatialDims; ++k) {
      marg[k].resize(ax.len[k]);
      gauss[k].resize(ax.len[k]);
      log_gauss[k].resize(ax.len[k]);
      axis_g[k].resize(ax.len[k]);
    }
  }
};

// Widen a map to T when the logits are half / bf16 (one cache-resident copy); else alias it.
template <typename scalar_t, typename T>
inline const T* widen(const scalar_t* src, int64_t n, Scratch<T>& s) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return src;
  } else {
    if (static_cast<int64_t>(s.z.size()) < n) s.z.resize(n);
    for (int64_t i = 0; i < n; ++i) s.z[i] = static_cast<T>(src[i]);
    return s.z.data();
  }
}

// e = op(z) over the map, stored, and summed into the x-marginal and the row sums.
template <typename T, typename Op>
inline void transform_and_sum(const T* z, const Axes<T>& ax, Scratch<T>& s, const Op& op) {
  constexpr int64_t kV = Vec<T>::size();
  const int64_t W = ax.len[0], R = ax.rows();
  T* mx = s.marg[0].data();
  std::fill(mx, mx + W, T(0));
  for (int64_t r = 0; r < R; ++r) {
    const T* zr = z + r * W;
    T* er = s.e.data() + r * W;
    Vec<T> acc(T(0));
    for (int64_t x = 0; x < W; x += kV) {
      const int64_t cnt = std::min(kV, W - x);
      const Vec<T> ev = zero_tail(op(load_part(zr + x, cnt, T(0))), cnt);
      ev.store(er + x, cnt);
      (load_part(mx + x, cnt, T(0)) + ev).store(mx + x, cnt);
      acc = acc + ev;
    }
    s.rows[r] = hsum(acc);
  }
}

// y / z marginals from the row sums (row r = z_index * len1 + y_index).
template <typename T>
inline void row_marginals(const Axes<T>& ax, Scratch<T>& s) {
  const int64_t H = ax.len[1], D = ax.len[2];
  std::fill(s.marg[1].begin(), s.marg[1].end(), T(0));
  for (int64_t dz = 0; dz < D; ++dz) {
    T mz = 0;  // same order as summing into marg[2][dz] directly
    for (int64_t y = 0; y < H; ++y) {
      const T v = s.rows[dz * H + y];
      s.marg[1][y] += v;
      mz += v;
    }
    s.marg[2][dz] = mz;
  }
}

// Below this, std::exp returns exactly 0 (float: e^-103.97 is half the smallest subnormal).
template <typename T>
constexpr T exp_zero_below() {
  return std::is_same_v<T, float> ? T(-110) : T(-760);
}

// The target's normalizer: q_i = g'x g'y g'z * norm, log q_i = lgx + lgy + lgz + log_norm.
template <typename T>
struct TargetNorm {
  T norm;      // exp(sum off_k) / (prod G_k + eps), G_k the true (unscaled) sums
  T log_norm;  // -log(prod G_k + eps)
};

// Per-axis Gaussian factors of the target around mu (view order), stored scaled by exp(-off_k)
// with off_k the largest exponent on axis k, so the largest stored factor is 1; their sums G'_k
// (absent axes: g = 1, G' = 1) and the normalizer. Unscaled, a target a few pixels outside the
// map made every factor tiny and the far ones subnormal, with few bits left: float32 KL,
// log(q + eps) with q >> eps, was off by up to 0.5. log_gauss keeps the unscaled exponents.
template <typename T>
inline TargetNorm<T> gaussian_factors(const Axes<T>& ax, const T* mu, T sigma_t, Scratch<T>& s,
                                      T* G) {
  T prod = 1, so = 0;
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    T off = 0;
    if (k < ax.dims) {
      off = -std::numeric_limits<T>::infinity();
      const T sk = T(2) * sigma_t / T(ax.len[k]);
      for (int64_t j = 0; j < ax.len[k]; ++j) {
        // gauss_factor()'s expression, keeping the exponent: log g is then free (see above).
        const T d = ax.ngrid[k][j] - mu[k];
        const T lg = -d * d / (T(2) * sk * sk);
        s.log_gauss[k][j] = lg;
        off = std::isnan(lg) || lg > off ? lg : off;
      }
      if (off == -std::numeric_limits<T>::infinity()) off = 0;  // every factor is 0 (mu = inf)
    }
    T sum = 0;
    for (int64_t j = 0; j < ax.len[k]; ++j) {
      T g = 1;
      if (k < ax.dims) {
        const T e = s.log_gauss[k][j] - off;
        // exp is exactly 0 below exp_zero_below(): skip the call (libm's underflow path is slow).
        g = e < exp_zero_below<T>() ? T(0) : std::exp(e);
      } else {
        s.log_gauss[k][j] = 0;
      }
      s.gauss[k][j] = g;
      sum += g;
    }
    G[k] = sum;
    prod *= sum;
    so += off;
  }
  // log(prod G + eps) with prod G = prod exp(so), without overflow or underflow.
  const T L = std::log(prod) + so, le = std::log(div_eps<T>());
  const T hi = std::max(L, le);
  const T log_den = std::isnan(L) ? L : hi + std::log(std::exp(L - hi) + std::exp(le - hi));
  return {std::exp(so - log_den), -log_den};
}

// Row factors of q_i = g'x(x) * g'y(y) * g'z(z) * norm (the eps of DESIGN.md §1.4 in the
// normalizer keeps a target far outside the map from dividing by zero), and of log q_i.
template <typename T>
inline void target_row_factors(const Axes<T>& ax, const TargetNorm<T>& tn, Scratch<T>& s) {
  const int64_t H = ax.len[1], D = ax.len[2];
  for (int64_t dz = 0; dz < D; ++dz) {
    for (int64_t y = 0; y < H; ++y) {
      s.row_q[dz * H + y] = s.gauss[1][y] * s.gauss[2][dz] * tn.norm;
      s.row_lq[dz * H + y] = s.log_gauss[1][y] + s.log_gauss[2][dz] + tn.log_norm;
    }
  }
}

template <typename T>
inline DivPass<T> make_div_pass(const KernelArgs& a, bool uniform, T shift, T denom) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  DivPass<T> c;
  c.reg = a.reg;
  c.fast_lp = kFloat && a.norm == Normalization::Softmax && !uniform;
  c.fast_lq = kFloat;
  c.beta = static_cast<T>(a.beta);
  c.shift = shift;
  c.log_denom = std::log(denom);
  return c;
}

// ----------------------------------------------------------------------------------------------
// The far field of a float JS map
//
// Away from the target q is negligible next to p, and the JS summand and its partials become
//   p (lp - lm)/2 + q (lq - lm)/2 = p ln2 / 2,   d_p = (lp - lm + p/(p+eps) - m/(m+eps))/2 = ln2/2,
//   w = d_q q ~ 0,
// up to float rounding: with q <= p / kFarRatio, lm = log((p + q)/2 + eps) = lp - ln2 + O(q/p),
// |lq - lm| <= |log eps| + |lm| < 60, so the q term is below 2^-26 of the p term, and with
// p >= kFarMinP both p and m are above the band (p/(p+eps) = m/(m+eps) = 1). Such an element
// needs no divergence at all: the forward sums p over it, the backward adds a constant to G.
// The bound on q is separable: lq_fast = log gx(x) + row lq(r) < kFarLogQ outside a box of
// rows x columns, and within each of its rows outside a range of columns (together about a disc
// of radius 9 pixels around the target for sigma_t = 1 pixel, rounded out to whole vectors);
// only that takes the per-element divergence. Outside the box a row is checked (min p against its bound on q, NaN
// fails) and goes through the per-element path if the check fails; for softmax the smallest
// logit of the map usually clears the whole far field at once.
// ----------------------------------------------------------------------------------------------

template <typename T>
struct NearBox {
  int64_t x0 = 0, x1 = 0;  // columns [x0, x1), x0 a multiple of the vector size
  int64_t r0 = 0, r1 = 0;  // rows [r0, r1)
  T max_x = 0;             // max_x log gx(x)
};

template <typename T>
struct FarField {
  static constexpr T kFarLogQ = T(-40);     // q < 4.3e-18 outside the box
  static constexpr T kFarMinP = T(1e-15);   // p, m above kBandHi ~ 3.4e-17
  static constexpr T kFarRatio = T(8e9);    // 60 * 2^27
  static constexpr T kHalfLn2 = T(0.34657359027997265471);
  // Smallest p the far part of a row may hold, given a bound on its lq_fast.
  static T min_p(T log_q_bound) {
    if (log_q_bound < T(-60)) return kFarMinP;  // kFarRatio e^-60 < kFarMinP
    return std::max(kFarMinP, kFarRatio * std::exp(std::min(log_q_bound, kFarLogQ)));
  }
};

// Bits of the lanes of v[begin, end) (begin a multiple of kV) that satisfy v + add >= cut, one
// vector at a time: the first and last such index, or first = -1 when there is none.
template <typename T>
inline void passing_range(const T* v, int64_t begin, int64_t end, T add, T cut, int64_t& first,
                          int64_t& last) {
  constexpr int64_t kV = Vec<T>::size();
  constexpr int kAll = (1 << kV) - 1;
  const Vec<T> vadd(add), vcut(cut);
  first = last = -1;
  for (int64_t x = begin; x < end; x += kV) {
    const int64_t cnt = std::min(kV, end - x);
    // -inf fill: lanes past the end never pass
    const Vec<T> pass = (load_part(v + x, cnt, -std::numeric_limits<T>::infinity()) + vadd) >= vcut;
    const int bits = ~pass.zero_mask() & kAll;
    if (bits == 0) continue;
    if (first < 0) first = x + __builtin_ctz(bits);
    last = x + (31 - __builtin_clz(bits));
  }
}

// Largest value of v[0, n); NaN if any is NaN.
template <typename T>
inline T max_of(const T* v, int64_t n) {
  constexpr int64_t kV = Vec<T>::size();
  Vec<T> mx(-std::numeric_limits<T>::infinity());
  for (int64_t i = 0; i < n; i += kV)
    mx = at::vec::maximum(mx, load_part(v + i, std::min(kV, n - i), -std::numeric_limits<T>::infinity()));
  return hmax(mx);
}

// The box outside of which every lq_fast < kFarLogQ (NaN logs make the whole map near), and
// for each of its rows r the columns [nx0[r], nx1[r]) (vector-aligned) outside of which
// lq_fast < kFarLogQ too (the box is a square around a disc). Vector compares throughout: on
// 3-D maps of 16-pixel rows this ran once per row of two vectors and cost as much as they did.
template <typename T>
inline NearBox<T> near_box(const Axes<T>& ax, Scratch<T>& s) {
  constexpr int64_t kV = Vec<T>::size();
  const int64_t W = ax.len[0], R = ax.rows();
  const T* lgx = s.log_gauss[0].data();
  const T* lqr = s.row_lq.data();
  const T max_x = max_of(lgx, W), max_r = max_of(lqr, R);
  NearBox<T> b;
  b.max_x = max_x;
  if (std::isnan(max_x) || std::isnan(max_r)) {
    b.x1 = W;
    b.r1 = R;
    std::fill(s.nx0.begin(), s.nx0.begin() + R, int64_t{0});
    std::fill(s.nx1.begin(), s.nx1.begin() + R, W);
    return b;
  }
  const T cut = FarField<T>::kFarLogQ;
  int64_t xf, xl, rf, rl;
  passing_range(lgx, 0, W, max_r, cut, xf, xl);
  passing_range(lqr, 0, R, max_x, cut, rf, rl);
  if (xf < 0 || rf < 0) return b;  // empty
  b.x0 = xf / kV * kV;
  b.x1 = std::min(W, (xl / kV + 1) * kV);
  b.r0 = rf;
  b.r1 = rl + 1;
  for (int64_t r = b.r0; r < b.r1; ++r) {
    // A column passing in row r passes with max_r too, so it lies in [x0, x1).
    int64_t lo, hi;
    passing_range(lgx, b.x0, b.x1, lqr[r], cut, lo, hi);
    if (lo < 0) {
      s.nx0[r] = s.nx1[r] = b.x0;
    } else {
      s.nx0[r] = lo / kV * kV;
      s.nx1[r] = std::min(W, (hi / kV + 1) * kV);
    }
  }
  return b;
}

// Smallest p the far part of row r may hold (rows of the box: their far columns have
// lq_fast < kFarLogQ; other rows: lq_fast <= row lq + max log gx).
template <typename T>
inline T far_min_p(const NearBox<T>& b, const Scratch<T>& s, int64_t r) {
  if (r >= b.r0 && r < b.r1) return FarField<T>::min_p(FarField<T>::kFarLogQ);
  return FarField<T>::min_p(s.row_lq[r] + b.max_x);
}

// ----------------------------------------------------------------------------------------------
// Forward
// ----------------------------------------------------------------------------------------------

// One map: logits z (N values) -> coords / variance (dims, view order = x, y, z), reg loss and
// stats [shift, denom] (csrc/OPS.md). NaN anywhere makes the max (softmax) or the sum NaN, which
// reaches every output of this map and no other.
template <typename T>
void forward_map(const T* z, const T* mu, const KernelArgs& a, const Axes<T>& ax, Scratch<T>& s,
                 T* coords, T* var, T* reg_loss, T* stats) {
  constexpr int64_t kV = Vec<T>::size();
  const int64_t N = ax.size(), W = ax.len[0], R = ax.rows();
  T shift = 0, denom = 1, inv = 1;
  T min_logit = std::numeric_limits<T>::quiet_NaN();  // softmax only
  s.uniform_fallback = false;
  switch (a.norm) {
    case Normalization::Softmax: {
      // Max-subtraction: exp never overflows and the largest term is exactly 1, so denom is in
      // [1, N]. A -inf logit gives exp(-inf) = 0; an all -inf map gives NaN, like torch.softmax.
      // Max and min (for the far field of JS) with the plain, NaN-blind vector max / min in
      // two independent chains; NaN logits are caught by their own unordered compare.
      constexpr T kInf = std::numeric_limits<T>::infinity();
      Vec<T> mx0(-kInf), mx1(-kInf), mn0(kInf), mn1(kInf), nan0(T(0)), nan1(T(0));
      int64_t i = 0;
      for (; i + 2 * kV <= N; i += 2 * kV) {
        const Vec<T> z0 = Vec<T>::loadu(z + i), z1 = Vec<T>::loadu(z + i + kV);
        mx0 = at::vec::clamp_min(z0, mx0);
        mx1 = at::vec::clamp_min(z1, mx1);
        mn0 = at::vec::clamp_max(z0, mn0);
        mn1 = at::vec::clamp_max(z1, mn1);
        nan0 = nan0 | (z0 != z0);
        nan1 = nan1 | (z1 != z1);
      }
      for (; i < N; i += kV) {
        const int64_t cnt = std::min(kV, N - i);
        const Vec<T> zl = load_part(z + i, cnt, -kInf), zh = load_part(z + i, cnt, kInf);
        mx0 = at::vec::clamp_min(zl, mx0);
        mn0 = at::vec::clamp_max(zh, mn0);
        nan0 = nan0 | (zl != zl);
      }
      const bool any_nan = (nan0 | nan1).zero_mask() != (1 << kV) - 1;
      const T beta = static_cast<T>(a.beta);
      shift = any_nan ? std::numeric_limits<T>::quiet_NaN() : hmax(at::vec::maximum(mx0, mx1));
      min_logit = hmin(at::vec::minimum(mn0, mn1));
      if (!std::isfinite(shift)) {
        // NaN or +inf logit, or only -inf: torch.softmax gives NaN, and so does this map.
        const T nan = std::numeric_limits<T>::quiet_NaN();
        for (int k = 0; k < ax.dims; ++k) coords[k] = var[k] = nan;
        *reg_loss = a.reg == Regularizer::None ? T(0) : nan;  // reg none: zeros (OPS.md)
        stats[0] = shift;
        stats[1] = nan;
        return;
      }
      transform_and_sum(z, ax, s, SoftmaxExp<T>{beta, shift});
      denom = 0;
      for (int64_t r = 0; r < R; ++r) denom += s.rows[r];
      inv = T(1) / denom;
      break;
    }
    case Normalization::None:
      transform_and_sum(z, ax, s, Identity<T>{});
      break;
    default: {
      transform_and_sum(z, ax, s, Rectify<T>{a.norm});
      denom = 0;
      for (int64_t r = 0; r < R; ++r) denom += s.rows[r];
      if (denom == T(0)) {
        // Nothing rectified survives (e.g. an all-negative relu map): no direction to prefer,
        // so the map is uniform (OPS.md). stats keeps denom = 0 to tell backward.
        std::fill(s.e.begin(), s.e.begin() + N, T(1));
        std::fill(s.marg[0].begin(), s.marg[0].end(), T(R));
        std::fill(s.rows.begin(), s.rows.end(), T(W));
        inv = T(1) / T(N);
        s.uniform_fallback = true;
      } else {
        inv = T(1) / denom;
      }
      break;
    }
  }
  stats[0] = shift;
  stats[1] = denom;
  row_marginals(ax, s);

  // Moments from the marginals: c = sum m v, mean u = sum m u, variance two-pass about the mean.
  T v_out[kMaxSpatialDims] = {0, 0, 0};
  for (int k = 0; k < ax.dims; ++k) {
    const T* m = s.marg[k].data();
    T c = 0, ubar = 0;
    for (int64_t j = 0; j < ax.len[k]; ++j) {
      c += m[j] * ax.grid[k][j];
      ubar += m[j] * ax.cent[k][j];
    }
    c *= inv;
    ubar *= inv;
    T v = 0;
    for (int64_t j = 0; j < ax.len[k]; ++j) {
      const T du = ax.cent[k][j] - ubar;
      v += m[j] * du * du;
    }
    coords[k] = c;
    var[k] = v_out[k] = v * inv;
  }

  T loss = 0;
  const T sigma2 = static_cast<T>(a.sigma_t) * static_cast<T>(a.sigma_t);
  if (a.reg == Regularizer::Var) {
    for (int k = 0; k < ax.dims; ++k) loss += (v_out[k] - sigma2) * (v_out[k] - sigma2);
  } else if (a.reg == Regularizer::JS || a.reg == Regularizer::KL) {
    T G[kMaxSpatialDims];
    const TargetNorm<T> tn = gaussian_factors(ax, mu, static_cast<T>(a.sigma_t), s, G);
    target_row_factors(ax, tn, s);
    const DivPass<T> dp = make_div_pass(a, s.uniform_fallback, shift, denom);
    const T* gx = s.gauss[0].data();
    const T* lgx = s.log_gauss[0].data();
    const Vec<T> vinv(inv);
    Vec<T> acc(T(0));
    // The divergence summands of row r, columns [x_begin, x_end) (x_begin a multiple of kV).
    auto divergence_cols = [&](int64_t r, int64_t x_begin, int64_t x_end) {
      const T* er = s.e.data() + r * W;
      const T* zr = z + r * W;
      const Vec<T> qr(s.row_q[r]), lqr(s.row_lq[r]);
      for (int64_t x = x_begin; x < x_end; x += kV) {
        const int64_t cnt = std::min(kV, W - x);
        // Lanes past cnt: p = q = 0 with finite logs, so they add exactly 0.
        const Vec<T> p = load_part(er + x, cnt, T(0)) * vinv;
        const Vec<T> q = load_part(gx + x, cnt, T(0)) * qr;
        Vec<T> lp, lq;
        divergence_logs(dp, load_part(zr + x, cnt, T(0)), p, q, load_part(lgx + x, cnt, T(0)) + lqr,
                        lp, lq);
        acc = acc + divergence(p, q, lp, lq, a.reg, false, false, dp.fast_lq).value;
      }
    };
    if (std::is_same_v<T, float> && a.reg == Regularizer::JS) {
      // Far field (see FarField): sum e where p >= kFarMinP, per-element elsewhere.
      const NearBox<T> b = near_box(ax, s);
      // Softmax: the smallest e of the map, exp(beta (min z - shift)), may clear the whole far
      // field at once (std::exp vs the vector exp: well inside the margins of FarField).
      const bool all_far_ok =
          a.norm == Normalization::Softmax && !s.uniform_fallback &&
          std::exp(static_cast<T>(a.beta) * (min_logit - shift)) * inv >=
              T(2) * FarField<T>::min_p(FarField<T>::kFarLogQ);
      Vec<T> far_acc(T(0));
      T far_e = 0;
      for (int64_t r = 0; r < R; ++r) {
        const T* er = s.e.data() + r * W;
        Vec<T> sum(T(0)), mn(std::numeric_limits<T>::infinity());
        auto far_cols = [&](int64_t x_begin, int64_t x_end) DSNT_INLINE_LAMBDA {
          for (int64_t x = x_begin; x < x_end; x += kV) {
            const int64_t cnt = std::min(kV, W - x);
            const Vec<T> ev = load_part(er + x, cnt, std::numeric_limits<T>::infinity());
            sum = sum + zero_tail(ev, cnt);
            mn = at::vec::minimum(mn, ev);
          }
        };
        if (r < b.r0 || r >= b.r1) {
          if (all_far_ok) {
            far_e += s.rows[r];
            continue;
          }
          far_cols(0, W);
          if (all_at_least(mn * vinv, far_min_p(b, s, r))) {
            far_acc = far_acc + sum;
          } else {
            divergence_cols(r, 0, W);
          }
          continue;
        }
        const int64_t x0 = s.nx0[r], x1 = s.nx1[r];
        divergence_cols(r, x0, x1);
        far_cols(0, x0);
        far_cols(x1, W);
        if (all_far_ok || all_at_least(mn * vinv, far_min_p(b, s, r))) {
          far_acc = far_acc + sum;
        } else {
          divergence_cols(r, 0, x0);
          divergence_cols(r, x1, W);
        }
      }
      far_e += hsum(far_acc);
      loss = hsum(acc) + FarField<T>::kHalfLn2 * (far_e * inv);
    } else {
      for (int64_t r = 0; r < R; ++r) divergence_cols(r, 0, W);
      loss = hsum(acc);
    }
  }
  *reg_loss = loss;
}

template <typename scalar_t>
void forward_chunk(const KernelArgs& a, int64_t begin, int64_t end) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Axes<T> ax(a);
  Scratch<T> s(ax);
  const int64_t N = ax.size();
  const int n = a.dims;
  const auto* logits = static_cast<const scalar_t*>(a.logits);
  const auto* target = static_cast<const T*>(a.target);
  for (int64_t m = begin; m < end; ++m) {
    const T* z = widen<scalar_t, T>(logits + m * N, N, s);
    T mu[kMaxSpatialDims] = {0, 0, 0};
    if (target != nullptr)
      for (int k = 0; k < n; ++k) mu[k] = target[m * n + k];
    forward_map<T>(z, mu, a, ax, s, static_cast<T*>(a.coords) + m * n,
                   static_cast<T*>(a.variance) + m * n, static_cast<T*>(a.reg_losses) + m,
                   static_cast<T*>(a.stats) + 2 * m);
  }
}

// ----------------------------------------------------------------------------------------------
// Backward
// ----------------------------------------------------------------------------------------------

// One map: dLoss/dz (N values, T) and, for js / kl with needs_target_grad, dLoss/dmu (dims).
// With G_i = dLoss/dp_i (DESIGN.md §2):
//   softmax:          dz_i = beta p_i (G_i - sum_j p_j G_j)
//   abs/relu/sigmoid: dz_i = r'(z_i) / R (G_i - sum_j p_j G_j); 0 for a uniform-fallback map
//   none:             dz_i = G_i
// G_i = sum_k A_k(i_k) + w (d_p(i)) where A_k collects the coordinate and variance paths:
//   A_k(j) = gc_k v_k(j) + nu_k [(u_k(j) - ubar_k)^2 - 2 ubar_k (1 - sum p) u_k(j)],
// (the last term is the path through the mean, zero when sum p = 1), and for normalized maps
// sum_i p_i A_k(i_k) = gc_k c_k + nu_k var_k in closed form from the saved outputs.
template <typename T>
void backward_map(const T* z, const T* mu, const KernelArgs& a, const Axes<T>& ax, Scratch<T>& s,
                  const T* coords, const T* var, const T* stats, const T* gc, const T* gv, T gr,
                  T* gz, T* gmu, bool allow_fused = true) {
  constexpr int64_t kV = Vec<T>::size();
  const int64_t N = ax.size(), W = ax.len[0], H = ax.len[1], D = ax.len[2], R = ax.rows();
  const bool is_div = a.reg == Regularizer::JS || a.reg == Regularizer::KL;
  const bool want_gmu = is_div && a.needs_target_grad;
  const T shift = stats[0], denom = stats[1];
  const T beta = static_cast<T>(a.beta);
  const bool uniform = a.norm != Normalization::Softmax && a.norm != Normalization::None &&
                       denom == T(0);
  const T inv = a.norm == Normalization::None ? T(1) : (uniform ? T(1) / T(N) : T(1) / denom);
  if (a.norm == Normalization::Softmax && !(std::isfinite(shift) && std::isfinite(denom))) {
    // A NaN map of the forward pass (see forward_map): NaN gradients, confined to this map.
    const T nan = std::numeric_limits<T>::quiet_NaN();
    std::fill(gz, gz + N, nan);
    if (gmu != nullptr)
      for (int k = 0; k < ax.dims; ++k) gmu[k] = want_gmu ? nan : T(0);
    return;
  }

  // sum p: 1 for the normalized modes, the plain sum for `none` (its maps need not sum to 1).
  T sum_p = 1;
  if (a.norm == Normalization::None) {
    Vec<T> acc(T(0));
    for (int64_t i = 0; i < N; i += kV) acc = acc + load_part(z + i, std::min(kV, N - i), T(0));
    sum_p = hsum(acc);
  }

  // Per-axis parts A_k of G and their p-weighted sum.
  const T sigma2 = static_cast<T>(a.sigma_t) * static_cast<T>(a.sigma_t);
  T sep = 0;
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    T* A = s.axis_g[k].data();
    if (k >= ax.dims) {
      A[0] = 0;
      continue;
    }
    const T Sk = T(ax.len[k]);
    const T ubar = a.normalized ? coords[k] * Sk / T(2)
                                : coords[k] - (Sk - T(1)) / T(2) * sum_p;
    T nu = gv[k];
    if (a.reg == Regularizer::Var) nu += T(2) * gr * (var[k] - sigma2);
    const T lin = T(2) * ubar * (T(1) - sum_p);
    for (int64_t j = 0; j < ax.len[k]; ++j) {
      const T du = ax.cent[k][j] - ubar;
      A[j] = gc[k] * ax.grid[k][j] + nu * (du * du - lin * ax.cent[k][j]);
    }
    sep += gc[k] * coords[k] + nu * var[k];
  }
  const bool normalized_p = a.norm != Normalization::None;
  for (int64_t dz = 0; dz < D; ++dz)
    for (int64_t y = 0; y < H; ++y)
      s.row_g[dz * H + y] = s.axis_g[1][y] + s.axis_g[2][dz] - (normalized_p ? sep : T(0));

  // Divergence pass: p (kept in e), d_p (kept in d), sum p d_p, and the marginals of
  // w_i = d_q(i) q_i for the target gradient.
  const bool div_pass = is_div && (gr != T(0) || want_gmu);
  T sum_pd = 0;
  bool fused_far = false;  // far p is formed in the write pass (softmax, see below)
  NearBox<T> b;
  T G[kMaxSpatialDims] = {1, 1, 1};
  TargetNorm<T> tn{1, 0};
  if (div_pass) {
    tn = gaussian_factors(ax, mu, static_cast<T>(a.sigma_t), s, G);
    target_row_factors(ax, tn, s);
    const DivPass<T> dp = make_div_pass(a, uniform, shift, denom);
    const T* lgx = s.log_gauss[0].data();
    T* wx = s.marg[0].data();
    std::fill(wx, wx + W, T(0));
    const T* gx = s.gauss[0].data();
    const Vec<T> vinv(inv);
    const SoftmaxExp<T> sm{beta, shift};
    const Rectify<T> rect{a.norm};
    auto prob = [&](const Vec<T>& zv) DSNT_INLINE_LAMBDA -> Vec<T> {
      if (uniform) return vinv;
      if (a.norm == Normalization::Softmax) return sm(zv) * vinv;
      if (a.norm == Normalization::None) return zv;
      return rect(zv) * vinv;
    };
    Vec<T> acc_pd(T(0));
    // Per-element divergence over row r, columns [x_begin, x_end) (x_begin a multiple of kV).
    auto divergence_cols = [&](int64_t r, int64_t x_begin, int64_t x_end, Vec<T>& acc_w) {
      const T* zr = z + r * W;
      T* er = s.e.data() + r * W;
      T* dr = s.d.data() + r * W;
      const Vec<T> qr(s.row_q[r]), lqr(s.row_lq[r]);
      for (int64_t x = x_begin; x < x_end; x += kV) {
        const int64_t cnt = std::min(kV, W - x);
        const Vec<T> zv = load_part(zr + x, cnt, T(0));
        const Vec<T> p = zero_tail(prob(zv), cnt);
        const Vec<T> q = load_part(gx + x, cnt, T(0)) * qr;
        Vec<T> lp, lq;
        divergence_logs(dp, zv, p, q, load_part(lgx + x, cnt, T(0)) + lqr, lp, lq);
        const DivVec<T> t = divergence(p, q, lp, lq, a.reg, true, want_gmu, dp.fast_lq);
        p.store(er + x, cnt);
        t.d_p.store(dr + x, cnt);
        acc_pd = acc_pd + p * t.d_p;  // zero lanes: p = 0 and d_p finite, so they add 0
        if (want_gmu) {
          const Vec<T> w = zero_tail(t.d_q * q, cnt);
          (load_part(wx + x, cnt, T(0)) + w).store(wx + x, cnt);
          acc_w = acc_w + w;
        }
      }
    };
    const bool fast_js = std::is_same_v<T, float> && a.reg == Regularizer::JS;
    if (fast_js) b = near_box(ax, s);
    if (fast_js && allow_fused && a.norm == Normalization::Softmax && !uniform) {
      // Softmax: sum over the far field of p d_p = ln2/2 (1 - sum of p over the box), so only
      // the box is visited here; the write pass forms p in the far field and checks it there
      // (a failed check redoes the map with the path below).
      Vec<T> near_p(T(0));
      for (int64_t r = 0; r < R; ++r) {
        s.d_lo[r] = s.d_hi[r] = 0;
        s.rows[r] = 0;
        if (r < b.r0 || r >= b.r1) continue;
        Vec<T> acc_w(T(0));
        divergence_cols(r, s.nx0[r], s.nx1[r], acc_w);
        s.d_lo[r] = s.nx0[r];
        s.d_hi[r] = s.nx1[r];
        if (want_gmu) s.rows[r] = hsum(acc_w);
        const T* er = s.e.data() + r * W;
        for (int64_t x = s.nx0[r]; x < s.nx1[r]; x += kV) {
          near_p = near_p + load_part(er + x, std::min(kV, W - x), T(0));
        }
      }
      sum_pd = hsum(acc_pd) + FarField<T>::kHalfLn2 * (T(1) - hsum(near_p));
      fused_far = true;
    } else if (fast_js) {
      // Far field (FarField): p only, d_p = ln2/2 and w = 0 there; d holds d_p in
      // [d_lo, d_hi) of each row.
      Vec<T> far_acc(T(0));
      for (int64_t r = 0; r < R; ++r) {
        Vec<T> acc_w(T(0));
        const bool near = r >= b.r0 && r < b.r1;
        const int64_t xb = near ? s.nx0[r] : 0, xe = near ? s.nx1[r] : 0;
        if (near) divergence_cols(r, xb, xe, acc_w);
        const T* zr = z + r * W;
        T* er = s.e.data() + r * W;
        Vec<T> sum(T(0)), mn(std::numeric_limits<T>::infinity());
        auto far_cols = [&](int64_t x_begin, int64_t x_end) DSNT_INLINE_LAMBDA {
          for (int64_t x = x_begin; x < x_end; x += kV) {
            const int64_t cnt = std::min(kV, W - x);
            const Vec<T> p = prob(load_part(zr + x, cnt, T(0)));
            p.store(er + x, cnt);
            if (cnt == kV) {
              sum = sum + p;
              mn = at::vec::clamp_max(p, mn);
            } else {
              sum = sum + zero_tail(p, cnt);
              mn = at::vec::clamp_max(
                  Vec<T>::set(Vec<T>(std::numeric_limits<T>::infinity()), p, cnt), mn);
            }
          }
        };
        far_cols(0, xb);
        far_cols(xe, W);
        // min p (NaN-blind) against the bound, and the sum (NaN / inf if any p is)
        const Vec<T> ok = (mn >= Vec<T>(far_min_p(b, s, r))) & ((sum - sum) == Vec<T>(T(0)));
        bool per_element = near;  // w is nonzero only where the divergence ran
        if (ok.zero_mask() == 0) {
          far_acc = far_acc + sum;
          s.d_lo[r] = xb;
          s.d_hi[r] = xe;
        } else {
          divergence_cols(r, 0, xb, acc_w);
          divergence_cols(r, xe, W, acc_w);
          s.d_lo[r] = 0;
          s.d_hi[r] = W;
          per_element = true;
        }
        s.rows[r] = want_gmu && per_element ? hsum(acc_w) : T(0);
      }
      sum_pd = hsum(acc_pd) + FarField<T>::kHalfLn2 * hsum(far_acc);
    } else {
      for (int64_t r = 0; r < R; ++r) {
        Vec<T> acc_w(T(0));
        divergence_cols(r, 0, W, acc_w);
        s.rows[r] = hsum(acc_w);
        s.d_lo[r] = 0;
        s.d_hi[r] = W;
      }
      sum_pd = hsum(acc_pd);
    }
  }

  // dLoss/dz. For the normalized modes the divergence part enters as w (d_p - sum p d_p).
  const Vec<T> vgr(gr);
  const Vec<T> vshift_pd(normalized_p ? gr * sum_pd : T(0));
  const T* Ax = s.axis_g[0].data();
  if (uniform) {
    std::fill(gz, gz + N, T(0));  // p = 1/N does not depend on z
  } else {
    const SoftmaxExp<T> sm{beta, shift};
    const Rectify<T> rect{a.norm};
    const Vec<T> vinv(inv), vbeta(beta);
    const T far_d = FarField<T>::kHalfLn2;  // d_p outside [d_lo, d_hi) (float JS far field)
    for (int64_t r = 0; r < R; ++r) {
      const T* zr = z + r * W;
      const T* er = s.e.data() + r * W;
      const T* dr = s.d.data() + r * W;
      T* gr_out = gz + r * W;
      const int64_t d_lo = div_pass ? s.d_lo[r] : 0, d_hi = div_pass ? s.d_hi[r] : 0;
      const Vec<T> rowg(s.row_g[r]);
      // G outside [d_lo, d_hi): A_x + row part + gr (ln2/2 - sum p d_p)
      const Vec<T> rowg_far(
          s.row_g[r] + (div_pass ? gr * far_d - (normalized_p ? gr * sum_pd : T(0)) : T(0)));
      if (fused_far) {
        // Far field of a softmax JS map: p from the logits, checked as in the two-pass path.
        Vec<T> sum(T(0)), mn(std::numeric_limits<T>::infinity());
        auto write_far = [&](int64_t x_begin, int64_t x_end) DSNT_INLINE_LAMBDA {
          for (int64_t x = x_begin; x < x_end; x += kV) {
            const int64_t cnt = std::min(kV, W - x);
            const Vec<T> p = sm(load_part(zr + x, cnt, T(0))) * vinv;
            const Vec<T> g = load_part(Ax + x, cnt, T(0)) + rowg_far;
            (vbeta * p * g).store(gr_out + x, cnt);
            if (cnt == kV) {
              sum = sum + p;
              mn = at::vec::clamp_max(p, mn);
            } else {
              sum = sum + zero_tail(p, cnt);
              mn = at::vec::clamp_max(
                  Vec<T>::set(Vec<T>(std::numeric_limits<T>::infinity()), p, cnt), mn);
            }
          }
        };
        write_far(0, d_lo);
        write_far(d_hi, W);
        const Vec<T> ok = (mn >= Vec<T>(far_min_p(b, s, r))) & ((sum - sum) == Vec<T>(T(0)));
        if (ok.zero_mask() != 0) {
          backward_map<T>(z, mu, a, ax, s, coords, var, stats, gc, gv, gr, gz, gmu, false);
          return;
        }
        for (int64_t x = d_lo; x < d_hi; x += kV) {
          const int64_t cnt = std::min(kV, W - x);
          const Vec<T> g = load_part(Ax + x, cnt, T(0)) + rowg +
                           vgr * load_part(dr + x, cnt, T(0)) - vshift_pd;
          (vbeta * load_part(er + x, cnt, T(0)) * g).store(gr_out + x, cnt);
        }
        continue;
      }
      auto write = [&](int64_t x_begin, int64_t x_end, bool with_d) DSNT_INLINE_LAMBDA {
        for (int64_t x = x_begin; x < x_end; x += kV) {
          const int64_t cnt = std::min(kV, W - x);
          Vec<T> g;
          if (with_d) {
            g = load_part(Ax + x, cnt, T(0)) + rowg + vgr * load_part(dr + x, cnt, T(0)) -
                vshift_pd;
          } else {
            g = load_part(Ax + x, cnt, T(0)) + rowg_far;
          }
          Vec<T> out;
          if (a.norm == Normalization::Softmax) {
            const Vec<T> p = div_pass ? load_part(er + x, cnt, T(0))
                                      : sm(load_part(zr + x, cnt, T(0))) * vinv;
            out = vbeta * p * g;
          } else if (a.norm == Normalization::None) {
            out = g;
          } else {
            out = rect.grad(load_part(zr + x, cnt, T(0))) * vinv * g;
          }
          out.store(gr_out + x, cnt);
        }
      };
      write(0, d_lo, false);
      write(d_lo, d_hi, true);
      write(d_hi, W, false);
    }
  }

  if (want_gmu) {
    // dLoss/dmu_k = w sum_i d_q(i) q_i dlog q_i/dmu_k, with
    // dlog q_i/dmu_k = (v_k - mu_k)/s_k^2 - (prod_{l != k} G_l) G'_k / (prod G + eps),
    // G'_k = sum_j g_k(j) (v_k(j) - mu_k)/s_k^2 (no division by G_k, which may underflow to 0).
    row_marginals(ax, s);  // w marginals along y, z from the per-row sums
    for (int k = 0; k < ax.dims; ++k) {
      const T sig = static_cast<T>(a.sigma_t);
      // gauss_log_grad(j, S, mu, sigma_t) of dsnt_math.h, the same operations
      T dG = 0;
      for (int64_t j = 0; j < ax.len[k]; ++j)
        dG += s.gauss[k][j] * gauss_log_grad<T>(j, ax.len[k], mu[k], sig);
      T others = 1;
      for (int l = 0; l < kMaxSpatialDims; ++l)
        if (l != k) others *= G[l];
      const T corr = others * dG * tn.norm;  // the scales exp(off) cancel against norm
      T acc = 0;
      for (int64_t j = 0; j < ax.len[k]; ++j)
        acc += s.marg[k][j] * (gauss_log_grad<T>(j, ax.len[k], mu[k], sig) - corr);
      gmu[k] = gr * acc;
    }
  } else if (gmu != nullptr) {
    for (int k = 0; k < ax.dims; ++k) gmu[k] = 0;
  }
}

template <typename scalar_t>
void backward_chunk(const KernelArgs& a, int64_t begin, int64_t end) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Axes<T> ax(a);
  Scratch<T> s(ax);
  const int64_t N = ax.size();
  const int n = a.dims;
  const auto* logits = static_cast<const scalar_t*>(a.logits);
  const auto* target = static_cast<const T*>(a.target);
  const auto* gc_all = static_cast<const T*>(a.grad_coords);
  const auto* gv_all = static_cast<const T*>(a.grad_variance);
  const auto* gr_all = static_cast<const T*>(a.grad_reg_losses);
  auto* grad_logits = static_cast<scalar_t*>(a.grad_logits);
  auto* grad_target = static_cast<T*>(a.grad_target);
  if constexpr (!std::is_same_v<scalar_t, T>) s.g_out.resize(N);
  const T zeros[kMaxSpatialDims] = {0, 0, 0};
  for (int64_t m = begin; m < end; ++m) {
    const T* z = widen<scalar_t, T>(logits + m * N, N, s);
    T mu[kMaxSpatialDims] = {0, 0, 0};
    if (target != nullptr)
      for (int k = 0; k < n; ++k) mu[k] = target[m * n + k];
    T* gz;
    if constexpr (std::is_same_v<scalar_t, T>) {
      gz = grad_logits + m * N;
    } else {
      gz = s.g_out.data();
    }
    backward_map<T>(z, mu, a, ax, s, static_cast<const T*>(a.coords) + m * n,
                    static_cast<const T*>(a.variance) + m * n,
                    static_cast<const T*>(a.stats) + 2 * m,
                    gc_all ? gc_all + m * n : zeros, gv_all ? gv_all + m * n : zeros,
                    gr_all ? gr_all[m] : T(0), gz, grad_target ? grad_target + m * n : nullptr);
    if constexpr (!std::is_same_v<scalar_t, T>) {
      scalar_t* dst = grad_logits + m * N;
      for (int64_t i = 0; i < N; ++i) dst[i] = static_cast<scalar_t>(gz[i]);
    }
  }
}

inline KernelTable make_table() {
  KernelTable t{};
  t.forward[static_cast<int>(DType::kF32)] = &forward_chunk<float>;
  t.forward[static_cast<int>(DType::kF64)] = &forward_chunk<double>;
  t.forward[static_cast<int>(DType::kF16)] = &forward_chunk<c10::Half>;
  t.forward[static_cast<int>(DType::kBF16)] = &forward_chunk<c10::BFloat16>;
  t.backward[static_cast<int>(DType::kF32)] = &backward_chunk<float>;
  t.backward[static_cast<int>(DType::kF64)] = &backward_chunk<double>;
  t.backward[static_cast<int>(DType::kF16)] = &backward_chunk<c10::Half>;
  t.backward[static_cast<int>(DType::kBF16)] = &backward_chunk<c10::BFloat16>;
  return t;
}

}  // namespace dsnt_cuda::cpu::DSNT_CPU_NS
