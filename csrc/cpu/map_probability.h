// How one map's probabilities p and their log2 are formed from the logits (docs/math.md §2,
// §7.1: log2 p is analytic for softmax, one real logarithm for the other normalizations), as
// small policy types the element loops are instantiated with:
//
//   prob(z, w), log2_prob(z, w)   forward, from the logit z and its stored weight w
//   p_and_log2(z, p, l2p), prob(z) backward, from the logit alone (one exp2 for softmax)
//   grad_logit(z, p, g)           dLoss/dz from g = G - sum p G (docs/math.md §6)
//   kExact                        the divergence gradient needs dsntnn's eps form (§7.2)
//
// MapNormalizer holds a map's stats slots and what the policies derive from them once per map.
//
// Included under namespace dsnt_cuda::cpu::DSNT_CPU_NS (kernels.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/vec_arith.h"

namespace dsnt_cuda::cpu::DSNT_CPU_NS {

template <typename T>
DSNT_ALWAYS_INLINE Vec<T> floor_log2(const Vec<T>& x) {
  return at::vec::clamp_min(x, Vec<T>(Precision<T>::kLog2Floor));
}

template <typename T>
struct MapNormalizer {
  Normalization mode = Normalization::Softmax;
  T beta = 1;
  int64_t map_size = 1;
  // stats slots (docs/ops.md)
  T shift = 0, denom = 1, mass = 1;
  // p = (w * pre) * inv, inv = 1 / scaled_denom; pre = 2^64 when 1 / denom would overflow (a
  // rectified sum below the reciprocal of the largest float: its weights are as tiny, and
  // scaling them is exact).
  T pre = 1, scaled_denom = 1, inv = 1, log2_denom = 0;
  bool uniform = false;  // a rectified map with sum 0: p = 1/N, zero logits gradient

  // Fills pre, inv, log2_denom and uniform from mode, denom and map_size.
  void derive() {
    switch (mode) {
      case Normalization::None:
        return;
      case Normalization::Softmax:
        scaled_denom = denom;
        inv = T(1) / denom;
        log2_denom = std::log2(denom);
        return;
      default:
        uniform = denom == T(0);
        if (uniform) {
          scaled_denom = T(map_size);
          inv = T(1) / scaled_denom;
          log2_denom = std::log2(scaled_denom);
          return;
        }
        constexpr T kTiny = T(5.421010862427522e-20);  // 2^-64
        pre = denom < kTiny ? T(18446744073709551616.0) : T(1);
        scaled_denom = denom * pre;
        inv = T(1) / scaled_denom;
        log2_denom = std::log2(denom);
    }
  }
};

template <typename T>
struct SoftmaxProb {
  static constexpr bool kExact = false;  // its divergence gradient is multiplied by p
  T shift, beta, beta_log2e, inv, log2_denom;

  Vec<T> weight_log2(const Vec<T>& z) const { return softmax_log2_weight(z, shift, beta_log2e); }
  Vec<T> prob(const Vec<T>&, const Vec<T>& w) const { return w * Vec<T>(inv); }
  Vec<T> log2_prob(const Vec<T>& z, const Vec<T>&) const {
    return floor_log2(weight_log2(z) - Vec<T>(log2_denom));
  }
  Vec<T> prob(const Vec<T>& z) const { return Arith<Vec<T>>::exp2(weight_log2(z)) * Vec<T>(inv); }
  void p_and_log2(const Vec<T>& z, Vec<T>& p, Vec<T>& l2p) const {
    const Vec<T> a = weight_log2(z);
    p = Arith<Vec<T>>::exp2(a) * Vec<T>(inv);
    l2p = floor_log2(a - Vec<T>(log2_denom));
  }
  Vec<T> grad_logit(const Vec<T>&, const Vec<T>& p, const Vec<T>& g) const { return Vec<T>(beta) * p * g; }
};

template <typename T>
struct RectifiedProb {
  static constexpr bool kExact = true;
  Normalization mode;
  T pre, inv, log2_denom;

  Vec<T> prob(const Vec<T>&, const Vec<T>& w) const { return (w * Vec<T>(pre)) * Vec<T>(inv); }
  Vec<T> log2_prob(const Vec<T>& z, const Vec<T>& w) const {
    return floor_log2(rectified_log2(z, w, mode) - Vec<T>(log2_denom));
  }
  Vec<T> prob(const Vec<T>& z) const { return prob(z, rectify(z, mode)); }
  void p_and_log2(const Vec<T>& z, Vec<T>& p, Vec<T>& l2p) const {
    const Vec<T> r = rectify(z, mode);
    p = prob(z, r);
    l2p = log2_prob(z, r);
  }
  // r'(z) g / denom, as ((g pre) inv) so that only a result that is itself out of range overflows.
  // relu selects rather than multiplies, as torch's threshold_backward: 0 where z <= 0 even for
  // a NaN g, g itself elsewhere (a NaN z included).
  Vec<T> grad_logit(const Vec<T>& z, const Vec<T>&, const Vec<T>& g) const {
    const Vec<T> scaled = (g * Vec<T>(pre)) * Vec<T>(inv);
    if (mode == Normalization::Relu) return Vec<T>::blendv(scaled, Vec<T>(T(0)), z <= Vec<T>(T(0)));
    return rectify_grad(z, mode) * scaled;
  }
};

// The uniform fallback of a rectified map whose sum is 0: p = 1/N, no dependence on z.
template <typename T>
struct UniformProb {
  static constexpr bool kExact = true;
  T p_value, log2_p_value;

  Vec<T> prob(const Vec<T>&, const Vec<T>&) const { return Vec<T>(p_value); }
  Vec<T> log2_prob(const Vec<T>&, const Vec<T>&) const { return Vec<T>(log2_p_value); }
  Vec<T> prob(const Vec<T>&) const { return Vec<T>(p_value); }
  void p_and_log2(const Vec<T>&, Vec<T>& p, Vec<T>& l2p) const {
    p = Vec<T>(p_value);
    l2p = Vec<T>(log2_p_value);
  }
  Vec<T> grad_logit(const Vec<T>&, const Vec<T>&, const Vec<T>&) const { return Vec<T>(T(0)); }
};

// "none": the logits are the heatmap (p = z, need not sum to 1).
template <typename T>
struct HeatmapProb {
  static constexpr bool kExact = true;

  Vec<T> prob(const Vec<T>& z, const Vec<T>&) const { return z; }
  Vec<T> log2_prob(const Vec<T>& z, const Vec<T>&) const { return floor_log2(Arith<Vec<T>>::log2(z)); }
  Vec<T> prob(const Vec<T>& z) const { return z; }
  void p_and_log2(const Vec<T>& z, Vec<T>& p, Vec<T>& l2p) const {
    p = z;
    l2p = log2_prob(z, z);
  }
  Vec<T> grad_logit(const Vec<T>&, const Vec<T>&, const Vec<T>& g) const { return g; }
};

// Calls fn(policy) with the map's policy. The element loops take it by value: a local copy
// cannot be aliased by their stores, so its fields stay in registers.
template <typename T, typename Fn>
DSNT_ALWAYS_INLINE void with_prob(const MapNormalizer<T>& nm, Fn&& fn) {
  switch (nm.mode) {
    case Normalization::Softmax:
      fn(SoftmaxProb<T>{nm.shift, nm.beta, nm.beta * T(kLog2e), nm.inv, nm.log2_denom});
      return;
    case Normalization::None:
      fn(HeatmapProb<T>{});
      return;
    default:
      if (nm.uniform) {
        fn(UniformProb<T>{nm.inv, -nm.log2_denom});
      } else {
        fn(RectifiedProb<T>{nm.mode, nm.pre, nm.inv, nm.log2_denom});
      }
  }
}

}  // namespace dsnt_cuda::cpu::DSNT_CPU_NS
