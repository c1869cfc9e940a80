// The backward kernel (see backward.cuh): per (map, slice) a group builds the map's tables,
// then one pass reads the logits chunk by chunk, writes dLoss/dz and accumulates the
// target-mean and beta gradients.
#pragma once

#include "backward.cuh"

namespace dsnt_cuda {

// Probe builds count the standard loss, whose target and beta take no gradient.
#if defined(DSNT_PROBE_NORMALIZATION)
#define DSNT_EXTRA_GRADS(flag) false
#else
#define DSNT_EXTRA_GRADS(flag) (flag)
#endif

template <typename scalar_t, bool kStandard, class Group>
DSNT_DEV void backward_map(const BwdArgs<scalar_t>& a, int m, int slice, const Group& g,
                           const TilePlace<acc_t<scalar_t>>& tp, const GroupMemory<acc_t<scalar_t>>& gm,
                           const BwdTables<acc_t<scalar_t>>& tab) {
  using T = acc_t<scalar_t>;
  using A = Arith<T>;
  constexpr int V = kChunkElems<scalar_t>;
  constexpr int C = kChunksPerThread<scalar_t, TileKind::Backward>;
  const TileLayout& L = a.layout;
  const auto md = modes_view<kStandard>(a.modes);
  const bool hot = md.softmax_js();
  // the standard-loss kernel is launched without target, beta or variance gradients
  const bool target_grad = !kStandard && DSNT_EXTRA_GRADS(a.needs_target_grad);
  const bool beta_grad = !kStandard && DSNT_EXTRA_GRADS(a.needs_beta_grad) && md.softmax();

  uint32_t b, l;
  a.keypoints.divmod(static_cast<uint32_t>(m), b, l);
  const scalar_t* map = opaque_global_pointer(a.logits + b * a.stride_b + l * a.stride_l);
  scalar_t* grad_map = opaque_global_pointer(a.grad_logits + static_cast<int64_t>(m) * L.map_size);
  const bool vec = L.whole_chunks && aligned16(map);
  const scalar_t pad =
      (md.softmax() || md.norm() == Normalization::Sigmoid) ? neg_inf<scalar_t>() : scalar_t(0);
  RegisterTile<T, C, V> tile;
  load_tile<scalar_t, C>(tile, map, gm.memory, tp.row0, tp.row_step, tp.x_t, L.stride_x, vec, pad);

  BwdMap<T> s = backward_map_constants<kStandard>(a, m, b, l);
  // With a variance upstream on a map one group holds, G - sum p G is formed axis by axis from
  // this pass's own first and second moments (axis_grad_centred): nu (u - ubar)^2 and nu Var
  // are in the thousands on a wide map while their difference is in the hundreds, and the
  // forward's Var rounds independently of this pass's G. One pass over the registers and one
  // reduction, no extra read of the logits.
  T m1[3] = {T(0), T(0), T(0)}, m2[3] = {T(0), T(0), T(0)};
  const bool var_grad = !kStandard && DSNT_EXTRA_GRADS(s.var_grad);  // a constant for the compiler
  if (var_grad) {
    T mom[6] = {T(0), T(0), T(0), T(0), T(0), T(0)};
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const RowCoords<T> r = gm.coords[tp.row(c)];
      const Vals<T, V> x = tile.get(c);
      const T d0 = r.xoff + tp.ux_t - s.ax[0].ubar;
      T pc = T(0);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const T w =
            md.softmax() ? A::exp2(softmax_log2_weight(x.v[k], s.shift, s.bl)) : rectify(x.v[k], md.norm());
        const T p = w * s.inv_p, d = d0 + T(k);
        mom[0] += p * d;
        mom[1] += p * d * d;
        pc += p;
      }
      const T dy = r.uy - s.ax[1].ubar, dz = r.uz - s.ax[2].ubar;
      mom[2] += pc * dy;
      mom[3] += pc * dy * dy;
      mom[4] += pc * dz;
      mom[5] += pc * dz * dz;
    }
    g.sum(mom, 2);
    for (int k = 0; k < kMaxSpatialDims; ++k) {
      m1[k] = mom[2 * k];
      m2[k] = mom[2 * k + 1];
    }
  }
  auto grad_part = [&](T u, int k) {
    return var_grad ? axis_grad_centred(u, s.ax[k], m1[k], m2[k]) : axis_grad(u, s.ax[k]);
  };
  AxisPartial<T> part[3];
  const T cx = centred_offset<T>(L.size[0]);
#pragma unroll 1
  for (int i = g.t; i < gm.x_entries; i += g.size()) {
    tab.xgrad[i] = s.table_scale * grad_part(static_cast<T>(gm.x_origin + i) - cx, 0);
  }
  if (s.div) {
    fill_axes(s.axes, L.size, gm.x_origin, gm.x_entries, tab, gm.own_x, gm.own_yz, g.t, g.size(), part);
    if (!gm.own_x) {  // a one-row map split over CTAs: the x sums over the whole axis, untabulated
#pragma unroll 1
      for (int j = g.t; j < L.size[0]; j += g.size()) {
        T gv, lv;
        const T u = static_cast<T>(j) - cx;
        target_entry(s.axes[0], u, gv, lv);
        part[0].g += gv;
        part[0].gu += gv * (u - s.axes[0].centre);
      }
    }
    T sums[6] = {part[0].g, part[0].gu, part[1].g, part[1].gu, part[2].g, part[2].gu};
    g.sum(sums, 1);
    TargetAxisSums<T> ts[3];
#pragma unroll
    for (int k = 0; k < kMaxSpatialDims; ++k) ts[k] = {s.axes[k].off, sums[2 * k], sums[2 * k + 1]};
    s.tn = target_norm(ts, L.dims);
  } else {
    g.sync();
  }
  // rows (and the x target-mean gradient, which needs the target's own mean)
#pragma unroll 1
  for (int v = g.t; v <= L.slice_vrows; v += g.size()) {
    const RowCoords<T> r = gm.coords[v];
    tab.rgrad[v] = s.table_scale * (grad_part(r.uy, 1) + grad_part(r.uz, 2)) + s.row_const;
    T rg = T(0), rl = Precision<T>::kLog2Floor;
    if (s.div) {
      int y, z;
      row_indices(L, r, gm.memory[v], y, z);
      rg = y >= 0 ? tab.yg[y] * tab.zg[z] : T(0);
      rl = y >= 0 ? tab.yl[y] + tab.zl[z] : Precision<T>::kLog2Floor;
      tab.rty[v] =
          target_mean_grad_offset(r.uy, s.axes[1].centre, s.tn.ubar_g[1], s.tn.one_minus_rho, s.t_coef[1]);
      tab.rtz[v] =
          target_mean_grad_offset(r.uz, s.axes[2].centre, s.tn.ubar_g[2], s.tn.one_minus_rho, s.t_coef[2]);
    }
    tab.rg[v] = rg;
    tab.rl[v] = rl;
  }
  if (s.div && target_grad) {
#pragma unroll 1
    for (int i = g.t; i < gm.x_entries; i += g.size()) {
      const T u = static_cast<T>(gm.x_origin + i) - cx;
      tab.xt[i] =
          target_mean_grad_offset(u, s.axes[0].centre, s.tn.ubar_g[0], s.tn.one_minus_rho, s.t_coef[0]);
    }
  }
  if (!s.div && hot) {  // the hot path reads the target tables: a flat, zero target
#pragma unroll 1
    for (int i = g.t; i < gm.x_entries; i += g.size()) tab.xg[i] = T(0);
  }
  g.sync();

  // The element pass. An element's gradient is f (G - sum_j p_j G_j): `element` gives p, its
  // log2, q, f and G (hot path: f = e, G scaled by beta / D and with the divergence term), the
  // tables holding G's separable part less its mean.
  const T q_scale = s.div ? s.tn.scale * (hot ? T(1) / s.inv_p : T(1)) : T(0);
  struct Element {
    T p, l2p, q, f, G, af;
  };
  auto element = [&](T z, int k, int xi, int v, int count, const Vals<T, V>& xgrad, const Vals<T, V>& xg,
                     T row_grad, T row_q, T row_l) {
    Element e{T(0), T(0), T(0), T(0), xgrad.v[k] + row_grad, T(0)};
    if (hot) {
      const T l2w = softmax_log2_weight(z, s.shift, s.bl);
      e.f = A::exp2(l2w);
      e.af = max_with(l2w, Precision<T>::kLog2Floor);
      const T wq = xg.v[k] * row_q;
      e.G += s.omega_s * (e.af - A::log2(max_with(e.f + wq, Precision<T>::kMinNormal)));
      e.p = e.f * s.inv_p;
      e.l2p = e.af + s.log2_inv_p;
      e.q = wq * s.inv_p;
      return e;
    }
    if (md.softmax()) {
      const T l2w = softmax_log2_weight(z, s.shift, s.bl);
      e.p = A::exp2(l2w) * s.inv_p;
      e.l2p = A::floor_at(l2w + s.log2_inv_p, Precision<T>::kLog2Floor);
      e.af = max_with(l2w, Precision<T>::kLog2Floor);
      e.f = s.beta * e.p;
    } else if (md.none()) {
      e.p = z;
      e.l2p = A::floor_at(A::log2(e.p), Precision<T>::kLog2Floor);
      e.f = T(1);
    } else if (s.uniform) {
      const bool valid = k < count;
      e.p = valid ? s.inv_p : T(0);
      e.l2p = valid ? s.log2_inv_p : Precision<T>::kLog2Floor;
    } else {
      const T rz = rectify(z, md.norm());
      e.p = rz * s.inv_p;
      e.l2p = rectified_log2(z, rz, md.norm()) + s.log2_inv_p;
      e.f = rectify_grad(z, md.norm()) * s.inv_p;
    }
    if (s.div) {
      e.q = xg.v[k] * row_q;
      const T l2q = tab.xl[xi + k] + row_l;
      const bool exact = !md.softmax();
      e.G += s.omega_s * (md.reg() == Regularizer::JS ? js_grad_p(e.p, e.l2p, e.q, l2q, exact)
                                                      : kl_grad_p(e.p, e.l2p, e.q, l2q, exact));
    }
    return e;
  };
  // the standard kernel's x is the same in every chunk: its x table entries once per map
  Vals<T, V> xgrad_t{}, xg_t{};
  if (kStandard) {
    xgrad_t = *reinterpret_cast<const Vals<T, V>*>(tab.xgrad + tp.x_t);
    xg_t = *reinterpret_cast<const Vals<T, V>*>(tab.xg + tp.x_t);
  }
  auto chunk_tables = [&](int c, int& v, int& xi, int& count, Vals<T, V>& xgrad, Vals<T, V>& xg, T& row_grad,
                          T& row_q, T& row_l) {
    v = tp.row(c);
    xi = gm.coords[v].xbase + tp.x_t;
    count = gm.memory[v].xcount - tp.x_t;
    xgrad = kStandard ? xgrad_t : *reinterpret_cast<const Vals<T, V>*>(tab.xgrad + xi);
    row_grad = tab.rgrad[v];
    if (hot || s.div) {
      xg = kStandard ? xg_t : *reinterpret_cast<const Vals<T, V>*>(tab.xg + xi);
      row_q = tab.rg[v] * q_scale;
      row_l = tab.rl[v] - s.tn.log2_norm;
    }
  };
  T acc[4] = {T(0), T(0), T(0), T(0)};  // target-mean gradient x, y, z; beta gradient
  Vals<T, V> unaligned[C];              // the gradient of a map whose rows are not aligned
  CompensatedSum<T> target_sum[3];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    int v, xi, count;
    Vals<T, V> xgrad, xg{};
    T row_grad, row_q = T(0), row_l = T(0);
    chunk_tables(c, v, xi, count, xgrad, xg, row_grad, row_q, row_l);
    const RowMemory rm = gm.memory[v];
    const Vals<T, V> x = tile.get(c);
    Vals<T, V> out;
    T wsum = T(0);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const Element e = element(x.v[k], k, xi, v, count, xgrad, xg, row_grad, row_q, row_l);
      out.v[k] = s.uniform ? T(0) : e.f * e.G;  // the uniform fallback has no gradient, even NaN
      if (beta_grad) acc[3] += e.af * out.v[k];
      if (target_grad && s.div) {
        const T l2q = tab.xl[xi + k] + row_l;
        const T w =
            md.reg() == Regularizer::JS ? js_target_weight(e.p, e.l2p, e.q, l2q) : kl_target_weight(e.p, e.q);
        target_sum[0].add(w * tab.xt[xi + k]);
        wsum += w;
      }
    }
    if (target_grad && s.div) {
      target_sum[1].add(tab.rty[v] * wsum);
      target_sum[2].add(tab.rtz[v] * wsum);
    }
    store_chunk<scalar_t, C>(grad_map, rm, tp.x_t, a.vec_out, c, out, unaligned);
  }
  if (!a.vec_out)
    store_tile_masked<scalar_t, C>(grad_map, gm.memory, tp.row0, tp.row_step, tp.x_t, unaligned);
  if (target_grad || beta_grad) {
    for (int k = 0; k < 3; ++k) acc[k] = target_sum[k].value();
    g.sum(acc, 0);
    if (g.t == 0) {
      T* out = a.partials + (static_cast<int64_t>(m) * a.slices + slice) * 4;
      for (int k = 0; k < L.dims; ++k) {
        out[k] = (s.div ? s.up.omega * acc[k] : T(0)) + (slice == 0 ? s.up.target_direct[k] : T(0));
      }
      out[3] = acc[3] / (s.beta * s.beta * T(kLog2e));
    }
  } else {
    g.sync();  // the tables are rewritten for the next map
  }
}

// kStandard: the standard-loss kernel (kernel_args.cuh, StandardModes).
// Launch bounds: 2 CTAs of 256 threads an SM, i.e. up to 128 registers: a thread holds 32
// elements plus the map's constants, which spilled at 3 CTAs (80 registers). 16 warps an SM,
// each with 8 16-byte loads in flight per thread, still cover HBM latency.
template <typename scalar_t, bool kWarp, bool kStandard>
__global__ void __launch_bounds__(256, 2) dsnt_bwd_kernel(const BwdArgs<scalar_t> a) {
  using T = acc_t<scalar_t>;
  constexpr int C = kChunksPerThread<scalar_t, TileKind::Backward>;
  const TileLayout& L = a.layout;
  const int warps = static_cast<int>(blockDim.x / 32);
  const SmemPlan& sp = a.smem;
  unsigned char* smem = dynamic_smem<unsigned char>();
  // A CTA always works on the same slice of its maps (the host makes the grid a multiple of
  // `slices`), so its row records are built once.
  const int slice = kWarp ? 0 : static_cast<int>(blockIdx.x) % a.slices;
  const int v_first = slice * L.slice_vrows;
  GroupPlace<T> place = place_group<kWarp, T>(L, sp, smem, v_first);
  GroupMemory<T>& gm = place.gm;
  // No CTA sees another's sums here: every CTA sums whole axes itself. Its x tables cover the
  // whole x axis, except for one-row maps split over CTAs (below).
  gm.own_x = L.rows > 1 || a.slices == 1;
  gm.own_yz = true;
  const int t = place.t;
  T* scratch = place.scratch;
  const BwdTables<T> tab = carve_backward_tables<T>(place.block, sp);
  const TilePlace<T> tp = tile_place<T>(L, t);
  DSNT_SYNCTHREADS(records_built);
  if constexpr (kWarp) {
    const WarpGroup<T> g{t, scratch};
    for (int m = static_cast<int>(blockIdx.x) * warps + place.group; m < a.maps;
         m += static_cast<int>(gridDim.x) * warps) {
      backward_map<scalar_t, kStandard>(a, m, 0, g, tp, gm, tab);
    }
  } else {
    const CtaGroup<T> g{t, warps, scratch};
    const int stride = static_cast<int>(gridDim.x) / a.slices;
    for (int m = static_cast<int>(blockIdx.x) / a.slices; m < a.maps; m += stride) {
      backward_map<scalar_t, kStandard>(a, m, slice, g, tp, gm, tab);
    }
  }
}

}  // namespace dsnt_cuda
