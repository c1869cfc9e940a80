// The CUDA kernels of dsnt_bwd (docs/ops.md): checks, outputs, one launch. The target-mean and
// beta gradients come back as per-(map, slice) partial sums: a view when a map is one slice,
// one small ATen sum over the slices when the map was split. With a mask and a grad_loss, the
// mask's total (the loss's denominator) is one small ATen sum before the launch.
#include <ATen/Dispatch.h>

#include "host_common.cuh"

namespace dsnt_cuda {

BackwardResult dsnt_bwd_cuda(const std::optional<at::Tensor>& grad_coords,
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
  const DeviceScope scope(logits, "dsnt_bwd (CUDA): logits");
  const OpOptions o =
      parse_options(normalization, beta, normalized_coordinates, reg, sigma_t, coord_loss, reg_weight);
  const MapGeometry g = check_forward_inputs(logits, target, mask, beta_map, sigma_t_map, o);
  check_backward_inputs(g, logits, grad_coords, grad_variance, grad_reg_losses, grad_coord_losses, grad_loss,
                        coords, variance, stats, o);
  const at::ScalarType acc = accumulation_type(logits);
  const auto opts = logits.options().dtype(acc);
  const bool has_target = target.has_value() && target->defined();
  const bool target_grad = needs_target_grad && has_target;
  const bool beta_grad = needs_beta_grad && beta_map.has_value() && beta_map->defined() &&
                         o.normalization == Normalization::Softmax;
  at::Tensor grad_logits =
      at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const at::ScalarType target_dtype = has_target ? target->scalar_type() : acc;
  const std::vector<int64_t> per_point = {g.batch, g.keypoints, g.dims};
  if (g.maps == 0) {
    return {grad_logits, at::zeros(per_point, opts.dtype(target_dtype)),
            reduce_beta_grad(at::zeros({g.batch, g.keypoints}, opts), beta_map, logits)};
  }
  const at::Tensor z = kernel_logits(logits);
  const at::Tensor tgt = has_target ? optional_as(target, acc) : at::Tensor();
  const at::Tensor msk = optional_as(mask, acc);
  const at::Tensor beta_view = per_map_view(beta_map, g, acc);
  const at::Tensor sigma_view = per_map_view(sigma_t_map, g, acc);
  const at::Tensor c = optional_as(coords, acc), v = optional_as(variance, acc), st = optional_as(stats, acc);
  const at::Tensor gc = optional_as(grad_coords, acc), gv = optional_as(grad_variance, acc);
  const at::Tensor gr = optional_as(grad_reg_losses, acc), gcl = optional_as(grad_coord_losses, acc);
  const at::Tensor gl = optional_as(grad_loss, acc);
  const at::Tensor mask_total = (gl.defined() && msk.defined()) ? msk.sum() : at::Tensor();
  at::Tensor partials;
  int slices = 1;

  DSNT_DISPATCH_LOGITS(logits.scalar_type(), "dsnt_bwd_cuda", [&] {
    using T = acc_t<scalar_t>;
    // the standard loss's backward: softmax + JS, no target, beta or variance gradient
    bool standard = false;
    const bool standard_modes = o.normalization == Normalization::Softmax && o.reg == Regularizer::JS &&
                                !target_grad && !beta_grad && !gv.defined();
    const LaunchPlan p = plan_for<true, scalar_t>(z, g, standard_modes, standard);
    slices = p.slices;
    if (target_grad || beta_grad) partials = empty_output({g.maps, slices, 4}, opts);
    BwdArgs<scalar_t> a{};
    fill_map_args<scalar_t>(a, z, g, o, p, tgt, msk, beta_view, sigma_view);
    a.grad_logits = grad_logits.data_ptr<scalar_t>();
    a.vec_out = p.layout.whole_out_chunks;
    a.slices = p.slices;
    a.coords = c.const_data_ptr<T>();
    a.variance = v.const_data_ptr<T>();
    a.stats = st.const_data_ptr<T>();
    a.grad_coords = ptr_or_null<T>(gc);
    a.grad_variance = ptr_or_null<T>(gv);
    a.grad_reg = ptr_or_null<T>(gr);
    a.grad_coord_losses = ptr_or_null<T>(gcl);
    a.grad_loss = ptr_or_null<T>(gl);
    a.mask_total = ptr_or_null<T>(mask_total);
    a.needs_target_grad = target_grad;
    a.needs_beta_grad = beta_grad;
    a.partials = ptr_or_null<T>(partials);
    launch_planned<true, scalar_t>(a, p, standard);
  });

  const at::Tensor per_map =
      partials.defined() ? (slices > 1 ? partials.sum(1) : partials.select(1, 0)) : at::Tensor();
  at::Tensor grad_target = target_grad ? per_map.narrow(1, 0, g.dims).reshape(per_point).to(target_dtype)
                                       : at::zeros(per_point, opts.dtype(target_dtype));
  const at::Tensor beta_per_map = beta_grad ? per_map.select(1, 3).reshape({g.batch, g.keypoints})
                                            : at::zeros({g.batch, g.keypoints}, opts);
  return {grad_logits, grad_target, reduce_beta_grad(beta_per_map, beta_map, logits)};
}

}  // namespace dsnt_cuda
