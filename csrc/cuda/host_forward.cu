// The CUDA kernels of dsnt_fwd (docs/ops.md): input checks (shared with every C++ backend,
// csrc/dsnt_ops.cpp), outputs, the launch plan, the launch on the current stream of the logits'
// device. Logits are read through their strides (channels-last included): no copy.
#include <ATen/Dispatch.h>

#include "host_common.cuh"

namespace dsnt_cuda {

ForwardResult dsnt_fwd_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& beta_map,
                            const std::optional<at::Tensor>& sigma_t_map, c10::string_view normalization,
                            double beta, bool normalized_coordinates, c10::string_view reg, double sigma_t,
                            c10::string_view coord_loss, double reg_weight) {
  const DeviceScope scope(logits, "dsnt_fwd (CUDA): logits");
  const OpOptions o =
      parse_options(normalization, beta, normalized_coordinates, reg, sigma_t, coord_loss, reg_weight);
  const MapGeometry g = check_forward_inputs(logits, target, mask, beta_map, sigma_t_map, o);
  const at::ScalarType acc = accumulation_type(logits);
  const auto opts = logits.options().dtype(acc);
  const bool with_loss = o.coord_loss != CoordLoss::None;
  at::Tensor coords = empty_output({g.batch, g.keypoints, g.dims}, opts);
  at::Tensor variance = empty_output({g.batch, g.keypoints, g.dims}, opts);
  at::Tensor reg_losses = empty_output({g.batch, g.keypoints}, opts);
  at::Tensor coord_losses = with_loss ? empty_output({g.batch, g.keypoints}, opts) : at::empty({0}, opts);
  at::Tensor loss = with_loss ? empty_output({}, opts) : at::empty({0}, opts);
  at::Tensor stats = empty_output({g.batch, g.keypoints, stats_size(g.dims)}, opts);
  if (g.maps == 0) {
    if (with_loss) loss.zero_();  // the mean over no maps: 0 / max(0, 1)
    return {coords, variance, reg_losses, coord_losses, loss, stats};
  }
  const at::Tensor z = kernel_logits(logits);
  const at::Tensor tgt = o.needs_target() ? optional_as(target, acc) : at::Tensor();
  const at::Tensor msk = with_loss ? optional_as(mask, acc) : at::Tensor();
  const at::Tensor beta_view = per_map_view(beta_map, g, acc);
  const at::Tensor sigma_view = per_map_view(sigma_t_map, g, acc);
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
    a.coords = coords.data_ptr<T>();
    a.variance = variance.data_ptr<T>();
    a.reg_losses = reg_losses.data_ptr<T>();
    a.coord_losses = with_loss ? coord_losses.data_ptr<T>() : nullptr;
    a.stats = stats.data_ptr<T>();
    a.loss = with_loss ? loss.data_ptr<T>() : nullptr;
    a.arrivals = with_loss ? reinterpret_cast<unsigned*>(arrivals.data_ptr<int>()) : nullptr;
    launch_planned<false, scalar_t>(a, p, standard);
  });
  return {coords, variance, reg_losses, coord_losses, loss, stats};
}

}  // namespace dsnt_cuda
