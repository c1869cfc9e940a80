"""Pure-PyTorch DSNT: the readable oracle every fused kernel is checked against.

Clarity beats speed here: each step of docs/math.md is one small function, built from eager
PyTorch ops, differentiable by autograd (also with respect to a tensor `beta` and the target).
Heatmaps are `(B, L, S_1, ..., S_n)` with n = 1..3 spatial dims in tensor order (..., D, H, W);
coordinates come out in (x, y, z) order (last tensor dim first), shape `(B, L, n)`.

Dtypes: half inputs are computed in float32, float64 stays float64 (so gradcheck is meaningful);
coordinates and losses come back in that accumulation dtype.
"""

import math

import torch

NORMALIZATIONS = ("softmax", "abs", "relu", "sigmoid", "none")
REGULARIZERS = ("none", "js", "kl", "var")
COORD_LOSSES = ("euclidean", "l1", "mse")

# dsntnn's epsilon inside the logarithms of KL / JS and in the Gaussian's normalizer. Added only
# in float32 or float64, where it is a normal number (in float16 it would flush to zero).
EPS = 1e-24


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (float32, float16, bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def spatial_dims(heatmaps: torch.Tensor) -> int:
    return heatmaps.dim() - 2


# --------------------------------------------------------------------------------------------
# Coordinate grids
# --------------------------------------------------------------------------------------------


def normalized_linspace(length, dtype=None, device=None):
    """Pixel-centre coordinates of an axis of `length` pixels: (2j + 1)/length - 1, in (-1, 1).

    Same formula and rounding as dsntnn (`arange * (2/length) + first`), so values match exactly.
    """
    if isinstance(length, torch.Tensor):
        length = length.to(device, dtype)
    first = -(length - 1.0) / length
    return torch.arange(length, dtype=dtype, device=device) * (2.0 / length) + first


def axis_grid(length: int, normalized: bool, dtype, device) -> torch.Tensor:
    """Coordinates of one axis: normalized pixel centres, or pixel indices 0..length-1."""
    if normalized:
        return normalized_linspace(length, dtype=dtype, device=device)
    return torch.arange(length, dtype=dtype, device=device)


def centred_pixel_grid(length: int, dtype, device) -> torch.Tensor:
    """u(j) = j - (length - 1)/2, so that the normalized grid is exactly (2/length) * u."""
    return torch.arange(length, dtype=dtype, device=device) - (length - 1) / 2


# --------------------------------------------------------------------------------------------
# Step 1: logits -> probability map
# --------------------------------------------------------------------------------------------


def _rectify(z: torch.Tensor, normalization: str) -> torch.Tensor:
    if normalization == "abs":
        return z.abs()
    if normalization == "relu":
        return z.relu()
    if normalization == "sigmoid":
        return z.sigmoid()
    raise ValueError(f"{normalization!r} is not a rectification")


def per_map(value, logits: torch.Tensor) -> torch.Tensor | float:
    """A float, or a tensor broadcastable to (B, L) viewed as (B, L, 1) in the accumulation dtype."""
    if not isinstance(value, torch.Tensor):
        return value
    batch, keypoints = logits.shape[:2]
    return value.to(accumulation_dtype(logits.dtype)).expand(batch, keypoints).unsqueeze(-1)


def normalize(logits: torch.Tensor, normalization: str = "softmax", beta=1.0) -> torch.Tensor:
    """Per-map probability map p in the accumulation dtype, same shape as `logits`.

    - softmax: p = softmax(beta * z) over the spatial dims, formed as beta * (z - max z) (beta * z
      alone overflows for a large beta). `beta` is a float or a tensor broadcastable to (B, L).
      A -inf logit's z - max z is the lowest finite value: it keeps p = 0 and no gradient, and
      adds 0 to beta's gradient (its p is 0 for every beta), where autograd would form
      0 * (-inf) = NaN. A map with a NaN or +inf logit, or only -inf ones, is NaN (as softmax).
    - abs / relu / sigmoid: p = r(z) / sum r(z). A map whose rectified sum is exactly 0 (an
      all-non-positive relu map, an all-zero abs map) has no direction to prefer: it becomes the
      uniform map 1/N, with zero gradient, instead of 0/0 = NaN. A NaN sum stays NaN.
    - none: p = z as given (need not sum to 1), dsntnn's heatmap input.
    """
    z = logits.to(accumulation_dtype(logits.dtype)).flatten(2)
    if normalization == "softmax":
        shift = z.detach().amax(-1, keepdim=True)
        # a -inf logit of a map with a finite max (not a NaN map, which stays NaN everywhere)
        floored = (z == -math.inf) & shift.isfinite()
        centred = torch.where(floored, torch.finfo(z.dtype).min, z - shift)
        p = torch.softmax(per_map(beta, logits) * centred, dim=-1)
    elif normalization == "none":
        p = z
    else:
        p = divide_by_sum(_rectify(z, normalization))
    return p.view(logits.shape)


def divide_by_sum(r: torch.Tensor) -> torch.Tensor:
    """r / sum(r) over the last dim; a row whose sum is exactly 0 becomes uniform (1/N).

    The division by a safe denominator keeps 0/0 out of the unused branch of `where`, so the
    gradient of a zero row is 0, not NaN. A NaN sum is not 0: a NaN row stays NaN.
    """
    total = r.sum(-1, keepdim=True)
    is_zero = total == 0
    safe_total = torch.where(is_zero, torch.ones_like(total), total)
    uniform = torch.full_like(r, 1.0 / r.shape[-1]) if r.shape[-1] else r
    return torch.where(is_zero, uniform, r / safe_total)


# --------------------------------------------------------------------------------------------
# Steps 2-3: expectation and spread
# --------------------------------------------------------------------------------------------


def marginals(p: torch.Tensor) -> list[torch.Tensor]:
    """Per spatial axis (tensor order), p summed over the other spatial axes: (B, L, S_k)."""
    n = spatial_dims(p)
    result = []
    for k in range(n):
        others = [2 + j for j in range(n) if j != k]
        result.append(p.sum(dim=others) if others else p)
    return result


def to_xyz(per_axis: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-axis (B, L) values given in tensor order into (B, L, n) in (x, y, z) order."""
    return torch.stack(per_axis[::-1], dim=-1)


def coordinates(p: torch.Tensor, normalized_coordinates: bool = True) -> torch.Tensor:
    """Expected coordinates c_k = sum_i p_i v_k(i_k), (B, L, n) in (x, y, z) order."""
    per_axis = [
        (m * axis_grid(m.shape[-1], normalized_coordinates, m.dtype, m.device)).sum(-1)
        for m in marginals(p)
    ]
    return to_xyz(per_axis)


def variance(p: torch.Tensor) -> torch.Tensor:
    """Per-axis variance in pixel² (B, L, n), (x, y, z) order.

    Computed in centred pixel coordinates u = j - (S-1)/2, which equals dsntnn's normalized-grid
    variance times (S/2)² even for maps that do not sum to 1.
    """
    per_axis = []
    for m in marginals(p):
        u = centred_pixel_grid(m.shape[-1], m.dtype, m.device)
        mean = (m * u).sum(-1, keepdim=True)
        per_axis.append((m * (u - mean) ** 2).sum(-1))
    return to_xyz(per_axis)


# --------------------------------------------------------------------------------------------
# Step 4: Gaussian target and regularizers
# --------------------------------------------------------------------------------------------


def gaussian_heatmaps(means: torch.Tensor, size, sigma_t, normalize: bool = True) -> torch.Tensor:
    """Gaussians centred on `means` ((..., n), normalized units, (x, y, z) order) drawn on maps of
    `size` ((..., D, H, W) order) with standard deviation `sigma_t` in pixels (a float, or a
    tensor broadcastable to means.shape[:-1]).

    The target is separable: one 1-D factor per axis, multiplied out here (the fused kernels never
    materialize it). Normalized by the sum plus 1e-24, like dsntnn, so that a target far outside
    the map does not divide by zero. Formed in logs, log q = sum_k l_k - log(prod_k G_k + eps):
    the plain quotient's gradient underflows (1e-24 squared) to 0/0 in float32 for a target far
    outside the map.
    """
    size = list(size)  # ints, or symbolic sizes under torch.export (not specialized)
    n = len(size)
    if isinstance(sigma_t, torch.Tensor):
        sigma_t = sigma_t.to(means.dtype).expand(means.shape[:-1]).unsqueeze(-1)
    log_factors = []
    for k, length in enumerate(size):  # tensor order: axis k pairs with mean index n-1-k
        grid = normalized_linspace(length, dtype=means.dtype, device=means.device)
        s = 2 * sigma_t / length
        mean = means[..., n - 1 - k].unsqueeze(-1)
        log_factors.append(-((grid - mean) ** 2) / (2 * s**2))  # (..., S_k)

    def outer(per_axis):
        out = 0
        for k, t in enumerate(per_axis):
            shape = list(t.shape[:-1]) + [1] * n
            shape[len(t.shape) - 1 + k] = size[k]
            out = out + t.reshape(shape)
        return out

    log_gauss = outer(log_factors)
    if not normalize:
        return torch.exp(log_gauss)
    log_total = sum(torch.logsumexp(f, dim=-1) for f in log_factors)
    # log(total + eps) as a logsumexp (logaddexp has no ONNX export in torch's TorchScript exporter)
    log_norm = torch.logsumexp(torch.stack([log_total, torch.full_like(log_total, math.log(EPS))]), dim=0)
    return torch.exp(log_gauss - log_norm.reshape(list(log_norm.shape) + [1] * n))


def _sum_spatial(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.sum(dim=tuple(range(-n, 0)))


def kl_divergence(p: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
    """sum_i p_i (log(p_i + eps) - log(q_i + eps)) over the last n dims."""
    return _sum_spatial(p * (_log_plus_eps(p) - _log_plus_eps(q)), n)


def _log_plus_eps(t: torch.Tensor) -> torch.Tensor:
    """log(t + eps). eps is added as a 1-element tensor, not a scalar: the ONNX optimizer of
    torch.onnx.export (onnxscript) drops `x + c` for a scalar |c| < 1e-8 as a no-op; same value."""
    return torch.log(t + t.new_full((1,), EPS))


def js_divergence(p: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
    """KL(p || m)/2 + KL(q || m)/2 with m = (p + q)/2; in [0, ln 2] for probability maps."""
    m = 0.5 * (p + q)
    return 0.5 * kl_divergence(p, m, n) + 0.5 * kl_divergence(q, m, n)


def regularizer_losses(p, target, reg: str, sigma_t, var=None) -> torch.Tensor:
    """Per-map regularizer (B, L) of probability map p toward a Gaussian around `target`."""
    n = spatial_dims(p)
    if reg == "none":
        return p.new_zeros(p.shape[:2])
    if reg == "var":
        var = variance(p) if var is None else var
        sigma = sigma_t.to(var.dtype).expand(var.shape[:-1]).unsqueeze(-1) if isinstance(
            sigma_t, torch.Tensor) else sigma_t
        return ((var - sigma**2) ** 2).sum(-1)
    q = gaussian_heatmaps(target.to(p.dtype), p.shape[2:], sigma_t)
    if reg == "kl":
        return kl_divergence(p, q, n)
    if reg == "js":
        return js_divergence(p, q, n)
    raise ValueError(f"unknown regularizer {reg!r}")


# --------------------------------------------------------------------------------------------
# Step 5: coordinate losses and the masked average
# --------------------------------------------------------------------------------------------


def euclidean_losses(actual: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(actual - target, ord=2, dim=-1)


def l1_losses(actual: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (actual - target).abs().mean(-1)


def mse_losses(actual: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((actual - target) ** 2).mean(-1)


def coordinate_losses(actual, target, coord_loss: str) -> torch.Tensor:
    losses = {"euclidean": euclidean_losses, "l1": l1_losses, "mse": mse_losses}
    return losses[coord_loss](actual, target)


def average_loss(losses: torch.Tensor, mask=None) -> torch.Tensor:
    """sum(losses * mask) / max(sum(mask), 1); the plain mean when mask is None."""
    if mask is None:
        n = losses.numel()
        if isinstance(n, torch.SymInt):
            # Traced with a symbolic size, torch.export simplifies max(n, 1) to n (it assumes
            # sizes >= 1), so an exported program would return NaN for an empty batch: clamp a
            # tensor instead, in float32 at least (a float16 count overflows at 65504).
            count = losses.new_full((), n, dtype=torch.promote_types(losses.dtype, torch.float32))
            return (losses.sum() / count.clamp(min=1)).to(losses.dtype)
        return losses.sum() / max(n, 1)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# The whole per-map transform, with the ops' signature (docs/ops.md)
# --------------------------------------------------------------------------------------------


def dsnt_core(logits, target, normalization, beta, normalized_coordinates, reg, sigma_t):
    """(coords, variance, reg_losses) of the fused transform (docs/ops.md)."""
    p = normalize(logits, normalization, beta)
    coords = coordinates(p, normalized_coordinates)
    var = variance(p)
    reg_losses = regularizer_losses(p, target, reg, sigma_t, var=var)
    return coords, var, reg_losses


def dsnt_fwd(logits, target, mask, beta_map, sigma_t_map, normalization, beta,
             normalized_coordinates, reg, sigma_t, coord_loss, reg_weight):
    """The outputs of the op dsnt_fwd but `stats`, with its arguments (docs/ops.md):
    (coords, variance, reg_losses, coord_losses, loss); the last two are empty for
    coord_loss "none"."""
    beta = beta if beta_map is None else beta_map
    sigma_t = sigma_t if sigma_t_map is None else sigma_t_map
    coords, var, reg_losses = dsnt_core(logits, target, normalization, beta, normalized_coordinates,
                                        reg, sigma_t)
    if coord_loss == "none":
        empty = coords.new_zeros((0,))
        return coords, var, reg_losses, empty, empty
    coord_losses = coordinate_losses(coords, target.to(coords.dtype), coord_loss)
    if mask is not None:
        mask = mask.to(coords.dtype)
    loss = average_loss(coord_losses + reg_weight * reg_losses, mask)
    return coords, var, reg_losses, coord_losses, loss


def dsnt_loss(logits, target, mask=None, reg="js", sigma_t=1.0, reg_weight=1.0,
              coord_loss="euclidean", normalization="softmax", beta=1.0):
    """The standard training loss, composed: (loss, coords, coord_losses, reg_losses)."""
    coords, _, reg_losses = dsnt_core(logits, target, normalization, beta, True, reg, sigma_t)
    coord_losses = coordinate_losses(coords, target.to(coords.dtype), coord_loss)
    loss = average_loss(coord_losses + reg_weight * reg_losses, mask)
    return loss, coords, coord_losses, reg_losses


__all__ = [
    "NORMALIZATIONS", "REGULARIZERS", "COORD_LOSSES", "EPS", "accumulation_dtype",
    "normalized_linspace", "axis_grid", "divide_by_sum", "centred_pixel_grid", "normalize", "marginals",
    "coordinates", "variance", "gaussian_heatmaps", "kl_divergence", "js_divergence",
    "regularizer_losses", "euclidean_losses", "l1_losses", "mse_losses", "coordinate_losses",
    "average_loss", "dsnt_core", "dsnt_fwd", "dsnt_loss", "per_map",
]
