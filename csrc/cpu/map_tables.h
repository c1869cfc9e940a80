// Per-axis tables of the CPU kernels (docs/math.md §7.4: everything separable costs O(sum S_k)
// per map, never a per-element index computation), and the per-thread workspace that holds them.
//
// A map of N = size[0] size[1] size[2] values is `rows` = size[1] size[2] contiguous rows of
// `width` = size[0] values (x, the last tensor dim); row r is (z, y) = (r / size[1], r % size[1]).
// Absent axes have length 1, centred coordinate 0, target factor 1 (log 0) and gradient term 0,
// so 1-, 2- and 3-D maps share one code path.
//
// Included under namespace dsnt_cuda::cpu::DSNT_CPU_NS (kernels.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/vec_arith.h"

namespace dsnt_cuda::cpu::DSNT_CPU_NS {

// An array of this build's own type. Not std::vector: an inline member of a std template that
// the AVX2 unit emits out of line (compiled for AVX2) and the portable unit inlines would be the
// only copy of that symbol, and portable code could call it (tests/test_cpu_isa.py).
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { delete[] data_; }
  // n values, contents unspecified; called once per workspace.
  void allocate(int64_t n) {
    delete[] data_;
    data_ = new T[n > 0 ? n : 1];
    size_ = n;
  }
  void fill(T value) {
    for (int64_t i = 0; i < size_; ++i) data_[i] = value;
  }
  int64_t size() const { return size_; }
  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  T* data_ = nullptr;
  int64_t size_ = 0;
};

template <typename T>
inline void fill_values(T* p, int64_t n, T value) {
  for (int64_t i = 0; i < n; ++i) p[i] = value;
}

// Geometry of one call and the centred pixel coordinate of every axis.
template <typename T>
struct Axes {
  int dims = 1;
  int64_t size[kMaxSpatialDims] = {1, 1, 1};
  int64_t width = 1, rows = 1, map_size = 1;
  Buffer<T> u[kMaxSpatialDims];  // u(j) = j - (S-1)/2

  explicit Axes(const MapGeometry& g) : dims(g.dims) {
    for (int k = 0; k < kMaxSpatialDims; ++k) {
      size[k] = k < dims ? g.size[k] : 1;
      u[k].allocate(size[k]);
      const T c = centred_offset<T>(size[k]);
      for (int64_t j = 0; j < size[k]; ++j) u[k][j] = T(j) - c;
    }
    width = size[0];
    rows = size[1] * size[2];
    map_size = width * rows;
  }
};

// Calls row_fn(r, y, z) for every row of the map, y and z its indices.
template <typename T, typename RowFn>
DSNT_ALWAYS_INLINE void for_each_row(const Axes<T>& ax, RowFn&& row_fn) {
  int64_t r = 0;
  for (int64_t z = 0; z < ax.size[2]; ++z)
    for (int64_t y = 0; y < ax.size[1]; ++y, ++r) row_fn(r, y, z);
}

// out[z * size[1] + y] = a[y] + b[z] + c over the rows, vectorized along y.
template <typename T>
inline void fill_row_sums(const Axes<T>& ax, const T* a, const T* b, T c, T* out) {
  const int64_t H = ax.size[1];
  for (int64_t z = 0; z < ax.size[2]; ++z) {
    const Vec<T> bz(b[z] + c);
    for_each_vector<T>(H, [&](int64_t y, int64_t n) DSNT_INLINE_LAMBDA {
      (load_part(a + y, n, T(0)) + bz).store(out + z * H + y, n);
    });
  }
}

// The Gaussian target of one map (docs/math.md §4) as per-axis tables in log2 units:
//   log2 q_i = target_log2_x(x) + row_target_log2(r)      (floored by the caller)
//   q_i      = target_factor_x(x) * row_target_factor(r)
// with target_factor = 2^(target_log2 - off), scaled to a largest of 1 per axis, and the scale
// 2^(sum off - log2_norm) folded into the row factor. The per-axis sums are formed in double,
// and so is the factor's own mean ubar_g: the target-mean gradient subtracts it from u, and on a
// long axis (|u| ~ 4000) a float ubar_g is off by far more than that difference's ulp.
template <typename T>
struct TargetTables {
  Buffer<T> target_log2[kMaxSpatialDims];
  Buffer<T> target_factor[kMaxSpatialDims];
  Buffer<T> row_target_log2, row_target_factor;
  double target_centre[kMaxSpatialDims] = {0, 0, 0};
  double ubar_g[kMaxSpatialDims] = {0, 0, 0};
  TargetNorm<T> norm{};

  void allocate(const Axes<T>& ax) {
    for (int k = 0; k < kMaxSpatialDims; ++k) {
      target_log2[k].allocate(ax.size[k]);
      target_factor[k].allocate(ax.size[k]);
      if (k >= ax.dims) {  // absent axes: factor 1, log 0
        target_log2[k].fill(T(0));
        target_factor[k].fill(T(1));
      }
    }
    row_target_log2.allocate(ax.rows);
    row_target_factor.allocate(ax.rows);
  }

  void build(const Axes<T>& ax, const T* mu, T sigma_t) {
    TargetAxisSums<T> sums[kMaxSpatialDims];
    bool empty = false;
    for (int k = 0; k < ax.dims; ++k) {
      const T centre = dsnt_cuda::target_centre(mu[k], ax.size[k]);
      target_centre[k] = centre;
      T sum_g = 0, sum_g_offset = 0;
      const T off = axis_factors(ax.u[k].data(), ax.size[k], centre, target_log2_coef(sigma_t),
                                 target_log2[k].data(), target_factor[k].data(), sum_g, sum_g_offset);
      ubar_g[k] = static_cast<double>(centre) + static_cast<double>(sum_g_offset) / sum_g;
      sums[k] = {off, sum_g, static_cast<T>(ubar_g[k] * sum_g)};
      empty = empty || off == -std::numeric_limits<T>::infinity();
    }
    norm = target_norm(sums, ax.dims);
    if (empty) {
      for (int k = 0; k < ax.dims; ++k) ubar_g[k] = 0;  // as target_norm: q = 0 everywhere
    }
    fill_row_sums(ax, target_log2[1].data(), target_log2[2].data(), -norm.log2_norm, row_target_log2.data());
    const int64_t H = ax.size[1];
    const T scale = norm.scale;
    for (int64_t z = 0; z < ax.size[2]; ++z) {
      const Vec<T> fz(target_factor[2][z] * scale);
      const T* fy = target_factor[1].data();
      for_each_vector<T>(H, [&](int64_t y, int64_t n) DSNT_INLINE_LAMBDA {
        (load_part(fy + y, n, T(0)) * fz).store(row_target_factor.data() + z * H + y, n);
      });
    }
  }

 private:
  // One axis: the log2 factors, the scaled factors, their sum and sum g (u - centre) (small
  // terms of both signs: ubar_g - centre to float accuracy however large u is); returns off, the
  // largest log2 factor.
  static T axis_factors(const T* u, int64_t S, T centre, T coef, T* log2f, T* factor, T& sum_g,
                        T& sum_g_offset) {
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const Vec<T> vc(centre), vcoef(coef);
    Vec<T> vmax(-kInf);
    for_each_vector<T>(S, [&](int64_t j, int64_t n) DSNT_INLINE_LAMBDA {
      const Vec<T> l = target_log2_factor(load_part(u + j, n, T(0)), vc, vcoef);
      l.store(log2f + j, n);
      vmax = at::vec::maximum(vmax, fill_tail(l, n, -kInf));  // NaN propagates
    });
    const T off = hmax(vmax);
    // Every factor 0 (off = -inf): exp2(-inf - 0) = 0, not exp2(NaN).
    const Vec<T> voff(off == -kInf ? T(0) : off);
    Vec<T> vsum(T(0)), vsum_offset(T(0));
    for_each_vector<T>(S, [&](int64_t j, int64_t n) DSNT_INLINE_LAMBDA {
      const Vec<T> g = zero_tail(Arith<Vec<T>>::exp2(load_part(log2f + j, n, T(0)) - voff), n);
      g.store(factor + j, n);
      vsum = vsum + g;
      vsum_offset = vsum_offset + g * (load_part(u + j, n, T(0)) - vc);
    });
    sum_g = hsum(vsum);
    sum_g_offset = hsum(vsum_offset);
    return off;
  }
};

// q_i = target_factor_x(x) * row_target_factor(r) from the tables, given l2q = log2 q_i: 0 where
// q_i is below the smallest normal number (log2 q < -126 in float). The product would be
// subnormal there, which costs a microcode assist per vector on some CPUs (a fifth of the
// backward's time on 16x16 maps on Zen 3); and a q that small changes no use of it: the eps forms
// add 1e-24 to it, every other term is multiplied by it.
template <typename T>
DSNT_ALWAYS_INLINE Vec<T> target_prob(const Vec<T>& factor_x, const Vec<T>& row_q, const Vec<T>& l2q) {
  constexpr T kMinNormalLog2 = T(std::numeric_limits<T>::min_exponent - 1);
  return Vec<T>::blendv(factor_x, Vec<T>(T(0)), l2q < Vec<T>(kMinNormalLog2)) * row_q;
}

// The separable part of dLoss/dp (docs/math.md §6) as per-axis tables: G_i = grad_x(x) +
// row_grad(r) (+ the divergence term), with row_shift (-sum p G for maps that sum to 1) folded
// into the row table.
template <typename T>
struct AxisGradTables {
  Buffer<T> axis[kMaxSpatialDims];
  Buffer<T> row;

  void allocate(const Axes<T>& ax) {
    for (int k = 0; k < kMaxSpatialDims; ++k) {
      axis[k].allocate(ax.size[k]);
      if (k >= ax.dims) axis[k].fill(T(0));  // absent axes add nothing
    }
    row.allocate(ax.rows);
  }

  void build(const Axes<T>& ax, const AxisGrad<T>* coefs, T row_shift) {
    for (int k = 0; k < ax.dims; ++k) {
      const T* u = ax.u[k].data();
      T* out = axis[k].data();
      for_each_vector<T>(ax.size[k], [&](int64_t j, int64_t n) DSNT_INLINE_LAMBDA {
        axis_grad(load_part(u + j, n, T(0)), coefs[k]).store(out + j, n);
      });
    }
    fill_row_sums(ax, axis[1].data(), axis[2].data(), row_shift, row.data());
  }
};

// t_k(j) = d log q / d mu_k per axis (docs/math.md §6), for the target-mean gradient; formed
// in double from the double normalizer (see TargetTables), rounded once.
template <typename T>
struct MeanGradTables {
  Buffer<T> axis[kMaxSpatialDims];

  void allocate(const Axes<T>& ax) {
    for (int k = 0; k < kMaxSpatialDims; ++k) {
      axis[k].allocate(ax.size[k]);
      axis[k].fill(T(0));  // absent axes add nothing
    }
  }

  void build(const Axes<T>& ax, const TargetTables<T>& target, T sigma_t) {
    for (int k = 0; k < ax.dims; ++k) {
      const double coef = target_mean_grad_coef<double>(sigma_t, ax.size[k]);
      const double centre = target.target_centre[k], ubar_g = target.ubar_g[k];
      const double one_minus_rho = target.norm.one_minus_rho;
      for (int64_t j = 0; j < ax.size[k]; ++j) {
        axis[k][j] =
            static_cast<T>(target_mean_grad<double>(ax.u[k][j], centre, ubar_g, one_minus_rho, coef));
      }
    }
  }
};

// Scratch of one thread: sized once per call, reused for every map of its chunk.
template <typename T>
struct Workspace {
  Axes<T> axes;
  Buffer<T> logits;          // the map widened to T (float16 / bfloat16 logits)
  Buffer<T> weight;          // forward: the unnormalized p of every element
  Buffer<T> block_marginal;  // forward: x-marginal of a block of rows
  Buffer<T> grad;            // backward: dLoss/dz in T before narrowing (float16 / bfloat16)
  Buffer<T> row_vec;         // per row: its vector of partial sums
  Buffer<T> row_sum;         // per row: its sum
  Buffer<T> marginal[kMaxSpatialDims];
  Buffer<T> centred[kMaxSpatialDims];  // backward: u - ubar per axis (absent axes: 0)
  TargetTables<T> target;
  AxisGradTables<T> grads;
  MeanGradTables<T> mean_grads;

  // widen: the logits are float16 / bfloat16; forward: scratch of the forward, else backward's.
  Workspace(const MapGeometry& g, bool widen, bool forward) : axes(g) {
    if (widen) logits.allocate(axes.map_size);
    if (forward) {
      weight.allocate(axes.map_size);
      block_marginal.allocate(axes.width);
    }
    if (widen && !forward) grad.allocate(axes.map_size);
    row_vec.allocate(axes.rows * kLanes<T>);
    row_sum.allocate(axes.rows);
    for (int k = 0; k < kMaxSpatialDims; ++k) {
      marginal[k].allocate(axes.size[k]);
      centred[k].allocate(axes.size[k]);
      centred[k].fill(T(0));
    }
    target.allocate(axes);
    grads.allocate(axes);
    mean_grads.allocate(axes);
  }
};

}  // namespace dsnt_cuda::cpu::DSNT_CPU_NS
