// Coordinates and the JS regularizer of a batch of heatmap logits from C++, through the
// dispatcher (the op's schema is docs/ops.md). Exits non-zero if the result is not what the
// logits say: a peak at pixel (x, y) = (5, 2) of a 8 x 10 map.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <tuple>

using OptTensor = std::optional<at::Tensor>;
using DsntFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& logits, const OptTensor& target, const OptTensor& mask, const OptTensor& beta_map,
    const OptTensor& sigma_t_map, c10::string_view normalization, double beta, bool normalized_coordinates,
    c10::string_view reg, double sigma_t, c10::string_view coord_loss, double reg_weight);

int main() {
  auto dsnt_fwd = c10::Dispatcher::singleton().findSchemaOrThrow("dsnt_cuda::dsnt_fwd", "").typed<DsntFwd>();

  at::Tensor logits = at::full({2, 3, 8, 10}, -8.0);  // (B, L, H, W)
  logits.index_put_({at::indexing::Slice(), at::indexing::Slice(), 2, 5}, 8.0);
  at::Tensor target = at::zeros({2, 3, 2});  // normalized units, (x, y)

  auto [coords, variance, js, coord_losses, loss, stats] =
      dsnt_fwd.call(logits, target, std::nullopt, std::nullopt, std::nullopt, "softmax", 1.0,
                    /*normalized_coordinates=*/false, "js", 1.0, "none", 0.0);

  const float x = coords[0][0][0].item<float>(), y = coords[0][0][1].item<float>();
  std::printf("coords (px) of map 0: x = %.4f, y = %.4f, variance = (%.2e, %.2e) px^2, JS = %.4f\n", x, y,
              variance[0][0][0].item<float>(), variance[0][0][1].item<float>(), js[0][0].item<float>());
  const bool ok = std::fabs(x - 5.0f) < 1e-3f && std::fabs(y - 2.0f) < 1e-3f && js.gt(0).all().item<bool>() &&
                  js.le(std::log(2.0) + 1e-6).all().item<bool>();
  std::printf(ok ? "ok\n" : "FAIL\n");
  return ok ? 0 : 1;
}
