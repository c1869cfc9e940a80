// The forward of one map by a group of threads holding it on chip (warp, block and cluster
// classes): one read of the logits, three passes over the tile (docs/performance.md §3).
//
//   pass 1  load the tile; softmax: the largest logit (reduction 1, with the target's tables
//           built meanwhile);
//   pass 2  weights w (softmax: e = 2^(beta log2e (z - shift)); rectified: r(z); none: z), their
//           sum and first moments (reduction 2, with the target's per-axis sums);
//   pass 3  centred second moments and the divergence terms (reduction 3), then one thread
//           writes the map's outputs (map_outputs.cuh).
//
// Moments are separable (docs/math.md §7.4): a chunk's x are consecutive, so per chunk
// sum w u_x = (u_x0) sum w + sum k w_k and sum w u_y = u_y sum w; the variance is centred
// about the reduced mean, never E[u^2] - E[u]^2.
//
// Softmax + JS, the standard loss, is evaluated in the scaled form (docs/math.md §7): with
// D = sum e, q D = g~_x g~_yz (scale D) from the tables, and L = log2(e + q D) (= log2 m + 1 +
// log2 D), JS needs per element one lg2 and two FMAs: sum e a (pass 2), sum e L and sum (qD) L;
// map_outputs.cuh turns them into JS and div_grad with sum q log2 q from the per-axis sums. The
// lg2 is taken everywhere: the "far" shortcut of log2_mid saves it only where a whole warp is
// far, and its test and select cost more issue slots than the lg2 (2 MUFU per element here).
// Other modes evaluate p, log2 p, q, log2 q per element and call dsnt_math.h's add_js_terms /
// add_kl_terms.
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
  int x_origin;     // x index of the x tables' first entry
  bool own_x, own_yz;  // this group adds the x (y, z) table entries to the target's sums
};

// The weight of one element after pass 1 (for the generic pass 3): e, r(z), z, or for a uniform
// map 1 on the map (0 on padding).
template <typename T>
struct Weigher {
  Modes md;
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
template <typename T>
DSNT_DEV void add_generic_divergence(const Weigher<T>& wt, T z, T w, T inv_p, T log2_inv_p, T q, T l2q, T& value,
                                     T& p_part) {
  using A = Arith<T>;
  const Modes& md = wt.md;
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

// Pass 2 on one chunk: its weights (returned), sum w per column k (ek: the x moments follow per
// map, x being the thread's own), and its share of s = {sum w x_offset, sum w u_y, sum w u_z,
// sum e a}. Scaled JS floors a = log2 e at log2 of the smallest normal (NaN kept): a -inf logit
// gets e = 2^-126 instead of 0, which no sum over a map can see (D >= 1), and every e + q D is
// then a normal number whose log2 is finite: pass 3 needs no floor.
template <typename T, int V, int N>
DSNT_DEV Vals<T, V> weigh_chunk(const Modes& md, const Vals<T, V>& x, T shift, T bl, const RowCoords<T>& r,
                                T (&ek)[V], T (&s)[N]) {
  static_assert(N >= 4, "weigh_chunk adds to four sums");
  using A = Arith<T>;
  Vals<T, V> w;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (md.softmax_js()) {
      const T l2w = max_keep_nan(softmax_log2_weight(x.v[k], shift, bl), kLog2MinNormal<T>);
      w.v[k] = A::exp2(l2w);
      s[3] += w.v[k] * l2w;
    } else if (md.softmax()) {
      w.v[k] = A::exp2(softmax_log2_weight(x.v[k], shift, bl));
    } else {
      w.v[k] = md.none() ? x.v[k] : rectify(x.v[k], md.norm());
    }
    ek[k] += w.v[k];
  }
  T pc = w.v[0];
#pragma unroll
  for (int k = 1; k < V; ++k) pc += w.v[k];
  s[0] += r.xoff * pc;
  s[1] += r.uy * pc;
  s[2] += r.uz * pc;
  return w;
}

// What pass 3 needs of a map besides the chunk.
template <typename T>
struct SecondPass {
  Weigher<T> weigh;
  T ubar[kMaxSpatialDims];
  T inv_p, log2_inv_p;
  bool div, keep_e;
};

// Pass 3 on one chunk: weights w (scaled JS: the e kept in the tile; else from the logits x),
// target factors xg (scaled by row_q), log2 factors xl (+ row_l). Adds to r = {sum w (u - ubar)^2
// per axis, then the divergence sums: scaled JS sum e L, sum (qD) L; else value, p part}.
template <typename T, int V>
DSNT_DEV void second_moments_chunk(const SecondPass<T>& sp, const Vals<T, V>& x, Vals<T, V> w, int count,
                                   const RowCoords<T>& r, T ux_t, const Vals<T, V>& xg, const Vals<T, V>& xl,
                                   T row_q, T row_l, T (&r3)[5]) {
  using A = Arith<T>;
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
  const T dy = r.uy - sp.ubar[1], dz = r.uz - sp.ubar[2];
  r3[1] += dy * dy * pc;
  r3[2] += dz * dz * pc;
  if (!sp.div) return;
  if (sp.keep_e) {  // L = log2(e + q D) with q D = g~_x (row_q); sum e L, sum q D L
    T gl = T(0);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const T lg = A::log2(xg.v[k] * row_q + w.v[k]);
      r3[3] += w.v[k] * lg;
      gl += xg.v[k] * lg;
    }
    r3[4] += row_q * gl;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      add_generic_divergence(sp.weigh, x.v[k], w.v[k], sp.inv_p, sp.log2_inv_p, xg.v[k] * row_q, xl.v[k] + row_l,
                             r3[3], r3[4]);
    }
  }
}

template <typename scalar_t, int C, class Group, class Tile>
DSNT_DEV void forward_map(const FwdArgs<scalar_t>& a, int m, const Group& g, Tile& tile, const TilePlace<acc_t<scalar_t>>& tp,
                          const GroupMemory<acc_t<scalar_t>>& gm) {
  using T = acc_t<scalar_t>;
  using A = Arith<T>;
  constexpr int V = kChunkElems<scalar_t>;
  const TileLayout& L = a.layout;
  const Modes md = a.modes;
  const bool softmax = md.softmax(), div = md.divergence(), keep_e = md.softmax_js();

  uint32_t b, l;
  a.keypoints.divmod(static_cast<uint32_t>(m), b, l);
  const scalar_t* map = a.logits + b * a.stride_b + l * a.stride_l;
  const bool vec = L.whole_chunks && aligned16(map);
  const scalar_t pad = (softmax || md.norm() == Normalization::Sigmoid) ? neg_inf<scalar_t>() : scalar_t(0);

  // ---- pass 1: the tile, the target's tables, the shift
  load_tile<scalar_t, C>(tile, map, gm.memory, tp.row0, tp.row_step, tp.x_t, L.stride_x, vec, pad);
  TargetAxis<T> axes[3];
  AxisPartial<T> part[3];
  const T sigma_t = per_map_value(a.sigma_t, b, l);
  if (div) {
    target_axes(a.target + static_cast<int64_t>(m) * L.dims, sigma_t, L.size, L.dims, axes);
    fill_axes(axes, L.size, gm.x_origin, gm.x_entries, gm.tab, gm.own_x, gm.own_yz, g.t, g.size(), part);
  }
  T shift = T(0);
  if (softmax) {
    T top = neg_inf<T>();
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const Vals<T, V> x = tile.get(c);
#pragma unroll
      for (int k = 0; k < V; ++k) top = max_keep_nan(top, x.v[k]);
    }
    shift = g.max(top, 0);
  }
  if (div) {
    g.sync();  // x, y, z tables written
    fill_rows(L, gm.coords, gm.memory, gm.tab, g.t, g.size());
  }

  // ---- pass 2: weights and first moments
  const T bl = per_map_value(a.beta, b, l) * T(kLog2e);
  T ek[V] = {};
  T s4[4] = {T(0), T(0), T(0), T(0)};  // sum w x_offset, sum w u_y, sum w u_z, sum e a
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const Vals<T, V> w = weigh_chunk(md, tile.get(c), shift, bl, gm.coords[tp.row(c)], ek, s4);
    if (keep_e) tile.put(c, w);
  }
  // reduced: {sum w, sum w u_x, sum w u_y, sum w u_z, sum g~ per axis}
  T s[7] = {ek[0], s4[0] + tp.ux_t * ek[0], s4[1], s4[2], part[0].g, part[1].g, part[2].g};
#pragma unroll
  for (int k = 1; k < V; ++k) {
    s[0] += ek[k];
    s[1] += (tp.ux_t + T(k)) * ek[k];
  }
  g.sum(s, 1);

  MapSums<T> ms;
  ms.shift = shift;
  ms.weight = s[0];
  ms.uniform = md.rectified() && s[0] == T(0);
  const T inv_w = md.none() ? T(1) : (ms.uniform ? T(0) : T(1) / s[0]);
#pragma unroll
  for (int k = 0; k < kMaxSpatialDims; ++k) ms.ubar[k] = s[1 + k] * inv_w;
  ms.log2_weight = md.none() ? T(0) : A::log2(s[0]);
  TargetNorm<T> tn{};
  if (div) {
    TargetAxisSums<T> ts[kMaxSpatialDims];
#pragma unroll
    for (int k = 0; k < kMaxSpatialDims; ++k) ts[k] = {axes[k].off, s[4 + k], T(0)};
    tn = target_norm(ts, L.dims);
  }

  // ---- pass 3: centred second moments, divergence terms
  SecondPass<T> sp{{md, shift, bl, ms.uniform}, {ms.ubar[0], ms.ubar[1], ms.ubar[2]}, T(0), T(0), div, keep_e};
  // p = w * inv_p; log2 p = log2 w + log2_inv_p (none: p = z)
  sp.inv_p = md.none() ? T(1) : (ms.uniform ? T(1) / T(L.map_size) : inv_w);
  sp.log2_inv_p = md.none() ? T(0) : (ms.uniform ? -A::log2(T(L.map_size)) : -ms.log2_weight);
  const T q_scale = tn.scale * (keep_e ? s[0] : T(1));  // scaled JS works with q D
  T r3[5] = {T(0), T(0), T(0), T(0), T(0)};
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int v = tp.row(c);
    const RowCoords<T> r = gm.coords[v];
    const int count = keep_e ? V : gm.memory[v].xcount - tp.x_t;
    Vals<T, V> xg{}, xl{};
    T row_q = T(0), row_l = T(0);
    if (div) {
      const int xi = r.xbase + tp.x_t;
      xg = *reinterpret_cast<const Vals<T, V>*>(gm.tab.xg + xi);
      row_q = gm.tab.rg[v] * q_scale;
      if (!keep_e) {
        xl = *reinterpret_cast<const Vals<T, V>*>(gm.tab.xl + xi);
        row_l = gm.tab.rl[v] - tn.log2_norm;
      }
    }
    const Vals<T, V> x = tile.get(c);
    second_moments_chunk<T, V>(sp, x, x, count, r, tp.ux_t, xg, xl, row_q, row_l, r3);
  }
  // reduced for the leader: the centred moments, the divergence sums, sum e a, sum g~ l per axis
  T r[9] = {r3[0], r3[1], r3[2], r3[3], r3[4], s4[3], part[0].gl, part[1].gl, part[2].gl};
  g.sum(r, 2);
  if (g.leader()) {
#pragma unroll
    for (int k = 0; k < kMaxSpatialDims; ++k) {
      ms.centred[k] = r[k];
      ms.target_off[k] = axes[k].off;
      ms.target_g[k] = s[4 + k];
      ms.target_gl[k] = r[6 + k];
    }
    ms.div_a = keep_e ? r[5] : r[3];
    ms.div_b = keep_e ? r[3] : r[4];
    ms.div_c = r[4];
    write_map_outputs(output_args(a), m, ms, sigma_t);
  }
}

}  // namespace dsnt_cuda
