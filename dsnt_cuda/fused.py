"""The fused API: logits in, coordinates (and the whole training loss) out, one kernel a direction.

`fused_dsnt` is for inference (coordinates, optionally the per-axis variance, no heatmap
written); `dsnt_loss` is the standard training loss of DSNT: normalize -> coordinates ->
coordinate loss + weighted regularizer -> masked average.
"""

from typing import NamedTuple

import torch

from dsnt_cuda import reference
from dsnt_cuda._validation import check_core_args, check_mask, check_option, check_points
from dsnt_cuda.dispatch import dsnt_core


class DSNTLossResult(NamedTuple):
    """What `dsnt_loss` returns. All but `loss` are per keypoint, (B, L[, n])."""

    loss: torch.Tensor  # scalar: average_loss(coord_losses + reg_weight * reg_losses, mask)
    coords: torch.Tensor  # (B, L, n) normalized coordinates, (x, y, z) order
    coord_losses: torch.Tensor  # (B, L)
    reg_losses: torch.Tensor  # (B, L), zeros when reg is None


def fused_dsnt(logits, *, normalization="softmax", beta=1.0, normalized_coordinates=True,
               return_variance=False, backend=None):
    """Coordinates of each heatmap's expected location, straight from the logits.

    Args:
        logits: (B, L, S_1[, S_2[, S_3]]) heatmap logits, float16/bfloat16/float32/float64.
        normalization: "softmax" (default, with inverse temperature `beta`), "abs", "relu",
            "sigmoid", or "none" (the input is already a heatmap).
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
    beta, _ = check_core_args(logits, None, normalization, beta, "none", 1.0)
    coords, variance, _ = dsnt_core(logits, None, normalization, beta, normalized_coordinates,
                                    "none", 1.0, backend)
    return (coords, variance) if return_variance else coords


def dsnt_loss(logits, target, *, mask=None, reg="js", sigma_t=1.0, reg_weight=1.0,
              coord_loss="euclidean", normalization="softmax", beta=1.0, backend=None):
    """The DSNT training loss from logits, fused: one forward and one backward kernel.

    With the defaults it equals dsntnn's recipe: flat_softmax -> dsnt -> euclidean_losses +
    js_reg_losses(sigma_t=1) -> average_loss.

    Args:
        logits: (B, L, S_1[, S_2[, S_3]]) heatmap logits.
        target: (B, L, n) target coordinates, normalized units, (x, y, z) order.
        mask: optional (B, L) weights of the keypoints (0 drops a keypoint from the average).
        reg: "js" (default), "kl", "var" or None.
        sigma_t: standard deviation of the Gaussian target in pixels (> 0).
        reg_weight: weight of the regularizer.
        coord_loss: "euclidean" (default), "l1" or "mse".
        normalization, beta, backend: as for `fused_dsnt`.

    Returns:
        DSNTLossResult(loss, coords, coord_losses, reg_losses).
    """
    reg = "none" if reg is None else reg
    check_option("coord_loss", coord_loss, reference.COORD_LOSSES)
    beta, sigma_t = check_core_args(logits, target, normalization, beta, reg, sigma_t)
    check_points(target, logits, "target")
    check_mask(mask, logits.shape[:2])
    coords, _, reg_losses = dsnt_core(logits, target, normalization, beta, True, reg, sigma_t, backend)
    coord_losses = reference.coordinate_losses(coords, target.to(coords.dtype), coord_loss)
    loss = reference.average_loss(coord_losses + reg_weight * reg_losses, mask)
    return DSNTLossResult(loss, coords, coord_losses, reg_losses)
