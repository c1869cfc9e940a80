"""Input checks of the Python API: a clear `ValueError` / `TypeError` naming the problem, once per
entry point, before any kernel runs (docs/ops.md, "Inputs").

Values inside tensor arguments (a per-map beta or sigma_t) are checked in eager mode only: on a
GPU tensor that costs a device sync, and under torch.compile / tracing it would break the graph.
"""

import math
import numbers

import torch

from dsnt_cuda.reference import accumulation_dtype

# The narrowest Gaussian target (in pixels) whose 1 / sigma_t^2 stays finite in the accumulation
# dtype (docs/ops.md): 2^-40 px in float32, 2^-400 px in float64.
MIN_SIGMA_T = {torch.float32: 2.0**-40, torch.float64: 2.0**-400}


def check_option(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")
    return value


def check_heatmaps(t: object, name: str = "heatmaps") -> torch.Tensor:
    """A floating (B, L, S_1..S_n) tensor with n in 1..3 and every S_k >= 1."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), "
                        f"got {t.dtype}")
    if not 3 <= t.dim() <= 5:
        raise ValueError(f"{name} must have shape (B, L, S_1[, S_2[, S_3]]) with 1 to 3 spatial dims, "
                         f"got {t.dim()} dims {tuple(t.shape)}")
    if 0 in t.shape[2:]:
        raise ValueError(f"{name} has an empty spatial axis: shape {tuple(t.shape)}")
    return t


def _check_device(t: torch.Tensor, name: str, heatmaps: torch.Tensor) -> None:
    if t.device != heatmaps.device:
        raise ValueError(f"{name} is on {t.device} but the heatmaps are on {heatmaps.device}")


def check_points(t: object, heatmaps: torch.Tensor, name: str) -> torch.Tensor:
    """A floating (B, L, n) tensor of coordinates matching `heatmaps`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    expected = (*heatmaps.shape[:2], heatmaps.dim() - 2)
    if t.shape != expected:
        raise ValueError(f"{name} must have shape (B, L, n) = {tuple(expected)} for heatmaps of shape "
                         f"{tuple(heatmaps.shape)}, got {tuple(t.shape)}")
    _check_device(t, name, heatmaps)
    return t


def check_mask(mask: object, heatmaps: torch.Tensor) -> None:
    """None, or (B, L) keypoint weights (floating or bool) on the heatmaps' device, no gradient."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a floating-point or bool tensor, got {mask.dtype}")
    if mask.shape != heatmaps.shape[:2]:
        raise ValueError(f"mask must have shape (B, L) = {tuple(heatmaps.shape[:2])}, "
                         f"got {tuple(mask.shape)}")
    _check_device(mask, "mask", heatmaps)
    if mask.requires_grad:
        raise ValueError("mask takes no gradient (it only weights the average); pass mask.detach()")


def _skip_value_checks() -> bool:
    # Under torch.compile a float may be symbolic and a tensor's values are not known: checking
    # them would break the graph, sync, or specialize on the value. The C++ op checks its float
    # arguments when it runs.
    return torch.compiler.is_compiling()


def _as_float(name: str, value: object, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    return float(value)


def check_real(name: str, value: object) -> float:
    """A finite Python number, as a float (unchecked under torch.compile, where it may be symbolic)."""
    if _skip_value_checks() or isinstance(value, torch.SymFloat):
        return value
    if type(value) is not float:
        value = _as_float(name, value, "a real number")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


# (lowest, highest) value of a beta / a width (sigma) in each accumulation dtype: a beta must be
# a positive normal number, a width at least MIN_SIGMA_T; both at most the dtype's largest.
_LIMITS = {(is_width, acc): (MIN_SIGMA_T[acc] if is_width else torch.finfo(acc).tiny, torch.finfo(acc).max)
           for is_width in (False, True) for acc in (torch.float32, torch.float64)}


def _limits(name: str, acc: torch.dtype) -> tuple[float, float]:
    return _LIMITS[name.startswith("sigma"), acc]


def _wording(name: str, acc: torch.dtype) -> str:
    if name.startswith("sigma"):
        return f"finite and >= {_limits(name, acc)[0]:.3g} pixels ({acc} cannot represent a narrower target)"
    return f"finite and > 0 (representable in {acc})"


def check_number(name: str, value: object, acc: torch.dtype) -> float:
    """A beta / sigma given as a Python number, within the limits of the accumulation dtype."""
    if type(value) is not float:
        value = _as_float(name, value, "a real number or a tensor")
    low, high = _limits(name, acc)
    if not low <= value <= high:  # NaN fails too
        raise ValueError(f"{name} must be {_wording(name, acc)}, got {value}")
    return value


def check_tensor_values(name: str, t: torch.Tensor, like: torch.Tensor, acc: torch.dtype,
                        check_values: bool = True) -> None:
    """A floating tensor of betas / sigmas on `like`'s device, each within the limits (eager only)."""
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    _check_device(t, name, like)
    if check_values and t.numel() and not (_skip_value_checks() or torch.jit.is_tracing()):
        low, high = _limits(name, acc)
        # one reduction and one read (a sync on GPU); a NaN makes both NaN, so it fails too
        least, largest = torch.aminmax(t.detach().to(acc))
        least, largest = least.item(), largest.item()
        if not (low <= least and largest <= high):
            raise ValueError(f"every {name} must be {_wording(name, acc)}; got values in "
                             f"[{least:.3g}, {largest:.3g}]")


def _check_per_map_shape(name: str, t: torch.Tensor, heatmaps: torch.Tensor) -> None:
    batch, keypoints = heatmaps.shape[:2]
    shape = tuple(t.shape)
    pairs = zip(shape[::-1], (keypoints, batch), strict=False)
    if t.dim() > 2 or not all(s in (1, full) for s, full in pairs):
        raise ValueError(f"{name} must be broadcastable to (B, L) = ({batch}, {keypoints}): shape (), (L,), "
                         f"(1, L), (B, 1) or (B, L); got {shape}")


def per_map_argument(name: str, value: object, heatmaps: torch.Tensor,
                     check_values: bool = True) -> tuple[float, torch.Tensor | None]:
    """beta / sigma_t as the op takes it: (the float, None) or (a placeholder float, the tensor).

    A Python number stays a float (no tensor is made); a tensor broadcastable to (B, L) is passed
    as the per-map tensor. sigma_t takes no gradient. `check_values=False` skips the value check
    of a tensor whose validity its producer guarantees (a module's log-parametrized beta)."""
    acc = accumulation_dtype(heatmaps.dtype)
    if not isinstance(value, torch.Tensor):
        if _skip_value_checks() or isinstance(value, torch.SymFloat):
            return value, None
        return check_number(name, value, acc), None
    if name == "sigma_t" and value.requires_grad:
        raise ValueError("sigma_t takes no gradient (the Gaussian target's width is a constant of "
                         "the loss); pass sigma_t.detach()")
    _check_per_map_shape(name, value, heatmaps)
    check_tensor_values(name, value, heatmaps, acc, check_values)
    return 1.0, value


__all__ = ["MIN_SIGMA_T", "check_heatmaps", "check_mask", "check_number", "check_option",
           "check_points", "check_real", "check_tensor_values", "per_map_argument"]
