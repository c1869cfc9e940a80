// CUDA kernels of the two dsnt_cuda ops (csrc/OPS.md): dsnt_fwd and dsnt_bwd.
//
// One launch per direction. A map (one (b, l) heatmap of N = S_1*..*S_n elements) is handled by
// a "group" of threads, chosen by map size on the host:
//   - warp class   (N <= 512):   a warp per map, 8 maps per 256-thread block, map in registers;
//   - block class  (N <= 4096):  a 256-thread block per map, map in registers;
//   - stream class (N > 4096):   a 256-thread block per map, looping over the map in global
//     memory in tiles (forward: one pass for normalizer + mean, a second for the variance about
//     the mean and js / kl; backward: one pass to write the gradient, preceded by one pass for sum(p G)
//     with js / kl and one for sum(p) with normalization "none").
// On-chip classes read each map once per direction (plus the gradient write in backward) and
// compute the variance in two passes over the registers (about the mean, never E[j^2] - c^2).
// Loads are 16-byte vectors when the map base is 16-byte aligned (checked at run time), else
// scalar loads with the same element-to-thread assignment. Accumulation in float (double for
// float64 logits); half / bfloat16 are converted on load, the logits gradient is stored in the
// logits' dtype. The per-element math comes from dsnt_math.h, shared with the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dsnt_math.h"
#include "dsnt_ops.h"
#include "torch_launch.cuh"

namespace dsnt_cuda {
namespace {

#define DSNT_DEV __device__ __forceinline__

constexpr int kBlockThreads = 256;   // block size of the warp and block classes
constexpr int kWarpItems = 16;       // elements per thread, warp class  -> N <= 512
constexpr int kBlockItems = 16;      // elements per thread, block class -> N <= 4096
constexpr int kStreamThreads = 256;  // block size of the stream class
constexpr int kStreamItems = 8;      // elements per thread per tile, stream class
constexpr int kMaxRed = 8;           // most values reduced at once
// Largest sum of axis lengths whose Gaussian target factors are tabulated in shared memory per
// map group (above it, the stream class computes them on the fly). 4098 doubles = 32.8 KB.
constexpr int kMaxTable = 4098;

// Elements of the cross-warp reduction buffer `red` that starts the dynamic shared memory (a warp
// group reduces with shuffles only).
__host__ __device__ constexpr int red_size(int group) { return group > 32 ? group / 32 * kMaxRed : 0; }

// Blocks per SM the register budget must allow: 2 (<= 128 registers a thread) keeps enough warps
// in flight for the bandwidth-bound float / half kernels; float64 (gradcheck, accuracy) gets
// the whole register file instead of spilling.
template <typename scalar_t>
constexpr int kMinBlocks = sizeof(scalar_t) == 8 ? 1 : 2;

template <typename T>
DSNT_DEV T neg_inf() {
  return static_cast<T>(-INFINITY);  // not numeric_limits: no --expt-relaxed-constexpr needed
}

// Map geometry in (x, y, z) order: S[0] is the last tensor dim. Unused axes have length 1.
struct Geo {
  int S[3];
  int N;
  int dims;
};

// ---------------------------------------------------------------------------------------------
// Group-wide reductions. kGroup == 32: one warp, shuffles only. kGroup > 32: the whole block.
// Every thread of the group must call them (they are always reached uniformly). All threads end
// with bitwise identical results (xor butterfly, then the same summation order over warps).
template <int kGroup, int NV, typename T>
DSNT_DEV void group_sum(T (&v)[NV], T* red) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[j] += __shfl_xor_sync(0xffffffffu, v[j], off);
  }
  if constexpr (kGroup > 32) {
    constexpr int kWarps = kGroup / 32;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    DSNT_SYNCTHREADS(reduction);  // earlier readers of red are done
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < NV; ++j) red[warp * NV + j] = v[j];
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      T s = red[j];
      for (int w = 1; w < kWarps; ++w) s += red[w * NV + j];
      v[j] = s;
    }
  }
}

// Max of per-thread partial maxima. Partial maxima are never NaN (NaN logits are skipped by the
// `>` comparisons and reach the outputs through the sums instead), so plain `>` is enough.
template <int kGroup, typename T>
DSNT_DEV T group_max(T v, T* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  if constexpr (kGroup > 32) {
    constexpr int kWarps = kGroup / 32;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = red[0];
    for (int w = 1; w < kWarps; ++w) v = red[w] > v ? red[w] : v;
  }
  return v;
}

template <int kGroup>
DSNT_DEV void group_sync() {
  if constexpr (kGroup > 32) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// Element <-> thread assignment. A tile holds kGroup * kItems elements starting at `base`;
// thread t owns the V-element chunks c*kGroup + t (c < kItems / V), so a warp reads 32
// consecutive 16-byte vectors. f(k, valid, ix, iy, iz) sees item k of the thread's registers;
// coordinates are only meaningful when valid.
template <int V, int kItems, int kGroup, typename F>
DSNT_DEV void for_items(int base, int t, const Geo& g, F&& f) {
#pragma unroll
  for (int c = 0; c < kItems / V; ++c) {
    int i0 = base + (c * kGroup + t) * V;
    // Opaque to the optimizer: coordinates are recomputed in each phase (two integer divisions
    // per chunk) instead of being kept live across reductions, which costs ~100 registers.
    asm volatile("" : "+r"(i0));
    int ix = i0 % g.S[0];
    const int r = i0 / g.S[0];
    int iy = r % g.S[1];
    int iz = r / g.S[1];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      f(c * V + e, i0 + e < g.N, ix, iy, iz);
      if (++ix == g.S[0]) {
        ix = 0;
        if (++iy == g.S[1]) {
          iy = 0;
          ++iz;
        }
      }
    }
  }
}

template <typename scalar_t, int V>
struct alignas(16) Vec {
  scalar_t v[V];
};

// Loads a tile into registers (acc dtype); elements past the end of the map read as 0.
// vec: the map base is 16-byte aligned and N % V == 0, so a chunk is wholly in or out.
template <int V, int kItems, int kGroup, typename scalar_t, typename acc_t>
DSNT_DEV void load_tile(const scalar_t* __restrict__ map, int base, int t, int N, bool vec,
                        acc_t (&x)[kItems]) {
#pragma unroll
  for (int c = 0; c < kItems / V; ++c) {
    const int i0 = base + (c * kGroup + t) * V;
    if (vec) {
      if (i0 < N) {
        const Vec<scalar_t, V> v = *reinterpret_cast<const Vec<scalar_t, V>*>(map + i0);
#pragma unroll
        for (int e = 0; e < V; ++e) x[c * V + e] = static_cast<acc_t>(v.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) x[c * V + e] = acc_t(0);
      }
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        x[c * V + e] = i0 + e < N ? static_cast<acc_t>(map[i0 + e]) : acc_t(0);
      }
    }
  }
}

template <int V, int kItems, int kGroup, typename scalar_t, typename acc_t>
DSNT_DEV void store_tile(scalar_t* __restrict__ map, int base, int t, int N, bool vec,
                         const acc_t (&x)[kItems]) {
#pragma unroll
  for (int c = 0; c < kItems / V; ++c) {
    const int i0 = base + (c * kGroup + t) * V;
    if (vec) {
      if (i0 < N) {
        Vec<scalar_t, V> v;
#pragma unroll
        for (int e = 0; e < V; ++e) v.v[e] = static_cast<scalar_t>(x[c * V + e]);
        *reinterpret_cast<Vec<scalar_t, V>*>(map + i0) = v;
      }
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (i0 + e < N) map[i0 + e] = static_cast<scalar_t>(x[c * V + e]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The separable Gaussian target of one map (DESIGN.md §1.4): per-axis factors g_k, their sums
// G_k, and H_k = sum_j g_k(j) (v_k(j) - mu_k) / (s_k^2 G_k) for the target-mean gradient.
// The factors are stored scaled by exp(-off_k), off_k = the largest exponent on axis k (0 when
// mu_k lies within the axis): every stored factor is <= 1 and the largest is ~1. Unscaled, a
// target a few pixels outside the map made every factor tiny, the far ones subnormal with a
// few bits left, and float32 KL (log(q + eps) with q >> eps) off by up to 0.5 (found by running
// this file on a host emulation of the CUDA thread model). inv_norm carries exp(sum off).
template <typename T>
struct Target {
  const T* table[3];  // scaled g_k(j) in shared memory, or nullptr: computed on the fly
  T mu[3];
  T inv_s2[3];
  T off[3];    // per-axis log offset (<= 0) taken out of the stored factors
  T H[3];
  T inv_norm;  // exp(sum off) / (prod G_k + eps) with the true (unscaled) G_k
  T rho;       // prod G_k / (prod G_k + eps)
  T sigma;
  int S[3];
  int dims;

  DSNT_DEV T g(int k, int j) const {
    if (k >= dims) return T(1);
    if (table[k] != nullptr) return table[k][j];
    const T d = grid_value<T>(j, S[k], true) - mu[k];
    return exp(-d * d * T(0.5) * inv_s2[k] - off[k]);
  }
  DSNT_DEV T q(int ix, int iy, int iz) const { return g(0, ix) * g(1, iy) * g(2, iz) * inv_norm; }
};

// Called by every thread of the group; `table` (ΣS_k entries) may be nullptr.
template <int kGroup, typename T>
DSNT_DEV Target<T> build_target(const T* __restrict__ mu, const Geo& geo, T sigma, T* table, int t,
                                T* red) {
  Target<T> tg;
  tg.sigma = sigma;
  tg.dims = geo.dims;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    tg.S[k] = geo.S[k];
    tg.mu[k] = k < geo.dims ? mu[k] : T(0);
    const T s = T(2) * sigma / T(geo.S[k]);
    tg.inv_s2[k] = T(1) / (s * s);
    tg.table[k] = nullptr;
    // Distance from mu to the axis' pixel centres [v(0), v(S-1)] (0 inside; NaN stays NaN).
    const T below = grid_value<T>(0, geo.S[k], true) - tg.mu[k];
    const T above = tg.mu[k] - grid_value<T>(geo.S[k] - 1, geo.S[k], true);
    T dist = above > below ? above : below;
    dist = dist > T(0) ? dist : (dist != dist ? dist : T(0));
    tg.off[k] = k < geo.dims ? -dist * dist * T(0.5) * tg.inv_s2[k] : T(0);
    if (tg.off[k] == -T(INFINITY)) tg.off[k] = T(0);  // infinite mean: every factor 0, as unscaled
  }
  group_sync<kGroup>();  // the previous map's readers of `table` are done
  T acc[6] = {T(0), T(0), T(0), T(0), T(0), T(0)};
  int off = 0;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if (k < geo.dims) {
      for (int j = t; j < geo.S[k]; j += kGroup) {
        const T dj = grid_value<T>(j, geo.S[k], true) - tg.mu[k];
        const T gv = exp(-dj * dj * T(0.5) * tg.inv_s2[k] - tg.off[k]);
        if (table != nullptr) table[off + j] = gv;
        acc[k] += gv;
        acc[3 + k] += gv * (grid_value<T>(j, geo.S[k], true) - tg.mu[k]) * tg.inv_s2[k];
      }
      if (table != nullptr) tg.table[k] = table + off;
      off += geo.S[k];
    }
  }
  group_sum<kGroup>(acc, red);
  group_sync<kGroup>();  // table writes visible to the whole group
  T prod = T(1);
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const bool used = k < geo.dims;
    prod *= used ? acc[k] : T(1);
    // G_k == 0 (target far outside the map): q == 0 everywhere and H_k is irrelevant.
    tg.H[k] = (used && acc[k] > T(0)) ? acc[3 + k] / acc[k] : T(0);
  }
  // The true prod G is prod exp(so). inv_norm = exp(so) / (prod exp(so) + eps), formed without
  // overflow: directly while exp(-so) is finite, else from log(prod exp(so) + eps).
  const T so = tg.off[0] + tg.off[1] + tg.off[2];
  const T es = exp(-so);
  if (es < T(INFINITY)) {
    tg.inv_norm = T(1) / (prod + div_eps<T>() * es);
  } else {
    const T L = log(prod) + so, le = log(div_eps<T>());
    const T hi = L > le ? L : le;
    tg.inv_norm = exp(so - (hi + log(exp(L - hi) + exp(le - hi))));
  }
  tg.rho = prod / (prod + div_eps<T>() * es);  // exp(-so) = inf: the true prod << eps, rho = 0
  return tg;
}

// ---------------------------------------------------------------------------------------------
template <typename T>
struct FwdArgs {
  const void* logits;  // (maps, N) contiguous, scalar_t
  const T* target;     // (maps, dims) or nullptr
  T* coords;           // (maps, dims)
  T* variance;         // (maps, dims)
  T* reg_losses;       // (maps)
  T* stats;            // (maps, 2)
  int64_t maps;
  Geo geo;
  Normalization mode;
  Regularizer reg;
  T beta;
  T sigma;
  bool normalized;
  bool vec;
  int table_stride;  // table entries per group in dynamic shared memory, 0 = none
};

template <typename T>
struct BwdArgs {
  const void* logits;  // (maps, N) contiguous, scalar_t
  void* grad_logits;   // (maps, N) contiguous, scalar_t
  const T* target;     // (maps, dims) or nullptr
  const T* coords;
  const T* variance;
  const T* stats;
  const T* grad_coords;    // or nullptr (zeros)
  const T* grad_variance;  // or nullptr
  const T* grad_reg;       // or nullptr
  T* grad_target;          // (maps, dims) or nullptr (not wanted)
  int64_t maps;
  Geo geo;
  Normalization mode;
  Regularizer reg;
  T beta;
  T sigma;
  bool normalized;
  bool vec;
  bool need_div;  // js / kl with a regularizer gradient: the divergence terms are needed
  int table_stride;
};

// What one map's backward needs per element, gathered once per map.
template <typename T>
struct BwdMap {
  Normalization mode;
  T beta, shift, inv, inv_n;
  bool uniform;  // zero-sum rectified map: p = 1/N, zero logits gradient
  T P;           // sum p (1 except for "none")
  T kappa[3];  // pixel centre of the variance: (S-1)/2 + ubar, ubar = sum p u
  T sh[3];     // (S-1)/2
  T gamma[3], nu[3], D[3], a[3], b[3];
  T omega;
  int dims;

  // p and dz/dp-factor f (dL/dz = f (G - sum p G); for none f = 1 and nothing is subtracted).
  DSNT_DEV void prob(T z, T& p, T& f) const {
    switch (mode) {
      case Normalization::Softmax:
        p = exp(beta * (z - shift)) * inv;  // shift = max z; see dsnt_fwd_kernel
        f = beta * p;
        break;
      case Normalization::None:
        p = z;
        f = T(1);
        break;
      default:
        if (uniform) {
          p = inv_n;
          f = T(0);
        } else {
          p = rectify<T>(z, mode) * inv;
          f = rectify_grad<T>(z, mode) * inv;
        }
    }
  }

  // G = dL/dp without the divergence part.
  DSNT_DEV T grad_p(int ix, int iy, int iz) const {
    const int j[3] = {ix, iy, iz};
    T G = T(0);
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if (k < dims) {
        const T jk = T(j[k]);
        const T d = jk - kappa[k];
        G += gamma[k] * (a[k] * jk + b[k]) + nu[k] * (d * d - T(2) * D[k] * (jk - sh[k]));
      }
    }
    return G;
  }
};

template <typename T>
DSNT_DEV BwdMap<T> make_bwd_map(const BwdArgs<T>& a, int64_t m) {
  BwdMap<T> s;
  const int n = a.geo.dims;
  s.mode = a.mode;
  s.dims = n;
  s.beta = a.beta;
  s.shift = a.stats[2 * m];
  const T denom = a.stats[2 * m + 1];
  s.inv = T(1) / denom;
  s.inv_n = T(1) / T(a.geo.N);
  s.uniform = a.mode != Normalization::Softmax && a.mode != Normalization::None && denom == T(0);
  s.P = T(1);
  s.omega = a.grad_reg != nullptr ? a.grad_reg[m] : T(0);
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const bool used = k < n;
    const T S = T(a.geo.S[k]);
    s.gamma[k] = (used && a.grad_coords != nullptr) ? a.grad_coords[m * n + k] : T(0);
    T nu = (used && a.grad_variance != nullptr) ? a.grad_variance[m * n + k] : T(0);
    if (used && a.reg == Regularizer::Var) {
      nu += T(2) * s.omega * (a.variance[m * n + k] - a.sigma * a.sigma);
    }
    s.nu[k] = nu;
    s.a[k] = a.normalized ? T(2) / S : T(1);
    s.b[k] = a.normalized ? T(1) / S - T(1) : T(0);
    s.sh[k] = (S - T(1)) * T(0.5);
    s.kappa[k] = s.sh[k];
    s.D[k] = T(0);
  }
  return s;
}

// Once P is known: the centred mean ubar = sum p u (u = j - (S-1)/2) from the saved coordinates,
// and the "none" correction D_k = ubar_k (1 - P) of d variance / d p_i =
// (u_i - ubar)^2 - 2 D_k u_i (DESIGN.md §2; D = 0 when the map sums to 1).
template <typename T>
DSNT_DEV void finish_bwd_map(BwdMap<T>& s, const BwdArgs<T>& a, int64_t m) {
  const int n = a.geo.dims;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if (k < n) {
      const T c = a.coords[m * n + k];
      const T S = T(a.geo.S[k]);
      // normalized grid v = (2/S) u, so c = (2/S) ubar; pixel grid j = u + sh, c = ubar + sh P.
      const T ubar = a.normalized ? c * S * T(0.5) : c - s.sh[k] * s.P;
      s.kappa[k] = s.sh[k] + ubar;
      s.D[k] = s.mode == Normalization::None ? ubar * (T(1) - s.P) : T(0);
    }
  }
}

// Per-element gradient: returns G_i (all terms) and accumulates r = {sum p G, per axis
// sum w ((v-mu)/s^2 - rho H)} with w = dL/dq * q (the target-mean gradient before the factor
// omega).
template <typename T>
DSNT_DEV T elem_grad(const BwdMap<T>& s, const Target<T>& tg, bool need_div, bool want_tgt,
                     Regularizer reg, T p, int ix, int iy, int iz, T (&r)[4]) {
  T G = s.grad_p(ix, iy, iz);
  if (need_div) {
    const T q = tg.q(ix, iy, iz);
    const DivergenceTerm<T> dt = divergence_term<T>(p, q, reg);
    G += s.omega * dt.d_p;
    if (want_tgt) {
      const T w = dt.d_q * q;
      const int j[3] = {ix, iy, iz};
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        // the normalizer's part rho H_k inside the sum, not subtracted from it afterwards
        if (k < tg.dims)
          r[1 + k] += w * ((grid_value<T>(j[k], tg.S[k], true) - tg.mu[k]) * tg.inv_s2[k] - tg.rho * tg.H[k]);
      }
    }
  }
  r[0] += p * G;
  return G;
}

// Forward's second pass, one element: sum p (u - ubar)^2 per axis into c2[0..2] (kappa = pixel
// index of ubar) and, for js / kl, the divergence summand into c2[3].
template <typename T>
DSNT_DEV void add_centred_moments(T p, int ix, int iy, int iz, const T (&kappa)[3], bool div,
                                  const Target<T>& tg, Regularizer reg, T (&c2)[4]) {
  const T dx = T(ix) - kappa[0], dy = T(iy) - kappa[1], dz = T(iz) - kappa[2];
  c2[0] += p * dx * dx;
  c2[1] += p * dy * dy;
  c2[2] += p * dz * dz;
  if (div) c2[3] += divergence_term<T>(p, tg.q(ix, iy, iz), reg).value;
}

template <typename T>
DSNT_DEV void write_fwd(const FwdArgs<T>& a, int64_t m, T shift, T denom, T P, const T (&ubar)[3],
                        const T (&var)[3], T div) {
  const int n = a.geo.dims;
  T reg = T(0);
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if (k >= n) break;
    const T S = T(a.geo.S[k]);
    // ubar = sum p u, u = j - (S-1)/2: normalized grid v = (2/S) u, pixel grid j = u + (S-1)/2.
    a.coords[m * n + k] = a.normalized ? T(2) * ubar[k] / S : ubar[k] + (S - T(1)) * T(0.5) * P;
    a.variance[m * n + k] = var[k];
    const T d = var[k] - a.sigma * a.sigma;
    reg += d * d;
  }
  if (a.reg == Regularizer::JS || a.reg == Regularizer::KL) {
    reg = div;
  } else if (a.reg == Regularizer::None) {
    reg = T(0);
  }
  a.reg_losses[m] = reg;
  a.stats[2 * m] = shift;
  a.stats[2 * m + 1] = denom;
}

// =============================================================================================
// dsnt_fwd_kernel
//   logits (maps, N) contiguous, scalar_t; target (maps, n) acc or null.
//   Outputs coords, variance (maps, n), reg_losses (maps), stats (maps, 2), acc dtype.
//   A group of kGroup threads per map (a warp, or the whole block), grid-stride over maps;
//   kStream: the map is streamed from global memory in tiles of kGroup * kItems elements.
//   Accumulation in acc_t = opmath_type<scalar_t> (float, or double for float64).
template <typename scalar_t, int kGroup, int kItems, bool kStream>
__global__ void __launch_bounds__(kGroup < kBlockThreads ? kBlockThreads : kGroup, kMinBlocks<scalar_t>)
    dsnt_fwd_kernel(const FwdArgs<at::opmath_type<scalar_t>> a) {
  using T = at::opmath_type<scalar_t>;
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  static_assert(kItems % V == 0, "a thread's items must be whole vectors");
  constexpr int kBlock = kGroup < kBlockThreads ? kBlockThreads : kGroup;
  constexpr int kGroupsPerBlock = kBlock / kGroup;
  T* const red = dynamic_smem<T>();  // then a target table per group (plan())

  const int t = threadIdx.x % kGroup;
  const int gib = threadIdx.x / kGroup;
  T* table = a.table_stride > 0 ? red + red_size(kGroup) + gib * a.table_stride : nullptr;
  const Geo& g = a.geo;
  const int N = g.N;
  const bool div = a.reg == Regularizer::JS || a.reg == Regularizer::KL;
  const bool softmax = a.mode == Normalization::Softmax;
  const bool none = a.mode == Normalization::None;
  const bool rect = !softmax && !none;
  const scalar_t* logits = static_cast<const scalar_t*>(a.logits);

  for (int64_t m = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + gib; m < a.maps;
       m += static_cast<int64_t>(gridDim.x) * kGroupsPerBlock) {
    const scalar_t* zmap = logits + m * static_cast<int64_t>(N);
    Target<T> tg{};
    if (div) tg = build_target<kGroup>(a.target + m * g.dims, g, a.sigma, table, t, red);

    T shift = T(0), denom = T(1), P = T(1);
    T ubar[3], var[3];
    T sh[3];  // axis centres (S-1)/2: moments are taken in centred pixels u = j - sh
#pragma unroll
    for (int k = 0; k < 3; ++k) sh[k] = T(g.S[k] - 1) * T(0.5);
    T c2[4] = {T(0), T(0), T(0), T(0)};  // second pass: centred moments and divergence

    if constexpr (!kStream) {
      // ---- on chip: registers hold the map, three reductions (max, first moments, centred).
      T x[kItems];
      load_tile<V, kItems, kGroup>(zmap, 0, t, N, a.vec, x);
      if (softmax) {
        // shift = max z and exponents beta (z - shift), never beta z - shift: nvcc may fuse the
        // latter into an fma here and not in the backward, and for a large beta z its rounding
        // left the largest term far from 1 (even inf). This way the largest term is exactly 1.
        T lm = neg_inf<T>();
        for_items<V, kItems, kGroup>(0, t, g, [&](int k, bool valid, int, int, int) {
          if (valid && x[k] > lm) lm = x[k];
        });
        shift = group_max<kGroup>(lm, red);
        // Max-subtraction keeps exp finite; an all -inf map gives 0 / 0 = NaN, like torch.
        for_items<V, kItems, kGroup>(0, t, g, [&](int k, bool valid, int, int, int) {
          x[k] = valid ? exp(a.beta * (x[k] - shift)) : T(0);
        });
      } else if (rect) {
        for_items<V, kItems, kGroup>(0, t, g, [&](int k, bool valid, int, int, int) {
          x[k] = valid ? rectify<T>(x[k], a.mode) : T(0);
        });
      }
      T s[4] = {T(0), T(0), T(0), T(0)};
      for_items<V, kItems, kGroup>(0, t, g, [&](int k, bool valid, int ix, int iy, int iz) {
        if (valid) {
          s[0] += x[k];
          s[1] += x[k] * (T(ix) - sh[0]);
          s[2] += x[k] * (T(iy) - sh[1]);
          s[3] += x[k] * (T(iz) - sh[2]);
        }
      });
      group_sum<kGroup>(s, red);
      if (none) {
        P = s[0];
#pragma unroll
        for (int k = 0; k < 3; ++k) ubar[k] = s[1 + k];
      } else {
        denom = s[0];
        if (rect && denom == T(0)) {
          // Zero-sum rectified map: the uniform map (OPS.md), exact pixel means.
          const T u = T(1) / T(N);
#pragma unroll
          for (int k = 0; k < kItems; ++k) x[k] = u;
#pragma unroll
          for (int k = 0; k < 3; ++k) ubar[k] = T(0);
        } else {
          const T inv = T(1) / denom;
#pragma unroll
          for (int k = 0; k < kItems; ++k) x[k] *= inv;
#pragma unroll
          for (int k = 0; k < 3; ++k) ubar[k] = s[1 + k] / denom;
        }
      }
      // Variance sum p (u - ubar)^2 (reference.variance; = dsntnn's normalized-grid variance
      // times (S/2)^2 even when "none" maps do not sum to 1), two-pass over the registers.
      T kappa[3];
#pragma unroll
      for (int k = 0; k < 3; ++k) kappa[k] = sh[k] + ubar[k];
      for_items<V, kItems, kGroup>(0, t, g, [&](int k, bool valid, int ix, int iy, int iz) {
        if (valid) add_centred_moments<T>(x[k], ix, iy, iz, kappa, div, tg, a.reg, c2);
      });
    } else {
      // ---- streamed: pass 1, per-thread online (max, sum w, sum w u) with u = j - centre,
      // rescaled when the running max grows; pass 2 (below), the variance about the mean and
      // the divergence. (A one-pass E[u^2] - E[u]^2 loses every digit of a peaked map's
      // variance near the edge of a large axis.)
      T mx = neg_inf<T>();
      T acc[4] = {T(0), T(0), T(0), T(0)};
      for (int base = 0; base < N; base += kGroup * kItems) {
        T x[kItems];
        load_tile<V, kItems, kGroup>(zmap, base, t, N, a.vec, x);
        if (softmax) {
          T tm = neg_inf<T>();
          for_items<V, kItems, kGroup>(base, t, g, [&](int k, bool valid, int, int, int) {
            if (valid && x[k] > tm) tm = x[k];
          });
          if (tm > mx) {
            const T sc = exp(a.beta * (mx - tm));  // 0 while mx == -inf; NaN sums stay NaN
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[j] *= sc;
            mx = tm;
          }
          const bool live = mx != neg_inf<T>();
          // Before this thread has seen a finite logit, a NaN one must still reach the sums.
          for_items<V, kItems, kGroup>(base, t, g, [&](int k, bool valid, int, int, int) {
            x[k] = !valid ? T(0) : (live ? exp(a.beta * (x[k] - mx)) : (x[k] != x[k] ? x[k] : T(0)));
          });
        } else if (rect) {
          for_items<V, kItems, kGroup>(base, t, g, [&](int k, bool valid, int, int, int) {
            x[k] = valid ? rectify<T>(x[k], a.mode) : T(0);
          });
        }
        for_items<V, kItems, kGroup>(base, t, g, [&](int k, bool valid, int ix, int iy, int iz) {
          if (valid) {
            const T w = x[k];
            acc[0] += w;
            acc[1] += w * (T(ix) - sh[0]);
            acc[2] += w * (T(iy) - sh[1]);
            acc[3] += w * (T(iz) - sh[2]);
          }
        });
      }
      if (softmax) {
        shift = group_max<kGroup>(mx, red);
        const T sc = mx == neg_inf<T>() ? T(0) : exp(a.beta * (mx - shift));
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] *= sc;
      }
      group_sum<kGroup>(acc, red);
      bool uniform = false;
      if (none) {
        P = acc[0];
#pragma unroll
        for (int k = 0; k < 3; ++k) ubar[k] = acc[1 + k];
      } else {
        denom = acc[0];
        uniform = rect && denom == T(0);
#pragma unroll
        for (int k = 0; k < 3; ++k) ubar[k] = uniform ? T(0) : acc[1 + k] / denom;
      }
      // ---- pass 2: sum p (u - ubar)^2 per axis (as the on-chip classes) and the divergence.
      const T inv = T(1) / denom;
      const T inv_n = T(1) / T(N);
      T kappa[3];
#pragma unroll
      for (int k = 0; k < 3; ++k) kappa[k] = sh[k] + ubar[k];
      for (int base = 0; base < N; base += kGroup * kItems) {
        T x[kItems];
        load_tile<V, kItems, kGroup>(zmap, base, t, N, a.vec, x);
        for_items<V, kItems, kGroup>(base, t, g, [&](int k, bool valid, int ix, int iy, int iz) {
          if (valid) {
            T p;
            if (softmax) {
              p = exp(a.beta * (x[k] - shift)) * inv;
            } else if (none) {
              p = x[k];
            } else {
              p = uniform ? inv_n : rectify<T>(x[k], a.mode) * inv;
            }
            add_centred_moments<T>(p, ix, iy, iz, kappa, div, tg, a.reg, c2);
          }
        });
      }
    }
    group_sum<kGroup>(c2, red);
#pragma unroll
    for (int k = 0; k < 3; ++k) var[k] = c2[k];
    const T divsum = c2[3];
    if (t == 0) write_fwd(a, m, shift, none ? T(1) : denom, P, ubar, var, divsum);
  }
}

// =============================================================================================
// dsnt_bwd_kernel
//   logits (maps, N) contiguous, scalar_t; saved coords / variance (maps, n), stats (maps, 2);
//   upstream gradients (maps, n) / (maps) or null. Writes grad_logits (maps, N) in scalar_t and,
//   when wanted, grad_target (maps, n) in acc dtype. p is recomputed from stats.
//   Group per map and tiling as in dsnt_fwd_kernel; accumulation in acc_t.
//   dL/dz = f (G - sum p G) (DESIGN.md §2), G = dL/dp.
template <typename scalar_t, int kGroup, int kItems, bool kStream>
__global__ void __launch_bounds__(kGroup < kBlockThreads ? kBlockThreads : kGroup, kMinBlocks<scalar_t>)
    dsnt_bwd_kernel(const BwdArgs<at::opmath_type<scalar_t>> a) {
  using T = at::opmath_type<scalar_t>;
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  static_assert(kItems % V == 0, "a thread's items must be whole vectors");
  constexpr int kBlock = kGroup < kBlockThreads ? kBlockThreads : kGroup;
  constexpr int kGroupsPerBlock = kBlock / kGroup;
  T* const red = dynamic_smem<T>();  // then a target table per group (plan())

  const int t = threadIdx.x % kGroup;
  const int gib = threadIdx.x / kGroup;
  T* table = a.table_stride > 0 ? red + red_size(kGroup) + gib * a.table_stride : nullptr;
  const Geo& g = a.geo;
  const int N = g.N;
  const bool none = a.mode == Normalization::None;
  const bool want_tgt = a.need_div && a.grad_target != nullptr;
  const scalar_t* logits = static_cast<const scalar_t*>(a.logits);
  scalar_t* grad_logits = static_cast<scalar_t*>(a.grad_logits);

  for (int64_t m = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + gib; m < a.maps;
       m += static_cast<int64_t>(gridDim.x) * kGroupsPerBlock) {
    const int64_t off = m * static_cast<int64_t>(N);
    const scalar_t* zmap = logits + off;
    scalar_t* gmap = grad_logits + off;
    Target<T> tg{};
    if (a.need_div) tg = build_target<kGroup>(a.target + m * g.dims, g, a.sigma, table, t, red);
    BwdMap<T> s = make_bwd_map(a, m);
    T r[4] = {T(0), T(0), T(0), T(0)};

    if constexpr (!kStream) {
      T x[kItems];  // z, then p, then G
      T f[kItems];
      load_tile<V, kItems, kGroup>(zmap, 0, t, N, a.vec, x);
      for_items<V, kItems, kGroup>(0, t, g, [&](int k, bool valid, int, int, int) {
        T p = T(0), fk = T(0);
        if (valid) s.prob(x[k], p, fk);
        x[k] = p;
        f[k] = fk;
      });
      if (none) {
        T ps[1] = {T(0)};
#pragma unroll
        for (int k = 0; k < kItems; ++k) ps[0] += x[k];  // padding is 0
        group_sum<kGroup>(ps, red);
        s.P = ps[0];
      }
      finish_bwd_map(s, a, m);
      for_items<V, kItems, kGroup>(0, t, g, [&](int k, bool valid, int ix, int iy, int iz) {
        if (valid) x[k] = elem_grad(s, tg, a.need_div, want_tgt, a.reg, x[k], ix, iy, iz, r);
      });
      group_sum<kGroup>(r, red);
      const T sub = none ? T(0) : r[0];
#pragma unroll
      for (int k = 0; k < kItems; ++k) x[k] = f[k] * (x[k] - sub);
      store_tile<V, kItems, kGroup>(gmap, 0, t, N, a.vec, x);
    } else {
      if (none) {
        T ps[1] = {T(0)};
        for (int base = 0; base < N; base += kGroup * kItems) {
          T x[kItems];
          load_tile<V, kItems, kGroup>(zmap, base, t, N, a.vec, x);
#pragma unroll
          for (int k = 0; k < kItems; ++k) ps[0] += x[k];
        }
        group_sum<kGroup>(ps, red);
        s.P = ps[0];
      }
      finish_bwd_map(s, a, m);
      if (a.need_div) {
        for (int base = 0; base < N; base += kGroup * kItems) {
          T x[kItems];
          load_tile<V, kItems, kGroup>(zmap, base, t, N, a.vec, x);
          for_items<V, kItems, kGroup>(base, t, g, [&](int k, bool valid, int ix, int iy, int iz) {
            if (valid) {
              T p, fk;
              s.prob(x[k], p, fk);
              elem_grad(s, tg, a.need_div, want_tgt, a.reg, p, ix, iy, iz, r);
            }
          });
        }
        group_sum<kGroup>(r, red);
      } else {
        // Without the divergence, sum_i p_i G_i follows from the saved outputs, saving a pass:
        // sum p v_k = c_k and sum p (u - ubar)^2 = var_k ("none" subtracts nothing anyway).
        const int n = g.dims;
#pragma unroll
        for (int k = 0; k < 3; ++k) {
          if (k < n) r[0] += s.gamma[k] * a.coords[m * n + k] + s.nu[k] * a.variance[m * n + k];
        }
      }
      const T sub = none ? T(0) : r[0];
      T dummy[4] = {T(0), T(0), T(0), T(0)};
      for (int base = 0; base < N; base += kGroup * kItems) {
        T x[kItems];
        load_tile<V, kItems, kGroup>(zmap, base, t, N, a.vec, x);
        for_items<V, kItems, kGroup>(base, t, g, [&](int k, bool valid, int ix, int iy, int iz) {
          T out = T(0);
          if (valid) {
            T p, fk;
            s.prob(x[k], p, fk);
            const T G = elem_grad(s, tg, a.need_div, false, a.reg, p, ix, iy, iz, dummy);
            out = fk * (G - sub);
          }
          x[k] = out;
        });
        store_tile<V, kItems, kGroup>(gmap, base, t, N, a.vec, x);
      }
    }
    if (t == 0 && a.grad_target != nullptr) {
      const int n = g.dims;
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        if (k >= n) break;
        a.grad_target[m * n + k] = want_tgt ? s.omega * r[1 + k] : T(0);
      }
    }
  }
}

// =============================================================================================
// Host side.

// DSNT_REPORT_FLOAT_ONLY: instantiate float only (quicker ptxas iterations; never in a real build).
#ifdef DSNT_REPORT_FLOAT_ONLY
#define DSNT_DISPATCH(type, name, ...) \
  [&] {                                \
    using scalar_t = float;            \
    return __VA_ARGS__();              \
  }()
#else
#define DSNT_DISPATCH(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, name, __VA_ARGS__)
#endif

enum class SizeClass { Warp, Block, Stream };

SizeClass size_class(int64_t N) {
  if (N <= 32 * kWarpItems) return SizeClass::Warp;
  if (N <= kBlockThreads * kBlockItems) return SizeClass::Block;
  return SizeClass::Stream;
}

Geo make_geo(const at::Tensor& logits) {
  Geo g;
  g.dims = static_cast<int>(logits.dim()) - 2;
  int64_t n = 1;
  for (int k = 0; k < 3; ++k) {
    // x is the last tensor dim, y the one before, z the one before that.
    g.S[k] = k < g.dims ? static_cast<int>(logits.size(logits.dim() - 1 - k)) : 1;
    n *= g.S[k];
  }
  g.N = static_cast<int>(n);
  return g;
}

struct Launch {
  SizeClass cls;
  int threads;
  int groups_per_block;
  int64_t blocks;
  int table_stride;
  size_t smem;
};

Launch plan(const Geo& g, int64_t maps, bool tables, size_t acc_size) {
  Launch l;
  l.cls = size_class(g.N);
  l.threads = l.cls == SizeClass::Stream ? kStreamThreads : kBlockThreads;
  l.groups_per_block = l.cls == SizeClass::Warp ? kBlockThreads / 32 : 1;
  l.blocks = (maps + l.groups_per_block - 1) / l.groups_per_block;
  l.blocks = std::min<int64_t>(l.blocks, int64_t{1} << 30);  // grid-stride beyond
  int sum_s = 0;
  for (int k = 0; k < g.dims; ++k) sum_s += g.S[k];
  l.table_stride = (tables && sum_s <= kMaxTable) ? sum_s : 0;
  const int group = l.cls == SizeClass::Warp ? 32 : l.threads;
  l.smem = static_cast<size_t>(red_size(group) + l.table_stride * l.groups_per_block) * acc_size;
  TORCH_INTERNAL_ASSERT(l.smem <= 48 * 1024, "dsnt_cuda: shared memory exceeds 48 KB");
  return l;
}

// c10::string_view is std::string_view in recent torch, a class of its own in older releases.
std::string_view as_std(c10::string_view s) { return std::string_view(s.data(), s.size()); }

bool vec_ok(const void* ptr, int64_t N, size_t elem) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (N * static_cast<int64_t>(elem)) % 16 == 0;
}

void check_sizes(const MapGeometry& mg) {
  // Element indices inside a map are int (with a tile of slack); map offsets are int64.
  TORCH_CHECK(mg.map_size <= (int64_t{1} << 30), "dsnt_cuda: a map may have at most 2^30 elements, got ",
              mg.map_size);
}

at::Tensor acc_input(const std::optional<at::Tensor>& t, at::ScalarType acc, const at::Tensor& logits,
                     const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == logits.device(), "dsnt_cuda: ", name, " must be on ", logits.device(),
              ", got ", t->device());
  return t->to(acc).contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

ForwardResult dsnt_fwd_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                            c10::string_view normalization, double beta, bool normalized_coordinates,
                            c10::string_view reg, double sigma_t) {
  const DeviceScope device(logits, "dsnt_fwd (CUDA): logits");
  const Normalization mode = parse_normalization(as_std(normalization));
  const Regularizer regularizer = parse_regularizer(as_std(reg));
  const MapGeometry mg = check_inputs(logits, target, regularizer, beta, sigma_t);
  check_sizes(mg);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(acc);
  at::Tensor coords = empty_output({mg.batch, mg.keypoints, mg.dims}, opts);
  at::Tensor variance = empty_output({mg.batch, mg.keypoints, mg.dims}, opts);
  at::Tensor reg_losses = empty_output({mg.batch, mg.keypoints}, opts);
  at::Tensor stats = empty_output({mg.batch, mg.keypoints, 2}, opts);
  if (mg.maps == 0 || mg.map_size == 0) return {coords, variance, reg_losses, stats};

  const bool div = regularizer == Regularizer::JS || regularizer == Regularizer::KL;
  const at::Tensor z = logits.contiguous();
  const at::Tensor tgt = div ? acc_input(target, acc, logits, "target") : at::Tensor();
  TORCH_CHECK(!div || tgt.defined(), "dsnt_fwd (CUDA): reg '", std::string(as_std(reg)), "' needs a target");
  const Geo geo = make_geo(logits);
  const cudaStream_t stream = current_stream();

  DSNT_DISPATCH(z.scalar_type(), "dsnt_fwd_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const Launch l = plan(geo, mg.maps, div, sizeof(T));
    FwdArgs<T> a;
    a.logits = z.const_data_ptr();
    a.target = ptr_or_null<T>(tgt);
    a.coords = coords.mutable_data_ptr<T>();
    a.variance = variance.mutable_data_ptr<T>();
    a.reg_losses = reg_losses.mutable_data_ptr<T>();
    a.stats = stats.mutable_data_ptr<T>();
    a.maps = mg.maps;
    a.geo = geo;
    a.mode = mode;
    a.reg = regularizer;
    a.beta = static_cast<T>(beta);
    a.sigma = static_cast<T>(sigma_t);
    a.normalized = normalized_coordinates;
    a.vec = vec_ok(a.logits, mg.map_size, sizeof(scalar_t));
    a.table_stride = l.table_stride;
    const LaunchConfig config{dim3(static_cast<unsigned>(l.blocks)), dim3(l.threads), l.smem, stream};
    switch (l.cls) {
      case SizeClass::Warp:
        launch(dsnt_fwd_kernel<scalar_t, 32, kWarpItems, false>, config, a);
        break;
      case SizeClass::Block:
        launch(dsnt_fwd_kernel<scalar_t, kBlockThreads, kBlockItems, false>, config, a);
        break;
      case SizeClass::Stream:
        launch(dsnt_fwd_kernel<scalar_t, kStreamThreads, kStreamItems, true>, config, a);
        break;
    }
  });
  return {coords, variance, reg_losses, stats};
}

BackwardResult dsnt_bwd_cuda(const std::optional<at::Tensor>& grad_coords,
                             const std::optional<at::Tensor>& grad_variance,
                             const std::optional<at::Tensor>& grad_reg_losses, const at::Tensor& logits,
                             const std::optional<at::Tensor>& target, const at::Tensor& coords,
                             const at::Tensor& variance, const at::Tensor& stats,
                             c10::string_view normalization, double beta, bool normalized_coordinates,
                             c10::string_view reg, double sigma_t, bool needs_target_grad) {
  const DeviceScope device(logits, "dsnt_bwd (CUDA): logits");
  const Normalization mode = parse_normalization(as_std(normalization));
  const Regularizer regularizer = parse_regularizer(as_std(reg));
  const MapGeometry mg = check_inputs(logits, target, regularizer, beta, sigma_t);
  check_sizes(mg);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool div = regularizer == Regularizer::JS || regularizer == Regularizer::KL;
  const bool has_target = target.has_value() && target->defined();

  check_backward_inputs(mg, logits, grad_coords, grad_variance, grad_reg_losses, coords, variance,
                        stats);

  at::Tensor grad_logits =
      empty_output(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const at::ScalarType target_dtype = has_target ? target->scalar_type() : acc;
  const std::vector<int64_t> per_map = {mg.batch, mg.keypoints, mg.dims};
  if (mg.maps == 0 || mg.map_size == 0) {
    return {grad_logits, at::zeros(per_map, logits.options().dtype(target_dtype))};
  }

  const at::Tensor z = logits.contiguous();
  const at::Tensor c = acc_input(coords, acc, logits, "coords");
  const at::Tensor v = acc_input(variance, acc, logits, "variance");
  const at::Tensor st = acc_input(stats, acc, logits, "stats");
  const at::Tensor gc = acc_input(grad_coords, acc, logits, "grad_coords");
  const at::Tensor gv = acc_input(grad_variance, acc, logits, "grad_variance");
  const at::Tensor gr = acc_input(grad_reg_losses, acc, logits, "grad_reg_losses");
  const bool need_div = div && gr.defined();
  const at::Tensor tgt = need_div ? acc_input(target, acc, logits, "target") : at::Tensor();
  TORCH_CHECK(!need_div || tgt.defined(), "dsnt_bwd (CUDA): reg '", std::string(as_std(reg)),
              "' needs a target");
  const bool want_tgt = need_div && needs_target_grad;
  at::Tensor grad_target = at::zeros(per_map, logits.options().dtype(acc));
  const Geo geo = make_geo(logits);
  const cudaStream_t stream = current_stream();

  DSNT_DISPATCH(z.scalar_type(), "dsnt_bwd_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const Launch l = plan(geo, mg.maps, need_div, sizeof(T));
    BwdArgs<T> a;
    a.logits = z.const_data_ptr();
    a.grad_logits = grad_logits.mutable_data_ptr();
    a.target = ptr_or_null<T>(tgt);
    a.coords = c.const_data_ptr<T>();
    a.variance = v.const_data_ptr<T>();
    a.stats = st.const_data_ptr<T>();
    a.grad_coords = ptr_or_null<T>(gc);
    a.grad_variance = ptr_or_null<T>(gv);
    a.grad_reg = ptr_or_null<T>(gr);
    a.grad_target = want_tgt ? grad_target.mutable_data_ptr<T>() : nullptr;
    a.maps = mg.maps;
    a.geo = geo;
    a.mode = mode;
    a.reg = regularizer;
    a.beta = static_cast<T>(beta);
    a.sigma = static_cast<T>(sigma_t);
    a.normalized = normalized_coordinates;
    a.vec = vec_ok(a.logits, mg.map_size, sizeof(scalar_t)) &&
            vec_ok(a.grad_logits, mg.map_size, sizeof(scalar_t));
    a.need_div = need_div;
    a.table_stride = l.table_stride;
    const LaunchConfig config{dim3(static_cast<unsigned>(l.blocks)), dim3(l.threads), l.smem, stream};
    switch (l.cls) {
      case SizeClass::Warp:
        launch(dsnt_bwd_kernel<scalar_t, 32, kWarpItems, false>, config, a);
        break;
      case SizeClass::Block:
        launch(dsnt_bwd_kernel<scalar_t, kBlockThreads, kBlockItems, false>, config, a);
        break;
      case SizeClass::Stream:
        launch(dsnt_bwd_kernel<scalar_t, kStreamThreads, kStreamItems, true>, config, a);
        break;
    }
  });
  return {grad_logits, grad_target.to(target_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsnt_cuda, DSNT_CUDA_DISPATCH_KEY, m) {
  m.impl("dsnt_fwd", &dsnt_fwd_cuda);
  m.impl("dsnt_bwd", &dsnt_bwd_cuda);
}

}  // namespace dsnt_cuda
