// One launcher per (direction, size class, dtype). Each size class is compiled in its own
// translation unit (fwd_*.cu, bwd_*.cu), which instantiates Launcher for the four logits
// dtypes, so nvcc builds the classes in parallel; host.cu only sees these declarations.
#pragma once

#include <cstddef>

#include "kernel_args.cuh"
#include "launch_plan.h"

namespace dsnt_cuda {

template <bool kBackward, typename scalar_t>
using ArgsOf = std::conditional_t<kBackward, BwdArgs<scalar_t>, FwdArgs<scalar_t>>;

template <SizeClass kClass, bool kBackward, typename scalar_t>
struct Launcher {
  static void launch(const ArgsOf<kBackward, scalar_t>& a, const LaunchPlan& p, cudaStream_t stream);
  // resident CTAs per SM of this kernel for a launch shape (the CUDA occupancy API)
  static int ctas_per_sm(int threads, size_t smem);
  // clusters resident at once (cluster class), 0 when the cluster cannot be launched
  static int max_active_clusters(int cluster, int threads, size_t smem);
};

// DSNT_FLOAT_ONLY: float32 logits only (quicker builds: the SASS probes of scripts/sass_count.py,
// the emulator's barrier-drop proof); host code then dispatches float32 alone.
#ifdef DSNT_FLOAT_ONLY
#define DSNT_INSTANTIATE_LAUNCHERS(kClass, kBackward) template struct Launcher<kClass, kBackward, float>;
#else
#define DSNT_INSTANTIATE_LAUNCHERS(kClass, kBackward)     \
  template struct Launcher<kClass, kBackward, float>;     \
  template struct Launcher<kClass, kBackward, double>;    \
  template struct Launcher<kClass, kBackward, c10::Half>; \
  template struct Launcher<kClass, kBackward, c10::BFloat16>;
#endif

#ifdef DSNT_FLOAT_ONLY
#define DSNT_DISPATCH_LOGITS(type, name, ...)                                                        \
  [&] {                                                                                               \
    TORCH_CHECK_VALUE(type == at::kFloat, "dsnt_cuda: this build (DSNT_FLOAT_ONLY) has float32 kernels only"); \
    using scalar_t = float;                                                                           \
    return __VA_ARGS__();                                                                             \
  }()
#else
#define DSNT_DISPATCH_LOGITS(type, name, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, name, __VA_ARGS__)
#endif

}  // namespace dsnt_cuda
