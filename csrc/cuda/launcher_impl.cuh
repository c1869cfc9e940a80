// The definitions behind launchers.h, included by the translation unit of each size class.
#pragma once

#include "backward_kernel.cuh"
#include "forward_kernel.cuh"
#include "forward_streamed.cuh"
#include "launchers.h"

namespace dsnt_cuda {

// Lets a kernel use more than 48 KiB of dynamic shared memory and, for clusters, more than the
// portable 8 CTAs (sm_90 allows 16).
template <typename Kernel>
void prepare_kernel(Kernel kernel, size_t smem, bool cluster) {
#ifndef DSNT_CUDA_EMULATION
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  if (cluster)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
#else
  (void)kernel;
  (void)smem;
  (void)cluster;
#endif
}

template <typename Kernel>
int occupancy_of(Kernel kernel, int threads, size_t smem) {
#ifndef DSNT_CUDA_EMULATION
  prepare_kernel(kernel, smem, false);
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  return n;
#else
  (void)kernel;
  return model_ctas_per_sm(64, threads, smem);
#endif
}

template <typename Kernel>
int active_clusters_of(Kernel kernel, int cluster, int threads, size_t smem) {
#ifndef DSNT_CUDA_EMULATION
  prepare_kernel(kernel, smem, true);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(cluster));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(cluster);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
#else
  (void)kernel;
  return 8 * model_ctas_per_sm(64, threads, smem) / cluster;
#endif
}

template <typename Kernel, typename Args>
void launch_plan_kernel(Kernel kernel, const Args& a, const LaunchPlan& p, cudaStream_t stream) {
  prepare_kernel(kernel, p.smem, p.cluster > 1);
  LaunchConfig c;
  c.grid = dim3(static_cast<unsigned>(p.ctas));
  c.block = dim3(static_cast<unsigned>(p.threads));
  c.smem = p.smem;
  c.stream = stream;
  c.cluster = dim3(static_cast<unsigned>(p.cluster));
  launch(kernel, c, a);
}

// The kernel of a (direction, class, variant, dtype); the backward's split class runs the CTA
// kernel.
template <SizeClass kClass, bool kBackward, bool kStandard, typename scalar_t>
constexpr auto kernel_of() {
  if constexpr (kBackward) {
    return &dsnt_bwd_kernel<scalar_t, kClass == SizeClass::Warp, kStandard>;
  } else if constexpr (kClass == SizeClass::Streamed) {
    return &dsnt_fwd_streamed_kernel<scalar_t, kStandard>;
  } else {
    return &dsnt_fwd_kernel<scalar_t, static_cast<FwdClass>(static_cast<int>(kClass)), kStandard>;
  }
}

template <SizeClass kClass, bool kBackward, bool kStandard, typename scalar_t>
void Launcher<kClass, kBackward, kStandard, scalar_t>::launch(const ArgsOf<kBackward, scalar_t>& a,
                                                              const LaunchPlan& p, cudaStream_t stream) {
  launch_plan_kernel(kernel_of<kClass, kBackward, kStandard, scalar_t>(), a, p, stream);
}

template <SizeClass kClass, bool kBackward, bool kStandard, typename scalar_t>
int Launcher<kClass, kBackward, kStandard, scalar_t>::ctas_per_sm(int threads, size_t smem) {
  return occupancy_of(kernel_of<kClass, kBackward, kStandard, scalar_t>(), threads, smem);
}

template <SizeClass kClass, bool kBackward, bool kStandard, typename scalar_t>
int Launcher<kClass, kBackward, kStandard, scalar_t>::max_active_clusters(int cluster, int threads,
                                                                          size_t smem) {
  return active_clusters_of(kernel_of<kClass, kBackward, kStandard, scalar_t>(), cluster, threads, smem);
}

}  // namespace dsnt_cuda
