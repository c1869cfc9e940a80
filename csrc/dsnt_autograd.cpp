// Autograd of every fused op pair (docs/ops.md), once: a kernel at the Autograd key of a forward
// op with dsnt_fwd's schema, whose backward is the pair's backward op (dsnt_bwd's schema). The C++
// pair registers it here; the Triton pair (and the CUDA emulator of the tests) through
// `register_autograd`, which the Python module exposes (dsnt_cuda/ops.py). Nothing of heatmap
// size is saved beyond the logits themselves: the small inputs and coords / variance / stats.
//
// In C++ rather than through a Python autograd.Function: every differentiable call then passed
// through a Python kernel, a Python redispatch and a Python backward, ~40 us a training step on
// a CPU, as much as the kernels of a small batch of maps.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dsnt_ops.h"

namespace dsnt_cuda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using ForwardSig = ForwardResult(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                 const OptTensor&, c10::string_view, double, bool, c10::string_view, double,
                                 c10::string_view, double);
using BackwardSig = BackwardResult(const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                   const OptTensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                   const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, c10::string_view, double, bool, c10::string_view,
                                   double, c10::string_view, double, bool, bool);

// A forward op and its backward op, by qualified name; the handles are looked up on first use
// (the C++ pair registers its kernel while the library's schemas may not be defined yet).
class OpPair {
 public:
  OpPair(std::string fwd, std::string bwd) : fwd_name_(std::move(fwd)), bwd_name_(std::move(bwd)) {}

  const c10::TypedOperatorHandle<ForwardSig>& forward() {
    std::call_once(once_, [this] { resolve(); });
    return *fwd_;
  }
  const c10::TypedOperatorHandle<BackwardSig>& backward() {
    std::call_once(once_, [this] { resolve(); });
    return *bwd_;
  }

 private:
  void resolve() {
    auto& dispatcher = c10::Dispatcher::singleton();
    fwd_ = dispatcher.findSchemaOrThrow(fwd_name_.c_str(), "").typed<ForwardSig>();
    bwd_ = dispatcher.findSchemaOrThrow(bwd_name_.c_str(), "").typed<BackwardSig>();
  }

  std::string fwd_name_, bwd_name_;
  std::once_flag once_;
  std::optional<c10::TypedOperatorHandle<ForwardSig>> fwd_;
  std::optional<c10::TypedOperatorHandle<BackwardSig>> bwd_;
};

// Every registered pair, alive for the process (kernels and autograd nodes point into it).
OpPair* add_pair(const std::string& fwd, const std::string& bwd) {
  static std::mutex mutex;
  static std::deque<OpPair> pairs;
  std::lock_guard<std::mutex> lock(mutex);
  return &pairs.emplace_back(fwd, bwd);
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }
OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
bool requires_grad(const OptTensor& t) { return given(t) && t->requires_grad(); }

// The forward op below autograd.
ForwardResult forward_below(OpPair* pair, const at::Tensor& logits, const OptTensor& target,
                            const OptTensor& mask, const OptTensor& beta_map, const OptTensor& sigma_t_map,
                            c10::string_view normalization, double beta, bool normalized_coordinates,
                            c10::string_view reg, double sigma_t, c10::string_view coord_loss,
                            double reg_weight) {
  at::AutoDispatchBelowADInplaceOrView below;
  return pair->forward().call(logits, target, mask, beta_map, sigma_t_map, normalization, beta,
                              normalized_coordinates, reg, sigma_t, coord_loss, reg_weight);
}

// Differentiable inputs: logits, target, beta_map (mask and sigma_t_map take no gradient). The
// first argument is the pair, which takes none.
struct DsntFwd : public torch::autograd::Function<DsntFwd> {
  static variable_list forward(AutogradContext* ctx, OpPair* pair, const at::Tensor& logits,
                               const OptTensor& target, const OptTensor& mask, const OptTensor& beta_map,
                               const OptTensor& sigma_t_map, c10::string_view normalization, double beta,
                               bool normalized_coordinates, c10::string_view reg, double sigma_t,
                               c10::string_view coord_loss, double reg_weight) {
    auto [coords, variance, reg_losses, coord_losses, loss, stats] =
        forward_below(pair, logits, target, mask, beta_map, sigma_t_map, normalization, beta,
                      normalized_coordinates, reg, sigma_t, coord_loss, reg_weight);
    ctx->save_for_backward({logits, target.value_or(at::Tensor()), mask.value_or(at::Tensor()),
                            beta_map.value_or(at::Tensor()), sigma_t_map.value_or(at::Tensor()), coords,
                            variance, stats});
    // The options, the pair, and where each optional input sits among the node's inputs
    // (needs_input_grad counts the tensors given, not the arguments).
    ctx->saved_data["options"] = c10::ivalue::Tuple::create(
        {std::string(normalization), beta, normalized_coordinates, std::string(reg), sigma_t,
         std::string(coord_loss), reg_weight, int64_t{given(target)}, int64_t{given(target) + given(mask)},
         reinterpret_cast<int64_t>(pair)});
    ctx->mark_non_differentiable({stats});
    // Unused outputs come as undefined gradients, not zero tensors: the op treats them as zeros.
    ctx->set_materialize_grads(false);
    return {coords, variance, reg_losses, coord_losses, loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto options = ctx->saved_data["options"].toTupleRef().elements();
    const bool has_target = options[7].toInt() != 0;
    const int64_t target_edge = 1, beta_edge = 1 + options[8].toInt();
    auto* pair = reinterpret_cast<OpPair*>(options[9].toInt());
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &target = saved[1], &beta_map = saved[3];
    const bool needs_logits = ctx->needs_input_grad(0);
    const bool needs_target = has_target && ctx->needs_input_grad(target_edge);
    const bool needs_beta = beta_map.defined() && ctx->needs_input_grad(beta_edge);
    variable_list result(13);  // one per argument of forward, the pair first
    if (!(needs_logits || needs_target || needs_beta)) return result;
    auto [grad_logits, grad_target, grad_beta] = pair->backward().call(
        optional(grads[0]), optional(grads[1]), optional(grads[2]), optional(grads[3]), optional(grads[4]),
        logits, optional(target), optional(saved[2]), optional(beta_map), optional(saved[4]), saved[5],
        saved[6], saved[7], options[0].toStringView(), options[1].toDouble(), options[2].toBool(),
        options[3].toStringView(), options[4].toDouble(), options[5].toStringView(), options[6].toDouble(),
        needs_target, needs_beta);
    if (needs_logits) result[1] = grad_logits;
    if (needs_target) result[2] = grad_target;
    if (needs_beta) result[4] = grad_beta;
    return result;
  }
};

// The kernel at the Autograd key of `pair`'s forward op.
torch::CppFunction autograd_kernel(OpPair* pair) {
  return torch::CppFunction([pair](const at::Tensor& logits, const OptTensor& target, const OptTensor& mask,
                                   const OptTensor& beta_map, const OptTensor& sigma_t_map,
                                   c10::string_view normalization, double beta, bool normalized_coordinates,
                                   c10::string_view reg, double sigma_t, c10::string_view coord_loss,
                                   double reg_weight) -> ForwardResult {
    const bool differentiable = at::GradMode::is_enabled() &&
                                (logits.requires_grad() || requires_grad(target) || requires_grad(mask) ||
                                 requires_grad(beta_map) || requires_grad(sigma_t_map));
    if (!differentiable) {
      return forward_below(pair, logits, target, mask, beta_map, sigma_t_map, normalization, beta,
                           normalized_coordinates, reg, sigma_t, coord_loss, reg_weight);
    }
    const variable_list out =
        DsntFwd::apply(pair, logits, target, mask, beta_map, sigma_t_map, normalization, beta,
                       normalized_coordinates, reg, sigma_t, coord_loss, reg_weight);
    return {out[0], out[1], out[2], out[3], out[4], out[5]};
  });
}

std::string name_in_namespace(const std::string& qualified, std::string* ns) {
  const auto colons = qualified.find("::");
  TORCH_CHECK(colons != std::string::npos, "register_autograd: expected a qualified op name, got '",
              qualified, "'");
  *ns = qualified.substr(0, colons);
  return qualified.substr(colons + 2);
}

}  // namespace

void register_autograd(const std::string& forward_op, const std::string& backward_op) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<torch::Library>> libraries;  // a registration lives with its Library
  std::string ns;
  const std::string name = name_in_namespace(forward_op, &ns);
  OpPair* pair = add_pair(forward_op, backward_op);
  std::lock_guard<std::mutex> lock(mutex);
  libraries.push_back(std::make_unique<torch::Library>(torch::Library::IMPL, ns, c10::DispatchKey::Autograd,
                                                       __FILE__, __LINE__));
  libraries.back()->impl(name.c_str(), autograd_kernel(pair));
}

}  // namespace dsnt_cuda

TORCH_LIBRARY_IMPL(dsnt_cuda, Autograd, m) {
  m.impl("dsnt_fwd",
         dsnt_cuda::autograd_kernel(dsnt_cuda::add_pair("dsnt_cuda::dsnt_fwd", "dsnt_cuda::dsnt_bwd")));
}
