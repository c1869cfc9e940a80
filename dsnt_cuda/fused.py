"""The fused API: logits in, coordinates (and the whole training loss) out, one op call each.

`fused_dsnt` is for inference (coordinates, optionally the per-axis variance, no heatmap
written); `dsnt_loss` is the standard training loss of DSNT: normalize -> coordinates ->
coordinate loss + weighted regularizer -> masked average, all inside the op (docs/ops.md).

`beta` (the softmax's inverse temperature) and `sigma_t` (the Gaussian target's width) are each a
float or a tensor broadcastable to (B, L): one value, one per keypoint `(L,)` or one per map
`(B, L)`. A tensor beta that requires grad gets its gradient from the op's backward.
"""

from typing import NamedTuple

import torch

from dsnt_cuda._validation import (
    check_heatmaps,
    check_mask,
    check_option,
    check_points,
    check_real,
    per_map_argument,
)
from dsnt_cuda.backends import dsnt_forward
from dsnt_cuda.reference import COORD_LOSSES, NORMALIZATIONS, REGULARIZERS

PerMap = float | torch.Tensor  # a float, or a tensor broadcastable to (B, L)


class DSNTLossResult(NamedTuple):
    """What `dsnt_loss` returns. All but `loss` are per keypoint, (B, L[, n])."""

    loss: torch.Tensor  # scalar: average_loss(coord_losses + reg_weight * reg_losses, mask)
    coords: torch.Tensor  # (B, L, n) normalized coordinates, (x, y, z) order
    coord_losses: torch.Tensor  # (B, L)
    reg_losses: torch.Tensor  # (B, L), zeros when reg is None


def regularizer_name(reg: str | None) -> str:
    """The op's spelling of the `reg` option (None means "none")."""
    return "none" if reg is None else check_option("reg", reg, REGULARIZERS)


def fused_dsnt(
    logits: torch.Tensor,
    *,
    normalization: str = "softmax",
    beta: PerMap = 1.0,
    normalized_coordinates: bool = True,
    return_variance: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of each heatmap's expected location, straight from the logits.

    Args:
        logits: (B, L, S_1[, S_2[, S_3]]) heatmap logits, float16/bfloat16/float32/float64.
        normalization: "softmax" (default, ``softmax(beta * z)``), "abs", "relu", "sigmoid", or
            "none" (the input is already a heatmap).
        beta: inverse temperature of the softmax (kornia's ``temperature`` is ``1 / beta``): a
            float, or a tensor of shape (), (L,), (1, L), (B, 1) or (B, L), finite and > 0,
            differentiable.
        normalized_coordinates: pixel centres in (-1, 1) (dsntnn's convention) when True,
            pixel indices when False.
        return_variance: also return the per-axis variance of each map in pixel², the spread
            (uncertainty) of the prediction.
        backend: "auto", "cuda", "triton", "cpu" or "reference"; None follows the process-wide
            default (`dsnt_cuda.set_backend`, `dsnt_cuda.use_backend`).

    Returns:
        coords (B, L, n) in (x, y, z) order — float32 for half inputs — and with
        `return_variance=True` also the variance (B, L, n), same order and dtype.
    """
    check_heatmaps(logits, "heatmaps" if normalization == "none" else "logits")
    check_option("normalization", normalization, NORMALIZATIONS)
    beta, beta_map = per_map_argument("beta", beta, logits)
    return coordinates(logits, normalization, beta, beta_map, bool(normalized_coordinates),
                       return_variance, backend)


def coordinates(logits, normalization, beta, beta_map, normalized_coordinates, return_variance,
                backend):
    """`fused_dsnt` on checked arguments (the modules call it directly)."""
    coords, variance, _, _, _ = dsnt_forward(
        logits, None, None, beta_map, None, normalization, beta, normalized_coordinates, "none",
        1.0, "none", 0.0, backend)
    return (coords, variance) if return_variance else coords


def dsnt_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    normalization: str = "softmax",
    beta: PerMap = 1.0,
    reg: str | None = "js",
    sigma_t: PerMap = 1.0,
    reg_weight: float = 1.0,
    coord_loss: str = "euclidean",
    backend: str | None = None,
) -> DSNTLossResult:
    """The DSNT training loss from logits, fused: one forward and one backward op.

    With the defaults it equals dsntnn's recipe: flat_softmax -> dsnt -> euclidean_losses +
    js_reg_losses(sigma_t=1) -> average_loss.

    Args:
        logits: (B, L, S_1[, S_2[, S_3]]) heatmap logits.
        target: (B, L, n) target coordinates, normalized units, (x, y, z) order.
        mask: optional (B, L) weights of the keypoints (0 drops a keypoint from the average);
            floating or bool, takes no gradient.
        normalization, beta: as for `fused_dsnt`.
        reg: "js" (default), "kl", "var" or None.
        sigma_t: standard deviation of the Gaussian target in pixels: a float or a tensor
            broadcastable to (B, L) (e.g. COCO's per-joint sigmas, per-instance widths), finite
            and >= 2^-40 px (2^-400 for float64 logits); no gradient.
        reg_weight: weight of the regularizer.
        coord_loss: "euclidean" (default), "l1" or "mse".
        backend: as for `fused_dsnt`.

    Returns:
        DSNTLossResult(loss, coords, coord_losses, reg_losses).
    """
    check_heatmaps(logits, "heatmaps" if normalization == "none" else "logits")
    check_points(target, logits, "target")
    check_mask(mask, logits)
    check_option("normalization", normalization, NORMALIZATIONS)
    check_option("coord_loss", coord_loss, COORD_LOSSES)
    reg = regularizer_name(reg)
    beta, beta_map = per_map_argument("beta", beta, logits)
    sigma_t, sigma_t_map = per_map_argument("sigma_t", sigma_t, logits)
    reg_weight = check_real("reg_weight", reg_weight)
    return loss(logits, target, mask, beta, beta_map, sigma_t, sigma_t_map, normalization, reg,
                reg_weight, coord_loss, backend)


def loss(logits, target, mask, beta, beta_map, sigma_t, sigma_t_map, normalization, reg,
         reg_weight, coord_loss, backend) -> DSNTLossResult:
    """`dsnt_loss` on checked arguments (the modules call it directly)."""
    coords, _, reg_losses, coord_losses, total = dsnt_forward(
        logits, target, mask, beta_map, sigma_t_map, normalization, beta, True, reg, sigma_t,
        coord_loss, reg_weight, backend)
    return DSNTLossResult(total, coords, coord_losses, reg_losses)


__all__ = ["DSNTLossResult", "PerMap", "dsnt_loss", "fused_dsnt"]
