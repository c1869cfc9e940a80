// Host-side declarations shared by the op registration (dsnt_ops.cpp) and the kernels of each
// backend (cpu/dsnt_kernel.cpp, cuda/dsnt_kernel.cu). Inputs are checked once, here, at the
// boundary; the kernels then assume valid contiguous data. See csrc/OPS.md for the contract.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "dsnt_math.h"

namespace dsnt_cuda {

Normalization parse_normalization(std::string_view name);
Regularizer parse_regularizer(std::string_view name);

// A validated (B, L, S_1..S_n) logits tensor seen as `maps` maps of `map_size` elements.
struct MapGeometry {
  int64_t batch = 0;
  int64_t keypoints = 0;
  int64_t maps = 0;      // B * L
  int64_t map_size = 0;  // S_1 * ... * S_n
  int dims = 0;          // n, 1..3
  // Axis lengths in tensor order (S_1 = depth .. S_n = width); unused entries are 1.
  int64_t sizes[kMaxSpatialDims] = {1, 1, 1};
};

// TORCH_CHECKs of csrc/OPS.md (rank, dtypes, sizes, target shape, sigma_t, beta), then the
// geometry. `target` is only required for reg js / kl.
MapGeometry check_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                         Regularizer reg, double beta, double sigma_t);

// TORCH_CHECKs of dsnt_bwd's extra inputs against the geometry of check_inputs: the optional
// upstream gradients (None = zeros) and the saved coords / variance (B, L, n), stats (B, L, 2).
void check_backward_inputs(const MapGeometry& geometry, const at::Tensor& logits,
                           const std::optional<at::Tensor>& grad_coords,
                           const std::optional<at::Tensor>& grad_variance,
                           const std::optional<at::Tensor>& grad_reg_losses,
                           const at::Tensor& coords, const at::Tensor& variance,
                           const at::Tensor& stats);

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor>;

}  // namespace dsnt_cuda
