// The groups of threads that work on one map, and their reductions.
//
//   WarpGroup     one warp per map (warp class: several maps per CTA); shuffles only.
//   CtaGroup      the whole CTA per map (block class, streamed class, backward).
//   ClusterGroup  one CTA per slice of a map, the map split over the CTAs of a thread-block
//                 cluster (sm_90): CTA totals are combined through distributed shared memory.
//
// Every reduction ends with the same totals, bitwise, in every thread of the group (fixed
// summation order: lanes by a fixed butterfly, warps in index order, CTAs in rank order), so
// the per-map constants derived from them agree everywhere. Sums of several values use a
// reduce-scatter inside the warp (each of the 5 levels trades half of the values with the
// partner lane), which costs about 2 shuffles per value instead of 5.
// Reduction rounds (at most kRounds per map) use separate scratch, so a round never overwrites
// what a slow thread may still read from the previous one.
#pragma once

#include "cluster.cuh"
#include "common.cuh"

namespace dsnt_cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Reduce-scatter of NV values over a warp, one level (partner distance D) at a time. On return
// this lane holds the full warp sum of value `index`; `owner` is true in exactly one lane per
// index.
template <int N, int D, typename T>
struct ReduceScatter {
  static DSNT_DEV T run(T (&v)[N], int (&id)[N], bool (&own)[N], int lane, int& index, bool& owner) {
    const bool hi = (lane & D) != 0;
    constexpr int kPairs = N / 2;
    constexpr int kNext = kPairs + (N & 1);
    T nv[kNext];
    int nid[kNext];
    bool nown[kNext];
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      const T keep = hi ? v[2 * i + 1] : v[2 * i];
      const T send = hi ? v[2 * i] : v[2 * i + 1];
      nv[i] = keep + __shfl_xor_sync(kFullMask, send, D);
      nid[i] = hi ? id[2 * i + 1] : id[2 * i];
      nown[i] = hi ? own[2 * i + 1] : own[2 * i];
    }
    if constexpr ((N & 1) != 0) {  // the odd value is summed whole; both partners keep it
      nv[kPairs] = v[N - 1] + __shfl_xor_sync(kFullMask, v[N - 1], D);
      nid[kPairs] = id[N - 1];
      nown[kPairs] = own[N - 1] && !hi;
    }
    if constexpr (D == 1) {
      static_assert(kNext == 1, "more than 32 values per warp reduction");
      index = nid[0];
      owner = nown[0];
      return nv[0];
    } else {
      return ReduceScatter<kNext, D / 2, T>::run(nv, nid, nown, lane, index, owner);
    }
  }
};

template <int NV, typename T>
DSNT_DEV T warp_reduce_scatter(const T (&in)[NV], int lane, int& index, bool& owner) {
  T v[NV];
  int id[NV];
  bool own[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    v[i] = in[i];
    id[i] = i;
    own[i] = true;
  }
  return ReduceScatter<NV, 16, T>::run(v, id, own, lane, index, owner);
}

template <typename T>
DSNT_DEV T warp_max(T v) {
#pragma unroll
  for (int d = 16; d >= 1; d >>= 1) v = max_keep_nan(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

// Broadcast: value i of `out` from lane i.
template <int NV, typename T>
DSNT_DEV void warp_gather(T total, T (&out)[NV]) {
#pragma unroll
  for (int i = 0; i < NV; ++i) out[i] = __shfl_sync(kFullMask, total, i);
}

template <typename T>
struct WarpGroup {
  static constexpr bool kCluster = false;
  int t;       // lane: the thread's index in the group
  T* scratch;  // this warp's kRounds * kMaxReduce values of dynamic shared memory
  DSNT_DEV int size() const { return 32; }
  DSNT_DEV void sync() const { __syncwarp(); }
  DSNT_DEV bool leader() const { return t == 0; }
  template <int NV>
  DSNT_DEV void sum(T (&v)[NV], int round) const {
    static_assert(NV <= kMaxReduce, "too many values in one reduction");
    int index;
    bool owner;
    const T mine = warp_reduce_scatter(v, t, index, owner);
    T* s = scratch + round * kMaxReduce;
    if (owner) s[index] = mine;
    __syncwarp();
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] = s[i];
  }
  DSNT_DEV T max(T v, int /*round*/) const { return warp_max(v); }
};

template <typename T>
struct CtaGroup {
  static constexpr bool kCluster = false;
  int t;       // threadIdx.x
  int warps;   // blockDim.x / 32
  T* scratch;  // kRounds * warps * kMaxReduce values of dynamic shared memory
  DSNT_DEV int size() const { return warps * 32; }
  DSNT_DEV void sync() const { DSNT_SYNCTHREADS(group_sync); }
  DSNT_DEV bool leader() const { return t == 0; }

  // CTA totals of NV values, left in lane i (< NV) of every warp as `total`.
  template <int NV>
  DSNT_DEV T cta_total(const T (&v)[NV], int round) const {
    static_assert(NV <= kMaxReduce, "too many values in one reduction");
    int index;
    bool owner;
    const T mine = warp_reduce_scatter(v, t & 31, index, owner);
    T* s = scratch + round * warps * kMaxReduce;
    if (owner) s[(t >> 5) * NV + index] = mine;
    DSNT_SYNCTHREADS(reduction);
    T total = T(0);
    const int lane = t & 31;
    if (lane < NV) {
#pragma unroll 1
      for (int w = 0; w < warps; ++w) total += s[w * NV + lane];
    }
    return total;
  }
  template <int NV>
  DSNT_DEV void sum(T (&v)[NV], int round) const {
    warp_gather(cta_total(v, round), v);
  }
  DSNT_DEV T cta_max(T v, int round) const {
    v = warp_max(v);
    T* s = scratch + round * warps * kMaxReduce;
    if ((t & 31) == 0) s[t >> 5] = v;
    DSNT_SYNCTHREADS(reduce_publish_max);
    T m = s[0];
#pragma unroll 1
    for (int w = 1; w < warps; ++w) m = max_keep_nan(m, s[w]);
    return m;
  }
  DSNT_DEV T max(T v, int round) const { return cta_max(v, round); }
};

// One CTA of a cluster; the group is the whole cluster. `slots` (kRounds * kMaxReduce values of
// this CTA's shared memory) publish the CTA totals to the other CTAs.
template <typename T>
struct ClusterGroup : CtaGroup<T> {
  static constexpr bool kCluster = true;
  T* slots;
  unsigned rank, ranks;

  DSNT_DEV bool leader() const { return this->t == 0 && rank == 0; }
  template <int NV>
  DSNT_DEV void sum(T (&v)[NV], int round) const {
    const T cta = this->cta_total(v, round);
    T* slot = slots + round * kMaxReduce;
    if (this->t < NV) slot[this->t] = cta;
    cluster_sync();  // every CTA's totals published (and the previous round's reads done)
    T total = T(0);
    const int lane = this->t & 31;
    if (lane < NV) {
#pragma unroll 1
      for (unsigned r = 0; r < ranks; ++r) total += cluster_shared_ptr(slot, r)[lane];
    }
    warp_gather(total, v);
  }
  DSNT_DEV T max(T v, int round) const {
    const T cta = this->cta_max(v, round);
    T* slot = slots + round * kMaxReduce;
    if (this->t == 0) slot[0] = cta;
    cluster_sync();
    T m = cluster_shared_ptr(slot, 0)[0];
#pragma unroll 1
    for (unsigned r = 1; r < ranks; ++r) m = max_keep_nan(m, cluster_shared_ptr(slot, r)[0]);
    return m;
  }
};

}  // namespace dsnt_cuda
