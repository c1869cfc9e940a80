// The backward of one map (docs/ops.md dsnt_bwd, docs/math.md §6, docs/performance.md §3): one
// pass over the map. Per map: map_upstream() combines the upstream gradients with the loss's into
// gamma, nu, omega; sum p G comes from stats (sum gamma c + sum nu var + omega div_grad), so the
// pass recomputes p (one exp2 for softmax), adds the separable part of G from per-axis tables
// (axis_grad) and the divergence part (js_grad_p / kl_grad_p), and writes dLoss/dz. The
// target-mean and beta gradients are reductions in the same pass, when requested.
//
// Included under namespace dsnt_cuda::cpu::DSNT_CPU_NS (kernels.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/forward_map.h"

namespace dsnt_cuda::cpu::DSNT_CPU_NS {

// This map's entries of the backward's inputs and outputs.
template <typename T>
struct MapGrads {
  MapUpstreamInputs<T> upstream;  // map_upstream's inputs
  const T* stats;
  T* grad_logits;
  T* grad_target;  // dims values, written always (0 unless needs_target_grad)
  T* grad_beta;    // or null
};

// What the element pass accumulates besides dLoss/dz (vectors, summed once per map). The
// constructor is written out: g++ compiles an implicit one without the AVX2 unit's target
// pragma, out of line, called through the PLT.
template <typename T>
struct PassSums {
  Vec<T> target[kMaxSpatialDims];
  Vec<T> beta;
  PassSums() : target{Vec<T>(T(0)), Vec<T>(T(0)), Vec<T>(T(0))}, beta(T(0)) {}
};

// Which divergence the element pass adds (none when the regularizer has no upstream gradient).
enum class DivTerm { None, JS, KL };

// The element pass. omega_scaled = omega ln2/2 (JS) or omega ln2 (KL): G's divergence term is
// omega_scaled * js_grad_p / kl_grad_p. target_grad: accumulate sum_i w_i t_k(i_k);
// beta_grad: accumulate sum_i (z_i - shift) dLoss/dz_i (softmax).
template <DivTerm kDiv, typename T, typename Prob>
inline void backward_pass(const T* z, const Prob prob, const Workspace<T>& ws, T omega_scaled,
                          bool target_grad, bool beta_grad, T shift, T* gz, PassSums<T>& out_sums) {
  PassSums<T> sums;  // a local: the stores to gz cannot alias it
  const Axes<T>& ax = ws.axes;
  const TargetTables<T>& tt = ws.target;
  const int64_t W = ax.width;
  const T* grad_x = ws.grads.axis[0].data();
  const T* lx = tt.target_log2[0].data();
  const T* fx = tt.target_factor[0].data();
  const T* tx = ws.mean_grads.axis[0].data();
  const Vec<T> vomega(omega_scaled), vshift(shift);
  const Vec<T> lowest(std::numeric_limits<T>::lowest());
  for_each_row(ax, [&](int64_t r, int64_t y, int64_t zi) DSNT_INLINE_LAMBDA {
    const Vec<T> row_grad(ws.grads.row[r]);
    const T* zr = z + r * W;
    T* gr = gz + r * W;
    Vec<T> row_l2q(T(0)), row_q(T(0)), row_w(T(0)), row_wt(T(0)), row_beta(T(0));
    if constexpr (kDiv != DivTerm::None) {
      row_l2q = Vec<T>(tt.row_target_log2[r]);
      row_q = Vec<T>(tt.row_target_factor[r]);
    }
    for_each_vector<T>(W, [&](int64_t x, int64_t n) DSNT_INLINE_LAMBDA {
      const Vec<T> zv = load_part(zr + x, n, T(0));
      Vec<T> g = load_part(grad_x + x, n, T(0)) + row_grad;
      Vec<T> p;
      if constexpr (kDiv == DivTerm::None) {
        p = prob.prob(zv);
      } else {
        Vec<T> l2p;
        prob.p_and_log2(zv, p, l2p);
        p = zero_tail(p, n);
        const Vec<T> l2q = floor_log2(load_part(lx + x, n, T(0)) + row_l2q);
        const Vec<T> q = target_prob(load_part(fx + x, n, T(0)), row_q, l2q);
        if constexpr (kDiv == DivTerm::JS) {
          g = g + vomega * js_grad_p(p, l2p, q, l2q, Prob::kExact);
          if (target_grad) {
            const Vec<T> w = js_target_weight(p, l2p, q, l2q);
            row_wt = row_wt + w * load_part(tx + x, n, T(0));
            row_w = row_w + w;
          }
        } else {
          g = g + vomega * kl_grad_p(p, l2p, q, l2q, Prob::kExact);
          if (target_grad) {
            const Vec<T> w = kl_target_weight(p, q);
            row_wt = row_wt + w * load_part(tx + x, n, T(0));
            row_w = row_w + w;
          }
        }
      }
      const Vec<T> dz = prob.grad_logit(zv, p, g);
      dz.store(gr + x, n);
      // (z - shift) dz; z = -inf has dz = 0 and must add 0, not -inf * 0
      if (beta_grad) row_beta = row_beta + zero_tail(at::vec::clamp_min(zv - vshift, lowest) * dz, n);
    });
    // per row, then over the rows (see kBlockRows)
    sums.beta = sums.beta + row_beta;
    if (target_grad) {
      sums.target[0] = sums.target[0] + row_wt;
      sums.target[1] = sums.target[1] + Vec<T>(ws.mean_grads.axis[1][y]) * row_w;
      sums.target[2] = sums.target[2] + Vec<T>(ws.mean_grads.axis[2][zi]) * row_w;
    }
  });
  out_sums = sums;
}

// R_k = sum_i p_i (u_k - ubar_k) for every axis, from one pass over the map: the variance's
// path through ubar (docs/math.md §6: -2 u ubar (1 - P) per element, i.e. -2 u R_k with
// R_k = ubar_k (1 - P) when ubar_k is exact). ubar_k in stats is rounded to T: on a long axis
// (|u| ~ 4000) by up to 1e-4 px, and the variance's gradient then carries 2 (u - ubar) times
// that rounding, as much as the gradient's own size on a sharp map; the exact residual R_k of
// the rounded ubar_k cancels it to second order, as autograd's chain through the mean does.
template <typename T, typename Prob>
inline void mean_residuals(const T* z, const Prob prob, Workspace<T>& ws, const T* ubar, T* residual) {
  const Axes<T>& ax = ws.axes;
  for (int k = 0; k < ax.dims; ++k) {
    const T* u = ax.u[k].data();
    T* out = ws.centred[k].data();
    const Vec<T> vubar(ubar[k]);
    for_each_vector<T>(ax.size[k], [&](int64_t j, int64_t n) DSNT_INLINE_LAMBDA {
      (load_part(u + j, n, T(0)) - vubar).store(out + j, n);
    });
  }
  const T* cx = ws.centred[0].data();
  const int64_t W = ax.width;
  Vec<T> acc[kMaxSpatialDims] = {Vec<T>(T(0)), Vec<T>(T(0)), Vec<T>(T(0))};
  for_each_row(ax, [&](int64_t r, int64_t y, int64_t zi) DSNT_INLINE_LAMBDA {
    const T* zr = z + r * W;
    Vec<T> row(T(0));
    for_each_vector<T>(W, [&](int64_t x, int64_t n) DSNT_INLINE_LAMBDA {
      const Vec<T> p = zero_tail(prob.prob(load_part(zr + x, n, T(0))), n);
      acc[0] = acc[0] + p * load_part(cx + x, n, T(0));
      row = row + p;
    });
    acc[1] = acc[1] + Vec<T>(ws.centred[1][y]) * row;
    acc[2] = acc[2] + Vec<T>(ws.centred[2][zi]) * row;
  });
  for (int k = 0; k < ax.dims; ++k) residual[k] = hsum(acc[k]);
}

// Whether R_k needs its own pass: the variance has an upstream gradient and either the map is
// "none" (P != 1: R_k is its whole cross term) or |ubar_k| > 8 sqrt(var_k) (the rounding of
// ubar_k is more than ~8 ulps of the variance's gradient).
template <typename T>
inline bool needs_mean_residuals(const MapUpstream<T>& up, const MapNormalizer<T>& nm, const T* stats,
                                 const T* variance, int dims) {
  if (nm.uniform) return false;  // its logits gradient is 0
  for (int k = 0; k < dims; ++k) {
    if (up.nu[k] == T(0)) continue;
    const T ubar = stats[kStatMean + k];
    if (nm.mode == Normalization::None || ubar * ubar > T(64) * variance[k]) return true;
  }
  return false;
}

// The per-axis coefficients of G (axis_grad_coefs, the cross term from R_k when `residual` is
// given), and sum p G into the row table. ubar and the mass are left out where nu = 0, so that a
// NaN map's ubar does not reach a gradient that does not depend on it.
template <typename T>
inline void gradient_tables(const MapUpstream<T>& up, const MapNormalizer<T>& nm, const T* stats,
                            const T* coords, const T* variance, const T* residual, T omega_div_grad,
                            bool normalized, Workspace<T>& ws) {
  const Axes<T>& ax = ws.axes;
  AxisGrad<T> coefs[kMaxSpatialDims];
  T sum_pg = omega_div_grad;
  for (int k = 0; k < ax.dims; ++k) {
    const T nu = up.nu[k];
    const bool with_nu = nu != T(0);
    const T ubar = with_nu ? stats[kStatMean + k] : T(0);
    coefs[k] = axis_grad_coefs(up.gamma[k], nu, ubar, with_nu ? nm.mass : T(1),
                               grid_affine<T>(ax.size[k], normalized));
    sum_pg += up.gamma[k] * coords[k];
    if (!with_nu) continue;
    if (residual != nullptr) {
      // sum p G_var = nu [var - 2 R sum p u], sum p u = ubar P + R
      coefs[k].cross = T(-2) * nu * residual[k];
      sum_pg += nu * (variance[k] - T(2) * residual[k] * (ubar * nm.mass + residual[k]));
    } else {
      sum_pg += nu * variance[k];
    }
  }
  // maps that sum to 1: dLoss/dz uses G - sum p G; "none" maps use G itself
  ws.grads.build(ax, coefs, nm.mode == Normalization::None ? T(0) : -sum_pg);
}

// A NaN softmax map (see forward_map): NaN wherever a gradient flows. grad_target already holds
// the coordinate loss's path (NaN where the loss flows); the divergence's adds NaN.
template <typename T>
inline void write_nan_grads(bool div_target, int dims, int64_t n, const MapGrads<T>& out) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  fill_values(out.grad_logits, n, nan);
  if (div_target) fill_values(out.grad_target, int64_t{dims}, nan);
  if (out.grad_beta != nullptr) *out.grad_beta = nan;
}

template <typename T>
inline MapNormalizer<T> normalizer_from_stats(const T* stats, T beta, Normalization mode, int64_t n) {
  MapNormalizer<T> nm;
  nm.mode = mode;
  nm.beta = beta;
  nm.map_size = n;
  nm.shift = stats[kStatShift];
  nm.denom = stats[kStatDenom];
  nm.mass = stats[kStatMass];
  nm.derive();
  return nm;
}

// One map. reg_path: the regularizer has an upstream gradient; needs_target_grad: write
// grad_target (else zeros).
template <typename T>
void backward_map(const T* z, const MapInputs<T>& in, const OpOptions& o, bool reg_path,
                  bool needs_target_grad, Workspace<T>& ws, const MapGrads<T>& out) {
  const Axes<T>& ax = ws.axes;
  const int dims = ax.dims;
  const MapUpstream<T> up = map_upstream(out.upstream, dims);
  const bool div = o.divergence() && reg_path;
  const bool target_grad = div && needs_target_grad;
  for (int k = 0; k < dims; ++k) out.grad_target[k] = needs_target_grad ? up.target_direct[k] : T(0);
  if (out.grad_beta != nullptr) *out.grad_beta = T(0);

  const MapNormalizer<T> nm = normalizer_from_stats(out.stats, in.beta, o.normalization, ax.map_size);
  if (o.normalization == Normalization::Softmax && !(std::isfinite(nm.shift) && std::isfinite(nm.denom))) {
    write_nan_grads(target_grad, dims, ax.map_size, out);
    return;
  }
  const T div_scale = o.reg == Regularizer::JS ? T(0.5 * kLn2) : T(kLn2);
  T residual[kMaxSpatialDims] = {0, 0, 0};
  const bool with_residual = needs_mean_residuals(up, nm, out.stats, out.upstream.variance, dims);
  if (with_residual) {
    with_prob(nm, [&](const auto& prob)
                      DSNT_INLINE_LAMBDA { mean_residuals(z, prob, ws, out.stats + kStatMean, residual); });
  }
  gradient_tables(up, nm, out.stats, out.upstream.coords, out.upstream.variance,
                  with_residual ? residual : nullptr, div ? up.omega * out.stats[kStatDivGrad] : T(0),
                  o.normalized, ws);
  if (div) {
    ws.target.build(ax, in.mu, in.sigma_t);
    if (target_grad) ws.mean_grads.build(ax, ws.target, in.sigma_t);
  }
  const bool beta_grad = out.grad_beta != nullptr && o.normalization == Normalization::Softmax;
  PassSums<T> sums;
  with_prob(nm, [&](const auto& prob) DSNT_INLINE_LAMBDA {
    const T omega_scaled = up.omega * div_scale;
    if (!div) {
      backward_pass<DivTerm::None>(z, prob, ws, T(0), false, beta_grad, nm.shift, out.grad_logits, sums);
    } else if (o.reg == Regularizer::JS) {
      backward_pass<DivTerm::JS>(z, prob, ws, omega_scaled, target_grad, beta_grad, nm.shift, out.grad_logits,
                                 sums);
    } else {
      backward_pass<DivTerm::KL>(z, prob, ws, omega_scaled, target_grad, beta_grad, nm.shift, out.grad_logits,
                                 sums);
    }
  });
  if (target_grad) {
    for (int k = 0; k < dims; ++k) out.grad_target[k] += up.omega * hsum(sums.target[k]);
  }
  if (beta_grad) *out.grad_beta = hsum(sums.beta) / nm.beta;
}

}  // namespace dsnt_cuda::cpu::DSNT_CPU_NS
