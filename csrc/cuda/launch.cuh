// How the kernels of csrc/cuda/ are launched, and what kernel code may use. The same source then
// also builds as host C++ (-x c++ -DDSNT_CUDA_EMULATION) over the emulator in tests/cuda_emulation/,
// which runs it on the CPU, plain and under ThreadSanitizer / AddressSanitizer + UBSan.
//
// Rules for kernel code (the emulator refuses or reports what breaks them):
//   - Shared memory: only the launch's dynamic buffer, dynamic_smem<T>(), whose size the host sets
//     in LaunchConfig::smem; carve every array from it. No `__shared__` declarations: the emulator
//     cannot give static shared memory a copy per block, so it refuses to compile them.
//   - Launches: launch(kernel, config, args...) only, never <<<...>>> or cudaLaunchKernel*.
//   - Intrinsics: __syncthreads, __syncwarp(mask), __shfl_sync / __shfl_up_sync /
//     __shfl_down_sync / __shfl_xor_sync, __ballot_sync, __any_sync, __all_sync, atomicAdd,
//     the cluster API of cluster.cuh; threadIdx, blockIdx, blockDim, gridDim, warpSize; math
//     through the <cmath> overloads (exp, log, ...). Anything else is first added to
//     tests/cuda_emulation/shim.h.
//   - Warp collectives: every lane named in the mask calls the same collective with the same mask,
//     in the same order. Shuffles and votes do not order memory; __syncwarp does.
//   - Barriers: every thread of the block reaches each __syncthreads; none returns while others
//     still have one to pass.
// The emulation checks logic, indexing and synchronization, not what only a GPU shows (its memory
// model, timing, fast math, registers): tests/cuda_emulation/README.md.
#pragma once

#include <cstddef>
#include <utility>

#ifdef DSNT_CUDA_EMULATION
#include <string_view>

#include "shim.h"  // tests/cuda_emulation/, on the emulation build's include path
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#endif

namespace dsnt_cuda {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t smem = 0;  // bytes of dynamic shared memory, the kernel's only shared memory
  cudaStream_t stream = nullptr;
  dim3 cluster = dim3(1, 1, 1);  // blocks per thread-block cluster (sm_90, at most 8; cluster.cuh)
};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& c, Args&&... args) {
#ifdef DSNT_CUDA_EMULATION
  emu::launch(c.grid, c.block, c.smem, c.cluster, [&] { kernel(args...); });
#else
  if (c.smem > 48 * 1024) {  // more than the default limit needs the kernel's opt-in
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(c.smem)));
  }
  if (c.cluster.x * c.cluster.y * c.cluster.z == 1) {
    // clang-format splits the closing >>> of a launch in a header
    // clang-format off
    kernel<<<c.grid, c.block, c.smem, c.stream>>>(std::forward<Args>(args)...);
    // clang-format on
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = c.cluster.x;
  cluster.val.clusterDim.y = c.cluster.y;
  cluster.val.clusterDim.z = c.cluster.z;
  cudaLaunchConfig_t config = {};
  config.gridDim = c.grid;
  config.blockDim = c.block;
  config.dynamicSmemBytes = c.smem;
  config.stream = c.stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
#endif
}

// The block's dynamic shared memory (LaunchConfig::smem bytes, 16-byte aligned).
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef DSNT_CUDA_EMULATION
  return reinterpret_cast<T*>(emu::block_smem());
#else
  extern __shared__ __align__(16) unsigned char dsnt_dynamic_smem[];
  return reinterpret_cast<T*>(dsnt_dynamic_smem);
#endif
}

}  // namespace dsnt_cuda

// A __syncthreads() with a name, which an emulation build drops with
// -DDSNT_EMU_DROP_BARRIER=<name>: the sanitizer tests prove they see the race it prevents.
#if defined(DSNT_CUDA_EMULATION) && defined(DSNT_EMU_DROP_BARRIER)
#define DSNT_EMU_STRINGIFY_(x) #x
#define DSNT_EMU_STRINGIFY(x) DSNT_EMU_STRINGIFY_(x)
#define DSNT_SYNCTHREADS(name)                                                                 \
  do {                                                                                         \
    if (std::string_view(#name) != DSNT_EMU_STRINGIFY(DSNT_EMU_DROP_BARRIER)) __syncthreads(); \
  } while (0)
#else
#define DSNT_SYNCTHREADS(name) __syncthreads()
#endif
