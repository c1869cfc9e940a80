// The host-side preparation of one call of dsnt_fwd / dsnt_bwd that every C++ backend shares:
// the schema's arguments taken once (dsnt_fwd_entry / dsnt_bwd_entry are the functions a backend
// registers), the options parsed, the inputs checked (dsnt_ops.cpp), the output allocation. A
// backend supplies `Scope` (set up before anything else, e.g. the CUDA device guard), `forward`
// and `backward`, which get the prepared call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>

#include "dsnt_ops.h"

namespace dsnt_cuda {

// dsnt_fwd's inputs, options parsed and checked.
struct ForwardCall {
  at::Tensor logits;
  std::optional<at::Tensor> target, mask, beta_map, sigma_t_map;
  OpOptions options;
  MapGeometry geometry;
  at::ScalarType acc = at::kFloat;  // accumulation_type(logits)

  bool with_loss() const { return options.coord_loss != CoordLoss::None; }
  // The float outputs' tensor options: the logits' device, dtype acc.
  at::TensorOptions acc_options() const { return logits.options().dtype(acc); }
};

// dsnt_bwd's inputs, checked, and which of the target / beta gradients the kernels compute.
struct BackwardCall {
  ForwardCall forward;
  std::optional<at::Tensor> grad_coords, grad_variance, grad_reg_losses, grad_coord_losses, grad_loss;
  at::Tensor coords, variance, stats;
  bool target_grad = false;  // needs_target_grad and a target given
  bool beta_grad = false;    // needs_beta_grad, a beta_map given and softmax normalization
};

// dsnt_fwd's outputs; coord_losses and loss are 0-element without a coordinate loss.
struct ForwardOutputs {
  at::Tensor coords, variance, reg_losses, coord_losses, loss, stats;

  ForwardResult result() const { return {coords, variance, reg_losses, coord_losses, loss, stats}; }
};

// The extra checks of dsnt_bwd: the optional upstream gradients and the saved forward outputs.
void check_backward_inputs(const BackwardCall& call);

// The outputs of `call`, each made by `empty(sizes, options)` (the backend's allocation).
template <class Empty>
ForwardOutputs forward_outputs(const ForwardCall& call, Empty empty) {
  const MapGeometry& g = call.geometry;
  const at::TensorOptions opts = call.acc_options();
  const bool with_loss = call.with_loss();
  ForwardOutputs out;
  out.coords = empty(at::IntArrayRef{g.batch, g.keypoints, g.dims}, opts);
  out.variance = empty(at::IntArrayRef{g.batch, g.keypoints, g.dims}, opts);
  out.reg_losses = empty(at::IntArrayRef{g.batch, g.keypoints}, opts);
  out.coord_losses = with_loss ? empty(at::IntArrayRef{g.batch, g.keypoints}, opts) : at::empty({0}, opts);
  out.loss = with_loss ? empty(at::IntArrayRef{}, opts) : at::empty({0}, opts);
  out.stats = empty(at::IntArrayRef{g.batch, g.keypoints, stats_size(g.dims)}, opts);
  return out;
}

// The Scope of a backend that needs no set-up per call.
struct NoScope {
  NoScope(const at::Tensor&, bool /*backward*/) {}
};

// Options parsed and the forward inputs checked (check_forward_inputs).
ForwardCall forward_call(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                         const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& beta_map,
                         const std::optional<at::Tensor>& sigma_t_map, const OpOptions& options);

template <class Backend>
ForwardResult dsnt_fwd_entry(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                             const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& beta_map,
                             const std::optional<at::Tensor>& sigma_t_map, c10::string_view normalization,
                             double beta, bool normalized_coordinates, c10::string_view reg, double sigma_t,
                             c10::string_view coord_loss, double reg_weight) {
  const typename Backend::Scope scope(logits, false);
  const OpOptions o =
      parse_options(normalization, beta, normalized_coordinates, reg, sigma_t, coord_loss, reg_weight);
  return Backend::forward(forward_call(logits, target, mask, beta_map, sigma_t_map, o));
}

template <class Backend>
BackwardResult dsnt_bwd_entry(const std::optional<at::Tensor>& grad_coords,
                              const std::optional<at::Tensor>& grad_variance,
                              const std::optional<at::Tensor>& grad_reg_losses,
                              const std::optional<at::Tensor>& grad_coord_losses,
                              const std::optional<at::Tensor>& grad_loss, const at::Tensor& logits,
                              const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& beta_map,
                              const std::optional<at::Tensor>& sigma_t_map, const at::Tensor& coords,
                              const at::Tensor& variance, const at::Tensor& stats,
                              c10::string_view normalization, double beta, bool normalized_coordinates,
                              c10::string_view reg, double sigma_t, c10::string_view coord_loss,
                              double reg_weight, bool needs_target_grad, bool needs_beta_grad) {
  const typename Backend::Scope scope(logits, true);
  const OpOptions o =
      parse_options(normalization, beta, normalized_coordinates, reg, sigma_t, coord_loss, reg_weight);
  BackwardCall call{.forward = forward_call(logits, target, mask, beta_map, sigma_t_map, o),
                    .grad_coords = grad_coords,
                    .grad_variance = grad_variance,
                    .grad_reg_losses = grad_reg_losses,
                    .grad_coord_losses = grad_coord_losses,
                    .grad_loss = grad_loss,
                    .coords = coords,
                    .variance = variance,
                    .stats = stats};
  check_backward_inputs(call);
  const auto given = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  call.target_grad = needs_target_grad && given(target);
  call.beta_grad = needs_beta_grad && given(beta_map) && o.normalization == Normalization::Softmax;
  return Backend::backward(call);
}

}  // namespace dsnt_cuda
