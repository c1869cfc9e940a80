// The forward's per-map epilogue and the loss epilogue.
//
// write_map_outputs: one thread per map turns the reduced sums into coords, variance,
// reg_losses, coord_losses and stats (docs/ops.md). Out of line: it runs once per map on one
// thread, so it has no place among the per-element instructions of the hot loop.
//
// finish_loss: the masked mean over maps (docs/math.md §5) is reduced in-kernel by the last CTA
// to finish (a zeroed arrival counter; __threadfence before arriving, after learning it is last),
// in a fixed order (maps by index over the CTA's threads, then the CTA tree): deterministic, and
// no extra launch. A host-side ATen reduction would cost three more launches per forward, which
// is the whole budget of the launch-bound shapes (batch-1).
#pragma once

#include "common.cuh"
#include "kernel_args.cuh"
#include "reduce.cuh"
#include "target_tables.cuh"

namespace dsnt_cuda {

// What the passes of one map produce (reduced over the group).
template <typename T>
struct MapSums {
  T shift;   // softmax: max z
  T weight;  // sum of the weights w (e, r or z)
  T ubar[kMaxSpatialDims];
  T centred[kMaxSpatialDims];  // sum w (u - ubar)^2
  bool uniform;                // rectified map with a zero sum: p = 1/N
  // divergence, log2 units. Scaled JS (softmax): a = sum e a, b = sum e L, c = sum (qD) L.
  // Otherwise: a = value, b = sum p (l2p - l2m) (JS only).
  T div_a, div_b, div_c;
  T log2_weight;  // log2 of `weight` (softmax and rectified)
  // the target's per-axis offsets and sums (sum g~, sum g~ l), for sum q and sum q log2 q
  T target_off[kMaxSpatialDims], target_g[kMaxSpatialDims], target_gl[kMaxSpatialDims];
};

// What the epilogue needs of the launch, passed by value: a reference to the kernel's arguments
// would make the compiler copy all of them to local memory.
template <typename T>
struct OutputArgs {
  T* coords;
  T* variance;
  T* reg_losses;
  T* coord_losses;
  T* stats;
  const T* target;
  Modes modes;
  CoordLoss coord_loss;
  int dims;
  int map_size;
  GridAffine<T> grid[kMaxSpatialDims];  // the requested grid per axis
};

template <typename scalar_t>
DSNT_DEV OutputArgs<acc_t<scalar_t>> output_args(const FwdArgs<scalar_t>& a) {
  const TileLayout& L = a.layout;
  using T = acc_t<scalar_t>;
  return {a.coords,
          a.variance,
          a.reg_losses,
          a.coord_losses,
          a.stats,
          a.target,
          a.modes,
          a.coord_loss,
          L.dims,
          L.map_size,
          {grid_affine<T>(L.size[0], a.normalized), grid_affine<T>(L.size[1], a.normalized),
           grid_affine<T>(L.size[2], a.normalized)}};
}

// kStandard: softmax + JS known at compile time, so the other modes' code is not there.
template <bool kStandard, typename T>
DSNT_OUT_OF_LINE void write_map_outputs(const OutputArgs<T> a, int m, const MapSums<T> s, T sigma_t) {
  const auto md = modes_view<kStandard>(a.modes);
  const int n = a.dims;
  const bool none = md.none();
  // p = w / denom; "none": p = z (denom 1, mass = sum z); uniform: p = 1/N (denom 0 in stats).
  const T mass = none ? s.weight : T(1);
  const T denom = none ? T(1) : (s.uniform ? T(0) : s.weight);
  const T inv = none ? T(1) : T(1) / (s.uniform ? T(a.map_size) : s.weight);
  T c[kMaxSpatialDims] = {T(0), T(0), T(0)}, reg = T(0);
  // axis loops: every slot with a test (a fixed trip count is unrolled, c stays in registers)
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    if (k >= n) continue;
    c[k] = a.grid[k].scale * s.ubar[k] + a.grid[k].offset * mass;
    const T var = s.centred[k] * inv;
    a.coords[m * n + k] = c[k];
    a.variance[m * n + k] = var;
    const T d = var - sigma_t * sigma_t;
    reg += d * d;
  }
  T div_grad = T(0);
  const Regularizer r = md.reg();
  if (r == Regularizer::JS) {
    T p_part = s.div_b, value = s.div_a;
    if (md.softmax()) {  // the scaled form, docs/math.md §7 (see forward_map.cuh)
      TargetAxis<T> axes[kMaxSpatialDims];
      for (int k = 0; k < kMaxSpatialDims; ++k) axes[k] = {T(0), T(0), s.target_off[k]};
      const T gu[kMaxSpatialDims] = {T(0), T(0), T(0)};
      const MapTarget<T> tgt = map_target(axes, s.target_g, s.target_gl, gu, n);
      p_part = (s.div_a - s.div_b) * inv + T(1);
      const T q_part = tgt.q_log2q - s.div_c * inv + tgt.mass * (s.log2_weight + T(1));
      value = p_part + q_part;
    }
    reg = T(0.5 * kLn2) * value;
    div_grad = T(0.5 * kLn2) * p_part;
  } else if (r == Regularizer::KL) {
    reg = T(kLn2) * s.div_a;
    div_grad = reg + mass;
  } else if (r == Regularizer::None) {
    reg = T(0);
  }
  a.reg_losses[m] = reg;
  if (a.coord_losses != nullptr) a.coord_losses[m] = coord_loss_value(c, a.target + m * n, n, a.coord_loss);
  T* st = a.stats + static_cast<int64_t>(m) * stats_size(n);
  st[kStatShift] = md.softmax() ? s.shift : T(0);
  st[kStatDenom] = denom;
  st[kStatMass] = mass;
  st[kStatDivGrad] = div_grad;
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    if (k < n) st[kStatMean + k] = s.ubar[k];
  }
}

// The loss of docs/ops.md, by the last CTA to arrive. Every thread of every CTA calls it once,
// after its maps' outputs are written.
template <typename scalar_t>
DSNT_DEV void finish_loss(const FwdArgs<scalar_t>& a, acc_t<scalar_t>* scratch) {
  using T = acc_t<scalar_t>;
  if (a.arrivals == nullptr) return;
  unsigned* flag = reinterpret_cast<unsigned*>(scratch);
  DSNT_SYNCTHREADS(loss_outputs_written);
  if (threadIdx.x == 0) {
    __threadfence();  // this CTA's per-map losses before its arrival
    const unsigned before = atomicAdd(a.arrivals, 1u);
    *flag = before == gridDim.x - 1 ? 1u : 0u;
  }
  DSNT_SYNCTHREADS(loss_last_known);
  const bool last = *flag != 0;
  DSNT_SYNCTHREADS(loss_flag_read);
  if (!last) return;
  __threadfence();        // every other CTA's losses after learning this one is last
  T v[2] = {T(0), T(0)};  // sum (cl + lambda reg) mask, sum mask
  for (int m = threadIdx.x; m < a.maps; m += blockDim.x) {
    const T w = a.mask != nullptr ? a.mask[m] : T(1);
    v[0] += (load_cg(a.coord_losses + m) + a.reg_weight * load_cg(a.reg_losses + m)) * w;
    v[1] += w;
  }
  const CtaGroup<T> cta{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x / 32), scratch};
  cta.sum(v, 0);
  if (threadIdx.x == 0) {
    const T count = a.mask != nullptr ? v[1] : T(a.maps);
    *a.loss = v[0] / (count > T(1) ? count : T(1));
  }
}

}  // namespace dsnt_cuda
