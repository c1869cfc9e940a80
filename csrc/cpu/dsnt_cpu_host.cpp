// CPU kernels of dsnt_fwd / dsnt_bwd (docs/ops.md): host entry points, registered for the CPU
// dispatch key. Checks (dsnt_ops.cpp), allocation, one at::parallel_for over the maps into the
// per-map kernels (kernels.h, the AVX2 build when the CPU has it), and the loss's final sum over
// the maps (serial, deterministic). No ATen op runs per element or per map.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>

#include "cpu/kernel_args.h"
#include "dsnt_ops.h"

namespace dsnt_cuda {
namespace cpu {
namespace {

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The AVX2 build when the CPU runs it, else the portable one. DSNT_CUDA_CPU_KERNELS=generic
// forces the portable build (the tests run both on AVX2 machines).
const KernelTable& kernels() {
  static const KernelTable* table = [] {
    const char* force = std::getenv("DSNT_CUDA_CPU_KERNELS");
    if (force != nullptr && std::string_view(force) == "generic") return &kernels_generic();
    // Ask the CPU first: even building the AVX2 table runs AVX2-compiled code.
    const KernelTable* avx2 = cpu_has_avx2() ? kernels_avx2() : nullptr;
    return avx2 != nullptr ? avx2 : &kernels_generic();
  }();
  return *table;
}

int dtype_index(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kDouble:
      return static_cast<int>(DType::kF64);
    case at::kHalf:
      return static_cast<int>(DType::kF16);
    case at::kBFloat16:
      return static_cast<int>(DType::kBF16);
    default:
      return static_cast<int>(DType::kF32);
  }
}

// Maps per task: about 16k elements, so that a task's set-up (its workspace) and the thread
// hand-off are amortized; a thread then keeps one map and its tables in L1 / L2.
int64_t grain_size(const MapGeometry& g) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, g.map_size));
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// Tensors the kernels read, kept alive for the call.
struct MapInputTensors {
  at::Tensor logits, target, beta, sigma_t;
};

MapInputTensors fill_map_args(MapArgs& a, const MapGeometry& g, const OpOptions& o, const at::Tensor& logits,
                              const std::optional<at::Tensor>& target,
                              const std::optional<at::Tensor>& beta_map,
                              const std::optional<at::Tensor>& sigma_t_map) {
  const at::ScalarType acc = accumulation_type(logits);
  MapInputTensors t;
  t.logits = logits.contiguous();
  if (o.needs_target()) t.target = target->to(acc).contiguous();
  t.beta = per_map_view(beta_map, g, acc);
  if (o.reg != Regularizer::None) t.sigma_t = per_map_view(sigma_t_map, g, acc);
  check_per_map_values(t.beta, t.sigma_t, acc);
  a.geometry = g;
  a.options = o;
  if (acc == at::kDouble) {
    a.beta_d = per_map_scalar<double>(t.beta, o.beta);
    a.sigma_t_d = per_map_scalar<double>(t.sigma_t, o.sigma_t);
  } else {
    a.beta_f = per_map_scalar<float>(t.beta, o.beta);
    a.sigma_t_f = per_map_scalar<float>(t.sigma_t, o.sigma_t);
  }
  a.logits = t.logits.const_data_ptr();
  a.target = data_or_null(t.target);
  return t;
}

// dsntnn's average_loss of coord_losses + reg_weight reg_losses (docs/ops.md), summed in double.
template <typename T>
T average_loss(const T* coord_losses, const T* reg_losses, const T* mask, int64_t maps, double reg_weight) {
  const T w = static_cast<T>(reg_weight);
  double total = 0, count = 0;
  for (int64_t m = 0; m < maps; ++m) {
    const T loss = coord_losses[m] + w * reg_losses[m];
    total += mask != nullptr ? static_cast<double>(loss * mask[m]) : static_cast<double>(loss);
    count += mask != nullptr ? static_cast<double>(mask[m]) : 1.0;
  }
  return static_cast<T>(total / std::max(count, 1.0));
}

// d loss / d loss_m without the mask factor: grad_loss / max(sum mask, 1) (or / max(B L, 1)).
template <typename T>
double loss_scale(const at::Tensor& grad_loss, const T* mask, int64_t maps) {
  double count = 0;
  for (int64_t m = 0; m < maps; ++m) count += mask != nullptr ? static_cast<double>(mask[m]) : 1.0;
  const T g = *grad_loss.const_data_ptr<T>();
  return static_cast<double>(g / static_cast<T>(std::max(count, 1.0)));
}

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace
}  // namespace cpu

ForwardResult dsnt_fwd_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                           const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& beta_map,
                           const std::optional<at::Tensor>& sigma_t_map, c10::string_view normalization,
                           double beta, bool normalized_coordinates, c10::string_view reg, double sigma_t,
                           c10::string_view coord_loss, double reg_weight) {
  const OpOptions o =
      parse_options(normalization, beta, normalized_coordinates, reg, sigma_t, coord_loss, reg_weight);
  const MapGeometry g = check_forward_inputs(logits, target, mask, beta_map, sigma_t_map, o);
  const at::ScalarType acc = accumulation_type(logits);
  const auto opts = logits.options().dtype(acc);
  const bool with_loss = o.coord_loss != CoordLoss::None;
  at::Tensor coords = at::empty({g.batch, g.keypoints, g.dims}, opts);
  at::Tensor variance = at::empty({g.batch, g.keypoints, g.dims}, opts);
  at::Tensor reg_losses = at::empty({g.batch, g.keypoints}, opts);
  at::Tensor coord_losses = with_loss ? at::empty({g.batch, g.keypoints}, opts) : at::empty({0}, opts);
  at::Tensor loss = with_loss ? at::empty({}, opts) : at::empty({0}, opts);
  at::Tensor stats = at::empty({g.batch, g.keypoints, stats_size(g.dims)}, opts);

  cpu::ForwardArgs args;
  const cpu::MapInputTensors inputs =
      cpu::fill_map_args(args.map, g, o, logits, target, beta_map, sigma_t_map);
  args.coords = coords.mutable_data_ptr();
  args.variance = variance.mutable_data_ptr();
  args.reg_losses = reg_losses.mutable_data_ptr();
  args.coord_losses = with_loss ? coord_losses.mutable_data_ptr() : nullptr;
  args.stats = stats.mutable_data_ptr();
  const cpu::ForwardFn fn = cpu::kernels().forward[cpu::dtype_index(logits)];
  at::parallel_for(0, g.maps, cpu::grain_size(g), [&](int64_t begin, int64_t end) { fn(args, begin, end); });

  if (with_loss) {
    const at::Tensor weights = optional_as(mask, acc);
    if (acc == at::kDouble) {
      *loss.mutable_data_ptr<double>() = cpu::average_loss(
          coord_losses.const_data_ptr<double>(), reg_losses.const_data_ptr<double>(),
          weights.defined() ? weights.const_data_ptr<double>() : nullptr, g.maps, reg_weight);
    } else {
      *loss.mutable_data_ptr<float>() = cpu::average_loss(
          coord_losses.const_data_ptr<float>(), reg_losses.const_data_ptr<float>(),
          weights.defined() ? weights.const_data_ptr<float>() : nullptr, g.maps, reg_weight);
    }
  }
  return {coords, variance, reg_losses, coord_losses, loss, stats};
}

BackwardResult dsnt_bwd_cpu(const std::optional<at::Tensor>& grad_coords,
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
  using cpu::has;
  const OpOptions o =
      parse_options(normalization, beta, normalized_coordinates, reg, sigma_t, coord_loss, reg_weight);
  const MapGeometry g = check_forward_inputs(logits, target, mask, beta_map, sigma_t_map, o);
  check_backward_inputs(g, logits, grad_coords, grad_variance, grad_reg_losses, grad_coord_losses, grad_loss,
                        coords, variance, stats, o);
  const at::ScalarType acc = accumulation_type(logits);
  const auto opts = logits.options().dtype(acc);
  // Without a coordinate loss its gradients (empty tensors, if any) are no gradient.
  const bool with_loss = o.coord_loss != CoordLoss::None;
  const std::optional<at::Tensor> grad_cl = with_loss ? grad_coord_losses : std::nullopt;
  const std::optional<at::Tensor> grad_l = with_loss ? grad_loss : std::nullopt;
  const bool target_grad = needs_target_grad && has(target);
  const bool beta_grad = needs_beta_grad && has(beta_map) && o.normalization == Normalization::Softmax;
  // Whether any upstream gradient reaches the logits; without one every gradient is 0.
  const bool reg_path = o.reg != Regularizer::None && (has(grad_reg_losses) || has(grad_l));
  const bool any_path = has(grad_coords) || has(grad_variance) || reg_path || has(grad_cl) || has(grad_l);

  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  at::Tensor grad_target = at::empty({g.batch, g.keypoints, g.dims}, opts);
  at::Tensor grad_beta = beta_grad ? at::empty({g.batch, g.keypoints}, opts) : at::Tensor();
  if (!any_path || g.maps == 0) {
    grad_logits.zero_();
    grad_target.zero_();
    if (grad_beta.defined()) grad_beta.zero_();
  } else {
    cpu::BackwardArgs args;
    const cpu::MapInputTensors inputs =
        cpu::fill_map_args(args.map, g, o, logits, target, beta_map, sigma_t_map);
    const at::Tensor gc = optional_as(grad_coords, acc), gv = optional_as(grad_variance, acc);
    const at::Tensor gr = optional_as(grad_reg_losses, acc), gcl = optional_as(grad_cl, acc);
    const at::Tensor weights = optional_as(mask, acc), gl = optional_as(grad_l, acc);
    const at::Tensor c = coords.to(acc).contiguous(), v = variance.to(acc).contiguous();
    const at::Tensor st = stats.to(acc).contiguous();
    args.grad_coords = cpu::data_or_null(gc);
    args.grad_variance = cpu::data_or_null(gv);
    args.grad_reg_losses = cpu::data_or_null(gr);
    args.grad_coord_losses = cpu::data_or_null(gcl);
    args.mask = cpu::data_or_null(weights);
    if (gl.defined()) {
      args.loss_scale =
          acc == at::kDouble
              ? cpu::loss_scale(gl, weights.defined() ? weights.const_data_ptr<double>() : nullptr, g.maps)
              : cpu::loss_scale(gl, weights.defined() ? weights.const_data_ptr<float>() : nullptr, g.maps);
    }
    args.reg_path = reg_path;
    args.needs_target_grad = target_grad;
    args.coords = c.const_data_ptr();
    args.variance = v.const_data_ptr();
    args.stats = st.const_data_ptr();
    args.grad_logits = grad_logits.mutable_data_ptr();
    args.grad_target = grad_target.mutable_data_ptr();
    args.grad_beta = grad_beta.defined() ? grad_beta.mutable_data_ptr() : nullptr;
    const cpu::BackwardFn fn = cpu::kernels().backward[cpu::dtype_index(logits)];
    at::parallel_for(0, g.maps, cpu::grain_size(g),
                     [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  }
  if (has(target) && target->scalar_type() != acc) grad_target = grad_target.to(target->scalar_type());
  if (has(beta_map) && !grad_beta.defined()) grad_beta = at::zeros({g.batch, g.keypoints}, opts);
  return {grad_logits, grad_target, reduce_beta_grad(grad_beta, beta_map, logits)};
}

}  // namespace dsnt_cuda

TORCH_LIBRARY_IMPL(dsnt_cuda, CPU, m) {
  m.impl("dsnt_fwd", &dsnt_cuda::dsnt_fwd_cpu);
  m.impl("dsnt_bwd", &dsnt_cuda::dsnt_bwd_cpu);
}
