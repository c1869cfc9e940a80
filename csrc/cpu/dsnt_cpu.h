// The interface between the CPU host code (dsnt_kernel.cpp: checks, allocation, threads,
// registration) and the per-map kernels (dsnt_kernel_impl.h), which are compiled twice: once for
// any x86-64 / ARM CPU (dsnt_kernel.cpp) and once with AVX2+FMA (dsnt_kernel_avx2.cpp), chosen
// at run time. Only raw pointers cross this boundary, so the AVX2 translation unit needs no ATen
// tensor headers (and no static initializers that could run AVX2 code on an older CPU at load).
#pragma once

#include <cstdint>

#include "dsnt_math.h"

namespace dsnt_cuda::cpu {

// Storage type of the logits (and of grad_logits). Everything else is the accumulation type:
// double for kF64, float otherwise.
enum class DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };
constexpr int kNumDTypes = 4;

struct KernelArgs {
  // Geometry in *view order*: axis 0 = last tensor dim (x, width), 1 = y (height), 2 = z (depth);
  // axes >= dims have length 1. A map is `len[2] * len[1]` contiguous rows of `len[0]` values.
  int64_t maps = 0;
  int64_t len[kMaxSpatialDims] = {1, 1, 1};
  int dims = 1;
  Normalization norm = Normalization::Softmax;
  Regularizer reg = Regularizer::None;
  double beta = 1.0;
  bool normalized = true;
  double sigma_t = 1.0;

  // Forward: logits (maps, N) contiguous; target (maps, dims) acc or null; outputs acc.
  const void* logits = nullptr;
  const void* target = nullptr;
  void* coords = nullptr;      // (maps, dims)
  void* variance = nullptr;    // (maps, dims)
  void* reg_losses = nullptr;  // (maps)
  void* stats = nullptr;       // (maps, 2); read-only in backward

  // Backward: upstream gradients in acc (null = zeros); coords / variance / stats are the saved
  // forward outputs (read through the pointers above); grad_target is written only when
  // needs_target_grad (acc, (maps, dims)).
  const void* grad_coords = nullptr;
  const void* grad_variance = nullptr;
  const void* grad_reg_losses = nullptr;
  void* grad_logits = nullptr;  // (maps, N), logits dtype
  void* grad_target = nullptr;
  bool needs_target_grad = false;
};

// Processes maps [begin, end) of one call. Each function owns its scratch buffers.
using ChunkFn = void (*)(const KernelArgs& args, int64_t begin, int64_t end);

struct KernelTable {
  ChunkFn forward[kNumDTypes];
  ChunkFn backward[kNumDTypes];
};

// Portable build (at::vec's scalar fallback, auto-vectorized by the compiler).
const KernelTable& kernels_generic();
// AVX2 + FMA build with Sleef's vector exp / log; null when the compiler could not build it.
const KernelTable* kernels_avx2();

}  // namespace dsnt_cuda::cpu
