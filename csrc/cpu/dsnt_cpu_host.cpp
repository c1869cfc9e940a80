// CPU kernels of dsnt_fwd / dsnt_bwd (docs/ops.md): host entry points, registered for the CPU
// dispatch key. Checks (dsnt_ops.cpp), allocation, one at::parallel_for over the maps into the
// per-map kernels (kernels.h, the AVX2 build when the CPU has it), and the loss's final sum over
// the maps (serial, deterministic). No ATen op runs per element or per map. The schema's
// arguments come parsed and checked through op_call.h.
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
#include "op_call.h"

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

MapInputTensors fill_map_args(MapArgs& a, const ForwardCall& call) {
  const MapGeometry& g = call.geometry;
  const OpOptions& o = call.options;
  MapInputTensors t;
  t.logits = call.logits.contiguous();
  if (o.needs_target()) t.target = call.target->to(call.acc).contiguous();
  t.beta = per_map_view(call.beta_map, g, call.acc);
  if (o.reg != Regularizer::None) t.sigma_t = per_map_view(call.sigma_t_map, g, call.acc);
  check_per_map_values(t.beta, t.sigma_t, call.acc);
  a.geometry = g;
  a.options = o;
  if (call.acc == at::kDouble) {
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

// The CPU backend of the op entries (op_call.h).
struct Host {
  using Scope = NoScope;
  static ForwardResult forward(const ForwardCall& call);
  static BackwardResult backward(const BackwardCall& call);
};

ForwardResult Host::forward(const ForwardCall& call) {
  const MapGeometry& g = call.geometry;
  const ForwardOutputs out = forward_outputs(
      call, [](at::IntArrayRef sizes, const at::TensorOptions& opts) { return at::empty(sizes, opts); });

  ForwardArgs args;
  const MapInputTensors inputs = fill_map_args(args.map, call);
  args.coords = out.coords.mutable_data_ptr();
  args.variance = out.variance.mutable_data_ptr();
  args.reg_losses = out.reg_losses.mutable_data_ptr();
  args.coord_losses = call.with_loss() ? out.coord_losses.mutable_data_ptr() : nullptr;
  args.stats = out.stats.mutable_data_ptr();
  const ForwardFn fn = kernels().forward[dtype_index(call.logits)];
  at::parallel_for(0, g.maps, grain_size(g), [&](int64_t begin, int64_t end) { fn(args, begin, end); });

  if (call.with_loss()) {
    const at::Tensor weights = optional_as(call.mask, call.acc);
    const double reg_weight = call.options.reg_weight;
    if (call.acc == at::kDouble) {
      *out.loss.mutable_data_ptr<double>() =
          average_loss(out.coord_losses.const_data_ptr<double>(), out.reg_losses.const_data_ptr<double>(),
                       weights.defined() ? weights.const_data_ptr<double>() : nullptr, g.maps, reg_weight);
    } else {
      *out.loss.mutable_data_ptr<float>() =
          average_loss(out.coord_losses.const_data_ptr<float>(), out.reg_losses.const_data_ptr<float>(),
                       weights.defined() ? weights.const_data_ptr<float>() : nullptr, g.maps, reg_weight);
    }
  }
  return out.result();
}

BackwardResult Host::backward(const BackwardCall& call) {
  const ForwardCall& f = call.forward;
  const MapGeometry& g = f.geometry;
  const OpOptions& o = f.options;
  const at::ScalarType acc = f.acc;
  const auto opts = f.acc_options();
  // Without a coordinate loss its gradients (empty tensors, if any) are no gradient.
  const std::optional<at::Tensor> grad_cl = f.with_loss() ? call.grad_coord_losses : std::nullopt;
  const std::optional<at::Tensor> grad_l = f.with_loss() ? call.grad_loss : std::nullopt;
  // Whether any upstream gradient reaches the logits; without one every gradient is 0.
  const bool reg_path = o.reg != Regularizer::None && (has(call.grad_reg_losses) || has(grad_l));
  const bool any_path =
      has(call.grad_coords) || has(call.grad_variance) || reg_path || has(grad_cl) || has(grad_l);

  at::Tensor grad_logits = at::empty(f.logits.sizes(), f.logits.options());
  at::Tensor grad_target = at::empty({g.batch, g.keypoints, g.dims}, opts);
  at::Tensor grad_beta = call.beta_grad ? at::empty({g.batch, g.keypoints}, opts) : at::Tensor();
  if (!any_path || g.maps == 0) {
    grad_logits.zero_();
    grad_target.zero_();
    if (grad_beta.defined()) grad_beta.zero_();
  } else {
    BackwardArgs args;
    const MapInputTensors inputs = fill_map_args(args.map, f);
    const at::Tensor gc = optional_as(call.grad_coords, acc), gv = optional_as(call.grad_variance, acc);
    const at::Tensor gr = optional_as(call.grad_reg_losses, acc), gcl = optional_as(grad_cl, acc);
    const at::Tensor weights = optional_as(f.mask, acc), gl = optional_as(grad_l, acc);
    const at::Tensor c = call.coords.to(acc).contiguous(), v = call.variance.to(acc).contiguous();
    const at::Tensor st = call.stats.to(acc).contiguous();
    args.grad_coords = data_or_null(gc);
    args.grad_variance = data_or_null(gv);
    args.grad_reg_losses = data_or_null(gr);
    args.grad_coord_losses = data_or_null(gcl);
    args.mask = data_or_null(weights);
    if (gl.defined()) {
      args.loss_scale =
          acc == at::kDouble
              ? loss_scale(gl, weights.defined() ? weights.const_data_ptr<double>() : nullptr, g.maps)
              : loss_scale(gl, weights.defined() ? weights.const_data_ptr<float>() : nullptr, g.maps);
    }
    args.reg_path = reg_path;
    args.needs_target_grad = call.target_grad;
    args.coords = c.const_data_ptr();
    args.variance = v.const_data_ptr();
    args.stats = st.const_data_ptr();
    args.grad_logits = grad_logits.mutable_data_ptr();
    args.grad_target = grad_target.mutable_data_ptr();
    args.grad_beta = grad_beta.defined() ? grad_beta.mutable_data_ptr() : nullptr;
    const BackwardFn fn = kernels().backward[dtype_index(f.logits)];
    at::parallel_for(0, g.maps, grain_size(g), [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  }
  if (has(f.target) && f.target->scalar_type() != acc) grad_target = grad_target.to(f.target->scalar_type());
  if (has(f.beta_map) && !grad_beta.defined()) grad_beta = at::zeros({g.batch, g.keypoints}, opts);
  return {grad_logits, grad_target, reduce_beta_grad(grad_beta, f.beta_map, f.logits)};
}

}  // namespace
}  // namespace cpu
}  // namespace dsnt_cuda

TORCH_LIBRARY_IMPL(dsnt_cuda, CPU, m) {
  m.impl("dsnt_fwd", &dsnt_cuda::dsnt_fwd_entry<dsnt_cuda::cpu::Host>);
  m.impl("dsnt_bwd", &dsnt_cuda::dsnt_bwd_entry<dsnt_cuda::cpu::Host>);
}
