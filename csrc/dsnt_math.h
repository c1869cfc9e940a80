// The per-element math of DSNT, written once for every C++ backend.
//
// Everything here is a host-and-device inline function of scalars, so the CPU kernels (and the
// CPU tests) run exactly the formulas the CUDA kernels run. `T` is the accumulation type:
// float for float16 / bfloat16 / float32 logits, double for float64 logits.
// The formulas are those of ../shared/DESIGN.md §1-2 and csrc/OPS.md.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DSNT_HD __host__ __device__ __forceinline__
#else
#define DSNT_HD inline
#endif

namespace dsnt_cuda {

constexpr int kMaxSpatialDims = 3;

// How logits become a probability map (csrc/OPS.md).
enum class Normalization : int { Softmax = 0, Abs = 1, Relu = 2, Sigmoid = 3, None = 4 };

// Which regularizer is computed per map.
enum class Regularizer : int { None = 0, JS = 1, KL = 2, Var = 3 };

// dsntnn's epsilon inside the logarithms. It is only ever added in the accumulation type
// (float or double): 1e-24 is a normal float, whereas in float16 it would flush to 0 and turn
// 0 * log(0) into NaN (dsntnn's float16 defect).
template <typename T>
DSNT_HD T div_eps() {
  return T(1e-24);
}

// Coordinate of index j on an axis of length S: pixel centres in (-1, 1) or plain pixels.
template <typename T>
DSNT_HD T grid_value(int64_t j, int64_t S, bool normalized) {
  return normalized ? T(2 * j + 1) / T(S) - T(1) : T(j);
}

// Rectification r(z) of the sum-normalized modes. Softmax and None never call it.
template <typename T>
DSNT_HD T rectify(T z, Normalization mode) {
  switch (mode) {
    case Normalization::Abs:
      return z < T(0) ? -z : z;
    case Normalization::Relu:
      return z <= T(0) ? T(0) : z;  // a NaN logit stays NaN (NaN <= 0 is false): its map is NaN
    case Normalization::Sigmoid:
      return T(1) / (T(1) + exp(-z));
    default:
      return z;
  }
}

// r'(z), with autograd's conventions at the kinks: abs'(0) = 0 (sign) and relu'(0) = 0.
template <typename T>
DSNT_HD T rectify_grad(T z, Normalization mode) {
  switch (mode) {
    case Normalization::Abs:
      return z > T(0) ? T(1) : (z < T(0) ? T(-1) : T(0));
    case Normalization::Relu:
      return z > T(0) ? T(1) : T(0);
    case Normalization::Sigmoid: {
      const T s = T(1) / (T(1) + exp(-z));
      return s * (T(1) - s);
    }
    default:
      return T(1);
  }
}

// Unnormalized separable Gaussian factor of the target along one axis:
// g(j) = exp(-(v(j) - mu)^2 / (2 s^2)) with s = 2 sigma_t / S, always on the normalized grid
// (the target means are in normalized units whatever grid the coordinates use).
template <typename T>
DSNT_HD T gauss_factor(int64_t j, int64_t S, T mu, T sigma_t) {
  const T s = T(2) * sigma_t / T(S);
  const T d = grid_value<T>(j, S, true) - mu;
  return exp(-d * d / (T(2) * s * s));
}

// d log g(j) / d mu = (v(j) - mu) / s^2: the per-axis piece of the target-mean gradient.
template <typename T>
DSNT_HD T gauss_log_grad(int64_t j, int64_t S, T mu, T sigma_t) {
  const T s = T(2) * sigma_t / T(S);
  return (grid_value<T>(j, S, true) - mu) / (s * s);
}

// One element of KL(p || q) = sum p (log(p+eps) - log(q+eps)) and its partial derivatives.
template <typename T>
struct DivergenceTerm {
  T value;  // the summand
  T d_p;    // d summand / d p
  T d_q;    // d summand / d q
};

template <typename T>
DSNT_HD DivergenceTerm<T> kl_term(T p, T q) {
  const T eps = div_eps<T>();
  const T log_ratio = log(p + eps) - log(q + eps);
  return {p * log_ratio, log_ratio + p / (p + eps), -p / (q + eps)};
}

// One element of JS(p, q) = KL(p || m)/2 + KL(q || m)/2 with m = (p + q)/2.
template <typename T>
DSNT_HD DivergenceTerm<T> js_term(T p, T q) {
  const T eps = div_eps<T>();
  const T m = T(0.5) * (p + q);
  const T log_m = log(m + eps);
  const T log_p = log(p + eps);
  const T log_q = log(q + eps);
  const T m_ratio = m / (m + eps);
  const T value = T(0.5) * (p * (log_p - log_m) + q * (log_q - log_m));
  const T d_p = T(0.5) * (log_p - log_m + p / (p + eps) - m_ratio);
  const T d_q = T(0.5) * (log_q - log_m + q / (q + eps) - m_ratio);
  return {value, d_p, d_q};
}

template <typename T>
DSNT_HD DivergenceTerm<T> divergence_term(T p, T q, Regularizer reg) {
  return reg == Regularizer::KL ? kl_term<T>(p, q) : js_term<T>(p, q);
}

// Combine two partial (max, sum of exp(x - max)) pairs of an online softmax normalizer.
// A partial with max = -inf (nothing seen yet, or only -inf logits) contributes nothing.
template <typename T>
DSNT_HD void combine_max_sum(T& max_a, T& sum_a, T max_b, T sum_b) {
  if (max_b == -INFINITY) return;
  if (max_a == -INFINITY) {
    max_a = max_b;
    sum_a = sum_b;
    return;
  }
  if (max_b > max_a) {
    sum_a = sum_a * exp(max_a - max_b) + sum_b;
    max_a = max_b;
  } else {
    sum_a = sum_a + sum_b * exp(max_b - max_a);
  }
}

}  // namespace dsnt_cuda
