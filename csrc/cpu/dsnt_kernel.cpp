// CPU kernels of dsnt_fwd / dsnt_bwd (csrc/OPS.md): host entry points, registered for the CPU
// dispatch key. The per-map math is in dsnt_kernel_impl.h, built here for any CPU and in
// dsnt_kernel_avx2.cpp with AVX2+FMA; the AVX2 build is used when the CPU has it.
//
// Threads: at::parallel_for over the B*L maps, a few maps per task so each thread keeps one
// map (and its scratch) in cache. Accumulation in float (double for float64 logits).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>

#include "dsnt_ops.h"

// The portable build of the kernels.
#define DSNT_CPU_NS generic
#include "cpu/dsnt_kernel_impl.h"
#undef DSNT_CPU_NS

namespace dsnt_cuda {

namespace cpu {

const KernelTable& kernels_generic() {
  static const KernelTable table = generic::make_table();
  return table;
}

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

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kDouble:
      return DType::kF64;
    case at::kHalf:
      return DType::kF16;
    case at::kBFloat16:
      return DType::kBF16;
    default:
      return DType::kF32;
  }
}

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Geometry in the kernels' view order (x = last tensor dim first), modes and scalars.
KernelArgs make_args(const MapGeometry& g, Normalization norm, Regularizer reg, double beta,
                     bool normalized, double sigma_t) {
  KernelArgs a;
  a.maps = g.maps;
  a.dims = g.dims;
  for (int k = 0; k < g.dims; ++k) a.len[k] = g.sizes[g.dims - 1 - k];
  a.norm = norm;
  a.reg = reg;
  a.beta = beta;
  a.normalized = normalized;
  a.sigma_t = sigma_t;
  return a;
}

// Maps per task: enough elements per task (~32k) to amortize scheduling, at least one map.
int64_t grain_size(const MapGeometry& g) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, g.map_size));
}

void run_chunks(ChunkFn fn, const KernelArgs& args, const MapGeometry& g) {
  at::parallel_for(0, g.maps, grain_size(g),
                   [&](int64_t begin, int64_t end) { fn(args, begin, end); });
}

// An optional per-keypoint input as a contiguous tensor of the accumulation type, or undefined.
at::Tensor acc_or_undefined(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(acc).contiguous();
}

}  // namespace
}  // namespace cpu

// (B, L, S...) logits -> coords (B, L, n), variance (B, L, n), reg_losses (B, L), stats (B, L, 2),
// all in the accumulation dtype. One task per group of maps; see dsnt_kernel_impl.h.
ForwardResult dsnt_fwd_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                           c10::string_view normalization, double beta,
                           bool normalized_coordinates, c10::string_view reg, double sigma_t) {
  const Normalization norm =
      parse_normalization(std::string_view(normalization.data(), normalization.size()));
  const Regularizer rg = parse_regularizer(std::string_view(reg.data(), reg.size()));
  const MapGeometry g = check_inputs(logits, target, rg, beta, sigma_t);
  TORCH_CHECK(logits.device().is_cpu(), "dsnt_cuda: dsnt_fwd_cpu got logits on ", logits.device());

  const at::ScalarType acc = cpu::acc_type(logits);
  const auto opts = logits.options().dtype(acc);
  at::Tensor coords = at::empty({g.batch, g.keypoints, g.dims}, opts);
  at::Tensor variance = at::empty({g.batch, g.keypoints, g.dims}, opts);
  at::Tensor reg_losses = at::empty({g.batch, g.keypoints}, opts);
  at::Tensor stats = at::empty({g.batch, g.keypoints, 2}, opts);
  if (g.maps == 0) return {coords, variance, reg_losses, stats};

  const at::Tensor z = logits.contiguous();
  const bool divergence = rg == Regularizer::JS || rg == Regularizer::KL;
  const at::Tensor mu = divergence ? target->to(acc).contiguous() : at::Tensor();

  cpu::KernelArgs args = cpu::make_args(g, norm, rg, beta, normalized_coordinates, sigma_t);
  args.logits = z.const_data_ptr();
  args.target = mu.defined() ? mu.const_data_ptr() : nullptr;
  args.coords = coords.mutable_data_ptr();
  args.variance = variance.mutable_data_ptr();
  args.reg_losses = reg_losses.mutable_data_ptr();
  args.stats = stats.mutable_data_ptr();
  cpu::run_chunks(cpu::kernels().forward[static_cast<int>(cpu::dtype_of(z))], args, g);
  return {coords, variance, reg_losses, stats};
}

// Upstream gradients (None = zeros) + logits and the saved forward outputs -> grad_logits
// (logits' shape and dtype, contiguous) and grad_target ((B, L, n), target's dtype; nonzero only
// for js / kl with needs_target_grad). p is recomputed from logits and stats.
BackwardResult dsnt_bwd_cpu(const std::optional<at::Tensor>& grad_coords,
                            const std::optional<at::Tensor>& grad_variance,
                            const std::optional<at::Tensor>& grad_reg_losses,
                            const at::Tensor& logits, const std::optional<at::Tensor>& target,
                            const at::Tensor& coords, const at::Tensor& variance,
                            const at::Tensor& stats, c10::string_view normalization, double beta,
                            bool normalized_coordinates, c10::string_view reg, double sigma_t,
                            bool needs_target_grad) {
  const Normalization norm =
      parse_normalization(std::string_view(normalization.data(), normalization.size()));
  const Regularizer rg = parse_regularizer(std::string_view(reg.data(), reg.size()));
  const MapGeometry g = check_inputs(logits, target, rg, beta, sigma_t);
  check_backward_inputs(g, logits, grad_coords, grad_variance, grad_reg_losses, coords, variance,
                        stats);
  TORCH_CHECK(logits.device().is_cpu(), "dsnt_cuda: dsnt_bwd_cpu got logits on ", logits.device());

  const at::ScalarType acc = cpu::acc_type(logits);
  const bool has_target = target.has_value() && target->defined();
  const at::ScalarType target_dtype = has_target ? target->scalar_type() : acc;
  const bool divergence = rg == Regularizer::JS || rg == Regularizer::KL;
  // Without a regularizer gradient (None = zeros) the target gets nothing: skip that work, and a
  // NaN map gives 0 there, not 0 * NaN (as the CUDA and Triton kernels do).
  const bool has_grad_reg = grad_reg_losses.has_value() && grad_reg_losses->defined();
  const bool target_grad = divergence && needs_target_grad && has_grad_reg;

  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());  // contiguous
  at::Tensor grad_target_acc =
      at::zeros({g.batch, g.keypoints, g.dims}, logits.options().dtype(acc));
  if (g.maps > 0) {
    const at::Tensor z = logits.contiguous();
    const at::Tensor mu = divergence ? target->to(acc).contiguous() : at::Tensor();
    const at::Tensor gc = cpu::acc_or_undefined(grad_coords, acc);
    const at::Tensor gv = cpu::acc_or_undefined(grad_variance, acc);
    const at::Tensor gr = cpu::acc_or_undefined(grad_reg_losses, acc);
    const at::Tensor c = coords.to(acc).contiguous();
    const at::Tensor v = variance.to(acc).contiguous();
    const at::Tensor st = stats.to(acc).contiguous();

    cpu::KernelArgs args = cpu::make_args(g, norm, rg, beta, normalized_coordinates, sigma_t);
    args.logits = z.const_data_ptr();
    args.target = mu.defined() ? mu.const_data_ptr() : nullptr;
    args.coords = const_cast<void*>(c.const_data_ptr());
    args.variance = const_cast<void*>(v.const_data_ptr());
    args.stats = const_cast<void*>(st.const_data_ptr());
    args.grad_coords = gc.defined() ? gc.const_data_ptr() : nullptr;
    args.grad_variance = gv.defined() ? gv.const_data_ptr() : nullptr;
    args.grad_reg_losses = gr.defined() ? gr.const_data_ptr() : nullptr;
    args.grad_logits = grad_logits.mutable_data_ptr();
    args.grad_target = target_grad ? grad_target_acc.mutable_data_ptr() : nullptr;
    args.needs_target_grad = target_grad;
    cpu::run_chunks(cpu::kernels().backward[static_cast<int>(cpu::dtype_of(z))], args, g);
  }
  at::Tensor grad_target =
      target_dtype == acc ? grad_target_acc : grad_target_acc.to(target_dtype);
  return {grad_logits, grad_target};
}

}  // namespace dsnt_cuda

TORCH_LIBRARY_IMPL(dsnt_cuda, CPU, m) {
  m.impl("dsnt_fwd", &dsnt_cuda::dsnt_fwd_cpu);
  m.impl("dsnt_bwd", &dsnt_cuda::dsnt_bwd_cpu);
}
