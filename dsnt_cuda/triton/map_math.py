"""The per-axis and per-map functions of csrc/dsnt_math.h (same names): the separable Gaussian
target, the coordinate losses and the backward's per-map set-up. The per-element functions are
in math.py; the conventions (log2 units, PerAxis for the header's arrays over axes, no float
locals) are the same.
"""

from typing import NamedTuple

import triton
import triton.language as tl

from dsnt_cuda.triton.math import LOG2_DIV_EPS, SQRT_HALF_LOG2E, GridAffine, PerAxis, exp2, log2, splat
from dsnt_cuda.triton.modes import EUCLIDEAN, L1, LOSS_NONE, MSE, VAR

# ---- the separable Gaussian target (docs/math.md §4) --------------------------------------------


@triton.jit
def target_log2_coef(sigma_t):
    # l2(j) = -((u(j) - m) coef)^2, coef = sqrt(log2(e) / 2) / sigma
    return 1.0 / sigma_t * SQRT_HALF_LOG2E


@triton.jit
def target_centre(mu, size):
    return mu * size * 0.5


@triton.jit
def target_log2_factor(u, centre, coef):
    d = (u - centre) * coef
    return -(d * d)  # -inf where d*d overflows: exp2 gives the 0 the factor rounds to


class TargetAxisSums(NamedTuple):
    """Per-axis sums of the scaled factors g~(j) = 2^(l2(j) - off)."""
    off: tl.tensor     # max_j l2(j); -inf: every factor is 0
    sum_g: tl.tensor   # sum_j g~(j)
    sum_gu: tl.tensor  # sum_j g~(j) u(j)


class TargetNorm(NamedTuple):
    """What a map's kernels need of the target (TargetNorm<T> of the header)."""
    log2_norm: tl.tensor      # log2(prod G_k + eps)
    scale: tl.tensor          # 2^(sum off_k - log2_norm): q = prod g~ * scale
    one_minus_rho: tl.tensor  # eps / (prod G + eps)
    empty: tl.tensor          # some axis has no representable factor: q = 0


@triton.jit
def target_norm(x: TargetAxisSums, y: TargetAxisSums, z: TargetAxisSums):
    # Axes a map does not have come as (off 0, sum_g 1, sum_gu 0): they change nothing.
    empty = (x.off == -float("inf")) | (y.off == -float("inf")) | (z.off == -float("inf"))
    log2_prod = x.off + log2(x.sum_g) + y.off + log2(y.sum_g) + z.off + log2(z.sum_g)
    sum_off = x.off + y.off + z.off
    # logaddexp2(log2_prod, log2 eps), without overflow; NaN stays NaN
    log2_eps = splat(log2_prod, LOG2_DIV_EPS)
    hi = tl.maximum(log2_prod, log2_eps)
    lo = tl.minimum(log2_prod, log2_eps)
    norm = tl.where(log2_prod != log2_prod, log2_prod, hi + log2(1.0 + exp2(lo - hi)))
    norm = tl.where(empty, log2_eps, norm)
    scale = tl.where(empty, 0.0, exp2(sum_off - norm))
    return TargetNorm(norm, scale, exp2(-(norm - LOG2_DIV_EPS)), empty)


@triton.jit
def target_axis_mean(a: TargetAxisSums, norm: TargetNorm):
    # ubar_g of one axis: the target factor's own mean (0 for an empty target)
    return tl.where(norm.empty, 0.0, a.sum_gu / a.sum_g)


@triton.jit
def target_mean_grad(u, centre, ubar_g, one_minus_rho, coef_half_s2):
    # t(j) = d log q / d mu on one axis, in the cancellation-free form (docs/math.md §6)
    return coef_half_s2 * ((u - ubar_g) + one_minus_rho * (ubar_g - centre))


@triton.jit
def target_mean_grad_coef(sigma_t, size):
    return size * 0.5 / (sigma_t * sigma_t)


# ---- coordinate losses (docs/math.md §5) ----------------------------------------------------------


@triton.jit
def _loss_term(d, KIND: tl.constexpr):
    if KIND == L1:
        term = tl.abs(d)
    else:
        term = d * d
    return term


@triton.jit
def coord_loss_value(c: PerAxis, t: PerAxis, NDIM: tl.constexpr, KIND: tl.constexpr):
    acc = _loss_term(c.x - t.x, KIND)
    if NDIM >= 2:
        acc += _loss_term(c.y - t.y, KIND)
    if NDIM == 3:
        acc += _loss_term(c.z - t.z, KIND)
    if KIND == EUCLIDEAN:
        value = tl.sqrt_rn(acc) if acc.dtype == tl.float32 else tl.sqrt(acc)
    elif KIND == LOSS_NONE:
        value = acc * 0.0
    else:
        value = acc / NDIM
    return value


@triton.jit
def _loss_grad(d, norm, NDIM: tl.constexpr, KIND: tl.constexpr):
    # one axis of d coord_loss / d c; euclidean's gradient at c = t is 0 (torch's), NaN stays NaN
    if KIND == EUCLIDEAN:
        grad = tl.where(norm > 0.0, d / tl.where(norm > 0.0, norm, 1.0), tl.where(norm != norm, norm, 0.0))
    elif KIND == L1:
        grad = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, tl.where(d != d, d, 0.0))) / NDIM
    elif KIND == MSE:
        grad = 2.0 * d / NDIM
    else:
        grad = d * 0.0
    return grad


@triton.jit
def coord_loss_grad(c: PerAxis, t: PerAxis, NDIM: tl.constexpr, KIND: tl.constexpr):
    norm = coord_loss_value(c, t, NDIM, KIND)
    return PerAxis(_loss_grad(c.x - t.x, norm, NDIM, KIND), _loss_grad(c.y - t.y, norm, NDIM, KIND),
                   _loss_grad(c.z - t.z, norm, NDIM, KIND))


# ---- per-map gradient set-up of the backward (docs/math.md §6) -----------------------------------


class MapUpstream(NamedTuple):
    """gamma (coords), nu (variance), omega (regularizer), and the coordinate loss's direct
    gradient to the target."""
    gamma: PerAxis
    nu: PerAxis
    omega: tl.tensor
    target_direct: PerAxis


@triton.jit
def _axis_upstream(grad_c, grad_v, dcl, g_cl, omega, variance, sigma_t, REG: tl.constexpr):
    # (gamma, nu, direct) of one axis
    from_loss = tl.where(g_cl != 0.0, g_cl * dcl, 0.0)  # 0 * NaN of a NaN map's loss must not leak
    nu = grad_v
    if REG == VAR:
        nu = tl.where(omega != 0.0, nu + 2.0 * omega * (variance - sigma_t * sigma_t), nu)
    return grad_c + from_loss, nu, -from_loss


@triton.jit
def map_upstream(grad_coords: PerAxis, grad_variance: PerAxis, grad_reg, grad_coord_loss, loss_weight,
                 coords: PerAxis, variance: PerAxis, target: PerAxis, sigma_t, reg_weight,
                 NDIM: tl.constexpr, REG: tl.constexpr, COORD_LOSS: tl.constexpr):
    # Per-axis inputs are 0 on axes the map lacks and where the upstream gradient is None.
    g_cl = grad_coord_loss + loss_weight
    dcl = coord_loss_grad(coords, target, NDIM, COORD_LOSS)
    omega = grad_reg + loss_weight * reg_weight
    gx, nx, tx = _axis_upstream(grad_coords.x, grad_variance.x, dcl.x, g_cl, omega, variance.x, sigma_t, REG)
    gy, ny, ty = _axis_upstream(grad_coords.y, grad_variance.y, dcl.y, g_cl, omega, variance.y, sigma_t, REG)
    gz, nz, tz = _axis_upstream(grad_coords.z, grad_variance.z, dcl.z, g_cl, omega, variance.z, sigma_t, REG)
    return MapUpstream(PerAxis(gx, gy, gz), PerAxis(nx, ny, nz), omega, PerAxis(tx, ty, tz))


class AxisGrad(NamedTuple):
    """The separable part of G on one axis: gamma v(j) + nu [(u - ubar)^2 - 2 u ubar (1 - P)]."""
    gamma_scale: tl.tensor
    gamma_offset: tl.tensor
    nu: tl.tensor
    ubar: tl.tensor
    cross: tl.tensor


@triton.jit
def axis_grad_coefs(gamma, nu, ubar, mass, grid: GridAffine):
    return AxisGrad(gamma * grid.scale, gamma * grid.offset, nu, ubar, 2.0 * nu * ubar * (mass - 1.0))


@triton.jit
def axis_grad(u, g: AxisGrad):
    # never expanded into a polynomial in u (float32 would lose every digit far from ubar)
    d = u - g.ubar
    return g.gamma_scale * u + g.gamma_offset + g.nu * d * d + g.cross * u
