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
// Moments are separable (docs/math.md §7.4): a thread's x are its chunk column's, the same in
// every chunk up to a per-row offset, so it sums w per column (x moments per map) and a chunk's
// w once (its y, z); the variance is centred about the reduced mean, never E[u^2] - E[u]^2.
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

#include "forward_chunks.cuh"
#include "map_reductions.cuh"

namespace dsnt_cuda {

template <typename scalar_t, int C, bool kStandard, class Group, class Tile>
DSNT_DEV void forward_map(const FwdArgs<scalar_t>& a, int m, const Group& g, Tile& tile,
                          const TilePlace<acc_t<scalar_t>>& tp, const GroupMemory<acc_t<scalar_t>>& gm,
                          const OutputArgs<acc_t<scalar_t>>& out) {
  using T = acc_t<scalar_t>;
  using A = Arith<T>;
  using M = ModesOf<kStandard>;
  constexpr int V = kChunkElems<scalar_t>;
  const TileLayout& L = a.layout;
  const M md = modes_view<kStandard>(a.modes);
  const bool softmax = md.softmax(), div = md.divergence(), keep_e = md.softmax_js();

  uint32_t b, l;
  a.keypoints.divmod(static_cast<uint32_t>(m), b, l);
  const scalar_t* map = opaque_global_pointer(a.logits + b * a.stride_b + l * a.stride_l);
  const bool vec = L.whole_chunks && aligned16(map);
  const scalar_t pad = (softmax || md.norm() == Normalization::Sigmoid) ? neg_inf<scalar_t>() : scalar_t(0);

  // ---- pass 1: the tile, the target's tables, the shift
  load_tile<scalar_t, C>(tile, map, gm.memory, tp.row0, tp.row_step, tp.x_t, L.stride_x, vec, pad);
  TargetAxis<T> axes[3];
  AxisPartial<T> part[3];
  const T sigma_t = per_map_value(a.sigma_t, b, l);
  if (div) {
    target_axes(a.target + static_cast<int64_t>(m) * L.dims, sigma_t, L.size, L.dims, axes);
    fill_axes<!kStandard>(axes, L.size, gm.x_origin, gm.x_entries, gm.tab, gm.own_x, gm.own_yz, g.t, g.size(),
                          part);
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
    fill_rows<!kStandard>(L, gm.coords, gm.memory, gm.tab, g.t, g.size());
  }

  // ---- pass 2: weights and first moments
  const T bl = per_map_value(a.beta, b, l) * T(kLog2e);
  T ek[V] = {};
  T s4[4] = {T(0), T(0), T(0), T(0)};  // sum w x_offset, sum w u_y, sum w u_z, sum e a
  T pcs[C];                            // each chunk's sum of w (standard: pass 3's y, z moments)
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const Vals<T, V> w =
        weigh_chunk<kStandard>(md, tile.get(c), shift, bl, gm.coords[tp.row(c)], ek, s4, pcs[c]);
    if (keep_e) tile.put(c, w);
  }
  // the thread's x: u = x0 + k, x0 = its column's centred x (standard: every chunk's)
  const T x0 = tp.ux_t + (kStandard ? gm.coords[0].xoff : T(0));
  FirstMoments<T> f = reduce_first_moments(md, g, ek, s4, x0, part, axes, shift, L.dims, div);
  const MapSums<T>& ms = f.ms;

  // ---- pass 3: centred second moments, divergence terms
  const T q_scale = q_scale_of(f, keep_e);  // scaled JS works with q D
  T r3[5] = {T(0), T(0), T(0), T(0), T(0)};
  if constexpr (kStandard) {
    Vals<T, V> gx = *reinterpret_cast<const Vals<T, V>*>(gm.tab.xg + tp.x_t);
#pragma unroll
    for (int k = 0; k < V; ++k) {  // x variance: per column, from pass 2's sums of the same e
      const T d = x0 + T(k) - ms.ubar[0];
      r3[0] += d * d * ek[k];
      gx.v[k] *= q_scale;
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int v = tp.row(c);
      second_moments_standard(tile.get(c), gm.coords[v], ms.ubar, gx, gm.tab.rg[v], pcs[c], r3);
    }
  } else {
    const SecondPass<T, M> sp = second_pass_of(md, f, bl, L.map_size, div, keep_e);
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
          row_l = gm.tab.rl[v] - f.tn.log2_norm;
        }
      }
      const Vals<T, V> x = tile.get(c);
      second_moments_chunk<T, V>(sp, x, x, count, r, tp.ux_t, xg, xl, row_q, row_l, r3);
    }
  }
  reduce_and_write<kStandard>(g, out, m, f, r3, s4[3], part, axes, keep_e, sigma_t);
}

}  // namespace dsnt_cuda
