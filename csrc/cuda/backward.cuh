// The backward of dsnt_fwd: one pass over the logits (read once, gradient written once) in
// every size class (docs/math.md §6, docs/performance.md §3).
//
// sum_j p_j G_j comes from the forward's stats (sum gamma c + sum nu var + omega div_grad), so
// a group needs no reduction before it writes dLoss/dz. Per map, the separable part of G is
// tabulated per x (axis_grad on x) and per virtual row (y and z, plus every per-map constant);
// per element:
//   softmax + JS (the standard loss):  e = 2^a, L = log2(e + q D) from the target tables,
//                                      dz = e (G_x + G_row + omega' (a - L)), tables scaled by
//                                      beta / D (the fast form of docs/math.md §7.2);
//   other modes:                       p, log2 p, q, log2 q and dsnt_math.h's js_grad_p /
//                                      kl_grad_p, rectify_grad.
// A group is a warp (warp class: small maps, 8 per CTA) or a CTA; a map larger than a CTA's
// tile is split into `slices` CTAs. The target-mean and beta gradients are reductions in the
// same pass: each group adds its share to `partials` (summed over slices by the host when a map
// is split).
#pragma once

#include "forward_kernel.cuh"

namespace dsnt_cuda {

template <typename T>
struct BwdTables {
  T *xg, *xl, *xgrad, *xt;         // x: target factor, log2 factor, gradient part, d log q / d mu_x
  T *yg, *yl, *zg, *zl;            // y, z target factors
  T *rg, *rl, *rgrad, *rty, *rtz;  // rows: g~_yz, l_yz, gradient part (+ constants), t_y, t_z
};

template <typename T>
DSNT_DEV BwdTables<T> carve_backward_tables(unsigned char* block, const SmemPlan& sp) {
  auto at = [&](int i) { return reinterpret_cast<T*>(block + sp.table[i]); };
  return {at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7), at(8), at(9), at(10), at(11), at(12)};
}

// Per-map constants of the backward.
template <typename T>
struct BwdMap {
  MapUpstream<T> up;
  AxisGrad<T> ax[kMaxSpatialDims];
  T shift, bl, beta, inv_p, log2_inv_p, mass;
  bool uniform, div;  // uniform fallback; the divergence term is needed (omega != 0)
  bool var_grad;      // a variance upstream (nu != 0) on a normalized map: see backward_map
  T table_scale;      // gradient tables are scaled by this (softmax + JS: beta / D)
  T row_const;        // added to every row's gradient part: -sum p G (+ omega' for JS)
  T omega_s;          // omega times the regularizer's scale (ln2/2 JS, ln2 KL), x table_scale
  TargetNorm<T> tn;
  T t_coef[kMaxSpatialDims];  // S_k / (2 sigma_t^2)
  TargetAxis<T> axes[kMaxSpatialDims];
};

template <bool kStandard, typename scalar_t>
DSNT_DEV BwdMap<acc_t<scalar_t>> backward_map_constants(const BwdArgs<scalar_t>& a, int m, uint32_t b,
                                                        uint32_t l) {
  using T = acc_t<scalar_t>;
  const TileLayout& L = a.layout;
  const auto md = modes_view<kStandard>(a.modes);
  const int n = L.dims;
  const int64_t mn = static_cast<int64_t>(m) * n;
  BwdMap<T> s{};
  const T* st = a.stats + static_cast<int64_t>(m) * stats_size(n);
  const T sigma_t = per_map_value(a.sigma_t, b, l);
  T loss_weight = T(0);
  if (a.grad_loss != nullptr) {
    const T total = a.mask != nullptr ? *a.mask_total : T(a.maps);
    loss_weight = *a.grad_loss * (a.mask != nullptr ? a.mask[m] : T(1)) / (total > T(1) ? total : T(1));
  }
  MapUpstreamInputs<T> in{a.grad_coords ? a.grad_coords + mn : nullptr,
                          a.grad_variance ? a.grad_variance + mn : nullptr,
                          a.grad_reg ? a.grad_reg[m] : T(0),
                          a.grad_coord_losses ? a.grad_coord_losses[m] : T(0),
                          loss_weight,
                          a.coords + mn,
                          a.variance + mn,
                          a.target ? a.target + mn : nullptr,
                          sigma_t,
                          a.reg_weight,
                          md.reg(),
                          a.coord_loss};
  s.up = map_upstream(in, n);
  s.shift = st[kStatShift];
  const T denom = st[kStatDenom];
  s.mass = st[kStatMass];
  s.beta = per_map_value(a.beta, b, l);
  s.bl = s.beta * T(kLog2e);
  s.uniform = md.rectified() && denom == T(0);
  s.inv_p = md.none() ? T(1) : (s.uniform ? T(1) / T(L.map_size) : T(1) / denom);
  s.log2_inv_p = md.none() ? T(0) : -Arith<T>::log2(s.uniform ? T(L.map_size) : denom);
  s.div = md.divergence() && s.up.omega != T(0);
  const bool hot = md.softmax_js();  // the element pass's form (backward_kernel.cuh), omega 0 or not
  s.table_scale = hot ? s.beta * s.inv_p : T(1);
  T sub = T(0);  // sum_j p_j G_j (docs/math.md §6); "none" subtracts nothing
  // every axis slot with a test, not up to n: a fixed trip count keeps s in registers (an array
  // indexed at run time lives in local memory, and then so does every flag read from it)
#pragma unroll
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    s.ax[k] = AxisGrad<T>{T(0), T(0), T(0), T(0), T(0)};
    if (k >= n) continue;
    s.ax[k] = axis_grad_coefs(s.up.gamma[k], s.up.nu[k], st[kStatMean + k], s.mass,
                              grid_affine<T>(L.size[k], a.normalized));
    sub += s.up.gamma[k] * a.coords[mn + k] + s.up.nu[k] * a.variance[mn + k];
  }
  const T reg_scale = md.reg() == Regularizer::JS ? T(0.5 * kLn2) : T(kLn2);
  const T omega = s.div ? s.up.omega * reg_scale : T(0);
  sub += s.div ? s.up.omega * st[kStatDivGrad] : T(0);
  if (md.none()) sub = T(0);
  s.var_grad = !kStandard && !md.none() && !s.uniform && a.slices == 1 &&
               (s.up.nu[0] != T(0) || s.up.nu[1] != T(0) || s.up.nu[2] != T(0));
  // sum p G of the divergence alone when the tables are centred (var_grad), else all of it
  const T div_sub = s.div ? s.up.omega * st[kStatDivGrad] : T(0);
  s.row_const = s.table_scale * ((hot ? omega : T(0)) - (s.var_grad ? div_sub : sub));
  s.omega_s = s.table_scale * omega;
  if (md.divergence()) {
    target_axes(a.target + mn, sigma_t, L.size, n, s.axes);
#pragma unroll
    for (int k = 0; k < kMaxSpatialDims; ++k)
      s.t_coef[k] = k < n ? target_mean_grad_coef(sigma_t, L.size[k]) : T(0);
  }
  return s;
}

}  // namespace dsnt_cuda
