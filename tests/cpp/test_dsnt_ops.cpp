// The dsnt_cuda ops called from C++ through the dispatcher, as a libtorch user would (no Python),
// with the schemas of docs/ops.md. Built and run by CMake / ctest (scripts/cmake_test.sh). Exits
// non-zero if any check fails.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "dsnt_ops.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Fwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                                       const OptTensor&, const OptTensor&,
                                                                       const OptTensor&, c10::string_view,
                                                                       double, bool, c10::string_view, double,
                                                                       c10::string_view, double);
using Bwd = std::tuple<Tensor, Tensor, Tensor>(const OptTensor&, const OptTensor&, const OptTensor&,
                                               const OptTensor&, const OptTensor&, const Tensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&,
                                               const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                                               c10::string_view, double, bool, c10::string_view, double,
                                               c10::string_view, double, bool, bool);

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

bool close(const Tensor& a, const Tensor& b, double tol) {
  return a.sizes() == b.sizes() && at::allclose(a.to(at::kDouble), b.to(at::kDouble), 0, tol);
}

c10::TypedOperatorHandle<Fwd> fwd_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("dsnt_cuda::dsnt_fwd", "").typed<Fwd>();
}

c10::TypedOperatorHandle<Bwd> bwd_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("dsnt_cuda::dsnt_bwd", "").typed<Bwd>();
}

// Forward without target, mask or per-map tensors, no loss.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> plain_fwd(const Tensor& z, const char* norm,
                                                                     double beta, bool normalized,
                                                                     const char* reg) {
  return fwd_op().call(z, std::nullopt, std::nullopt, std::nullopt, std::nullopt, norm, beta, normalized, reg,
                       1.0, "none", 0.0);
}

void test_peaked_maps() {
  // 2-D: all mass on (y, x) = (3, 2) of a 5 x 7 map.
  Tensor z = at::zeros({1, 1, 5, 7});
  z.index_put_({0, 0, 3, 2}, 100.0);
  auto [c, v, r, cl, loss, s] = plain_fwd(z, "softmax", 1.0, false, "none");
  expect(close(c, at::tensor({2.0f, 3.0f}).view({1, 1, 2}), 1e-5), "2-D peak, pixel coordinates");
  expect(close(v, at::zeros({1, 1, 2}), 1e-5), "2-D peak, zero variance");
  expect(close(r, at::zeros({1, 1}), 0), "reg none gives zeros");
  expect(cl.numel() == 0 && loss.numel() == 0, "no coordinate loss: empty coord_losses and loss");
  expect(s.sizes() == at::IntArrayRef({1, 1, 6}), "stats (B, L, 4 + n)");
  expect(close(s.index({0, 0, at::indexing::Slice(4)}), at::tensor({2.0f - 3.0f, 3.0f - 2.0f}), 1e-5),
         "stats ubar in centred pixels");
  std::tie(c, v, r, cl, loss, s) = plain_fwd(z, "softmax", 1.0, true, "none");
  expect(close(c, at::tensor({5.0f / 7 - 1, 7.0f / 5 - 1}).view({1, 1, 2}), 1e-5),
         "2-D peak, normalized coordinates (2j+1)/S-1");

  // 1-D and 3-D peaks, x first.
  Tensor z1 = at::full({2, 1, 9}, -50.0);
  z1.index_put_({1, 0, 6}, 50.0);
  z1.index_put_({0, 0, 0}, 50.0);
  std::tie(c, v, r, cl, loss, s) = plain_fwd(z1, "softmax", 1.0, false, "none");
  expect(close(c, at::tensor({0.0f, 6.0f}).view({2, 1, 1}), 1e-5), "1-D peaks");
  Tensor z3 = at::zeros({1, 1, 3, 4, 5});
  z3.index_put_({0, 0, 2, 1, 4}, 1.0);
  std::tie(c, v, r, cl, loss, s) = plain_fwd(z3, "relu", 1.0, false, "none");
  expect(close(c, at::tensor({4.0f, 1.0f, 2.0f}).view({1, 1, 3}), 1e-6), "3-D relu peak, (x,y,z)");
}

void test_uniform_maps() {
  Tensor z = at::full({1, 2, 4, 6}, 0.25);
  auto [c, v, r, cl, loss, s] = plain_fwd(z, "softmax", 2.0, true, "var");
  expect(close(c, at::zeros({1, 2, 2}), 1e-6), "uniform map centred at 0");
  // pixel variance of a uniform axis of S pixels: (S^2 - 1) / 12
  expect(close(v.select(2, 0), at::full({1, 2}, 35.0 / 12), 1e-5), "uniform variance x");
  expect(close(v.select(2, 1), at::full({1, 2}, 15.0 / 12), 1e-5), "uniform variance y");
  const double expected_var_reg = std::pow(35.0 / 12 - 1, 2) + std::pow(15.0 / 12 - 1, 2);
  expect(close(r, at::full({1, 2}, expected_var_reg), 1e-5), "var regularizer");
  expect(close(s.select(2, 1), at::full({1, 2}, 24.0), 1e-5), "softmax stats denom = N");

  // All-negative relu map: uniform fallback, denom 0 in stats, zero logits gradient.
  Tensor neg = at::full({1, 1, 3, 3}, -1.0);
  std::tie(c, v, r, cl, loss, s) = plain_fwd(neg, "relu", 1.0, false, "none");
  expect(close(c, at::tensor({1.0f, 1.0f}).view({1, 1, 2}), 1e-6), "relu fallback is uniform");
  expect(s.index({0, 0, 1}).item<float>() == 0.0f, "relu fallback keeps denom 0");
  auto [gl, gt, gb] = bwd_op().call(at::ones_like(c), std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                                    neg, std::nullopt, std::nullopt, std::nullopt, std::nullopt, c, v, s,
                                    "relu", 1.0, false, "none", 1.0, "none", 0.0, false, false);
  expect(gl.abs().max().item<float>() == 0.0f, "relu fallback has zero gradient");
  expect(gb.numel() == 0, "no beta_map: empty grad_beta_map");
}

// The standard training loss (euclidean + reg_weight JS, mean) and its gradients.
void test_training_loss() {
  auto fwd = fwd_op();
  auto bwd = bwd_op();
  at::manual_seed(3);
  Tensor z = at::randn({3, 2, 8, 6}, at::kDouble);
  Tensor t = at::rand({3, 2, 2}, at::kDouble) * 1.6 - 0.8;
  const double w = 0.7;
  auto loss_of = [&](const Tensor& logits) {
    return std::get<4>(fwd.call(logits, t, std::nullopt, std::nullopt, std::nullopt, "softmax", 1.3, true,
                                "js", 1.0, "euclidean", w));
  };
  auto [c, v, r, cl, loss, s] = fwd.call(z, t, std::nullopt, std::nullopt, std::nullopt, "softmax", 1.3, true,
                                         "js", 1.0, "euclidean", w);
  expect(r.min().item<double>() >= 0 && r.max().item<double>() <= std::log(2.0), "JS in [0, ln 2]");
  expect(close(cl, (c - t).norm(2, {-1}), 1e-12), "euclidean coord_losses");
  expect(close(loss, (cl + w * r).mean(), 1e-12), "loss = mean(coord_losses + reg_weight reg_losses)");

  const Tensor one = at::ones({}, at::kDouble);
  auto [gl, gt, gb] =
      bwd.call(std::nullopt, std::nullopt, std::nullopt, std::nullopt, one, z, t, std::nullopt, std::nullopt,
               std::nullopt, c, v, s, "softmax", 1.3, true, "js", 1.0, "euclidean", w, true, false);
  expect(gl.sizes() == z.sizes() && gl.scalar_type() == at::kDouble, "grad_logits shape, dtype");
  // Softmax gradients sum to 0 over each map: sum_i p_i (G_i - sum_j p_j G_j) = 0.
  expect(close(gl.sum({2, 3}), at::zeros({3, 2}, at::kDouble), 1e-12), "softmax gradient sums to zero");
  expect(gt.sizes() == t.sizes() && at::isfinite(gt).all().item<bool>(), "grad_target finite");

  // Finite differences of the loss in one logit and one target mean.
  const double h = 1e-6;
  Tensor zp = z.clone(), zm = z.clone();
  zp.index_put_({1, 1, 4, 2}, z.index({1, 1, 4, 2}).item<double>() + h);
  zm.index_put_({1, 1, 4, 2}, z.index({1, 1, 4, 2}).item<double>() - h);
  const double fd = (loss_of(zp) - loss_of(zm)).item<double>() / (2 * h);
  expect(std::abs(gl.index({1, 1, 4, 2}).item<double>() - fd) < 1e-8,
         "loss gradient matches a finite difference");
  const Tensor t0 = t.clone();
  t.index_put_({2, 0, 1}, t0.index({2, 0, 1}).item<double>() + h);
  const double lp = loss_of(z).item<double>();
  t.index_put_({2, 0, 1}, t0.index({2, 0, 1}).item<double>() - h);
  const double fdt = (lp - loss_of(z).item<double>()) / (2 * h);
  t.copy_(t0);
  expect(std::abs(gt.index({2, 0, 1}).item<double>() - fdt) < 1e-8,
         "target gradient (regularizer + coordinate loss) matches a finite difference");
}

// The library's autograd (csrc/dsnt_autograd.cpp): the loss's gradient through autograd equals
// the backward op's, for the logits and the target.
void test_autograd() {
  auto fwd = fwd_op();
  auto bwd = bwd_op();
  at::manual_seed(5);
  const Tensor z = at::randn({2, 3, 7, 5}, at::kDouble).requires_grad_(true);
  const Tensor t = (at::rand({2, 3, 2}, at::kDouble) * 1.6 - 0.8).requires_grad_(true);
  auto [c, v, r, cl, loss, s] = fwd.call(z, t, std::nullopt, std::nullopt, std::nullopt, "softmax", 1.0, true,
                                         "js", 1.0, "euclidean", 1.0);
  expect(loss.requires_grad() && !s.requires_grad(), "loss differentiable, stats not");
  const auto grads = torch::autograd::grad({loss}, {z, t});
  at::AutoDispatchBelowADInplaceOrView below;
  auto [gl, gt, gb] =
      bwd.call(std::nullopt, std::nullopt, std::nullopt, std::nullopt, at::ones({}, at::kDouble), z.detach(),
               t.detach(), std::nullopt, std::nullopt, std::nullopt, c.detach(), v.detach(), s, "softmax",
               1.0, true, "js", 1.0, "euclidean", 1.0, true, false);
  expect(close(grads[0], gl, 1e-14) && close(grads[1], gt, 1e-14),
         "autograd's gradient is the backward op's");
}

void test_per_map_beta() {
  auto fwd = fwd_op();
  auto bwd = bwd_op();
  at::manual_seed(4);
  Tensor z = at::randn({2, 3, 5, 4}, at::kDouble);
  Tensor beta_map = at::tensor({0.7, 1.3, 2.0}, at::kDouble);  // per keypoint (L,)
  auto outs = fwd.call(z, std::nullopt, std::nullopt, beta_map, std::nullopt, "softmax", 1.0, true, "var",
                       1.0, "none", 0.0);
  auto single = fwd.call(z.narrow(1, 2, 1), std::nullopt, std::nullopt, std::nullopt, std::nullopt, "softmax",
                         2.0, true, "var", 1.0, "none", 0.0);
  expect(close(std::get<0>(outs).narrow(1, 2, 1), std::get<0>(single), 1e-14),
         "beta_map[l] acts as beta for map l");
  auto [gl, gt, gb] =
      bwd.call(std::nullopt, std::nullopt, at::ones({2, 3}, at::kDouble), std::nullopt, std::nullopt, z,
               std::nullopt, std::nullopt, beta_map, std::nullopt, std::get<0>(outs), std::get<1>(outs),
               std::get<5>(outs), "softmax", 1.0, true, "var", 1.0, "none", 0.0, false, true);
  const double h = 1e-6;
  auto reg_sum = [&](double b1) {
    Tensor b = beta_map.clone();
    b.index_put_({1}, b1);
    return std::get<2>(fwd.call(z, std::nullopt, std::nullopt, b, std::nullopt, "softmax", 1.0, true, "var",
                                1.0, "none", 0.0))
        .sum()
        .item<double>();
  };
  const double fd = (reg_sum(1.3 + h) - reg_sum(1.3 - h)) / (2 * h);
  expect(gb.sizes() == beta_map.sizes() && std::abs(gb.index({1}).item<double>() - fd) < 1e-7,
         "beta_map gradient (summed over the batch) matches a finite difference");
}

template <typename Call>
void expect_error(Call call, const char* needle, const std::string& what) {
  bool threw = false;
  try {
    call();
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find(needle) != std::string::npos;
  }
  expect(threw, what);
}

void test_bad_inputs() {
  expect_error([] { plain_fwd(at::zeros({3, 4}), "softmax", 1.0, true, "none"); }, "spatial dims",
               "rank-2 logits rejected with a clear message");
  expect_error([] { plain_fwd(at::zeros({1, 1, 3}), "softmax", 1.0, true, "js"); }, "target",
               "js without target rejected");
  expect_error(
      [] {
        fwd_op().call(at::zeros({1, 2, 3}), std::nullopt, std::nullopt, at::tensor({1.0, -1.0}), std::nullopt,
                      "softmax", 1.0, true, "none", 1.0, "none", 0.0);
      },
      "beta_map", "a beta_map value <= 0 rejected");
  expect_error(
      [] {
        fwd_op().call(at::zeros({1, 2, 3}), at::zeros({1, 2, 1}), std::nullopt, std::nullopt, std::nullopt,
                      "softmax", 1.0, false, "none", 1.0, "l1", 0.0);
      },
      "normalized_coordinates", "a coordinate loss on the pixel grid rejected");
  expect_error([] { dsnt_cuda::parse_normalization("softermax"); }, "softermax", "parse_normalization");
}

}  // namespace

int main() {
  try {
    test_peaked_maps();
    test_uniform_maps();
    test_training_loss();
    test_autograd();
    test_per_map_beta();
    test_bad_inputs();
  } catch (const std::exception& e) {
    std::printf("FAIL uncaught exception: %s\n", e.what());
    return 1;
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
