// Host-side declarations shared by the op registration (dsnt_ops.cpp) and the host code of each
// C++ backend (cpu/, cuda/): option parsing, the input checks of docs/ops.md (done once, by the
// op, for every C++ kernel), and small helpers to hand tensors to kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "dsnt_math.h"

namespace dsnt_cuda {

Normalization parse_normalization(std::string_view name);
Regularizer parse_regularizer(std::string_view name);
CoordLoss parse_coord_loss(std::string_view name);

// The string / float options of both ops, parsed.
struct OpOptions {
  Normalization normalization = Normalization::Softmax;
  Regularizer reg = Regularizer::None;
  CoordLoss coord_loss = CoordLoss::None;
  double beta = 1.0;
  double sigma_t = 1.0;
  double reg_weight = 0.0;
  bool normalized = true;

  bool divergence() const { return reg == Regularizer::JS || reg == Regularizer::KL; }
  bool needs_target() const { return divergence() || coord_loss != CoordLoss::None; }
};

OpOptions parse_options(c10::string_view normalization, double beta, bool normalized_coordinates,
                        c10::string_view reg, double sigma_t, c10::string_view coord_loss, double reg_weight);

// A validated (B, L, S_1..S_n) logits tensor seen as `maps` maps of `map_size` elements.
struct MapGeometry {
  int64_t batch = 0;
  int64_t keypoints = 0;
  int64_t maps = 0;      // B * L
  int64_t map_size = 0;  // S_1 * ... * S_n
  int dims = 0;          // n, 1..3
  // Axis lengths in (x, y, z) order: size[0] is the last tensor dim. Unused entries are 1.
  int64_t size[kMaxSpatialDims] = {1, 1, 1};
};

// The checks of docs/ops.md on dsnt_fwd's inputs (shapes, dtypes, devices, option values), then
// the geometry. Values inside tensors (a per-map beta, sigma_t) are the caller's to check.
MapGeometry check_forward_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                                 const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& beta_map,
                                 const std::optional<at::Tensor>& sigma_t_map, const OpOptions& options);

// float64 for float64 logits, float32 otherwise.
at::ScalarType accumulation_type(const at::Tensor& logits);

// An optional input as a contiguous tensor of dtype `acc`, or an undefined tensor for None.
at::Tensor optional_as(const std::optional<at::Tensor>& t, at::ScalarType acc);

// The (B, L) view of an optional per-map tensor in dtype `acc` (undefined for None); keep it
// alive while a PerMapScalar points into it.
at::Tensor per_map_view(const std::optional<at::Tensor>& t, const MapGeometry& g, at::ScalarType acc);

// The values of the per-map views (per_map_view; undefined = not given), checked as the float
// beta / sigma_t are: each beta finite, > 0 and representable in `acc`; each sigma_t finite and
// at least the narrowest representable target. Reads every value on the host (a device tensor
// is copied there first).
void check_per_map_values(const at::Tensor& beta_view, const at::Tensor& sigma_t_view, at::ScalarType acc);

template <typename T>
PerMapScalar<T> per_map_scalar(const at::Tensor& view, double value) {
  PerMapScalar<T> s;
  s.value = static_cast<T>(value);
  if (view.defined()) {
    s.data = view.const_data_ptr<T>();
    s.stride_b = view.stride(0);
    s.stride_l = view.stride(1);
  }
  return s;
}

// grad_beta_map from per-map gradients (B, L): summed to beta_map's shape and cast to its dtype;
// a 0-element tensor when beta_map is None (docs/ops.md).
at::Tensor reduce_beta_grad(const at::Tensor& per_map_grad, const std::optional<at::Tensor>& beta_map,
                            const at::Tensor& logits);

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Autograd of an op pair with dsnt_fwd's / dsnt_bwd's schemas, by qualified names: a kernel at the
// forward's Autograd key whose backward is the backward op (csrc/dsnt_autograd.cpp; the C++ pair
// has it already). The one autograd registration of every fused backend.
void register_autograd(const std::string& forward_op, const std::string& backward_op);

}  // namespace dsnt_cuda
