// The CUDA kernels of dsnt_fwd (docs/ops.md), after the input checks every C++ backend shares
// (op_call.h): outputs, the launch plan, the launch on the current stream of the logits' device.
// Logits are read through their strides (channels-last included): no copy.
#include <ATen/Dispatch.h>

#include "host_common.cuh"

namespace dsnt_cuda {

ForwardResult CudaHost::forward(const ForwardCall& call) {
  const at::Tensor& logits = call.logits;
  const MapGeometry& g = call.geometry;
  const OpOptions& o = call.options;
  const at::ScalarType acc = call.acc;
  const bool with_loss = call.with_loss();
  const ForwardOutputs out = forward_outputs(call, empty_output);
  if (g.maps == 0) {
    if (with_loss) out.loss.zero_();  // the mean over no maps: 0 / max(0, 1)
    return out.result();
  }
  const at::Tensor z = kernel_logits(logits);
  const at::Tensor tgt = o.needs_target() ? optional_as(call.target, acc) : at::Tensor();
  const at::Tensor msk = with_loss ? optional_as(call.mask, acc) : at::Tensor();
  const at::Tensor beta_view = per_map_view(call.beta_map, g, acc);
  const at::Tensor sigma_view = per_map_view(call.sigma_t_map, g, acc);
  at::Tensor arrivals;
  if (with_loss) {
    arrivals = at::empty({1}, logits.options().dtype(at::kInt));
#ifdef DSNT_CUDA_EMULATION
    arrivals.zero_();
#else
    C10_CUDA_CHECK(cudaMemsetAsync(arrivals.data_ptr(), 0, sizeof(int), current_stream()));
#endif
  }
  DSNT_DISPATCH_LOGITS(logits.scalar_type(), "dsnt_fwd_cuda", [&] {
    using T = acc_t<scalar_t>;
    bool standard = false;
    const bool standard_modes = o.normalization == Normalization::Softmax && o.reg == Regularizer::JS;
    const LaunchPlan p = plan_for<false, scalar_t>(z, g, standard_modes, standard);
    FwdArgs<scalar_t> a{};
    fill_map_args<scalar_t>(a, z, g, o, p, tgt, msk, beta_view, sigma_view);
    a.coords = out.coords.data_ptr<T>();
    a.variance = out.variance.data_ptr<T>();
    a.reg_losses = out.reg_losses.data_ptr<T>();
    a.coord_losses = with_loss ? out.coord_losses.data_ptr<T>() : nullptr;
    a.stats = out.stats.data_ptr<T>();
    a.loss = with_loss ? out.loss.data_ptr<T>() : nullptr;
    a.arrivals = with_loss ? reinterpret_cast<unsigned*>(arrivals.data_ptr<int>()) : nullptr;
    launch_planned<false, scalar_t>(a, p, standard);
  });
  return out.result();
}

}  // namespace dsnt_cuda
