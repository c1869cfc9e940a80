// The dsnt_cuda ops called from C++ through the dispatcher, as a libtorch user would (no Python).
// Built and run by CMake / ctest (scripts/cmake_test.sh). Exits non-zero on the first failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "dsnt_ops.h"

namespace {

using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, double, bool,
    c10::string_view, double);
using Bwd = std::tuple<at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, double, bool,
    c10::string_view, double, bool);

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

bool close(const at::Tensor& a, const at::Tensor& b, double tol) {
  return a.sizes() == b.sizes() && at::allclose(a.to(at::kDouble), b.to(at::kDouble), 0, tol);
}

c10::TypedOperatorHandle<Fwd> fwd_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("dsnt_cuda::dsnt_fwd", "").typed<Fwd>();
}

c10::TypedOperatorHandle<Bwd> bwd_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("dsnt_cuda::dsnt_bwd", "").typed<Bwd>();
}

void test_peaked_maps() {
  auto fwd = fwd_op();
  // 2-D: all mass on (y, x) = (3, 2) of a 5 x 7 map.
  at::Tensor z = at::zeros({1, 1, 5, 7});
  z.index_put_({0, 0, 3, 2}, 100.0);
  auto [c, v, r, s] = fwd.call(z, std::nullopt, "softmax", 1.0, false, "none", 1.0);
  expect(close(c, at::tensor({2.0f, 3.0f}).view({1, 1, 2}), 1e-5), "2-D peak, pixel coordinates");
  expect(close(v, at::zeros({1, 1, 2}), 1e-5), "2-D peak, zero variance");
  expect(close(r, at::zeros({1, 1}), 0), "reg none gives zeros");
  std::tie(c, v, r, s) = fwd.call(z, std::nullopt, "softmax", 1.0, true, "none", 1.0);
  expect(close(c, at::tensor({5.0f / 7 - 1, 7.0f / 5 - 1}).view({1, 1, 2}), 1e-5),
         "2-D peak, normalized coordinates (2j+1)/S-1");

  // 1-D and 3-D peaks, x first.
  at::Tensor z1 = at::full({2, 1, 9}, -50.0);
  z1.index_put_({1, 0, 6}, 50.0);
  z1.index_put_({0, 0, 0}, 50.0);
  std::tie(c, v, r, s) = fwd.call(z1, std::nullopt, "softmax", 1.0, false, "none", 1.0);
  expect(close(c, at::tensor({0.0f, 6.0f}).view({2, 1, 1}), 1e-5), "1-D peaks");
  at::Tensor z3 = at::zeros({1, 1, 3, 4, 5});
  z3.index_put_({0, 0, 2, 1, 4}, 1.0);
  std::tie(c, v, r, s) = fwd.call(z3, std::nullopt, "relu", 1.0, false, "none", 1.0);
  expect(close(c, at::tensor({4.0f, 1.0f, 2.0f}).view({1, 1, 3}), 1e-6), "3-D relu peak, (x,y,z)");
}

void test_uniform_maps() {
  auto fwd = fwd_op();
  at::Tensor z = at::full({1, 2, 4, 6}, 0.25);
  auto [c, v, r, s] = fwd.call(z, std::nullopt, "softmax", 2.0, true, "var", 1.0);
  expect(close(c, at::zeros({1, 2, 2}), 1e-6), "uniform map centred at 0");
  // pixel variance of a uniform axis of S pixels: (S^2 - 1) / 12
  expect(close(v.select(2, 0), at::full({1, 2}, 35.0 / 12), 1e-5), "uniform variance x");
  expect(close(v.select(2, 1), at::full({1, 2}, 15.0 / 12), 1e-5), "uniform variance y");
  const double expected_var_reg = std::pow(35.0 / 12 - 1, 2) + std::pow(15.0 / 12 - 1, 2);
  expect(close(r, at::full({1, 2}, expected_var_reg), 1e-5), "var regularizer");
  expect(close(s.select(2, 1), at::full({1, 2}, 24.0), 1e-5), "softmax stats denom = N");

  // All-negative relu map: uniform fallback, denom 0 in stats, zero logits gradient.
  at::Tensor neg = at::full({1, 1, 3, 3}, -1.0);
  std::tie(c, v, r, s) = fwd.call(neg, std::nullopt, "relu", 1.0, false, "none", 1.0);
  expect(close(c, at::tensor({1.0f, 1.0f}).view({1, 1, 2}), 1e-6), "relu fallback is uniform");
  expect(s.index({0, 0, 1}).item<float>() == 0.0f, "relu fallback keeps denom 0");
  auto [gl, gt] = bwd_op().call(at::ones_like(c), std::nullopt, std::nullopt, neg, std::nullopt, c,
                                v, s, "relu", 1.0, false, "none", 1.0, false);
  expect(gl.abs().max().item<float>() == 0.0f, "relu fallback has zero gradient");
}

void test_backward_and_js() {
  auto fwd = fwd_op();
  auto bwd = bwd_op();
  at::manual_seed(3);
  at::Tensor z = at::randn({3, 2, 8, 6}, at::kDouble);
  at::Tensor t = at::rand({3, 2, 2}, at::kDouble) * 1.6 - 0.8;
  auto [c, v, r, s] = fwd.call(z, t, "softmax", 1.0, true, "js", 1.0);
  expect(r.min().item<double>() >= 0 && r.max().item<double>() <= std::log(2.0),
         "JS in [0, ln 2]");
  auto [gl, gt] = bwd.call(at::randn_like(c), at::randn_like(v), at::ones_like(r), z, t, c, v, s,
                           "softmax", 1.0, true, "js", 1.0, true);
  expect(gl.sizes() == z.sizes() && gl.scalar_type() == at::kDouble, "grad_logits shape, dtype");
  // Softmax gradients sum to 0 over each map: sum_i p_i (G_i - sum_j p_j G_j) = 0.
  expect(close(gl.sum({2, 3}), at::zeros({3, 2}), 1e-12), "softmax gradient sums to zero");
  expect(gt.sizes() == t.sizes() && at::isfinite(gt).all().item<bool>(), "grad_target finite");

  // Finite difference of the JS loss in one logit.
  const double h = 1e-6;
  at::Tensor zp = z.clone(), zm = z.clone();
  zp.index_put_({1, 1, 4, 2}, z.index({1, 1, 4, 2}).item<double>() + h);
  zm.index_put_({1, 1, 4, 2}, z.index({1, 1, 4, 2}).item<double>() - h);
  const double fd = (std::get<2>(fwd.call(zp, t, "softmax", 1.0, true, "js", 1.0)).sum() -
                     std::get<2>(fwd.call(zm, t, "softmax", 1.0, true, "js", 1.0)).sum())
                        .item<double>() /
                    (2 * h);
  auto [gl_reg, unused] = bwd.call(std::nullopt, std::nullopt, at::ones_like(r), z, t, c, v, s,
                                   "softmax", 1.0, true, "js", 1.0, false);
  expect(std::abs(gl_reg.index({1, 1, 4, 2}).item<double>() - fd) < 1e-7,
         "JS logits gradient matches a finite difference");
}

void test_bad_inputs() {
  auto fwd = fwd_op();
  bool threw = false;
  try {
    fwd.call(at::zeros({3, 4}), std::nullopt, "softmax", 1.0, true, "none", 1.0);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("spatial dims") != std::string::npos;
  }
  expect(threw, "rank-2 logits rejected with a clear message");
  threw = false;
  try {
    fwd.call(at::zeros({1, 1, 3}), std::nullopt, "softmax", 1.0, true, "js", 1.0);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("target") != std::string::npos;
  }
  expect(threw, "js without target rejected");
  threw = false;
  try {
    dsnt_cuda::parse_normalization("softermax");
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw && dsnt_cuda::parse_normalization("abs") == dsnt_cuda::Normalization::Abs,
         "parse_normalization");
}

}  // namespace

int main() {
  try {
    test_peaked_maps();
    test_uniform_maps();
    test_backward_and_js();
    test_bad_inputs();
  } catch (const std::exception& e) {
    std::printf("FAIL uncaught exception: %s\n", e.what());
    return 1;
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
