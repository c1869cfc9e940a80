// The forward's reductions over a map and what follows from each, shared by the on-chip classes
// (forward_map.cuh) and the streamed kernel (forward_streamed.cuh):
//
//   reduction 2  sum w, the first moments and the target's per-axis sums (pass 2's, reduced
//                over the group), then the map's weight, mean and the target's normalization;
//   reduction 3  the centred moments and the divergence sums (pass 3's), then the group's leader
//                writes the map's outputs (map_outputs.cuh).
#pragma once

#include "forward_chunks.cuh"

namespace dsnt_cuda {

// What a forward keeps of a map from reduction 2 for its pass 3 and its outputs.
template <typename T>
struct FirstMoments {
  T s[7];  // reduced: sum w, sum w u per axis, sum g~ per axis
  MapSums<T> ms;
  T inv_w;  // 1 / sum w (none: 1; a uniform rectified map: 0)
  TargetNorm<T> tn{};
};

// Reduction 2: ek = the thread's sum of w per column k (its x is x0 + k), s4 = {sum w x_offset,
// sum w u_y, sum w u_z, sum e a}, part = its share of the target's per-axis sums.
template <typename T, int V, class M, class Group>
DSNT_DEV FirstMoments<T> reduce_first_moments(const M& md, const Group& g, const T (&ek)[V], const T (&s4)[4],
                                              T x0, const AxisPartial<T> (&part)[3],
                                              const TargetAxis<T> (&axes)[3], T shift, int dims, bool div) {
  FirstMoments<T> f{{ek[0], s4[0] + x0 * ek[0], s4[1], s4[2], part[0].g, part[1].g, part[2].g}};
#pragma unroll
  for (int k = 1; k < V; ++k) {
    f.s[0] += ek[k];
    f.s[1] += (x0 + T(k)) * ek[k];
  }
  g.sum(f.s, 1);
  f.ms.shift = shift;
  f.ms.weight = f.s[0];
  f.ms.uniform = md.rectified() && f.s[0] == T(0);
  f.inv_w = md.none() ? T(1) : (f.ms.uniform ? T(0) : T(1) / f.s[0]);
#pragma unroll
  for (int k = 0; k < kMaxSpatialDims; ++k) f.ms.ubar[k] = f.s[1 + k] * f.inv_w;
  f.ms.log2_weight = md.none() ? T(0) : Arith<T>::log2(f.s[0]);
  if (div) {
    TargetAxisSums<T> ts[kMaxSpatialDims];
#pragma unroll
    for (int k = 0; k < kMaxSpatialDims; ++k) ts[k] = {axes[k].off, f.s[4 + k], T(0)};
    f.tn = target_norm(ts, dims);
  }
  return f;
}

// What the generic pass 3 needs of the map: p = w inv_p, log2 p = log2 w + log2_inv_p (none: p = z).
template <typename T, class M>
DSNT_DEV SecondPass<T, M> second_pass_of(const M& md, const FirstMoments<T>& f, T bl, int map_size, bool div,
                                         bool keep_e) {
  const MapSums<T>& ms = f.ms;
  SecondPass<T, M> sp{
      {md, ms.shift, bl, ms.uniform}, {ms.ubar[0], ms.ubar[1], ms.ubar[2]}, T(0), T(0), div, keep_e};
  sp.inv_p = md.none() ? T(1) : (ms.uniform ? T(1) / T(map_size) : f.inv_w);
  sp.log2_inv_p = md.none() ? T(0) : (ms.uniform ? -Arith<T>::log2(T(map_size)) : -ms.log2_weight);
  return sp;
}

// The factor of the target's g~ products in pass 3: q (scaled JS: q D) = g~_x g~_yz q_scale.
template <typename T>
DSNT_DEV T q_scale_of(const FirstMoments<T>& f, bool scaled_js) {
  return f.tn.scale * (scaled_js ? f.s[0] : T(1));
}

// Reduction 3 and the map's outputs: r3 = {sum w (u - ubar)^2 per axis, two divergence sums}
// (pass 3's), sum_ea = sum e a (pass 2's, scaled JS), part's gl = sum g~ l per axis.
template <bool kStandard, typename T, class Group>
DSNT_DEV void reduce_and_write(const Group& g, const OutputArgs<T>& out, int m, FirstMoments<T>& f,
                               const T (&r3)[5], T sum_ea, const AxisPartial<T> (&part)[3],
                               const TargetAxis<T> (&axes)[3], bool scaled_js, T sigma_t) {
  T r[9] = {r3[0], r3[1], r3[2], r3[3], r3[4], sum_ea, part[0].gl, part[1].gl, part[2].gl};
  g.sum(r, 2);
  if (!g.leader()) return;
  MapSums<T>& ms = f.ms;
#pragma unroll
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    ms.centred[k] = r[k];
    ms.target_off[k] = axes[k].off;
    ms.target_g[k] = f.s[4 + k];
    ms.target_gl[k] = r[6 + k];
  }
  ms.div_a = scaled_js ? r[5] : r[3];
  ms.div_b = scaled_js ? r[3] : r[4];
  ms.div_c = r[4];
  write_map_outputs<kStandard>(out, m, ms, sigma_t);
}

}  // namespace dsnt_cuda
