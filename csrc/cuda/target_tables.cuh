// The Gaussian target of one map as tables in shared memory (docs/math.md §4, §7.1):
//   x table:   per x of the group's range, the scaled factor g~_x = 2^(l_x - off_x) and l_x;
//   y, z:      the same per axis (one entry {1, 0} for an absent axis);
//   row table: per virtual row of the group, g~_y g~_z and l_y + l_z.
// so that q_i = g~_x * g~_yz * target_scale and log2 q_i = l_x + l_yz - log2_norm cost one
// multiply or add per element. off_k, the largest l_k on the axis, is l_k at the grid point
// nearest the target mean: known without a reduction. The per-axis sums (sum g~, sum g~ l,
// sum g~ u) are accumulated by whoever computes an entry and reduced with the map's other sums.
// Every entry is computed by the functions of csrc/dsnt_math.h.
#pragma once

#include "common.cuh"
#include "tile_layout.cuh"

namespace dsnt_cuda {

// Per-axis constants of the target of one map.
template <typename T>
struct TargetAxis {
  T centre;  // target mean in centred pixels
  T coef;    // l(u) = -((u - centre) coef)^2
  T off;     // max over the grid of l
};

template <typename T>
DSNT_DEV TargetAxis<T> target_axis(T mu, T coef, int S) {
  TargetAxis<T> a;
  a.centre = target_centre(mu, S);
  a.coef = coef;
  // the grid point nearest the mean: clamp(round(centre + (S-1)/2)) (NaN stays NaN through l)
  const T c0 = centred_offset<T>(S);
  T j = rint(a.centre + c0);
  j = j < T(0) ? T(0) : (j > T(S - 1) ? T(S - 1) : j);
  a.off = target_log2_factor(j - c0, a.centre, a.coef);
  return a;
}

// The axes of the target of one map (mu: its dims means); an absent axis is flat: {g~ = 1, l = 0}.
template <typename T>
DSNT_DEV void target_axes(const T* mu, T sigma_t, const int (&size)[kMaxSpatialDims], int dims,
                          TargetAxis<T> (&axes)[kMaxSpatialDims]) {
  const T coef = target_log2_coef(sigma_t);
#pragma unroll
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    axes[k] = k < dims ? target_axis(mu[k], coef, size[k]) : TargetAxis<T>{T(0), T(0), T(0)};
  }
}

// One table entry: the scaled factor and the (floored) log2 factor at centred coordinate u.
template <typename T>
DSNT_DEV void target_entry(const TargetAxis<T>& a, T u, T& g, T& l) {
  const T l2 = target_log2_factor(u, a.centre, a.coef);
  g = Arith<T>::exp2(l2 - a.off);
  l = Arith<T>::floor_at(l2, Precision<T>::kLog2Floor);
}

// Sums over an axis (the entries a thread owns; reduced afterwards).
template <typename T>
struct AxisPartial {
  T g = T(0);   // sum g~
  T gl = T(0);  // sum g~ l      (forward: sum q log2 q)
  T gu = T(0);  // sum g~ (u - m) (backward: the target factor's own mean, as an offset from m)
};

// Where the tables of one group live (all in dynamic shared memory).
template <typename T>
struct TargetTables {
  T* xg;  // x entries, indexed by RowCoords::xbase + x
  T* xl;
  T* yg;  // S_y entries
  T* yl;
  T* zg;  // S_z entries
  T* zl;
  T* rg;  // slice_vrows entries
  T* rl;
};

// The x, y and z tables of a group in one loop over their entries (x entries [0, nx) for
// x = x_first + i, then S_y, then S_z); entries past an axis are {0, floor}. The entries a
// group owns (own_x, own_yz) are added to `sums`. kLog2: the log2 tables are written too (the
// scaled JS of the standard forward reads only the factors).
template <bool kLog2 = true, typename T, class Tables>
DSNT_DEV void fill_axes(const TargetAxis<T> (&axes)[kMaxSpatialDims], const int (&size)[kMaxSpatialDims],
                        int x_first, int nx, const Tables& tab, bool own_x, bool own_yz, int t, int step,
                        AxisPartial<T> (&sums)[kMaxSpatialDims]) {
  const int ny = size[1], total = nx + ny + size[2];
#pragma unroll 1
  for (int i = t; i < total; i += step) {
    const bool on_x = i < nx, on_y = !on_x && i < nx + ny;
    const int k = on_x ? 0 : (on_y ? 1 : 2);
    const int j = on_x ? x_first + i : i - (on_y ? nx : nx + ny);
    const TargetAxis<T> a = on_x ? axes[0] : (on_y ? axes[1] : axes[2]);
    const int S = on_x ? size[0] : (on_y ? size[1] : size[2]);
    T* g = on_x ? tab.xg + i : (on_y ? tab.yg + j : tab.zg + j);
    T gv = T(0), lv = Precision<T>::kLog2Floor;
    const T u = static_cast<T>(j) - centred_offset<T>(S);
    if (j < S) target_entry(a, u, gv, lv);
    *g = gv;
    if (kLog2) *(on_x ? tab.xl + i : (on_y ? tab.yl + j : tab.zl + j)) = lv;
    if (on_x ? own_x : own_yz) {
      const T gl = gv * lv, gu = gv * (u - a.centre);
      sums[0].g += k == 0 ? gv : T(0);
      sums[0].gl += k == 0 ? gl : T(0);
      sums[0].gu += k == 0 ? gu : T(0);
      sums[1].g += k == 1 ? gv : T(0);
      sums[1].gl += k == 1 ? gl : T(0);
      sums[1].gu += k == 1 ? gu : T(0);
      sums[2].g += k == 2 ? gv : T(0);
      sums[2].gl += k == 2 ? gl : T(0);
      sums[2].gu += k == 2 ? gu : T(0);
    }
  }
}

// y, z table index of a row record; -1 for a padding row (beyond the map or slice), whose
// elements must see a zero target.
template <typename T>
DSNT_DEV void row_indices(const TileLayout& L, const RowCoords<T>& rc, const RowMemory& rm, int& y, int& z) {
  y = rm.xcount > 0 ? static_cast<int>(rc.uy + centred_offset<T>(L.size[1])) : -1;
  z = static_cast<int>(rc.uz + centred_offset<T>(L.size[2]));
}

// The row table from the y and z tables: entry v for virtual row v of the group, the padding
// record included (after a sync that made the y, z tables visible). kLog2 as fill_axes.
template <bool kLog2 = true, typename T>
DSNT_DEV void fill_rows(const TileLayout& L, const RowCoords<T>* records, const RowMemory* memory,
                        const TargetTables<T>& tab, int t, int step) {
#pragma unroll 1
  for (int v = t; v <= L.slice_vrows; v += step) {
    int y, z;
    row_indices(L, records[v], memory[v], y, z);
    tab.rg[v] = y >= 0 ? tab.yg[y] * tab.zg[z] : T(0);
    if (kLog2) tab.rl[v] = y >= 0 ? tab.yl[y] + tab.zl[z] : Precision<T>::kLog2Floor;
  }
}

// The per-map target constants from the reduced per-axis sums (docs/math.md §4).
template <typename T>
struct MapTarget {
  TargetNorm<T> norm;  // log2_norm, scale, one_minus_rho, ubar_g
  T mass;              // Q = sum q
  T q_log2q;           // sum q log2 q
};

template <typename T>
DSNT_DEV MapTarget<T> map_target(const TargetAxis<T> (&axes)[kMaxSpatialDims], const T (&g)[kMaxSpatialDims],
                                 const T (&gl)[kMaxSpatialDims], const T (&gu)[kMaxSpatialDims], int dims) {
  TargetAxisSums<T> s[kMaxSpatialDims];
#pragma unroll
  for (int k = 0; k < kMaxSpatialDims; ++k) s[k] = {axes[k].off, g[k], gu[k]};
  MapTarget<T> t;
  t.norm = target_norm(s, dims);
  // sum_i q_i log2 q_i = scale sum_k (sum_j g~_k l_k) prod_{k' != k} G~_k' - log2_norm Q
  T prod = T(1), cross = T(0);
#pragma unroll
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    if (k >= dims) break;
    cross = cross * g[k] + gl[k] * prod;
    prod *= g[k];
  }
  t.mass = t.norm.scale * prod;
  t.q_log2q = t.norm.scale * cross - t.norm.log2_norm * t.mass;
  return t;
}

}  // namespace dsnt_cuda
