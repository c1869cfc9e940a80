// The math of DSNT, written once for every C++ backend (docs/math.md).
//
// Per-element functions are templates over a value type V: `float` / `double` (one element: the
// CUDA kernels, and the CPU kernels' scalar tails) or a SIMD vector (the CPU kernels instantiate
// them with at::vec::Vectorized<T>). They use only arithmetic and the primitives of Arith<V>,
// which this header defines for float and double and csrc/cpu/vec_arith.h for the vectors.
// Per-axis and per-map functions are scalar (the accumulation type T: float for float16 /
// bfloat16 / float32 logits, double for float64).
//
// Units: logarithms inside the kernels are base 2 (the hardware's ex2 / lg2): `l2p` is log2 p.
// Outputs in natural units are formed once per map (a multiplication by ln 2).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DSNT_HD __host__ __device__ __forceinline__
#else
#define DSNT_HD inline
#endif

namespace dsnt_cuda {

constexpr int kMaxSpatialDims = 3;

// How logits become a probability map (docs/ops.md).
enum class Normalization : int { Softmax = 0, Abs = 1, Relu = 2, Sigmoid = 3, None = 4 };
// Which regularizer is computed per map.
enum class Regularizer : int { None = 0, JS = 1, KL = 2, Var = 3 };
// Which coordinate loss the fused loss epilogue computes (None: no loss at all).
enum class CoordLoss : int { None = 0, Euclidean = 1, L1 = 2, MSE = 3 };

// Slots of the per-map `stats` output (docs/ops.md): stats has kStatMean + dims entries per map.
constexpr int kStatShift = 0;    // softmax: the largest logit (unscaled); else 0
constexpr int kStatDenom = 1;    // p = e / denom (softmax: sum exp(beta (z - shift)); rectified: sum r)
constexpr int kStatMass = 2;     // sum p: 1, or sum z for "none"
constexpr int kStatDivGrad = 3;  // sum_i p_i dDiv/dp_i (js / kl), natural units; else 0
constexpr int kStatMean = 4;     // ubar_k = sum p u_k, centred pixels, x first
constexpr int stats_size(int dims) { return kStatMean + dims; }

constexpr double kLn2 = 0.693147180559945309417232121458176568;
constexpr double kLog2e = 1.44269504088896340735992468100189214;
// dsntnn's epsilon inside the logarithms and in the target's normalizer. Only ever added in the
// accumulation type, where it is a normal number (in float16 it would flush to 0).
constexpr double kDivEps = 1e-24;
constexpr double kLog2DivEps = -79.726274144432671;  // log2(1e-24)

template <typename T>
DSNT_HD bool dsnt_isnan(T x) {
  return x != x;
}

// What the evaluation rules of docs/math.md §7 need to know about the accumulation type.
template <typename T>
struct Precision;

template <>
struct Precision<float> {
  // |log2 p - log2 q| above this: the smaller of p, q is below half an ulp of the larger.
  static constexpr float kFarLog2 = 24.0f;
  // x >= kTiny: x + 1e-24 rounds to x (eps * 2^24).
  static constexpr float kTiny = 1.6777216e-17f;
  // Floor of log2 values, so that 0 * log2(0) is 0 instead of NaN; below log2 of the smallest
  // subnormal, so a positive value is never floored.
  static constexpr float kLog2Floor = -160.0f;
  // The smallest normal number: log2 arguments are clamped to it (a fast log2 flushes
  // subnormals to 0, and both p, q that small contribute nothing anyway).
  static constexpr float kMinNormal = 1.17549435e-38f;
};

template <>
struct Precision<double> {
  static constexpr double kFarLog2 = 53.0;
  static constexpr double kTiny = 9.007199254740992e-09;  // eps * 2^53
  static constexpr double kLog2Floor = -1100.0;
  static constexpr double kMinNormal = 2.2250738585072014e-308;
};

// Primitives of a value type, specialized per type: exp2, log2, and NaN-aware selections.
// Masks are `bool` for scalars and lane masks for vectors; any / all reduce a mask.
template <typename V>
struct Arith;

template <typename T>
struct ScalarArith {
  using Scalar = T;
  using Mask = bool;
  // log2_mid takes the logarithm (a single instruction on a GPU)
  static constexpr bool kLog2MidByRatio = false;
  static DSNT_HD T splat(T x) { return x; }
  static DSNT_HD T select(bool m, T a, T b) { return m ? a : b; }
  static DSNT_HD bool any(bool m) { return m; }
  static DSNT_HD bool all(bool m) { return m; }
  static DSNT_HD T abs(T x) { return x < T(0) ? -x : x; }
  // x < lo ? lo : x — keeps NaN (NaN < lo is false).
  static DSNT_HD T floor_at(T x, T lo) { return x < lo ? lo : x; }
  // The larger of two values that are never NaN where the result matters.
  static DSNT_HD T max(T a, T b) { return a > b ? a : b; }
  static DSNT_HD T min(T a, T b) { return a < b ? a : b; }
};

template <>
struct Arith<float> : ScalarArith<float> {
  // ex2.approx / lg2.approx on the GPU (about 2 ulp; subnormal results flush to 0, which no
  // output can see); the C library on the host.
  static DSNT_HD float exp2(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return std::exp2(x);
#endif
  }
  static DSNT_HD float log2(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return std::log2(x);
#endif
  }
};

template <>
struct Arith<double> : ScalarArith<double> {
  static DSNT_HD double exp2(double x) {
#if defined(__CUDA_ARCH__)
    return ::exp2(x);
#else
    return std::exp2(x);
#endif
  }
  static DSNT_HD double log2(double x) {
#if defined(__CUDA_ARCH__)
    return ::log2(x);
#else
    return std::log2(x);
#endif
  }
};

// =============================================================================================
// Grids (docs/math.md §1). u(j) = j - (S-1)/2; v(j) = (2/S) u(j) (normalized) or j (pixel).

// Any integer type of S: the kernels' int sizes then convert in 32 bits, not 64.
template <typename T, typename Int>
DSNT_HD T centred_offset(Int S) {
  return T(S - 1) * T(0.5);
}

// The requested grid as an affine function of the centred coordinate: v = scale * u + offset.
template <typename T>
struct GridAffine {
  T scale, offset;
};

template <typename T>
DSNT_HD GridAffine<T> grid_affine(int64_t S, bool normalized) {
  return normalized ? GridAffine<T>{T(2) / T(S), T(0)} : GridAffine<T>{T(1), centred_offset<T>(S)};
}

// =============================================================================================
// Normalization (docs/math.md §2).

// log2 of the unnormalized softmax weight, beta (z - shift) log2(e). Always this form, never
// beta z - shift (docs/ops.md, stats): the largest weight is exactly 2^0 = 1 in every kernel.
template <typename V, typename T>
DSNT_HD V softmax_log2_weight(V z, T shift, T beta_log2e) {
  return (z - Arith<V>::splat(shift)) * Arith<V>::splat(beta_log2e);
}

// r(z) of the sum-normalized modes. relu keeps a NaN logit NaN (its map becomes NaN).
template <typename V>
DSNT_HD V rectify(V z, Normalization mode) {
  using A = Arith<V>;
  using T = typename A::Scalar;
  switch (mode) {
    case Normalization::Abs:
      return A::abs(z);
    case Normalization::Relu:
      return A::select(z <= A::splat(T(0)), A::splat(T(0)), z);
    default:  // sigmoid; 1 / (1 + 2^(-z log2 e)) is 0 at z = -inf and 1 at +inf
      return A::splat(T(1)) / (A::splat(T(1)) + A::exp2(z * A::splat(T(-kLog2e))));
  }
}

// r'(z), with autograd's conventions at the kinks: abs'(0) = 0 and relu'(0) = 0.
template <typename V>
DSNT_HD V rectify_grad(V z, Normalization mode) {
  using A = Arith<V>;
  using T = typename A::Scalar;
  const V zero = A::splat(T(0)), one = A::splat(T(1));
  switch (mode) {
    case Normalization::Abs:
      return A::select(z > zero, one, A::select(z < zero, A::splat(T(-1)), zero));
    case Normalization::Relu:
      return A::select(z > zero, one, zero);
    default: {
      const V s = rectify(z, mode);
      return s * (one - s);
    }
  }
}

// log2 r(z) for the divergences, floored (0 * log 0 = 0). sigmoid: log2 s = -log2(1 + 2^(-z log2 e)).
template <typename V>
DSNT_HD V rectified_log2(V z, V r, Normalization mode) {
  using A = Arith<V>;
  using T = typename A::Scalar;
  if (mode == Normalization::Sigmoid) {
    return A::floor_at(-A::log2(A::splat(T(1)) + A::exp2(z * A::splat(T(-kLog2e)))),
                       A::splat(Precision<T>::kLog2Floor));
  }
  return A::floor_at(A::log2(r), A::splat(Precision<T>::kLog2Floor));
}

// =============================================================================================
// Divergence terms (docs/math.md §4, §6, §7). Inputs per element: p, q and their log2 (floored
// at Precision::kLog2Floor by the caller, so that a zero probability contributes 0, not NaN).

// log2 m for float vectors, without a logarithm (docs/math.md §7.3): with hi, lo the larger and
// the smaller of p, q (ordered by their logs, so that l2hi belongs to hi),
//   log2(p + q) = l2hi + log2(1 + lo/hi) = l2hi + (2/ln2) atanh(u),  u = lo / (p + q + hi),
// u in [0, 1/3]; (2/ln2) atanh(u) / u is a polynomial in u^2 (minimax, relative error 4e-9, below
// float rounding). One division and five FMAs instead of a vector log2 (~30 instructions and a
// long dependency chain on the CPU). Vectors whose lanes are all "far" skip even that: most of a
// large map.
template <typename V>
DSNT_HD V log2_mid_by_ratio(V p, V l2p, V q, V l2q) {
  using A = Arith<V>;
  using T = typename A::Scalar;
  const auto p_hi = l2p >= l2q;
  const V l2hi = A::select(p_hi, l2p, l2q);
  if (A::all(A::abs(l2p - l2q) > A::splat(Precision<T>::kFarLog2))) return l2hi - A::splat(T(1));
  const V hi = A::select(p_hi, p, q), lo = A::select(p_hi, q, p);
  // lo at least 2^-40 hi: u >= 2^-42, so that neither u nor u^2 is subnormal (the CPU's slow
  // path), a change below 2^-38 that l2hi - 1 (|.| >= 1 for p, q <= 1) rounds away. p = q = 0:
  // u = 0 (l2m = l2hi - 1, multiplied by 0). A NaN p or q stays NaN.
  const V lo_floor = A::max(lo, hi * A::splat(T(9.094947017729282e-13)));  // 2^-40
  const V u = lo_floor / (A::floor_at(p + q, A::splat(Precision<T>::kMinNormal)) + hi);
  const V w = u * u;
  V poly = A::splat(T(0.40652744)) * w + A::splat(T(0.40338623));
  poly = poly * w + A::splat(T(0.57743740));
  poly = poly * w + A::splat(T(0.96179162));
  poly = poly * w + A::splat(T(2.8853901));
  return u * poly + (l2hi - A::splat(T(1)));
}

// log2 m, m = (p + q)/2: log2 max(p, q) - 1 where the smaller is below half an ulp of the larger
// ("far"), else the one real logarithm per element of JS. Value types whose log2 is costly
// (Arith<V>::kLog2MidByRatio: the CPU's float vectors) take log2_mid_by_ratio instead.
template <typename V>
DSNT_HD V log2_mid(V p, V l2p, V q, V l2q) {
  using A = Arith<V>;
  using T = typename A::Scalar;
  if constexpr (A::kLog2MidByRatio) {
    return log2_mid_by_ratio(p, l2p, q, l2q);
  } else {
    const V hi = A::max(l2p, l2q);
    const auto far = A::abs(l2p - l2q) > A::splat(Precision<T>::kFarLog2);
    if (A::all(far)) return hi - A::splat(T(1));
    const V near = A::log2(A::floor_at(p + q, A::splat(Precision<T>::kMinNormal)));
    return A::select(far, hi, near) - A::splat(T(1));
  }
}

// log2(x + eps): the analytic log2 x where x >= kTiny (there x + eps rounds to x), a real
// logarithm below (KL's eps, which dsntnn keeps where q underflows).
template <typename V>
DSNT_HD V log2_plus_eps(V x, V l2x) {
  using A = Arith<V>;
  using T = typename A::Scalar;
  const auto tiny = x < A::splat(Precision<T>::kTiny);
  if (!A::any(tiny)) return l2x;
  return A::select(tiny, A::log2(x + A::splat(T(kDivEps))), l2x);
}

// Forward sums of one element, log2 units (docs/math.md §7.2: the fast forms are exact to a few
// eps per element). The caller scales once per map:
//   JS:  reg = ln2/2 * value,  div_grad = ln2/2 * p_part
//   KL:  reg = ln2 * value,    div_grad = ln2 * value + sum p   (p / (p + eps) -> 1)
template <typename V>
DSNT_HD void add_js_terms(V p, V l2p, V q, V l2q, V& value, V& p_part) {
  const V l2m = log2_mid(p, l2p, q, l2q);
  const V tp = p * (l2p - l2m);
  value += tp + q * (l2q - l2m);
  p_part += tp;
}

template <typename V>
DSNT_HD void add_kl_terms(V p, V l2p, V q, V l2q, V& value) {
  value += p * (l2p - log2_plus_eps(q, l2q));
}

// dDiv/dp_i / scale, with scale = ln2/2 (JS) or ln2 (KL): the per-element divergence part of
// G_i = dLoss/dp_i before the factor omega * scale.
// `exact` selects dsntnn's eps form where p (or m, q) is below kTiny; it is needed when the term
// is not multiplied by p afterwards (rectified and "none" maps). Softmax multiplies by p and
// passes exact = false (docs/math.md §7.2).
template <typename V>
DSNT_HD V js_grad_p(V p, V l2p, V q, V l2q, bool exact) {
  using A = Arith<V>;
  using T = typename A::Scalar;
  const V l2m = log2_mid(p, l2p, q, l2q);
  const V fast = l2p - l2m;
  if (!exact) return fast;
  const V m = A::splat(T(0.5)) * (p + q);
  const V eps = A::splat(T(kDivEps));
  const auto tiny = A::min(p, m) < A::splat(Precision<T>::kTiny);
  if (!A::any(tiny)) return fast;
  // log2(p+eps) - log2(m+eps) + (p/(p+eps) - m/(m+eps)) / ln2
  const V exact_value =
      A::log2(p + eps) - A::log2(m + eps) + (p / (p + eps) - m / (m + eps)) * A::splat(T(kLog2e));
  return A::select(tiny, exact_value, fast);
}

template <typename V>
DSNT_HD V kl_grad_p(V p, V l2p, V q, V l2q, bool exact) {
  using A = Arith<V>;
  using T = typename A::Scalar;
  const V log_ratio = l2p - log2_plus_eps(q, l2q);
  const V one = A::splat(T(kLog2e));  // p / (p + eps) = 1, over ln 2
  if (!exact) return log_ratio + one;
  const V eps = A::splat(T(kDivEps));
  const auto tiny = p < A::splat(Precision<T>::kTiny);
  if (!A::any(tiny)) return log_ratio + one;
  const V exact_value = A::log2(p + eps) - log2_plus_eps(q, l2q) + p / (p + eps) * A::splat(T(kLog2e));
  return A::select(tiny, exact_value, log_ratio + one);
}

// w_i = (dDiv/dq_i) q_i, the weight of element i in the target-mean gradient, natural units.
// Multiplied by q, so JS takes the fast form; KL's -p q/(q+eps) keeps its ratio below kTiny.
template <typename V>
DSNT_HD V js_target_weight(V p, V l2p, V q, V l2q) {
  using A = Arith<V>;
  using T = typename A::Scalar;
  return A::splat(T(0.5 * kLn2)) * q * (l2q - log2_mid(p, l2p, q, l2q));
}

template <typename V>
DSNT_HD V kl_target_weight(V p, V q) {
  using A = Arith<V>;
  using T = typename A::Scalar;
  const auto tiny = q < A::splat(Precision<T>::kTiny);
  if (!A::any(tiny)) return -p;
  return A::select(tiny, -p * q / (q + A::splat(T(kDivEps))), -p);
}

// =============================================================================================
// The separable Gaussian target (docs/math.md §4). Built per map from per-axis tables of size S_k.

// Per-axis constant of the log2 factor: l2(j) = -((u(j) - m) k)^2, k = sqrt(log2(e) / 2) / sigma.
template <typename T>
DSNT_HD T target_log2_coef(T sigma_t) {
  return T(0.84932180028801904272150283410288961) / sigma_t;  // sqrt(log2(e) / 2)
}

// The target mean on an axis in centred pixels: m = mu S / 2.
template <typename T>
DSNT_HD T target_centre(T mu, int64_t S) {
  return mu * T(S) * T(0.5);
}

template <typename V>
DSNT_HD V target_log2_factor(V u, V m, V coef) {
  const V d = (u - m) * coef;
  return -(d * d);  // -inf where d*d overflows: exp2 gives the 0 the factor rounds to
}

// Per-axis sums of the scaled factors g~(j) = 2^(l2(j) - off), off = max_j l2(j).
template <typename T>
struct TargetAxisSums {
  T off;     // max_j l2(j); -inf: every factor is 0 (a target far beyond or narrower than the grid)
  T sum_g;   // sum_j g~(j)   (>= 1 when off is finite)
  T sum_gu;  // sum_j g~(j) u(j)
};

// What a map's kernels need of the target, from the per-axis sums.
template <typename T>
struct TargetNorm {
  T log2_norm;                // lambda / ln 2 = log2(prod G_k + eps)
  T scale;                    // 2^(sum off_k - lambda2): q_i = prod_k g~_k(i_k) * scale
  T one_minus_rho;            // eps / (prod G + eps)
  T ubar_g[kMaxSpatialDims];  // the target factor's own mean per axis (centred pixels)
};

template <typename T>
DSNT_HD TargetNorm<T> target_norm(const TargetAxisSums<T>* axes, int dims) {
  using A = Arith<T>;
  TargetNorm<T> n;
  T log2_prod = T(0), sum_off = T(0);
  bool empty = false;
  // Loops over every axis slot with a test, not up to `dims`: a fixed trip count lets a GPU
  // compiler unroll them and keep ubar_g in registers.
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    n.ubar_g[k] = T(0);
    if (k >= dims) continue;
    const TargetAxisSums<T>& a = axes[k];
    empty = empty || a.off == -T(INFINITY);
    log2_prod += a.off + A::log2(a.sum_g);
    sum_off += a.off;
    n.ubar_g[k] = a.sum_gu / a.sum_g;
  }
  if (empty) {  // q = 0 everywhere; prod G = 0, lambda = log eps
    n.log2_norm = T(kLog2DivEps);
    n.scale = T(0);
    n.one_minus_rho = T(1);
    for (int k = 0; k < kMaxSpatialDims; ++k) n.ubar_g[k] = T(0);
    return n;
  }
  // logaddexp2(log2_prod, log2 eps), without overflow
  const T e = T(kLog2DivEps);
  const T hi = log2_prod > e ? log2_prod : e;
  const T lo = log2_prod > e ? e : log2_prod;
  n.log2_norm = dsnt_isnan(log2_prod) ? log2_prod : hi + A::log2(T(1) + A::exp2(lo - hi));
  n.scale = A::exp2(sum_off - n.log2_norm);
  n.one_minus_rho = A::exp2(e - n.log2_norm);
  return n;
}

// t_k(j) = d log q / d mu_k on axis k (docs/math.md §6), in the cancellation-free form.
template <typename V, typename T>
DSNT_HD V target_mean_grad(V u, T m, T ubar_g, T one_minus_rho, T coef_half_s2) {
  using A = Arith<V>;
  return A::splat(coef_half_s2) * ((u - A::splat(ubar_g)) + A::splat(one_minus_rho * (ubar_g - m)));
}

// t_k(j) with the target factor's own mean given as its offset from the target mean,
// offset = ubar_g,k - m_k (target_norm returns it when sum_gu holds sum_j g~(j) (u(j) - m)):
// (u - m) - rho offset, equal to target_mean_grad(u, m, m + offset, ...). A mean far from the
// axis centre (tens of pixels) rounds ubar_g to a few ulps of a large number; the offset form
// keeps those digits.
template <typename V, typename T>
DSNT_HD V target_mean_grad_offset(V u, T m, T offset, T one_minus_rho, T coef_half_s2) {
  using A = Arith<V>;
  return A::splat(coef_half_s2) * ((u - A::splat(m)) - A::splat((T(1) - one_minus_rho) * offset));
}

// S / (2 sigma^2): the factor of target_mean_grad on an axis of S pixels.
template <typename T>
DSNT_HD T target_mean_grad_coef(T sigma_t, int64_t S) {
  return T(S) * T(0.5) / (sigma_t * sigma_t);
}

// =============================================================================================
// Coordinate losses (docs/math.md §5), per map, normalized units, dims entries x first.

// Loops over every axis slot with a test, not up to `dims`: a GPU compiler unrolls a fixed trip
// count into straight code (these run once per map in every thread of the backward).
template <typename T>
DSNT_HD T coord_loss_value(const T* c, const T* t, int dims, CoordLoss kind) {
  T acc = T(0);
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    if (k >= dims) continue;  // not break: the loop would take min(dims, 3) trips
    const T d = c[k] - t[k];
    acc += kind == CoordLoss::L1 ? Arith<T>::abs(d) : d * d;
  }
  switch (kind) {
    case CoordLoss::Euclidean:
      return sqrt(acc);
    case CoordLoss::None:
      return T(0);
    default:
      return acc / T(dims);
  }
}

// d coord_loss / d c_k into grad[0..dims); euclidean's gradient at c = t is 0 (torch's choice).
// Every kind is one division per axis, d / norm, sign(d) / dims or 2 d / dims: one division with
// the operands chosen per kind (a GPU's division is a dozen instructions and a slow path).
template <typename T>
DSNT_HD void coord_loss_grad(const T* c, const T* t, int dims, CoordLoss kind, T* grad) {
  const bool euclidean = kind == CoordLoss::Euclidean;
  const T norm = euclidean ? coord_loss_value(c, t, dims, kind) : T(0);
  const T den = euclidean ? norm : T(dims);
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    if (k >= dims) continue;  // not break: the loop would take min(dims, 3) trips
    const T d = c[k] - t[k];
    T num = d;  // euclidean
    if (kind == CoordLoss::L1) num = d > T(0) ? T(1) : (d < T(0) ? T(-1) : (dsnt_isnan(d) ? d : T(0)));
    if (kind == CoordLoss::MSE) num = T(2) * d;
    const T q = num / den;
    if (euclidean && !(norm > T(0))) {
      grad[k] = dsnt_isnan(norm) ? norm : T(0);
    } else {
      grad[k] = kind == CoordLoss::None ? T(0) : q;
    }
  }
}

// =============================================================================================
// Per-map gradient set-up of the backward (docs/math.md §6).

// Upstream gradients of one map, read by the backward kernels (null pointers = zeros) and
// combined with the loss epilogue's: gamma (coords), nu (variance), omega (regularizer), and
// the coordinate loss's direct gradient to the target.
template <typename T>
struct MapUpstream {
  T gamma[kMaxSpatialDims];
  T nu[kMaxSpatialDims];
  T omega;
  T target_direct[kMaxSpatialDims];  // -(dLoss/dcl) dcl/dc: the coordinate loss's target path
};

// Inputs of one map for map_upstream; pointers are to this map's entries (dims values each) or
// null. loss_weight = grad_loss * w_m (0 when there is no loss).
template <typename T>
struct MapUpstreamInputs {
  const T* grad_coords;    // or null
  const T* grad_variance;  // or null
  T grad_reg;              // 0 when absent
  T grad_coord_loss;       // 0 when absent
  T loss_weight;           // grad_loss * w_m, 0 when absent
  const T* coords;
  const T* variance;
  const T* target;  // or null (then no coordinate loss)
  T sigma_t;
  T reg_weight;
  Regularizer reg;
  CoordLoss coord_loss;
};

template <typename T>
DSNT_HD MapUpstream<T> map_upstream(const MapUpstreamInputs<T>& in, int dims) {
  MapUpstream<T> u;
  T dcl[kMaxSpatialDims] = {T(0), T(0), T(0)};
  const T g_cl = in.grad_coord_loss + in.loss_weight;
  if (in.coord_loss != CoordLoss::None && in.target != nullptr) {
    coord_loss_grad(in.coords, in.target, dims, in.coord_loss, dcl);
  }
  u.omega = in.grad_reg + in.loss_weight * in.reg_weight;
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    const bool used = k < dims;
    const T gc = (used && in.grad_coords != nullptr) ? in.grad_coords[k] : T(0);
    // g_cl * dcl only where the loss exists: 0 * NaN (a NaN map's loss) must not leak
    const T from_loss = (used && g_cl != T(0)) ? g_cl * dcl[k] : T(0);
    u.gamma[k] = gc + from_loss;
    u.target_direct[k] = -from_loss;
    T nu = (used && in.grad_variance != nullptr) ? in.grad_variance[k] : T(0);
    if (used && in.reg == Regularizer::Var && u.omega != T(0)) {
      nu += T(2) * u.omega * (in.variance[k] - in.sigma_t * in.sigma_t);
    }
    u.nu[k] = nu;
  }
  return u;
}

// The separable part of G_i on one axis (docs/math.md §6):
//   gamma v(j) + nu [(u - ubar)^2 - 2 u ubar (1 - P)]
// with per-map coefficients. Never expanded into a polynomial in u: near the end of a long axis
// u^2 and ubar^2 are ~1e7 while (u - ubar)^2 is ~1, and float32 would lose every digit.
template <typename T>
struct AxisGrad {
  T gamma_scale, gamma_offset;  // gamma v(j) = gamma_scale u + gamma_offset
  T nu, ubar;
  T cross;  // 2 nu ubar (P - 1): the path through ubar of maps that do not sum to 1
};

template <typename T>
DSNT_HD AxisGrad<T> axis_grad_coefs(T gamma, T nu, T ubar, T mass, GridAffine<T> grid) {
  return {gamma * grid.scale, gamma * grid.offset, nu, ubar, T(2) * nu * ubar * (mass - T(1))};
}

template <typename V, typename T>
DSNT_HD V axis_grad(V u, const AxisGrad<T>& g) {
  using A = Arith<V>;
  const V d = u - A::splat(g.ubar);
  return A::splat(g.gamma_scale) * u + A::splat(g.gamma_offset) + A::splat(g.nu) * d * d +
         A::splat(g.cross) * u;
}

// The separable part of G_i minus its p-weighted mean, on one axis, for a map summing to 1:
//   gamma v(j) + nu (u - ubar)^2 - sum_j p_j [...] = gamma_scale (d - m1) + nu (d^2 - m2)
// with d = u - ubar, m1 = sum p d, m2 = sum p d^2 (of the same p). Its sum over the axes is
// G_i - sum p G without the divergence part, formed without the large, nearly equal terms
// nu (u - ubar)^2 and nu Var of a wide map, whose difference would cost their digits.
template <typename V, typename T>
DSNT_HD V axis_grad_centred(V u, const AxisGrad<T>& g, T m1, T m2) {
  using A = Arith<V>;
  const V d = u - A::splat(g.ubar);
  return A::splat(g.gamma_scale) * (d - A::splat(m1)) + A::splat(g.nu) * (d * d - A::splat(m2));
}

// A per-map scalar (beta, sigma_t): a float, or a tensor broadcastable to (B, L) read through
// its strides (no copy beyond a dtype conversion). Kernels call at(b, l).
template <typename T>
struct PerMapScalar {
  const T* data = nullptr;
  int64_t stride_b = 0;
  int64_t stride_l = 0;
  T value = T(0);
  DSNT_HD T at(int64_t b, int64_t l) const { return data ? data[b * stride_b + l * stride_l] : value; }
};

}  // namespace dsnt_cuda
