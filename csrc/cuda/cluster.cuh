// Thread-block clusters (sm_90): the device-side API of kernels whose blocks cooperate through
// distributed shared memory (DSMEM). Launch them with launch() and LaunchConfig::cluster
// (launch.cuh), whose rules hold here too. On the device this is cooperative_groups::this_cluster();
// in emulation the shim runs a cluster's blocks at once and maps DSMEM pointers into the other
// block's buffer (tests/cuda_emulation/).
//
// Rules:
//   - cluster_sync() is a barrier of every thread of every block of the cluster, and it orders
//     memory among them: local and distributed shared memory, and global memory. Every thread
//     calls it the same number of times; none returns while others still have one to pass.
//   - cluster_shared_ptr(p, rank): p points into this block's dynamic shared memory
//     (dynamic_smem<T>()); the result is the same object in block `rank`'s buffer (every block
//     has the same layout: one kernel, one smem size).
//   - Order every remote access with cluster_sync(): after the owner wrote what others read,
//     before the owner overwrites what others read, and before any block returns while others
//     may still access its shared memory (a block's shared memory dies with it; the emulator
//     poisons it then, so a late remote read is NaN, and TSan / ASan report it).
//   - cluster_block_rank() is in 0..cluster_num_blocks()-1, x fastest over the cluster's dims.
//     At most 8 blocks per cluster (the portable limit; the emulator refuses more).
//   - sm_90 and newer only: built for an older architecture, these trap.
#pragma once

#include "launch.cuh"

#ifndef DSNT_CUDA_EMULATION
#include <cooperative_groups.h>
#endif

namespace dsnt_cuda {

#if defined(DSNT_CUDA_EMULATION)

inline void cluster_sync() { emu::cluster_sync(); }
inline unsigned cluster_block_rank() { return emu::cluster_block_rank(); }
inline unsigned cluster_num_blocks() { return emu::cluster_num_blocks(); }
template <typename T>
T* cluster_shared_ptr(T* local, unsigned rank) {
  return emu::cluster_shared_ptr(local, rank);
}

#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900

__device__ __forceinline__ void cluster_sync() { __trap(); }
__device__ __forceinline__ unsigned cluster_block_rank() {
  __trap();
  return 0;
}
__device__ __forceinline__ unsigned cluster_num_blocks() {
  __trap();
  return 1;
}
template <typename T>
__device__ __forceinline__ T* cluster_shared_ptr(T* local, unsigned) {
  __trap();
  return local;
}

#else

__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }
__device__ __forceinline__ unsigned cluster_block_rank() {
  return cooperative_groups::this_cluster().block_rank();
}
__device__ __forceinline__ unsigned cluster_num_blocks() {
  return cooperative_groups::this_cluster().num_blocks();
}
template <typename T>
__device__ __forceinline__ T* cluster_shared_ptr(T* local, unsigned rank) {
  return cooperative_groups::this_cluster().map_shared_rank(local, static_cast<int>(rank));
}

#endif

}  // namespace dsnt_cuda
