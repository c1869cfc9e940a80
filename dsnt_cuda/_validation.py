"""Input checks at the Python boundary: clear exceptions naming the problem, before any kernel."""

import math
import numbers

import torch

from dsnt_cuda.reference import COORD_LOSSES, NORMALIZATIONS, REGULARIZERS


def check_option(name: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")
    return value


def check_heatmaps(t, name: str = "heatmaps") -> torch.Tensor:
    """A floating (B, L, S_1..S_n) tensor with n in 1..3 and every S_k >= 1."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")
    if t.dim() not in (3, 4, 5):
        raise ValueError(
            f"{name} must have shape (B, L, S_1[, S_2[, S_3]]) with 1 to 3 spatial dims, "
            f"got {t.dim()} dims {tuple(t.shape)}"
        )
    if any(s == 0 for s in t.shape[2:]):
        raise ValueError(f"{name} has an empty spatial axis: shape {tuple(t.shape)}")
    return t


def check_points(t, heatmaps: torch.Tensor, name: str) -> torch.Tensor:
    """A floating (B, L, n) tensor of coordinates matching `heatmaps`."""
    n = heatmaps.dim() - 2
    expected = (*heatmaps.shape[:2], n)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape (B, L, n) = {expected} for heatmaps of shape "
                         f"{tuple(heatmaps.shape)}, got {tuple(t.shape)}")
    if t.device != heatmaps.device:
        raise ValueError(f"{name} is on {t.device} but the heatmaps are on {heatmaps.device}")
    return t


def check_mask(mask, losses_shape) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(losses_shape):
        raise ValueError(f"mask must have shape {tuple(losses_shape)} (B, L), got {tuple(mask.shape)}")


def check_positive_number(name: str, value) -> float:
    """A finite real number > 0 (a Python number or a one-element tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, torch.SymFloat) or (torch.compiler.is_compiling() and isinstance(value, float)):
        # Under torch.compile(dynamic=True) a float may be symbolic: checking it here would
        # break the graph or specialize it on the value. Eager calls check it here; compiled
        # calls of the fused ops are checked by their TORCH_CHECKs at run time.
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_core_args(logits, target, normalization, beta, reg, sigma_t, target_name="target"):
    """Validate the arguments of the fused transform; returns (beta, sigma_t) as floats."""
    check_heatmaps(logits, "logits" if normalization != "none" else "heatmaps")
    check_option("normalization", normalization, NORMALIZATIONS)
    check_option("reg", reg, REGULARIZERS)
    beta = check_positive_number("beta", beta)
    sigma_t = check_positive_number("sigma_t", sigma_t)
    if reg in ("js", "kl"):
        if target is None:
            raise ValueError(f"reg={reg!r} needs target means")
        check_points(target, logits, target_name)
    return beta, sigma_t


__all__ = ["check_option", "check_heatmaps", "check_points", "check_mask", "check_positive_number",
           "check_core_args", "COORD_LOSSES"]
