// The per-chunk work of the forward passes (forward_map.cuh), and where a thread sits in the
// tile. Two forms: the general one (every mode and layout) and the standard kernels' (softmax +
// JS, a thread's x the same in every chunk): there the x moments and the x variance are per map,
// from per-column sums, and the thread's x target factors sit in registers.
#pragma once

#include "kernel_args.cuh"
#include "map_outputs.cuh"
#include "map_tile.cuh"
#include "reduce.cuh"
#include "target_tables.cuh"

namespace dsnt_cuda {

// This thread's place in the tile: chunk c is virtual row row0 + c * row_step of the group's
// records; a thread outside the layout points every chunk at the padding record.
template <typename T>
struct TilePlace {
  int row0, row_step;
  int x_t;  // element offset of the thread's chunk in a virtual row
  T ux_t;
  DSNT_DEV int row(int c) const { return row0 + c * row_step; }
};

template <typename T>
DSNT_DEV TilePlace<T> tile_place(const TileLayout& L, int t) {
  TilePlace<T> p;
  const int vr = t / L.cols;
  const bool in_tile = vr < L.tile_rows;
  p.row0 = in_tile ? vr : L.slice_vrows;
  p.row_step = in_tile ? L.tile_rows : 0;
  p.x_t = (t - vr * L.cols) * L.vec;
  p.ux_t = static_cast<T>(p.x_t);
  return p;
}

// What a group needs besides its threads: the CTA's row records and its own tables.
template <typename T>
struct GroupMemory {
  const RowCoords<T>* coords;
  const RowMemory* memory;
  TargetTables<T> tab;
  int x_entries;
  int x_origin;        // x index of the x tables' first entry
  bool own_x, own_yz;  // this group adds the x (y, z) table entries to the target's sums
};

// The weight of one element after pass 1 (for the generic pass 3): e, r(z), z, or for a uniform
// map 1 on the map (0 on padding).
template <typename T, class M>
struct Weigher {
  M md;
  T shift, bl;
  bool uniform;
  DSNT_DEV T log2_weight(T z) const { return softmax_log2_weight(z, shift, bl); }
  DSNT_DEV T operator()(T z, bool valid) const {
    if (md.softmax()) return Arith<T>::exp2(log2_weight(z));
    if (md.none()) return z;
    if (uniform) return valid ? T(1) : T(0);
    return rectify(z, md.norm());
  }
};

// Divergence terms of one element in the generic form: p, log2 p from the weight, q, log2 q from
// the tables, then dsnt_math.h.
template <typename T, class M>
DSNT_DEV void add_generic_divergence(const Weigher<T, M>& wt, T z, T w, T inv_p, T log2_inv_p, T q, T l2q,
                                     T& value, T& p_part) {
  using A = Arith<T>;
  const M& md = wt.md;
  const T p = w * inv_p;
  T l2p;
  if (md.softmax()) {
    l2p = A::floor_at(wt.log2_weight(z) + log2_inv_p, Precision<T>::kLog2Floor);
  } else if (md.none()) {
    l2p = A::floor_at(A::log2(p), Precision<T>::kLog2Floor);
  } else if (wt.uniform) {
    l2p = w > T(0) ? log2_inv_p : Precision<T>::kLog2Floor;
  } else {
    l2p = rectified_log2(z, w, md.norm()) + log2_inv_p;
  }
  if (md.reg() == Regularizer::JS) {
    add_js_terms(p, l2p, q, l2q, value, p_part);
  } else {
    add_kl_terms(p, l2p, q, l2q, value);
  }
}

// log2 of the smallest normal number: the softmax weights of the scaled JS path are floored
// there (see weigh_chunk).
template <typename T>
constexpr T kLog2MinNormal = sizeof(T) == 8 ? T(-1022) : T(-126);

// log2 e of the scaled JS path: the softmax log2 weight floored at kLog2MinNormal (NaN kept).
template <typename T>
DSNT_DEV T scaled_js_log2_weight(T z, T shift, T bl) {
  return max_keep_nan(softmax_log2_weight(z, shift, bl), kLog2MinNormal<T>);
}

// Pass 2 on one chunk: its weights (returned), sum w per column k (ek: the x moments follow per
// map, x being the thread's own), and its share of s = {sum w x_offset, sum w u_y, sum w u_z,
// sum e a} (kFixedX: the x offset is the same in every chunk and is added per map).
// Scaled JS floors a = log2 e at log2 of the smallest normal (NaN kept): a -inf logit gets
// e = 2^-126 instead of 0, which no sum over a map can see (D >= 1), and every e + q D is then
// a normal number whose log2 is finite: pass 3 needs no floor.
template <bool kFixedX, typename T, int V, int N, class M>
DSNT_DEV Vals<T, V> weigh_chunk(const M& md, const Vals<T, V>& x, T shift, T bl, const RowCoords<T>& r,
                                T (&ek)[V], T (&s)[N], T& pc) {
  static_assert(N >= 4, "weigh_chunk adds to four sums");
  using A = Arith<T>;
  Vals<T, V> w;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (md.softmax_js()) {
      const T l2w = scaled_js_log2_weight(x.v[k], shift, bl);
      w.v[k] = A::exp2(l2w);
      s[3] += w.v[k] * l2w;
    } else if (md.softmax()) {
      w.v[k] = A::exp2(softmax_log2_weight(x.v[k], shift, bl));
    } else {
      w.v[k] = md.none() ? x.v[k] : rectify(x.v[k], md.norm());
    }
    ek[k] += w.v[k];
  }
  pc = w.v[0];
#pragma unroll
  for (int k = 1; k < V; ++k) pc += w.v[k];
  if (!kFixedX) s[0] += r.xoff * pc;
  s[1] += r.uy * pc;
  s[2] += r.uz * pc;
  return w;
}

// Pass 3's y and z variance of a chunk (one row: one u_y, u_z) from its sum of w, pc.
template <typename T>
DSNT_DEV void add_yz_moments(const RowCoords<T>& r, const T (&ubar)[kMaxSpatialDims], T pc, T (&r3)[5]) {
  const T dy = r.uy - ubar[1], dz = r.uz - ubar[2];
  r3[1] += dy * dy * pc;
  r3[2] += dz * dz * pc;
}

// Pass 3's scaled JS terms of a chunk: L = log2(e + q D) with q D = g~_x row_q; adds sum e L to
// r3[3] and sum (q D) L to r3[4].
template <typename T, int V>
DSNT_DEV void add_scaled_js(const Vals<T, V>& e, const Vals<T, V>& gx, T row_q, T (&r3)[5]) {
  T gl = T(0);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const T lg = Arith<T>::log2(gx.v[k] * row_q + e.v[k]);
    r3[3] += e.v[k] * lg;
    gl += gx.v[k] * lg;
  }
  r3[4] += row_q * gl;
}

// What pass 3 needs of a map besides the chunk.
template <typename T, class M>
struct SecondPass {
  Weigher<T, M> weigh;
  T ubar[kMaxSpatialDims];
  T inv_p, log2_inv_p;
  bool div, keep_e;
};

// Pass 3 on one chunk: weights w (scaled JS: the e kept in the tile; else from the logits x),
// target factors xg (scaled by row_q), log2 factors xl (+ row_l). Adds to r = {sum w (u - ubar)^2
// per axis, then the divergence sums: scaled JS sum e L, sum (qD) L; else value, p part}.
template <typename T, int V, class M>
DSNT_DEV void second_moments_chunk(const SecondPass<T, M>& sp, const Vals<T, V>& x, Vals<T, V> w, int count,
                                   const RowCoords<T>& r, T ux_t, const Vals<T, V>& xg, const Vals<T, V>& xl,
                                   T row_q, T row_l, T (&r3)[5]) {
  if (!sp.keep_e) {
#pragma unroll
    for (int k = 0; k < V; ++k) w.v[k] = sp.weigh(x.v[k], k < count);
  }
  const T d0 = r.xoff + ux_t - sp.ubar[0];
  T pc = w.v[0];
  r3[0] += w.v[0] * d0 * d0;
#pragma unroll
  for (int k = 1; k < V; ++k) {
    const T d = d0 + T(k);
    r3[0] += w.v[k] * d * d;
    pc += w.v[k];
  }
  add_yz_moments(r, sp.ubar, pc, r3);
  if (!sp.div) return;
  if (sp.keep_e) {
    add_scaled_js(w, xg, row_q, r3);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      add_generic_divergence(sp.weigh, x.v[k], w.v[k], sp.inv_p, sp.log2_inv_p, xg.v[k] * row_q,
                             xl.v[k] + row_l, r3[3], r3[4]);
    }
  }
}

// Pass 3 of the standard kernels on one chunk: the x variance is per map (x is the thread's own:
// sum_k (x_k - ubar)^2 ek[k]); y and z from the chunk's sum of e (pc, kept from pass 2); per
// element the scaled JS terms with the thread's target factors g~_x in registers, scaled by
// q_scale once per map (row_q: the row's g~_yz, so g~_x row_q = q D).
template <typename T, int V>
DSNT_DEV void second_moments_standard(const Vals<T, V>& e, const RowCoords<T>& r,
                                      const T (&ubar)[kMaxSpatialDims], const Vals<T, V>& gx, T row_q, T pc,
                                      T (&r3)[5]) {
  add_scaled_js(e, gx, row_q, r3);
  add_yz_moments(r, ubar, pc, r3);
}

}  // namespace dsnt_cuda
