// One launcher per (direction, size class, standard-loss kernel or not, dtype). Each (class,
// dtype) is compiled in a translation unit of its own (instances/*.cu), so nvcc builds them in
// parallel; the host code only sees these declarations.
#pragma once

#include <cstddef>

#include "kernel_args.cuh"
#include "launch_plan.h"

namespace dsnt_cuda {

template <bool kBackward, typename scalar_t>
using ArgsOf = std::conditional_t<kBackward, BwdArgs<scalar_t>, FwdArgs<scalar_t>>;

template <SizeClass kClass, bool kBackward, bool kStandard, typename scalar_t>
struct Launcher {
  static void launch(const ArgsOf<kBackward, scalar_t>& a, const LaunchPlan& p, cudaStream_t stream);
  // resident CTAs per SM of this kernel for a launch shape (the CUDA occupancy API)
  static int ctas_per_sm(int threads, size_t smem);
  // clusters resident at once (cluster class), 0 when the cluster cannot be launched
  static int max_active_clusters(int cluster, int threads, size_t smem);
};

// The standard-loss kernels exist for float32 / float16 / bfloat16 logits; float64 (gradcheck,
// accuracy) runs the general kernel only.
template <typename scalar_t>
constexpr bool kHasStandard = !std::is_same_v<scalar_t, double>;

// Both kernels of a (class, direction) for one dtype (instances/*.cu).
#define DSNT_INSTANTIATE_LAUNCHERS(kClass, kBackward, scalar_t) \
  template struct Launcher<kClass, kBackward, false, scalar_t>; \
  template struct Launcher<kClass, kBackward, kHasStandard<scalar_t>, scalar_t>;

// DSNT_FLOAT_ONLY: a build with float32 kernels only (the SASS probes of scripts/sass_count.py,
// the emulator's barrier-drop proof); the host code then dispatches float32 alone.

#ifdef DSNT_FLOAT_ONLY
#define DSNT_DISPATCH_LOGITS(type, name, ...)                                              \
  [&] {                                                                                    \
    TORCH_CHECK_VALUE(type == at::kFloat,                                                  \
                      "dsnt_cuda: this build (DSNT_FLOAT_ONLY) has float32 kernels only"); \
    using scalar_t = float;                                                                \
    return __VA_ARGS__();                                                                  \
  }()
#else
#define DSNT_DISPATCH_LOGITS(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, name, __VA_ARGS__)
#endif

}  // namespace dsnt_cuda
