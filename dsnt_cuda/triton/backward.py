"""The backward kernel of the fused op (docs/ops.md, dsnt_bwd): one pass over the logits.

`sum p G` comes from the forward's per-map outputs (docs/math.md §6), so every element's
gradient is known from its logit, the map's `stats` and per-axis tables: no reduction pass, and
a map may be split over CHUNKS programs (grid (maps, CHUNKS)). The target-mean and beta
gradients are reductions in the same pass, written per program to `partials` (maps, CHUNKS,
AXES): lanes < NDIM the target gradient, lane AXES - 1 the beta gradient; the launcher sums the
chunks.
"""

from typing import NamedTuple

import triton
import triton.language as tl

from dsnt_cuda.triton.map_math import (
    AxisGrad,
    axis_grad,
    axis_grad_coefs,
    map_upstream,
    target_mean_grad,
    target_mean_grad_coef,
)
from dsnt_cuda.triton.map_stats import load_map_stats
from dsnt_cuda.triton.math import (
    AXES,
    LN2,
    LOG2_FLOOR,
    PerAxis,
    exp2,
    floor_at,
    grid_affine,
    js_grad_p,
    js_target_weight,
    kl_grad_p,
    kl_target_weight,
    log2,
    precision,
    rectified_log2,
    rectify,
    rectify_grad,
    softmax_log2_weight,
)
from dsnt_cuda.triton.modes import JS, KL, LOSS_NONE, NONE, RELU, SOFTMAX
from dsnt_cuda.triton.tiles import (
    MapTile,
    Target,
    add_axes,
    axis_sums,
    load_axes,
    load_tile,
    map_tile,
    marginals,
    per_map_scalar,
    shift_base,
    target_means,
    target_q,
    target_setup,
    target_tile,
)


class MapGrad(NamedTuple):
    """dLoss/dz = dp(z) * (col(x) + row(y, z) + div * dDiv/dp): the per-axis parts of G, minus
    sum p G, and the factor of p's derivative (beta, 1/R, 1) folded into the coefficients."""
    x: AxisGrad
    y: AxisGrad
    z: AxisGrad
    offset: tl.tensor  # -sum p G (0 for "none": dLoss/dz = G)
    scale: tl.tensor   # beta (softmax), 1/R (rectified; 0 for the uniform fallback), 1 (none)
    div: tl.tensor     # omega times ln2/2 (JS) or ln2 (KL): dDiv/dp comes in log2 units


class Probabilities(NamedTuple):
    """What rebuilds p from a logit: the forward's Normalizer, from `stats`."""
    shift: tl.tensor
    beta_log2e: tl.tensor
    inv_denom: tl.tensor   # 1/N for the uniform fallback
    log2_denom: tl.tensor  # log2 N for the uniform fallback
    uniform: tl.tensor


@triton.jit
def divergence_scale(REG: tl.constexpr):
    # natural units of dDiv/dp per log2 unit (returned, never assigned: a float local is float32)
    return 0.5 * LN2 if REG == JS else LN2


@triton.jit
def axis_grad_of(gamma, nu, ubar, mass, SIZE: tl.constexpr, NORMALIZED: tl.constexpr):
    return axis_grad_coefs(gamma, nu, ubar, mass, grid_affine(tl.full([], SIZE, ubar.dtype), NORMALIZED))


@triton.jit
def dot_axes(a: PerAxis, b: PerAxis):
    return a.x * b.x + a.y * b.y + a.z * b.z


@triton.jit
def tile_probabilities(z, tile: MapTile, n: Probabilities, NORM: tl.constexpr):
    # (p, log2 p) from the logits and the map's stats; log2 p floored (0 * log2 p = 0)
    floor = precision(z, LOG2_FLOOR)
    if NORM == SOFTMAX:
        w = softmax_log2_weight(z, shift_base(n.shift), n.beta_log2e)
        l2p = tl.maximum(w - n.log2_denom, floor)
        p = exp2(w) * n.inv_denom  # not exp2(l2p): the rounding of l2p would cost small p ulps
    elif NORM == NONE:
        p = z
        l2p = floor_at(log2(z), floor)
    else:
        r = tl.where(tile.mask, rectify(z, NORM) + n.uniform.to(z.dtype), 0.0)
        p = r * n.inv_denom
        l2p = tl.where(n.uniform, 0.0, rectified_log2(z, r, NORM)) - n.log2_denom
    return p, l2p


@triton.jit
def axis_target_grad(u, a, ubar_g, one_minus_rho, sigma_t, SIZE: tl.constexpr):
    return target_mean_grad(u, a.centre, ubar_g, one_minus_rho,
                            target_mean_grad_coef(sigma_t, tl.full([], SIZE, u.dtype)))


@triton.jit
def tile_target_grad(w, tile: MapTile, t: Target, ubar_g: PerAxis, sigma_t, SIZE_X: tl.constexpr,
                     SIZE_Y: tl.constexpr, SIZE_Z: tl.constexpr, NDIM: tl.constexpr):
    # sum_i w_i t_k(i_k) per axis (docs/math.md §6), from the marginals of w
    r = t.norm.one_minus_rho
    return axis_sums(marginals(w), axis_target_grad(tile.u_x, t.x, ubar_g.x, r, sigma_t, SIZE_X),
                     axis_target_grad(tile.u_y, t.y, ubar_g.y, r, sigma_t, SIZE_Y),
                     axis_target_grad(tile.u_z, t.z, ubar_g.z, r, sigma_t, SIZE_Z), NDIM)


@triton.jit
def _dsnt_bwd_kernel(
    grad_coords_ptr, grad_variance_ptr, grad_reg_ptr, grad_coord_loss_ptr, grad_loss_ptr,
    logits_ptr, target_ptr, mask_ptr, mask_total_ptr, beta_ptr, sigma_ptr,
    coords_ptr, variance_ptr, stats_ptr, grad_logits_ptr, partials_ptr,
    keypoints, maps, stride_beta_b, stride_beta_l, stride_sigma_b, stride_sigma_l,
    beta_hi, beta_lo, sigma_hi, sigma_lo, reg_weight_hi, reg_weight_lo,
    NDIM: tl.constexpr, SIZE_X: tl.constexpr, SIZE_Y: tl.constexpr, SIZE_Z: tl.constexpr,
    NORM: tl.constexpr, REG: tl.constexpr, COORD_LOSS: tl.constexpr, NORMALIZED: tl.constexpr,
    HAS_GRAD_COORDS: tl.constexpr, HAS_GRAD_VARIANCE: tl.constexpr, HAS_GRAD_REG: tl.constexpr,
    HAS_GRAD_COORD_LOSS: tl.constexpr, HAS_GRAD_LOSS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BETA_MAP: tl.constexpr, HAS_SIGMA_MAP: tl.constexpr,
    TARGET_GRAD: tl.constexpr, BETA_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK_ROWS: tl.constexpr, AXIS_BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    ROWS: tl.constexpr = SIZE_Y * SIZE_Z
    MAP_SIZE: tl.constexpr = ROWS * SIZE_X
    DIVERGENCE: tl.constexpr = REG == JS or REG == KL
    map_id = tl.program_id(0)
    chunk = tl.program_id(1)
    b = map_id // keypoints
    keypoint = map_id % keypoints
    beta = per_map_scalar(beta_ptr, b, keypoint, stride_beta_b, stride_beta_l, beta_hi, beta_lo, HAS_BETA_MAP,
                          ACC)
    sigma_t = per_map_scalar(sigma_ptr, b, keypoint, stride_sigma_b, stride_sigma_l, sigma_hi, sigma_lo,
                             HAS_SIGMA_MAP, ACC)
    zero = tl.zeros([], ACC)
    zeros = PerAxis(zero, zero, zero)

    # ---- upstream gradients of this map (None: zeros) ------------------------------------
    out = map_id * NDIM
    grad_coords = zeros
    if HAS_GRAD_COORDS:
        grad_coords = load_axes(grad_coords_ptr + out, NDIM, ACC)
    grad_variance = zeros
    if HAS_GRAD_VARIANCE:
        grad_variance = load_axes(grad_variance_ptr + out, NDIM, ACC)
    grad_reg = zero
    if HAS_GRAD_REG:
        grad_reg = tl.load(grad_reg_ptr + map_id).to(ACC)
    grad_coord_loss = zero
    if HAS_GRAD_COORD_LOSS:
        grad_coord_loss = tl.load(grad_coord_loss_ptr + map_id).to(ACC)
    loss_weight = zero
    if HAS_GRAD_LOSS:
        if HAS_MASK:
            loss_weight = tl.load(mask_ptr + map_id) / tl.load(mask_total_ptr)
        else:
            loss_weight = 1.0 / tl.maximum(tl.cast(maps, ACC), 1.0)
        loss_weight *= tl.load(grad_loss_ptr).to(ACC)
    mu = zeros
    if DIVERGENCE or COORD_LOSS != LOSS_NONE:
        mu = load_axes(target_ptr + out, NDIM, ACC)
    coords = load_axes(coords_ptr + out, NDIM, ACC)
    variance = load_axes(variance_ptr + out, NDIM, ACC)
    reg_weight = tl.cast(reg_weight_hi, ACC) + tl.cast(reg_weight_lo, ACC)
    up = map_upstream(grad_coords, grad_variance, grad_reg, grad_coord_loss, loss_weight, coords,
                      variance, mu, sigma_t, reg_weight, NDIM, REG, COORD_LOSS)

    # ---- the map's normalizer and the per-axis coefficients of G ---------------------------
    stats = load_map_stats(stats_ptr, map_id, NDIM, ACC)
    denom = stats.denom
    mass = stats.mass
    ubar = stats.ubar
    uniform = denom == 0.0
    if NORM == SOFTMAX or NORM == NONE:
        uniform = zero != 0.0
    denom_p = tl.where(uniform, zero + MAP_SIZE, denom)
    n = Probabilities(stats.shift, beta * 1.4426950408889634, 1.0 / denom_p,
                      log2(denom_p), uniform)
    div_grad = stats.div_grad
    sum_pg = dot_axes(up.gamma, coords) + dot_axes(up.nu, variance) + up.omega * div_grad
    if NORM == SOFTMAX:
        g_scale = beta
    elif NORM == NONE:
        g_scale = zero + 1.0
        sum_pg = zero
    else:
        g_scale = tl.where(uniform, 0.0, 1.0 / denom)
    g = MapGrad(axis_grad_of(up.gamma.x, up.nu.x, ubar.x, mass, SIZE_X, NORMALIZED),
                axis_grad_of(up.gamma.y, up.nu.y, ubar.y, mass, SIZE_Y, NORMALIZED),
                axis_grad_of(up.gamma.z, up.nu.z, ubar.z, mass, SIZE_Z, NORMALIZED),
                -sum_pg, g_scale, up.omega * divergence_scale(REG))
    if DIVERGENCE:
        target = target_setup(mu, sigma_t, SIZE_X, SIZE_Y, SIZE_Z, NDIM, AXIS_BLOCK, ACC)
        ubar_g = target_means(target)

    # ---- one pass over this program's rows -------------------------------------------------
    base = logits_ptr + map_id.to(tl.int64) * MAP_SIZE
    grad_base = grad_logits_ptr + map_id.to(tl.int64) * MAP_SIZE
    OTHER: tl.constexpr = -float("inf") if NORM == SOFTMAX else 0.0
    target_sums = zeros
    beta_sum = zero
    for row0 in range(chunk * CHUNK_ROWS, tl.minimum((chunk + 1) * CHUNK_ROWS, ROWS), BLOCK_R):
        for col0 in range(0, SIZE_X, BLOCK_C):
            tile = map_tile(row0, col0, SIZE_X, SIZE_Y, SIZE_Z, BLOCK_R, BLOCK_C, ACC)
            z = load_tile(base, tile, OTHER, ACC)
            p, l2p = tile_probabilities(z, tile, n, NORM)
            col = g.scale * (axis_grad(tile.u_x, g.x) + g.offset)
            row = g.scale * axis_grad(tile.u_y, g.y)
            if NDIM == 3:
                row += g.scale * axis_grad(tile.u_z, g.z)
            grad = col[None, :] + row[:, None]
            if DIVERGENCE:
                q, l2q = target_q(target_tile(target, tile, NDIM))
                if REG == JS:
                    grad += (g.scale * g.div) * js_grad_p(p, l2p, q, l2q, NORM != SOFTMAX)
                    w = js_target_weight(p, l2p, q, l2q)
                else:
                    grad += (g.scale * g.div) * kl_grad_p(p, l2p, q, l2q, NORM != SOFTMAX)
                    w = kl_target_weight(p, q)
                if TARGET_GRAD:
                    target_sums = add_axes(target_sums, tile_target_grad(w, tile, target, ubar_g, sigma_t,
                                                                         SIZE_X, SIZE_Y, SIZE_Z, NDIM))
            if NORM == SOFTMAX:
                grad *= p
            elif NORM == RELU:
                grad = tl.where(z <= 0.0, 0.0, grad)  # autograd's threshold_backward: 0 even for a NaN grad
            elif NORM != NONE:
                grad *= rectify_grad(z, NORM)
            tl.store(grad_base + tile.offsets, grad.to(grad_logits_ptr.dtype.element_ty), mask=tile.mask)
            if BETA_GRAD:
                # sum (z - shift) dz / beta; the floor makes -inf logits add 0 * finite
                w = softmax_log2_weight(z, shift_base(n.shift), n.beta_log2e)
                beta_sum += tl.sum(tl.maximum(w, precision(w, LOG2_FLOOR)) * grad)

    # ---- this program's share of the target-mean and beta gradients ------------------------
    share = zeros
    if TARGET_GRAD:
        # the regularizer's path only where it has an upstream gradient (0, not 0 * NaN);
        # the coordinate loss's direct path once per map
        first = (chunk == 0).to(ACC)
        share = PerAxis(target_share(up.omega, target_sums.x, up.target_direct.x, first),
                        target_share(up.omega, target_sums.y, up.target_direct.y, first),
                        target_share(up.omega, target_sums.z, up.target_direct.z, first))
    lanes = tl.arange(0, AXES)
    beta_share = zero
    if BETA_GRAD:
        beta_share = beta_sum / (beta * n.beta_log2e)
    values = tl.where(lanes == 0, share.x, tl.where(lanes == 1, share.y, share.z))
    tl.store(partials_ptr + (map_id * tl.num_programs(1) + chunk) * AXES + lanes,
             tl.where(lanes == AXES - 1, beta_share, tl.where(lanes < NDIM, values, 0.0)))


@triton.jit
def target_share(omega, target_sum, direct, first):
    return tl.where(omega != 0.0, omega * target_sum, 0.0) + tl.where(first != 0.0, direct, 0.0)
