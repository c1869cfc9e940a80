// The streamed forward: the fallback for maps larger than the largest cluster holds on chip
// (and for builds without clusters, before sm_90). A CTA per map, two passes over the logits in
// HBM, tile by tile, the next tile's loads issued before the current one is processed:
//
//   pass A  online: each thread keeps its running max and rescales its sums when it grows
//           (weights 2^(beta log2e (z - running max)), the largest exactly 1), then the CTA
//           rescales every thread's sums to the map's max: sum w, first moments, sum e a;
//   pass B  the exact form 2^(beta log2e (z - shift)): centred second moments and the
//           divergence, the target factors computed per element (no tables: an axis may be
//           longer than shared memory).
// The per-chunk work is forward_map.cuh's (weigh_chunk, second_moments_chunk).
#pragma once

#include "forward_map.cuh"

namespace dsnt_cuda {

template <typename scalar_t>
constexpr int kStreamedChunks = kChunksPerThread<scalar_t, TileKind::Streamed>;

// The record of virtual row v, computed (the rows of a streamed map may not fit a table): the
// general kernel's, whose rows may have several segments.
template <typename T>
DSNT_DEV void streamed_record(const TileLayout& L, int v, RowCoords<T>& rc, RowMemory& rm) {
  const bool live = v < L.vrows;
  uint32_t row = static_cast<uint32_t>(live ? v : 0), seg = 0, y, z;
  L.segs_div.divmod(row, row, seg);
  L.size_y_div.divmod(row, z, y);
  const int x0 = static_cast<int>(seg) * L.row_width;
  rc.xoff = static_cast<T>(x0) - centred_offset<T>(L.size[0]);
  rc.uy = static_cast<T>(y) - centred_offset<T>(L.size[1]);
  rc.uz = static_cast<T>(z) - centred_offset<T>(L.size[2]);
  rc.xbase = x0;  // the x index itself: no tables here
  rm.offset = static_cast<int>(x0 * L.stride_x + y * L.stride_y + z * L.stride_z);
  const int left = L.size[0] - x0;
  rm.xcount = live ? (left < L.row_width ? left : L.row_width) : 0;
  rm.contiguous_offset = static_cast<int>(row) * L.size[0] + x0;
  rm.pad_ = 0;
}

// A thread's rows in the standard kernel (every row one virtual row, host_common.cuh): chunk c
// of tile t is row vr + (t C + c) tile_rows, so each chunk's row is tile_rows rows after the
// one before. Its memory offset and its centred u_y, u_z follow by additions, with at most one
// carry of y into z (streamed_record divides twice per chunk, in the load and again in the
// pass). A walk feeds either the loads (offset, y) or the passes (u_y, u_z); the compiler drops
// the fields a walk's user never reads. The sums of u_y, u_z are exact wherever the direct
// form y - (S_y - 1) / 2 is (|u| < 2^23 in float).
template <typename T>
struct RowWalk {
  int v;            // the row (v >= vrows: beyond the map)
  int y;            // its y
  uint32_t offset;  // y stride_y + z stride_z: < 2^31 on the map (host_common.cuh); unsigned, so
                    // that the rows a walk passes beyond the map wrap instead of overflowing
  T uy, uz;         // its centred y, z
};

// One step of a walk: tile_rows rows, i.e. dz planes and dy rows (uy, uz: the same in T), and
// their offset; `carry` is the offset of a y that passed S_y into the next z, `uy_last` the
// largest u_y.
template <typename T>
struct RowStep {
  int rows, dy;
  uint32_t offset, carry;  // modulo 2^32: a carry may be negative (z stride below S_y y strides)
  T uy, uz, size_y, uy_last;
};

template <typename T>
DSNT_DEV RowStep<T> row_step_of(const TileLayout& L) {
  uint32_t dz, dy;
  L.size_y_div.divmod(static_cast<uint32_t>(L.tile_rows), dz, dy);
  const int y = static_cast<int>(dy), z = static_cast<int>(dz);
  return {L.tile_rows,
          y,
          static_cast<uint32_t>(y * L.stride_y + z * L.stride_z),
          static_cast<uint32_t>(L.stride_z - L.size[1] * L.stride_y),
          static_cast<T>(y),
          static_cast<T>(z),
          static_cast<T>(L.size[1]),
          centred_offset<T>(L.size[1])};
}

// The walk of the thread in virtual row vr of a tile (none: a thread outside the tile's rows).
template <typename T>
DSNT_DEV RowWalk<T> row_walk_start(const TileLayout& L, int vr, bool in_tile) {
  uint32_t z, y;
  L.size_y_div.divmod(static_cast<uint32_t>(in_tile ? vr : 0), z, y);
  const int yi = static_cast<int>(y), zi = static_cast<int>(z);
  return {in_tile ? vr : L.vrows, yi, static_cast<uint32_t>(yi * L.stride_y + zi * L.stride_z),
          static_cast<T>(yi) - centred_offset<T>(L.size[1]),
          static_cast<T>(zi) - centred_offset<T>(L.size[2])};
}

template <typename T>
DSNT_DEV void advance(RowWalk<T>& w, const RowStep<T>& s, int size_y) {
  w.v += s.rows;
  w.y += s.dy;
  w.offset += s.offset;
  if (w.y >= size_y) {
    w.y -= size_y;
    w.offset += s.carry;
  }
  w.uy += s.uy;
  w.uz += s.uz;
  if (w.uy > s.uy_last) {
    w.uy -= s.size_y;
    w.uz += T(1);
  }
}

// What the loads need of the walk's row: a row beyond the map reads nothing.
template <typename T>
DSNT_DEV RowMemory walk_memory(const RowWalk<T>& w, const TileLayout& L) {
  const bool live = w.v < L.vrows;
  return {live ? static_cast<int>(w.offset) : 0, live ? L.size[0] : 0, 0, 0};
}

// kStandard: the standard loss's modes (softmax + JS) known at compile time; a thread's x is
// then the same in every chunk (x moments and variance per map, from per-column sums, as the
// on-chip standard kernels) and its rows are walked (RowWalk).
template <typename scalar_t, bool kStandard>
__global__ void __launch_bounds__(512, 2) dsnt_fwd_streamed_kernel(const FwdArgs<scalar_t> a) {
  using T = acc_t<scalar_t>;
  using A = Arith<T>;
  using M = ModesOf<kStandard>;
  constexpr int V = kChunkElems<scalar_t>;
  constexpr int C = kStreamedChunks<scalar_t>;
  const TileLayout& L = a.layout;
  const M md = modes_view<kStandard>(a.modes);
  const bool softmax = md.softmax(), div = md.divergence(), scaled_js = md.softmax_js();
  T* scratch = dynamic_smem<T>();
  const CtaGroup<T> g{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x / 32), scratch};
  const int vr = g.t / L.cols;
  const bool in_tile = vr < L.tile_rows;
  const int x_t = (g.t - vr * L.cols) * V;
  const T ux_t = static_cast<T>(x_t);
  const int tiles = (L.vrows + L.slice_vrows - 1) / L.slice_vrows;
  auto vrow = [&](int tile, int c) {
    return in_tile ? tile * L.slice_vrows + vr + c * L.tile_rows : L.vrows;
  };
  // standard: the walks' step, and the u of every row's first x
  const RowStep<T> step = kStandard ? row_step_of<T>(L) : RowStep<T>{};
  const T x0 = ux_t - centred_offset<T>(L.size[0]);  // standard: the thread's first u_x

  // Chunk c of `tile`: its coordinates and memory record; standard: the walk's row, and the
  // walk steps on (the loads' walk leaves its coordinates unread: the compiler drops them).
  auto chunk_record = [&](int tile, int c, RowWalk<T>& w, RowCoords<T>& rc, RowMemory& rm) {
    if constexpr (kStandard) {
      rc = RowCoords<T>{w.uy, w.uz, x0, 0};
      rm = walk_memory(w, L);
      advance(w, step, L.size[1]);
    } else {
      streamed_record(L, vrow(tile, c), rc, rm);
    }
  };

  const OutputArgs<T> out = output_args(a);  // its per-axis divisions once, not per map
  for (int m = blockIdx.x; m < a.maps; m += gridDim.x) {
    uint32_t b, l;
    a.keypoints.divmod(static_cast<uint32_t>(m), b, l);
    const scalar_t* map = opaque_global_pointer(a.logits + b * a.stride_b + l * a.stride_l);
    const bool vec = L.whole_chunks && aligned16(map);
    const scalar_t pad = (softmax || md.norm() == Normalization::Sigmoid) ? neg_inf<scalar_t>() : scalar_t(0);
    const T bl = per_map_value(a.beta, b, l) * T(kLog2e);
    RowWalk<T> ahead, at;  // standard: the rows of the next load, of the next chunk processed
    auto load = [&](int tile, RegisterTile<T, C, V>& dst) {
      RowMemory rows[C];  // this thread's records of the tile
#pragma unroll
      for (int c = 0; c < C; ++c) {
        RowCoords<T> rc;
        RowMemory rm;
        chunk_record(tile, c, ahead, rc, rm);
        rows[c] = rm;
      }
      load_tile<scalar_t, C>(dst, map, rows, 0, 1, x_t, L.stride_x, vec, pad);
    };

    // ---- pass A
    T run = neg_inf<T>();
    T ek[V] = {}, s4[4] = {};  // as forward_map.cuh: sum w per column, sum w x_off, u_y, u_z, sum e a
    auto rescale = [&](T from, T to) {  // the sums of weights relative to `from`, made relative to `to`
      const T d = (to - from) * bl, f = A::exp2(-d);
      T w = T(0);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        w += ek[k];
        ek[k] *= f;
      }
      s4[3] = f * (s4[3] - d * w);
      for (int i = 0; i < 3; ++i) s4[i] *= f;
    };
    RegisterTile<T, C, V> cur, next;
    ahead = at = kStandard ? row_walk_start<T>(L, vr, in_tile) : RowWalk<T>{};  // not kept: registers
    load(0, cur);
    for (int tile = 0; tile < tiles; ++tile) {
      if (tile + 1 < tiles) load(tile + 1, next);
      if (softmax) {
        T top = neg_inf<T>();
#pragma unroll
        for (int c = 0; c < C; ++c) {
#pragma unroll
          for (int k = 0; k < V; ++k) top = max_keep_nan(top, cur.v[c][k]);
        }
        if (!(top <= run)) {  // a larger (or NaN) logit: rescale the sums to it
          const T fresh = max_keep_nan(run, top);
          if (run != neg_inf<T>()) rescale(run, fresh);
          run = fresh;
        }
      }
      const bool weigh = !softmax || run != neg_inf<T>();
#pragma unroll
      for (int c = 0; c < C; ++c) {
        RowCoords<T> rc;
        RowMemory rm;
        chunk_record(tile, c, at, rc, rm);
        T pc;
        if (weigh) weigh_chunk<kStandard>(md, cur.get(c), run, bl, rc, ek, s4, pc);
      }
      cur = next;
    }
    T shift = T(0);
    if (softmax) {
      shift = g.max(run, 0);
      if (run != neg_inf<T>()) rescale(run, shift);  // from this thread's running max to the map's
    }
    TargetAxis<T> axes[3];
    AxisPartial<T> part[3];
    const T sigma_t = per_map_value(a.sigma_t, b, l);
    if (div) {
      target_axes(a.target + static_cast<int64_t>(m) * L.dims, sigma_t, L.size, L.dims, axes);
#pragma unroll 1
      for (int k = 0; k < kMaxSpatialDims; ++k) {
        for (int j = g.t; j < L.size[k]; j += g.size()) {
          T gv, lv;
          target_entry(axes[k], static_cast<T>(j) - centred_offset<T>(L.size[k]), gv, lv);
          part[k].g += gv;
          part[k].gl += gv * lv;
        }
      }
    }
    FirstMoments<T> f =
        reduce_first_moments(md, g, ek, s4, kStandard ? x0 : ux_t, part, axes, shift, L.dims, div);
    const MapSums<T>& ms = f.ms;

    // ---- pass B
    const SecondPass<T, M> sp = second_pass_of(md, f, bl, L.map_size, div, scaled_js);
    const T q_scale = q_scale_of(f, scaled_js);
    T r3[5] = {T(0), T(0), T(0), T(0), T(0)};
    Vals<T, V> gx{};  // standard: the thread's x factors g~_x q_scale, once per map
    if constexpr (kStandard) {
#pragma unroll
      for (int k = 0; k < V; ++k) {  // x variance: per column, from pass A's sums of e
        const T d = x0 + T(k) - ms.ubar[0];
        r3[0] += d * d * ek[k];
        T lx;
        if (x_t + k < L.size[0]) target_entry(axes[0], x0 + T(k), gx.v[k], lx);
        gx.v[k] *= q_scale;
      }
    }
    ahead = at = kStandard ? row_walk_start<T>(L, vr, in_tile) : RowWalk<T>{};  // not kept: registers
    load(0, cur);
    for (int tile = 0; tile < tiles; ++tile) {
      if (tile + 1 < tiles) load(tile + 1, next);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        RowCoords<T> rc;
        RowMemory rm;
        chunk_record(tile, c, at, rc, rm);
        const Vals<T, V> x = cur.get(c);
        if constexpr (kStandard) {
          T gy, ly, gz, lz;
          target_entry(axes[1], rc.uy, gy, ly);
          target_entry(axes[2], rc.uz, gz, lz);
          const T row_q = rm.xcount > 0 ? gy * gz : T(0);  // a row beyond the map sees no target
          Vals<T, V> e;
          T pc = T(0);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            e.v[k] = A::exp2(scaled_js_log2_weight(x.v[k], shift, bl));
            pc += e.v[k];
          }
          second_moments_standard(e, rc, ms.ubar, gx, row_q, pc, r3);
        } else {
          Vals<T, V> xg{}, xl{};
          T row_q = T(0), row_l = T(0);
          if (div) {
            T gy, ly, gz, lz;
            target_entry(axes[1], rc.uy, gy, ly);
            target_entry(axes[2], rc.uz, gz, lz);
            row_q = rm.xcount > 0 ? gy * gz * q_scale : T(0);  // a padding row sees no target
            row_l = ly + lz - f.tn.log2_norm;
#pragma unroll
            for (int k = 0; k < V; ++k) {
              if (rc.xbase + x_t + k < L.size[0])
                target_entry(axes[0], rc.xoff + ux_t + T(k), xg.v[k], xl.v[k]);
            }
          }
          Vals<T, V> w = x;
          if (scaled_js) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
              w.v[k] = A::exp2(scaled_js_log2_weight(x.v[k], shift, bl));
            }
          }
          second_moments_chunk<T, V>(sp, x, w, rm.xcount - x_t, rc, ux_t, xg, xl, row_q, row_l, r3);
        }
      }
      cur = next;
    }
    reduce_and_write<kStandard>(g, out, m, f, r3, s4[3], part, axes, scaled_js, sigma_t);
  }
  finish_loss(a, scratch);
}

}  // namespace dsnt_cuda
