// The interface between the CPU host code (dsnt_cpu_host.cpp: checks, allocation, threads, the
// loss's final sum, registration) and the per-map kernels (kernels.h), which are compiled twice:
// for any CPU (dsnt_cpu_kernels.cpp) and with AVX2 + FMA (dsnt_cpu_kernels_avx2.cpp), chosen at
// run time. Tensors cross it as raw pointers: contiguous, in the accumulation type `acc` (double
// for float64 logits, float otherwise) unless said otherwise.
#pragma once

#include <cstdint>

#include "dsnt_ops.h"

namespace dsnt_cuda::cpu {

// Storage type of the logits (and of grad_logits).
enum class DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };
constexpr int kNumDTypes = 4;

// What the forward and the backward both read.
struct MapArgs {
  MapGeometry geometry;
  OpOptions options;
  // Per-map beta / sigma_t; the one of the accumulation type is used.
  PerMapScalar<float> beta_f, sigma_t_f;
  PerMapScalar<double> beta_d, sigma_t_d;
  const void* logits = nullptr;  // (maps, map_size), storage dtype
  const void* target = nullptr;  // (maps, dims), or null when not needed
};

struct ForwardArgs {
  MapArgs map;
  void* coords = nullptr;        // (maps, dims)
  void* variance = nullptr;      // (maps, dims)
  void* reg_losses = nullptr;    // (maps)
  void* coord_losses = nullptr;  // (maps), null without a coordinate loss
  void* stats = nullptr;         // (maps, stats_size(dims))
};

struct BackwardArgs {
  MapArgs map;
  // Upstream gradients, null = zeros.
  const void* grad_coords = nullptr;        // (maps, dims)
  const void* grad_variance = nullptr;      // (maps, dims)
  const void* grad_reg_losses = nullptr;    // (maps)
  const void* grad_coord_losses = nullptr;  // (maps)
  // The loss's gradient per map: grad_loss * loss_scale * (mask ? mask[m] : 1); loss_scale is
  // 0 without grad_loss.
  double loss_scale = 0.0;
  const void* mask = nullptr;  // (maps), or null
  // Whether the regularizer has an upstream gradient at all (grad_reg_losses or the loss): the
  // divergence path runs only then, so a NaN map without one adds nothing to grad_target.
  bool reg_path = false;
  bool needs_target_grad = false;
  // Saved forward outputs.
  const void* coords = nullptr;
  const void* variance = nullptr;
  const void* stats = nullptr;
  // Outputs: grad_logits in the storage dtype; grad_target (maps, dims); grad_beta (maps), or
  // null when the beta gradient is not wanted.
  void* grad_logits = nullptr;
  void* grad_target = nullptr;
  void* grad_beta = nullptr;
};

// Each processes maps [begin, end) and owns its scratch.
using ForwardFn = void (*)(const ForwardArgs& args, int64_t begin, int64_t end);
using BackwardFn = void (*)(const BackwardArgs& args, int64_t begin, int64_t end);

struct KernelTable {
  ForwardFn forward[kNumDTypes];
  BackwardFn backward[kNumDTypes];
};

// Portable build (at::vec's scalar fallback).
const KernelTable& kernels_generic();
// AVX2 + FMA build; null when the compiler could not build it. Call only on a CPU with both.
const KernelTable* kernels_avx2();

}  // namespace dsnt_cuda::cpu
