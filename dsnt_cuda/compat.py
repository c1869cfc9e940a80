"""Drop-in replacements for dsntnn 0.5.3: same names, signatures, conventions and values.

The transforms (`dsnt`/`soft_argmax`, `kl_reg_losses`, `js_reg_losses`, `variance_reg_losses`)
are one call each of the fused op (normalization "none": the input is the heatmap) on the backend
in force (`dsnt_cuda.set_backend`), so swapping `import dsntnn` for `import dsnt_cuda as dsntnn`
runs the fused kernels. Intentional differences from dsntnn, all fixes of defects, are listed in
the README ("Differences from dsntnn"); extensions: `sigma_t` may also be a tensor (one width per
keypoint or per map).
"""

from collections.abc import Sequence

import numpy as np
import torch

from dsnt_cuda import reference
from dsnt_cuda._validation import (
    check_heatmaps,
    check_number,
    check_points,
    check_tensor_values,
    per_map_argument,
)
from dsnt_cuda.backends import dsnt_forward
from dsnt_cuda.fused import PerMap, coordinates

normalized_linspace = reference.normalized_linspace
ArrayOrTensor = np.ndarray | torch.Tensor


def flat_softmax(inp: torch.Tensor) -> torch.Tensor:
    """Softmax over all but the first two dims (works for non-contiguous input, unlike dsntnn)."""
    check_heatmaps(inp, "inp")
    flat = inp.reshape(*inp.shape[:2], -1)
    return torch.softmax(flat, dim=-1).view(inp.shape)


def linear_expectation(probs: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """Expectation of `values` (one 1-D tensor per spatial axis, tensor order) under `probs`.

    Returns (B, L, n) in tensor order (dsntnn's convention; `dsnt` flips it to x, y, z).
    """
    check_heatmaps(probs, "probs")
    if len(values) != probs.dim() - 2:
        raise ValueError(f"expected {probs.dim() - 2} value vectors (one per spatial axis), "
                         f"got {len(values)}")
    per_axis = []
    for k, (marginal, v) in enumerate(zip(reference.marginals(probs), values, strict=True)):
        if v.shape[-1] != marginal.shape[-1]:
            raise ValueError(f"values[{k}] has {v.shape[-1]} entries for an axis of {marginal.shape[-1]}")
        per_axis.append((marginal * v).sum(-1))
    return torch.stack(per_axis, dim=-1)


def soft_argmax(heatmaps: torch.Tensor, normalized_coordinates: bool = True) -> torch.Tensor:
    """Expected (x, y[, z]) coordinates of each heatmap, (B, L, n); float32 for half heatmaps."""
    check_heatmaps(heatmaps)
    return coordinates(heatmaps, "none", 1.0, None, bool(normalized_coordinates), False, None)


def dsnt(heatmaps: torch.Tensor, **kwargs) -> torch.Tensor:
    """Differentiable spatial to numerical transform: `soft_argmax` of the heatmaps."""
    return soft_argmax(heatmaps, **kwargs)


def _check_same_size(actual, target):
    if actual.shape != target.shape:
        raise ValueError(f"input tensors must have the same size, got {tuple(actual.shape)} and "
                         f"{tuple(target.shape)}")


def euclidean_losses(actual: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Euclidean distance per point, (B, L)."""
    _check_same_size(actual, target)
    return reference.euclidean_losses(actual, target)


def l1_losses(actual: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the coordinate axes per point, (B, L)."""
    _check_same_size(actual, target)
    return reference.l1_losses(actual, target)


def mse_losses(actual: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the coordinate axes per point, (B, L)."""
    _check_same_size(actual, target)
    return reference.mse_losses(actual, target)


def make_gauss(
    means: torch.Tensor, size: Sequence[int], sigma: PerMap, normalize: bool = True
) -> torch.Tensor:
    """Gaussians at `means` ((..., n), normalized units, x-first) on maps of `size` ((..., H, W)),
    standard deviation `sigma` in pixels (a float, or a tensor broadcastable to
    `means.shape[:-1]`); differentiable with respect to `means` (and a tensor `sigma`)."""
    if not isinstance(means, torch.Tensor) or not means.is_floating_point():
        raise TypeError("means must be a floating-point torch.Tensor")
    size = [int(s) for s in size]
    if means.shape[-1] != len(size):
        raise ValueError(f"means has {means.shape[-1]} coordinates per point for a {len(size)}-D size")
    if any(s <= 0 for s in size):
        raise ValueError(f"size must be positive, got {size}")
    _check_sigma(sigma, means)
    return reference.gaussian_heatmaps(means, size, sigma, normalize)


def _check_sigma(sigma, means: torch.Tensor) -> None:
    acc = reference.accumulation_dtype(means.dtype)
    if not isinstance(sigma, torch.Tensor):
        check_number("sigma", sigma, acc)
        return
    check_tensor_values("sigma", sigma, means, acc)
    try:
        torch.broadcast_shapes(sigma.shape, means.shape[:-1])
    except RuntimeError as error:
        raise ValueError(f"sigma of shape {tuple(sigma.shape)} is not broadcastable to the means' "
                         f"points {tuple(means.shape[:-1])}") from error


def average_loss(losses: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of per-point losses; with a (B, L) mask, sum(losses * mask) / max(sum(mask), 1)."""
    if mask is not None and mask.shape != losses.shape:
        raise ValueError(f"mask must be the same size as losses: {tuple(mask.shape)} vs "
                         f"{tuple(losses.shape)}")
    return reference.average_loss(losses, mask)


def _reg_losses(heatmaps, mu_t, sigma_t, reg):
    check_heatmaps(heatmaps)
    if mu_t is not None:
        check_points(mu_t, heatmaps, "mu_t")
    sigma_t, sigma_t_map = per_map_argument("sigma_t", sigma_t, heatmaps)
    _, _, losses, _, _ = dsnt_forward(heatmaps, mu_t, None, None, sigma_t_map, "none", 1.0, True, reg,
                                      sigma_t, "none", 0.0)
    return losses


def kl_reg_losses(heatmaps: torch.Tensor, mu_t: torch.Tensor, sigma_t: PerMap) -> torch.Tensor:
    """KL(heatmap || Gaussian(mu_t, sigma_t px)) per map, (B, L). No NaN for float16 heatmaps."""
    return _reg_losses(heatmaps, mu_t, sigma_t, "kl")


def js_reg_losses(heatmaps: torch.Tensor, mu_t: torch.Tensor, sigma_t: PerMap) -> torch.Tensor:
    """Jensen-Shannon divergence to Gaussian(mu_t, sigma_t px) per map, (B, L)."""
    return _reg_losses(heatmaps, mu_t, sigma_t, "js")


def variance_reg_losses(heatmaps: torch.Tensor, sigma_t: PerMap) -> torch.Tensor:
    """sum_k (Var_k in pixel² - sigma_t²)² per map, (B, L) (dsntnn's pixel-unit version)."""
    return _reg_losses(heatmaps, None, sigma_t, "var")


def _size_xyz(coords, size):
    """`size` ((..., H, W) order) reversed to (W, H, ...) to match x-first coordinates."""
    if torch.is_tensor(coords):
        return coords.new_tensor(list(size)).flip(-1)
    return np.asarray(size, dtype=np.float64)[::-1]


def normalized_to_pixel_coordinates(coords: ArrayOrTensor, size: Sequence[int]) -> ArrayOrTensor:
    """Normalized (x, y, ...) -> pixel coordinates; `size` is (..., H, W). Tensors or numpy."""
    return 0.5 * ((coords + 1) * _size_xyz(coords, size) - 1)


def pixel_to_normalized_coordinates(coords: ArrayOrTensor, size: Sequence[int]) -> ArrayOrTensor:
    """Pixel (x, y, ...) -> normalized coordinates; `size` is (..., H, W). Tensors or numpy."""
    return ((2 * coords + 1) / _size_xyz(coords, size)) - 1


def sharpen_heatmaps(heatmaps: torch.Tensor, alpha: float) -> torch.Tensor:
    """heatmaps ** alpha renormalized per map (dsntnn's master version, fixed for B*L > 1).

    `alpha > 1` sharpens (e.g. Romero et al.'s mode approximation:
    `soft_argmax(sharpen_heatmaps(h, alpha=6))`). A map whose powered sum is 0 becomes uniform.
    """
    check_heatmaps(heatmaps)
    powered = (heatmaps**alpha).flatten(2)
    return reference.divide_by_sum(powered).view(heatmaps.shape)
