// The forward of one map (docs/ops.md dsnt_fwd, docs/performance.md §3): the map stays in L1 /
// L2 between passes; only the first reads memory.
//   1. softmax: shift = max z (NaN-aware: a NaN, +inf or all -inf map is a NaN map);
//   2. the weights w (2^(beta (z - shift) log2 e), r(z), or z itself), stored, with per-row
//      sums and the x-marginal: denom, the marginals of every axis;
//   3. moments from the marginals: ubar, then the variance about it (two passes over O(S_k));
//   4. js / kl: one pass of add_js_terms / add_kl_terms against the per-axis target tables.
// Then the per-map outputs: coords, variance, reg_losses, coord_losses and stats.
//
// Included under namespace dsnt_cuda::cpu::DSNT_CPU_NS (kernels.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/map_probability.h"
#include "cpu/map_tables.h"

namespace dsnt_cuda::cpu::DSNT_CPU_NS {

// Per-map inputs read by both directions.
template <typename T>
struct MapInputs {
  T beta = 1, sigma_t = 1;
  const T* mu = nullptr;  // target means (dims values, normalized units), or null
};

// This map's entries of the forward outputs; coord_loss is null without a coordinate loss.
template <typename T>
struct MapOutputs {
  T* coords;
  T* variance;
  T* reg_loss;
  T* coord_loss;
  T* stats;
};

// Float sums grow their error with the number of terms added one after the other: rows enter
// the x-marginal in blocks of kBlockRows, vectors a row's sum in blocks of kBlockVectors, so the
// error grows with about block + count / block terms (a 64-row marginal of a "none" map summing
// to 2700 was twice as far off as torch's cascade sum).
constexpr int64_t kBlockRows = 8;
constexpr int64_t kBlockVectors = 8;

// Sums the weights weight_fn(z) of the map (stored into `weights` when kStore): per-row sums,
// the marginal of every axis (Workspace::marginal) and the total. weight_fn is taken by value
// and captures by value: what it reads is then a local the stores to `weights` cannot alias, kept
// in registers (read through references it was loaded again for every vector).
template <bool kStore, typename T, typename WeightFn>
inline T weigh_map(const T* z, Workspace<T>& ws, const WeightFn weight_fn, T* weights) {
  const Axes<T>& ax = ws.axes;
  const int64_t W = ax.width;
  T* mx = ws.marginal[0].data();
  T* block = ws.block_marginal.data();
  fill_values(mx, W, T(0));
  for (int64_t r = 0; r < ax.rows; ++r) {
    if (r % kBlockRows == 0) fill_values(block, W, T(0));
    const T* zr = z + r * W;
    Vec<T> acc(T(0)), part(T(0));
    int64_t count = 0;
    for_each_vector<T>(W, [&](int64_t x, int64_t n) DSNT_INLINE_LAMBDA {
      const Vec<T> w = zero_tail(weight_fn(load_part(zr + x, n, T(0))), n);
      if constexpr (kStore) w.store(weights + r * W + x, n);
      (load_part(block + x, n, T(0)) + w).store(block + x, n);
      part = part + w;
      if (++count == kBlockVectors) {
        acc = acc + part;
        part = Vec<T>(T(0));
        count = 0;
      }
    });
    (acc + part).store(ws.row_vec.data() + r * kLanes<T>);
    if (r % kBlockRows == kBlockRows - 1 || r == ax.rows - 1) {
      for_each_vector<T>(W, [&](int64_t x, int64_t n) DSNT_INLINE_LAMBDA {
        (load_part(mx + x, n, T(0)) + load_part(block + x, n, T(0))).store(mx + x, n);
      });
    }
  }
  row_sums(ws.row_vec.data(), ax.rows, ws.row_sum.data());
  // y and z marginals from the row sums; the total as the sum of the z marginal
  const int64_t H = ax.size[1];
  T* my = ws.marginal[1].data();
  T* mz = ws.marginal[2].data();
  fill_values(my, H, T(0));
  T total = 0;
  for (int64_t zi = 0; zi < ax.size[2]; ++zi) {
    const T* rs = ws.row_sum.data() + zi * H;
    Vec<T> acc(T(0));
    for_each_vector<T>(H, [&](int64_t y, int64_t n) DSNT_INLINE_LAMBDA {
      const Vec<T> v = load_part(rs + y, n, T(0));
      (load_part(my + y, n, T(0)) + v).store(my + y, n);
      acc = acc + v;
    });
    mz[zi] = hsum(acc);
    total += mz[zi];
  }
  return total;
}

// The uniform fallback's weights: every weight 1 (its marginals: the counts of the other axes).
template <typename T>
inline void uniform_weights(Workspace<T>& ws) {
  const Axes<T>& ax = ws.axes;
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    ws.marginal[k].fill(T(ax.map_size / ax.size[k]));
  }
}

// Normalization passes 1-2: the normalizer of the map from its logits, weights stored in
// ws.weight (softmax / rectified). Returns false for a NaN softmax map (nothing else is done).
template <typename T>
inline bool normalize_map(const T* z, T beta, Normalization mode, Workspace<T>& ws, MapNormalizer<T>& nm) {
  nm = MapNormalizer<T>{};
  nm.mode = mode;
  nm.beta = beta;
  nm.map_size = ws.axes.map_size;
  switch (mode) {
    case Normalization::Softmax: {
      nm.shift = max_of(z, nm.map_size);
      // NaN or +inf logit, or every logit -inf: torch.softmax gives NaN, and so does this map.
      if (!std::isfinite(nm.shift)) return false;
      const T beta_log2e = beta * T(kLog2e);
      const T shift = nm.shift;
      nm.denom = weigh_map<true>(
          z, ws,
          [shift, beta_log2e](const Vec<T>& zv)
              DSNT_INLINE_LAMBDA { return Arith<Vec<T>>::exp2(softmax_log2_weight(zv, shift, beta_log2e)); },
          ws.weight.data());
      break;
    }
    case Normalization::None:
      nm.mass = weigh_map<false>(
          z, ws, [](const Vec<T>& zv) DSNT_INLINE_LAMBDA { return zv; }, static_cast<T*>(nullptr));
      break;
    default:
      nm.denom = weigh_map<true>(
          z, ws, [mode](const Vec<T>& zv) DSNT_INLINE_LAMBDA { return rectify(zv, mode); }, ws.weight.data());
      if (nm.denom == T(0)) uniform_weights(ws);
  }
  nm.derive();
  return true;
}

template <typename T>
struct Moments {
  T ubar, var;
};

// The sum of term(j) over j < S as four independent sums, lane l taking j = l mod 4, added in
// that order: a chain of dependent double adds would set the pace, and four locals in a
// fixed-trip inner loop stay in registers (the compiler packs them into one vector; indexed by
// j & 3 they went through memory, a third of the forward's per-map work on 16x16 maps).
template <typename Term>
inline double sum_in_four(int64_t S, const Term& term) {
  double s[4] = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= S; j += 4) {
    for (int l = 0; l < 4; ++l) s[l] += term(j + l);
  }
  for (int l = 0; j + l < S; ++l) s[l] += term(j + l);
  return s[0] + s[1] + s[2] + s[3];
}

// ubar = sum m u / denom and var = sum m (u - ubar)^2 / denom from a marginal m of an axis,
// weights scaled as p = (w pre) / scaled_denom; in double (O(S) per axis), var about the ubar
// that stats keep (the backward's variance gradient assumes it).
template <typename T>
inline Moments<T> axis_moments(const T* m, const T* u, int64_t S, T pre, T scaled_denom) {
  const T ubar = static_cast<T>(
      sum_in_four(S, [&](int64_t j) { return static_cast<double>(m[j] * pre) * u[j]; }) / scaled_denom);
  const double centre = ubar;
  const double centred = sum_in_four(S, [&](int64_t j) {
    const double d = static_cast<double>(u[j]) - centre;
    return static_cast<double>(m[j] * pre) * d * d;
  });
  return {ubar, static_cast<T>(centred / scaled_denom)};
}

// Pass 4: sums of add_js_terms (kJS) or add_kl_terms over the map, log2 units; per row, then
// over the rows (see kBlockRows).
template <bool kJS, typename T, typename Prob>
inline void divergence_sums(const T* z, const T* weights, const Prob prob, const Workspace<T>& ws,
                            T& value_sum, T& p_part_sum) {
  const Axes<T>& ax = ws.axes;
  const TargetTables<T>& tt = ws.target;
  const T* lx = tt.target_log2[0].data();
  const T* fx = tt.target_factor[0].data();
  const int64_t W = ax.width;
  Vec<T> map_value(T(0)), map_p_part(T(0));
  for (int64_t r = 0; r < ax.rows; ++r) {
    const Vec<T> row_l2q(tt.row_target_log2[r]), row_q(tt.row_target_factor[r]);
    const T* zr = z + r * W;
    const T* wr = weights + r * W;
    Vec<T> value(T(0)), p_part(T(0));
    for_each_vector<T>(W, [&](int64_t x, int64_t n) DSNT_INLINE_LAMBDA {
      const Vec<T> zv = load_part(zr + x, n, T(0)), wv = load_part(wr + x, n, T(0));
      const Vec<T> p = zero_tail(prob.prob(zv, wv), n);
      const Vec<T> l2p = prob.log2_prob(zv, wv);
      const Vec<T> l2q = floor_log2(load_part(lx + x, n, T(0)) + row_l2q);
      const Vec<T> q = target_prob(load_part(fx + x, n, T(0)), row_q, l2q);  // 0 in the tail lanes
      if constexpr (kJS) {
        add_js_terms(p, l2p, q, l2q, value, p_part);
      } else {
        add_kl_terms(p, l2p, q, l2q, value);
      }
    });
    map_value = map_value + value;
    map_p_part = map_p_part + p_part;
  }
  value_sum = hsum(map_value);
  p_part_sum = hsum(map_p_part);
}

template <typename T>
inline void write_nan_map(const MapNormalizer<T>& nm, Regularizer reg, int dims, const MapOutputs<T>& out) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int k = 0; k < dims; ++k) out.coords[k] = out.variance[k] = out.stats[kStatMean + k] = nan;
  *out.reg_loss = reg == Regularizer::None ? T(0) : nan;  // reg none stays 0 (docs/ops.md)
  if (out.coord_loss != nullptr) *out.coord_loss = nan;
  out.stats[kStatShift] = nm.shift;
  out.stats[kStatDenom] = nan;
  out.stats[kStatMass] = nan;
  out.stats[kStatDivGrad] = nan;
}

// One map: logits z (map_size values) -> this map's outputs.
template <typename T>
void forward_map(const T* z, const MapInputs<T>& in, const OpOptions& o, Workspace<T>& ws,
                 const MapOutputs<T>& out) {
  const Axes<T>& ax = ws.axes;
  const int dims = ax.dims;
  MapNormalizer<T> nm;
  if (!normalize_map(z, in.beta, o.normalization, ws, nm)) {
    write_nan_map(nm, o.reg, dims, out);
    return;
  }
  for (int k = 0; k < dims; ++k) {
    const Moments<T> mo =
        axis_moments(ws.marginal[k].data(), ax.u[k].data(), ax.size[k], nm.pre, nm.scaled_denom);
    const GridAffine<T> grid = grid_affine<T>(ax.size[k], o.normalized);
    out.coords[k] = grid.scale * mo.ubar + grid.offset * nm.mass;
    out.variance[k] = mo.var;
    out.stats[kStatMean + k] = mo.ubar;
  }
  T reg = 0, div_grad = 0;
  if (o.reg == Regularizer::Var) {
    const T s2 = in.sigma_t * in.sigma_t;
    for (int k = 0; k < dims; ++k) reg += (out.variance[k] - s2) * (out.variance[k] - s2);
  } else if (o.divergence()) {
    ws.target.build(ax, in.mu, in.sigma_t);
    const T* weights = nm.mode == Normalization::None ? z : ws.weight.data();
    const bool js = o.reg == Regularizer::JS;
    T value = 0, p_part = 0;
    with_prob(nm, [&](const auto& prob) DSNT_INLINE_LAMBDA {
      if (js) {
        divergence_sums<true>(z, weights, prob, ws, value, p_part);
      } else {
        divergence_sums<false>(z, weights, prob, ws, value, p_part);
      }
    });
    if (js) {
      reg = T(0.5 * kLn2) * value;
      div_grad = T(0.5 * kLn2) * p_part;
    } else {
      reg = T(kLn2) * value;
      div_grad = reg + nm.mass;  // sum p (ln p - ln q + p/(p + eps)), p/(p + eps) -> 1
    }
  }
  *out.reg_loss = reg;
  if (out.coord_loss != nullptr) *out.coord_loss = coord_loss_value(out.coords, in.mu, dims, o.coord_loss);
  out.stats[kStatShift] = nm.shift;
  out.stats[kStatDenom] = nm.denom;
  out.stats[kStatMass] = nm.mass;
  out.stats[kStatDivGrad] = div_grad;
}

}  // namespace dsnt_cuda::cpu::DSNT_CPU_NS
