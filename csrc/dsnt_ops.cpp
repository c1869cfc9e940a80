// The op schemas of namespace dsnt_cuda (docs/ops.md) and the input checks every C++ backend
// shares. Kernels are registered per dispatch key next to their code (cpu/, cuda/); fake kernels
// and autograd are registered from Python (dsnt_cuda/ops.py).
#include "dsnt_ops.h"

#include <ATen/ExpandUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

#include "op_call.h"

namespace dsnt_cuda {

namespace {

template <typename E>
struct Named {
  std::string_view name;
  E value;
};

// The value of `name` in `table`; an unknown name is a ValueError that lists the known ones.
template <typename E, size_t N>
E parse_name(std::string_view name, const char* what, const Named<E> (&table)[N]) {
  for (const Named<E>& entry : table) {
    if (entry.name == name) return entry.value;
  }
  std::string expected;
  for (const Named<E>& entry : table) expected += (expected.empty() ? "" : ", ") + std::string(entry.name);
  TORCH_CHECK_VALUE(false, "dsnt_cuda: unknown ", what, " '", std::string(name), "'; expected one of ",
                    expected);
}

}  // namespace

Normalization parse_normalization(std::string_view name) {
  static constexpr Named<Normalization> kNames[] = {{"softmax", Normalization::Softmax},
                                                    {"abs", Normalization::Abs},
                                                    {"relu", Normalization::Relu},
                                                    {"sigmoid", Normalization::Sigmoid},
                                                    {"none", Normalization::None}};
  return parse_name(name, "normalization", kNames);
}

Regularizer parse_regularizer(std::string_view name) {
  static constexpr Named<Regularizer> kNames[] = {{"none", Regularizer::None},
                                                  {"js", Regularizer::JS},
                                                  {"kl", Regularizer::KL},
                                                  {"var", Regularizer::Var}};
  return parse_name(name, "regularizer", kNames);
}

CoordLoss parse_coord_loss(std::string_view name) {
  static constexpr Named<CoordLoss> kNames[] = {{"none", CoordLoss::None},
                                                {"euclidean", CoordLoss::Euclidean},
                                                {"l1", CoordLoss::L1},
                                                {"mse", CoordLoss::MSE}};
  return parse_name(name, "coord_loss", kNames);
}

namespace {

std::string_view as_std(c10::string_view s) { return {s.data(), s.size()}; }

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The narrowest target whose 1 / sigma_t^2 (times a map size) stays finite in the accumulation
// type (docs/ops.md): 2^-40 px for float32, 2^-400 px for float64.
double min_sigma_t(at::ScalarType acc) {
  return acc == at::kDouble ? std::ldexp(1.0, -400) : std::ldexp(1.0, -40);
}

double max_beta(at::ScalarType acc) {
  return acc == at::kDouble ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max();
}

void check_same_device(const at::Tensor& t, const char* what, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), "dsnt_cuda: ", what, " is on ", t.device(),
                    " but logits are on ", logits.device());
}

// A (B, L[, last]) per-keypoint tensor that travels with the maps.
void check_per_keypoint(const at::Tensor& t, const char* what, const MapGeometry& g, const at::Tensor& logits,
                        int64_t last) {
  const bool shape_ok =
      last < 0 ? (t.dim() == 2 && t.size(0) == g.batch && t.size(1) == g.keypoints)
               : (t.dim() == 3 && t.size(0) == g.batch && t.size(1) == g.keypoints && t.size(2) == last);
  if (last < 0) {
    TORCH_CHECK_VALUE(shape_ok, "dsnt_cuda: ", what, " must have shape (", g.batch, ", ", g.keypoints,
                      ") to match logits of shape ", logits.sizes(), ", got ", t.sizes());
  } else {
    TORCH_CHECK_VALUE(shape_ok, "dsnt_cuda: ", what, " must have shape (", g.batch, ", ", g.keypoints, ", ",
                      last, ") to match logits of shape ", logits.sizes(), ", got ", t.sizes());
  }
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "dsnt_cuda: ", what,
                    " must be a floating-point tensor, got ", t.scalar_type());
  check_same_device(t, what, logits);
}

// beta_map / sigma_t_map: floating, on the logits' device, broadcastable to (B, L).
void check_per_map(const std::optional<at::Tensor>& t, const char* what, const MapGeometry& g,
                   const at::Tensor& logits) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(at::isFloatingType(t->scalar_type()), "dsnt_cuda: ", what,
                    " must be a floating-point tensor, got ", t->scalar_type());
  check_same_device(*t, what, logits);
  TORCH_CHECK_VALUE(t->dim() <= 2 && at::is_expandable_to(t->sizes(), {g.batch, g.keypoints}),
                    "dsnt_cuda: ", what, " must be broadcastable to (B, L) = (", g.batch, ", ", g.keypoints,
                    "), got shape ", t->sizes());
}

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The forward outputs dsnt_bwd gets back.
void check_saved_outputs(const MapGeometry& g, const at::Tensor& logits, const at::Tensor& coords,
                         const at::Tensor& variance, const at::Tensor& stats) {
  check_per_keypoint(coords, "coords", g, logits, g.dims);
  check_per_keypoint(variance, "variance", g, logits, g.dims);
  check_per_keypoint(stats, "stats", g, logits, stats_size(g.dims));
}

}  // namespace

OpOptions parse_options(c10::string_view normalization, double beta, bool normalized_coordinates,
                        c10::string_view reg, double sigma_t, c10::string_view coord_loss,
                        double reg_weight) {
  OpOptions o;
  o.normalization = parse_normalization(as_std(normalization));
  o.reg = parse_regularizer(as_std(reg));
  o.coord_loss = parse_coord_loss(as_std(coord_loss));
  o.beta = beta;
  o.sigma_t = sigma_t;
  o.reg_weight = reg_weight;
  o.normalized = normalized_coordinates;
  return o;
}

at::ScalarType accumulation_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

MapGeometry check_forward_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                                 const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& beta_map,
                                 const std::optional<at::Tensor>& sigma_t_map, const OpOptions& o) {
  TORCH_CHECK_VALUE(logits.defined(), "dsnt_cuda: logits is an undefined tensor");
  TORCH_CHECK_VALUE(logits.dim() >= 3 && logits.dim() <= 2 + kMaxSpatialDims,
                    "dsnt_cuda: logits must have shape (B, L, S_1..S_n) with 1 to 3 spatial dims, got a ",
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
    const int64_t s = logits.size(logits.dim() - 1 - k);  // x = the last tensor dim
    TORCH_CHECK_VALUE(s >= 1, "dsnt_cuda: every spatial size of logits must be >= 1, got shape ",
                      logits.sizes());
    g.size[k] = s;
    g.map_size *= s;
  }
  // Element offsets inside a map are 32-bit in the GPU kernels (with a tile of slack).
  TORCH_CHECK_VALUE(g.map_size <= (int64_t{1} << 30), "dsnt_cuda: a map may have at most 2^30 elements, got ",
                    g.map_size);

  const at::ScalarType acc = accumulation_type(logits);
  if (!has(beta_map)) {
    TORCH_CHECK_VALUE(std::isfinite(o.beta) && o.beta > 0 && o.beta <= max_beta(acc),
                      "dsnt_cuda: beta must be finite, > 0 and representable in ", acc, ", got ", o.beta);
  }
  if (o.reg != Regularizer::None && !has(sigma_t_map)) {
    TORCH_CHECK_VALUE(std::isfinite(o.sigma_t) && o.sigma_t >= min_sigma_t(acc),
                      "dsnt_cuda: sigma_t must be finite and >= ", min_sigma_t(acc), " pixels (", acc,
                      " cannot represent a narrower target), got ", o.sigma_t);
  }
  TORCH_CHECK_VALUE(std::isfinite(o.reg_weight), "dsnt_cuda: reg_weight must be finite, got ", o.reg_weight);
  TORCH_CHECK_VALUE(o.coord_loss == CoordLoss::None || o.normalized,
                    "dsnt_cuda: a coordinate loss needs normalized_coordinates=True (the loss is in "
                    "normalized units)");
  if (o.needs_target()) {
    TORCH_CHECK_VALUE(has(target),
                      "dsnt_cuda: target means are needed by reg js / kl and by a coordinate loss, "
                      "but target is None");
    check_per_keypoint(*target, "target", g, logits, g.dims);
  }
  if (has(mask)) {
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == g.batch && mask->size(1) == g.keypoints,
                      "dsnt_cuda: mask must have shape (", g.batch, ", ", g.keypoints, "), got ",
                      mask->sizes());
    TORCH_CHECK_VALUE(at::isFloatingType(mask->scalar_type()) || mask->scalar_type() == at::kBool,
                      "dsnt_cuda: mask must be a floating-point or bool tensor, got ", mask->scalar_type());
    check_same_device(*mask, "mask", logits);
  }
  check_per_map(beta_map, "beta_map", g, logits);
  check_per_map(sigma_t_map, "sigma_t_map", g, logits);
  return g;
}

ForwardCall forward_call(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                         const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& beta_map,
                         const std::optional<at::Tensor>& sigma_t_map, const OpOptions& options) {
  ForwardCall call{.logits = logits,
                   .target = target,
                   .mask = mask,
                   .beta_map = beta_map,
                   .sigma_t_map = sigma_t_map,
                   .options = options,
                   .geometry = check_forward_inputs(logits, target, mask, beta_map, sigma_t_map, options),
                   .acc = accumulation_type(logits)};
  return call;
}

void check_backward_inputs(const BackwardCall& call) {
  const MapGeometry& g = call.forward.geometry;
  const at::Tensor& logits = call.forward.logits;
  const auto per_keypoint = [&](const std::optional<at::Tensor>& t, const char* what, int64_t last) {
    if (has(t)) check_per_keypoint(*t, what, g, logits, last);
  };
  per_keypoint(call.grad_coords, "grad_coords", g.dims);
  per_keypoint(call.grad_variance, "grad_variance", g.dims);
  per_keypoint(call.grad_reg_losses, "grad_reg_losses", -1);
  if (!call.forward.with_loss()) {
    // coord_losses and loss are then empty, and autograd may hand their gradients in as empty
    // tensors (AOTAutograd materializes zeros of the outputs' shapes): those are no gradient.
    const auto nonempty = [](const std::optional<at::Tensor>& t) { return has(t) && t->numel() > 0; };
    TORCH_CHECK_VALUE(!nonempty(call.grad_coord_losses) && !nonempty(call.grad_loss),
                      "dsnt_cuda: grad_coord_losses / grad_loss given but coord_loss is 'none'");
    return check_saved_outputs(g, logits, call.coords, call.variance, call.stats);
  }
  per_keypoint(call.grad_coord_losses, "grad_coord_losses", -1);
  if (has(call.grad_loss)) {
    TORCH_CHECK_VALUE(call.grad_loss->numel() == 1 && call.grad_loss->dim() <= 1,
                      "dsnt_cuda: grad_loss must be a scalar, got shape ", call.grad_loss->sizes());
    check_same_device(*call.grad_loss, "grad_loss", logits);
  }
  check_saved_outputs(g, logits, call.coords, call.variance, call.stats);
}

at::Tensor optional_as(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!has(t)) return at::Tensor();
  return t->to(acc).contiguous();
}

at::Tensor per_map_view(const std::optional<at::Tensor>& t, const MapGeometry& g, at::ScalarType acc) {
  if (!has(t)) return at::Tensor();
  return t->to(acc).expand({g.batch, g.keypoints});
}

namespace {

// The first (b, l) of a (B, L) view whose value fails `ok`, reported with `what` and `rule`.
template <typename T, typename Ok>
void check_view_values(const at::Tensor& view, const char* what, const char* rule, Ok ok) {
  const at::Tensor host = view.is_cpu() ? view : view.cpu();
  const T* data = host.const_data_ptr<T>();
  for (int64_t b = 0; b < host.size(0); ++b) {
    for (int64_t l = 0; l < host.size(1); ++l) {
      const double x = static_cast<double>(data[b * host.stride(0) + l * host.stride(1)]);
      TORCH_CHECK_VALUE(ok(x), "dsnt_cuda: every value of ", what, " must be ", rule, ", got ", x,
                        " for map (", b, ", ", l, ")");
    }
  }
}

template <typename T>
void check_per_map_values_as(const at::Tensor& beta_view, const at::Tensor& sigma_t_view,
                             at::ScalarType acc) {
  if (beta_view.defined()) {
    const double hi = max_beta(acc);
    check_view_values<T>(beta_view, "beta_map", "finite, > 0 and representable in the accumulation dtype",
                         [hi](double x) { return std::isfinite(x) && x > 0 && x <= hi; });
  }
  if (sigma_t_view.defined()) {
    const double lo = min_sigma_t(acc);
    check_view_values<T>(sigma_t_view, "sigma_t_map",
                         acc == at::kDouble ? "finite and >= 2^-400 pixels" : "finite and >= 2^-40 pixels",
                         [lo](double x) { return std::isfinite(x) && x >= lo; });
  }
}

}  // namespace

void check_per_map_values(const at::Tensor& beta_view, const at::Tensor& sigma_t_view, at::ScalarType acc) {
  if (acc == at::kDouble) {
    check_per_map_values_as<double>(beta_view, sigma_t_view, acc);
  } else {
    check_per_map_values_as<float>(beta_view, sigma_t_view, acc);
  }
}

at::Tensor reduce_beta_grad(const at::Tensor& per_map_grad, const std::optional<at::Tensor>& beta_map,
                            const at::Tensor& logits) {
  if (!has(beta_map)) return at::empty({0}, logits.options().dtype(accumulation_type(logits)));
  return per_map_grad.sum_to_size(beta_map->sizes()).to(beta_map->scalar_type()).contiguous();
}

}  // namespace dsnt_cuda

// The schemas of docs/ops.md. Both ops are functional (no aliasing, no mutation), so they are
// pt2-compliant: torch.compile and torch.export trace them through the fake kernels of
// dsnt_cuda/ops.py.
TORCH_LIBRARY(dsnt_cuda, m) {
  m.def(
      "dsnt_fwd(Tensor logits, Tensor? target, Tensor? mask, Tensor? beta_map, Tensor? sigma_t_map, "
      "str normalization, float beta, bool normalized_coordinates, str reg, float sigma_t, "
      "str coord_loss, float reg_weight) "
      "-> (Tensor coords, Tensor variance, Tensor reg_losses, Tensor coord_losses, Tensor loss, "
      "Tensor stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "dsnt_bwd(Tensor? grad_coords, Tensor? grad_variance, Tensor? grad_reg_losses, "
      "Tensor? grad_coord_losses, Tensor? grad_loss, "
      "Tensor logits, Tensor? target, Tensor? mask, Tensor? beta_map, Tensor? sigma_t_map, "
      "Tensor coords, Tensor variance, Tensor stats, "
      "str normalization, float beta, bool normalized_coordinates, str reg, float sigma_t, "
      "str coord_loss, float reg_weight, bool needs_target_grad, bool needs_beta_grad) "
      "-> (Tensor grad_logits, Tensor grad_target, Tensor grad_beta_map)",
      {at::Tag::pt2_compliant_tag});
}
