// The CUDA kernels of dsnt_bwd (docs/ops.md), after the checks every C++ backend shares
// (op_call.h): outputs, one launch. The target-mean and beta gradients come back as per-(map,
// slice) partial sums: a view when a map is one slice, one small ATen sum over the slices when the
// map was split. With a mask and a grad_loss, the mask's total (the loss's denominator) is one
// small ATen sum before the launch.
#include <ATen/Dispatch.h>

#include "host_common.cuh"

namespace dsnt_cuda {

BackwardResult CudaHost::backward(const BackwardCall& call) {
  const ForwardCall& f = call.forward;
  const at::Tensor& logits = f.logits;
  const MapGeometry& g = f.geometry;
  const OpOptions& o = f.options;
  const at::ScalarType acc = f.acc;
  const auto opts = f.acc_options();
  const bool target_grad = call.target_grad, beta_grad = call.beta_grad;
  at::Tensor grad_logits =
      at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const at::ScalarType target_dtype =
      f.target.has_value() && f.target->defined() ? f.target->scalar_type() : acc;
  const std::vector<int64_t> per_point = {g.batch, g.keypoints, g.dims};
  if (g.maps == 0) {
    return {grad_logits, at::zeros(per_point, opts.dtype(target_dtype)),
            reduce_beta_grad(at::zeros({g.batch, g.keypoints}, opts), f.beta_map, logits)};
  }
  const at::Tensor z = kernel_logits(logits);
  const at::Tensor tgt = optional_as(f.target, acc);
  const at::Tensor msk = optional_as(f.mask, acc);
  const at::Tensor beta_view = per_map_view(f.beta_map, g, acc);
  const at::Tensor sigma_view = per_map_view(f.sigma_t_map, g, acc);
  const at::Tensor c = optional_as(call.coords, acc), v = optional_as(call.variance, acc),
                   st = optional_as(call.stats, acc);
  const at::Tensor gc = optional_as(call.grad_coords, acc), gv = optional_as(call.grad_variance, acc);
  const at::Tensor gr = optional_as(call.grad_reg_losses, acc),
                   gcl = optional_as(call.grad_coord_losses, acc);
  const at::Tensor gl = optional_as(call.grad_loss, acc);
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
  return {grad_logits, grad_target, reduce_beta_grad(beta_per_map, f.beta_map, logits)};
}

}  // namespace dsnt_cuda
