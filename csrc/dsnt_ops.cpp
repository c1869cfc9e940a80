// The op schemas of namespace dsnt_cuda (csrc/OPS.md) and the input checks every backend shares.
// Kernels are registered per dispatch key next to their code (cpu/dsnt_kernel.cpp,
// cuda/dsnt_kernel.cu); fake kernels and autograd are registered from Python (dsnt_cuda/ops.py).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "dsnt_ops.h"

namespace dsnt_cuda {

Normalization parse_normalization(std::string_view name) {
  if (name == "softmax") return Normalization::Softmax;
  if (name == "abs") return Normalization::Abs;
  if (name == "relu") return Normalization::Relu;
  if (name == "sigmoid") return Normalization::Sigmoid;
  if (name == "none") return Normalization::None;
  TORCH_CHECK_VALUE(false, "dsnt_cuda: unknown normalization '", std::string(name),
                    "'; expected one of softmax, abs, relu, sigmoid, none");
}

Regularizer parse_regularizer(std::string_view name) {
  if (name == "none") return Regularizer::None;
  if (name == "js") return Regularizer::JS;
  if (name == "kl") return Regularizer::KL;
  if (name == "var") return Regularizer::Var;
  TORCH_CHECK_VALUE(false, "dsnt_cuda: unknown regularizer '", std::string(name),
                    "'; expected one of none, js, kl, var");
}

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

const char* reg_name(Regularizer reg) {
  switch (reg) {
    case Regularizer::JS:
      return "js";
    case Regularizer::KL:
      return "kl";
    case Regularizer::Var:
      return "var";
    default:
      return "none";
  }
}

// A (B, L, n) per-keypoint tensor that travels with the maps (target, coords, gradients).
void check_per_keypoint(const at::Tensor& t, const char* what, const MapGeometry& g,
                        const at::Tensor& logits, int64_t last) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == g.batch && t.size(1) == g.keypoints &&
                        t.size(2) == last,
                    "dsnt_cuda: ", what, " must have shape (", g.batch, ", ", g.keypoints, ", ",
                    last, ") to match logits of shape ", logits.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "dsnt_cuda: ", what,
                    " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == logits.device(), "dsnt_cuda: ", what, " is on ", t.device(),
                    " but logits are on ", logits.device());
}

}  // namespace

MapGeometry check_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                         Regularizer reg, double beta, double sigma_t) {
  TORCH_CHECK_VALUE(logits.defined(), "dsnt_cuda: logits is an undefined tensor");
  TORCH_CHECK_VALUE(logits.dim() >= 3 && logits.dim() <= 2 + kMaxSpatialDims,
                    "dsnt_cuda: logits must have shape (B, L, S_1..S_n) with 1 to 3 spatial "
                    "dims, got a ",
                    logits.dim(), "-D tensor of shape ", logits.sizes());
  TORCH_CHECK_VALUE(is_supported_float(logits.scalar_type()),
                    "dsnt_cuda: logits must be float16, bfloat16, float32 or float64, got ",
                    logits.scalar_type());
  MapGeometry g;
  g.batch = logits.size(0);
  g.keypoints = logits.size(1);
  g.maps = g.batch * g.keypoints;
  g.dims = static_cast<int>(logits.dim() - 2);
  g.map_size = 1;
  for (int k = 0; k < g.dims; ++k) {
    const int64_t s = logits.size(2 + k);
    TORCH_CHECK_VALUE(s >= 1, "dsnt_cuda: spatial axis ", k, " (tensor dim ", 2 + k,
                      ") of logits is empty; every spatial size must be >= 1, got shape ",
                      logits.sizes());
    g.sizes[k] = s;
    g.map_size *= s;
  }
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0, "dsnt_cuda: beta must be finite and > 0, got ",
                    beta);
  if (reg != Regularizer::None) {
    TORCH_CHECK_VALUE(std::isfinite(sigma_t) && sigma_t > 0,
                      "dsnt_cuda: sigma_t must be finite and > 0 (pixels), got ", sigma_t);
  }
  if (reg == Regularizer::JS || reg == Regularizer::KL) {
    TORCH_CHECK_VALUE(target.has_value() && target->defined(), "dsnt_cuda: reg '", reg_name(reg),
                      "' needs the target means, but target is None");
    check_per_keypoint(*target, "target", g, logits, g.dims);
  }
  return g;
}

void check_backward_inputs(const MapGeometry& g, const at::Tensor& logits,
                           const std::optional<at::Tensor>& grad_coords,
                           const std::optional<at::Tensor>& grad_variance,
                           const std::optional<at::Tensor>& grad_reg_losses,
                           const at::Tensor& coords, const at::Tensor& variance,
                           const at::Tensor& stats) {
  if (grad_coords.has_value() && grad_coords->defined()) {
    check_per_keypoint(*grad_coords, "grad_coords", g, logits, g.dims);
  }
  if (grad_variance.has_value() && grad_variance->defined()) {
    check_per_keypoint(*grad_variance, "grad_variance", g, logits, g.dims);
  }
  if (grad_reg_losses.has_value() && grad_reg_losses->defined()) {
    const auto& t = *grad_reg_losses;
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == g.batch && t.size(1) == g.keypoints,
                      "dsnt_cuda: grad_reg_losses must have shape (", g.batch, ", ", g.keypoints,
                      "), got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == logits.device(), "dsnt_cuda: grad_reg_losses is on ",
                      t.device(), " but logits are on ", logits.device());
  }
  check_per_keypoint(coords, "coords", g, logits, g.dims);
  check_per_keypoint(variance, "variance", g, logits, g.dims);
  check_per_keypoint(stats, "stats", g, logits, 2);
}

}  // namespace dsnt_cuda

// The schemas of csrc/OPS.md. Both ops are functional (no aliasing, no mutation), so they are
// pt2-compliant: torch.compile traces them through the fake kernels of dsnt_cuda/ops.py.
TORCH_LIBRARY(dsnt_cuda, m) {
  m.def(
      "dsnt_fwd(Tensor logits, Tensor? target, str normalization, float beta, "
      "bool normalized_coordinates, str reg, float sigma_t) "
      "-> (Tensor coords, Tensor variance, Tensor reg_losses, Tensor stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "dsnt_bwd(Tensor? grad_coords, Tensor? grad_variance, Tensor? grad_reg_losses, "
      "Tensor logits, Tensor? target, Tensor coords, Tensor variance, Tensor stats, "
      "str normalization, float beta, bool normalized_coordinates, str reg, float sigma_t, "
      "bool needs_target_grad) -> (Tensor grad_logits, Tensor grad_target)",
      {at::Tag::pt2_compliant_tag});
}
