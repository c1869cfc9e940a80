"""The forward kernel of the fused op (docs/ops.md, dsnt_fwd) and the loss's masked mean.

One program per map. A map that fits one tile is read once and stays in registers; a larger one
is read twice: pass 1 finds the normalizer and the first moments (softmax online: the running
sums are rescaled when the maximum grows), pass 2 the variance about the exact mean and the
divergence. Per element: one ex2 (softmax), the JS's one lg2 unless far, the target from per-axis
tables (docs/math.md §7); per-axis sums come from the tile's row and column sums.
"""

from typing import NamedTuple

import triton
import triton.language as tl

from dsnt_cuda.triton.map_math import coord_loss_value
from dsnt_cuda.triton.map_stats import MapStats, store_map_stats
from dsnt_cuda.triton.math import (
    LN2,
    LOG2_FLOOR,
    PerAxis,
    add_js_terms,
    add_kl_terms,
    exp2,
    floor_at,
    grid_affine,
    log2,
    nan_max,
    precision,
    rectified_log2,
    rectify,
    softmax_log2_weight,
)
from dsnt_cuda.triton.modes import JS, KL, LOSS_NONE, NONE, SOFTMAX, VAR
from dsnt_cuda.triton.tiles import (
    MapTile,
    add_axes,
    load_axes,
    load_tile,
    map_tile,
    marginals,
    max_all,
    per_map_scalar,
    scale_axes,
    second_moments,
    shift_base,
    store_axes,
    target_q,
    target_setup,
    target_tile,
    total_and_first_moments,
)


class MapSums(NamedTuple):
    """Pass 1 of one map: the softmax shift, the sum of the weights relative to it (softmax: sum
    2^(l2 weight); rectified: sum r; none: sum z) and their first moments."""
    shift: tl.tensor
    total: tl.tensor
    s1: PerAxis


class Normalizer(NamedTuple):
    """What turns a weight into p: p = weight * inv_denom, log2 p = log2 weight - log2_denom."""
    shift: tl.tensor
    beta_log2e: tl.tensor
    inv_denom: tl.tensor
    log2_denom: tl.tensor
    uniform: tl.tensor  # a rectified map whose sum is exactly 0: p = 1/N


@triton.jit
def tile_weights(z, tile: MapTile, shift, beta_log2e, uniform, NORM: tl.constexpr):
    # The unnormalized p of a tile, 0 outside the map (masked logits load as -inf / 0).
    if NORM == SOFTMAX:
        e = exp2(softmax_log2_weight(z, shift_base(shift), beta_log2e))
    elif NORM == NONE:
        e = z
    else:
        e = tl.where(tile.mask, rectify(z, NORM) + uniform.to(z.dtype), 0.0)
    return e


@triton.jit
def tile_probabilities(z, e, n: Normalizer, NORM: tl.constexpr):
    # (p, log2 p), log2 p floored so that 0 * log2 p is 0. The softmax floor is a plain max:
    # where it would hide a NaN, p is NaN itself.
    floor = precision(e, LOG2_FLOOR)
    if NORM == SOFTMAX:
        l2p = tl.maximum(softmax_log2_weight(z, shift_base(n.shift), n.beta_log2e) - n.log2_denom, floor)
    elif NORM == NONE:
        l2p = floor_at(log2(z), floor)  # NaN for negative entries, as the reference
    else:
        l2p = tl.where(n.uniform, 0.0, rectified_log2(z, e, NORM)) - n.log2_denom
    return e * n.inv_denom, l2p


@triton.jit
def tile_divergence(z, e, tile: MapTile, n: Normalizer, target, NDIM: tl.constexpr,
                    NORM: tl.constexpr, REG: tl.constexpr):
    # (sum of the p half, sum of the q half) of the JS summands, or (sum of KL's, 0), log2 units
    p, l2p = tile_probabilities(z, e, n, NORM)
    q, l2q = target_q(target_tile(target, tile, NDIM))
    if REG == JS:
        tp, tq = add_js_terms(p, l2p, q, l2q)
        sums = tl.sum(tp), tl.sum(tq)
    else:
        sums = tl.sum(add_kl_terms(p, l2p, q, l2q)), tl.zeros([], p.dtype)
    return sums


@triton.jit
def map_normalizer(sums: MapSums, beta_log2e, uniform, MAP_SIZE: tl.constexpr, NORM: tl.constexpr):
    if NORM == NONE:
        total = tl.full([], 1.0, sums.total.dtype)
    else:
        total = tl.where(uniform, MAP_SIZE, sums.total)
    return Normalizer(sums.shift, beta_log2e, 1.0 / total, log2(total), uniform)


@triton.jit
def merge_tile(acc: MapSums, z, tile: MapTile, beta_log2e, NDIM: tl.constexpr, NORM: tl.constexpr):
    # Pass 1 of the looped path: one more tile into the running sums.
    shift = acc.shift
    alpha = 1.0
    if NORM == SOFTMAX:
        shift = nan_max(acc.shift, max_all(z))
        alpha = tl.where(shift == acc.shift, 1.0,
                         exp2(softmax_log2_weight(acc.shift, shift_base(shift), beta_log2e)))
    e = tile_weights(z, tile, shift, beta_log2e, tl.zeros([], z.dtype) != 0.0, NORM)
    total, s1 = total_and_first_moments(marginals(e), tile, NDIM)
    return MapSums(shift, acc.total * alpha + total, add_axes(scale_axes(acc.s1, alpha), s1))


@triton.jit
def axis_coord(ubar, mass, SIZE: tl.constexpr, NORMALIZED: tl.constexpr):
    # c = sum p v = scale ubar + offset P (docs/math.md §3)
    grid = grid_affine(tl.full([], SIZE, ubar.dtype), NORMALIZED)
    return grid.scale * ubar + grid.offset * mass


@triton.jit
def var_excess(variance, sigma_t):
    excess = variance - sigma_t * sigma_t
    return excess * excess


@triton.jit
def _dsnt_fwd_kernel(
    logits_ptr, target_ptr, beta_ptr, sigma_ptr,
    coords_ptr, variance_ptr, reg_losses_ptr, coord_losses_ptr, stats_ptr,
    keypoints, stride_beta_b, stride_beta_l, stride_sigma_b, stride_sigma_l,
    beta_hi, beta_lo, sigma_hi, sigma_lo,
    NDIM: tl.constexpr, SIZE_X: tl.constexpr, SIZE_Y: tl.constexpr, SIZE_Z: tl.constexpr,
    NORM: tl.constexpr, REG: tl.constexpr, COORD_LOSS: tl.constexpr, NORMALIZED: tl.constexpr,
    HAS_BETA_MAP: tl.constexpr, HAS_SIGMA_MAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, AXIS_BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    ROWS: tl.constexpr = SIZE_Y * SIZE_Z
    MAP_SIZE: tl.constexpr = ROWS * SIZE_X
    SINGLE: tl.constexpr = ROWS <= BLOCK_R and SIZE_X <= BLOCK_C
    DIVERGENCE: tl.constexpr = REG == JS or REG == KL
    OTHER: tl.constexpr = -float("inf") if NORM == SOFTMAX else 0.0
    map_id = tl.program_id(0)
    b = map_id // keypoints
    keypoint = map_id % keypoints
    base = logits_ptr + map_id.to(tl.int64) * MAP_SIZE
    beta = per_map_scalar(beta_ptr, b, keypoint, stride_beta_b, stride_beta_l, beta_hi, beta_lo, HAS_BETA_MAP,
                          ACC)
    sigma_t = per_map_scalar(sigma_ptr, b, keypoint, stride_sigma_b, stride_sigma_l, sigma_hi, sigma_lo,
                             HAS_SIGMA_MAP, ACC)
    beta_log2e = beta * 1.4426950408889634
    if DIVERGENCE or COORD_LOSS != LOSS_NONE:
        mu = load_axes(target_ptr + map_id * NDIM, NDIM, ACC)
    if DIVERGENCE:
        target = target_setup(mu, sigma_t, SIZE_X, SIZE_Y, SIZE_Z, NDIM, AXIS_BLOCK, ACC)
    div = tl.zeros([], ACC), tl.zeros([], ACC)
    no = tl.zeros([], ACC) != 0.0  # False, as a tensor

    if SINGLE:
        tile = map_tile(0, 0, SIZE_X, SIZE_Y, SIZE_Z, BLOCK_R, BLOCK_C, ACC)
        z = load_tile(base, tile, OTHER, ACC)
        shift = tl.zeros([], ACC)
        if NORM == SOFTMAX:
            shift = max_all(z)
        e = tile_weights(z, tile, shift, beta_log2e, no, NORM)
        uniform = no
        if NORM != SOFTMAX and NORM != NONE:
            uniform = tl.sum(e) == 0.0
            e = tl.where(tile.mask, e + uniform.to(ACC), 0.0)
        m = marginals(e)
        total, s1 = total_and_first_moments(m, tile, NDIM)
        sums = MapSums(shift, total, s1)
        n = map_normalizer(sums, beta_log2e, uniform, MAP_SIZE, NORM)
        ubar = scale_axes(sums.s1, n.inv_denom)
        m2 = second_moments(m, tile, ubar, NDIM)
        if DIVERGENCE:
            div = tile_divergence(z, e, tile, n, target, NDIM, NORM, REG)
    else:
        zero = tl.zeros([], ACC)
        sums = MapSums(tl.full([], OTHER, ACC), zero, PerAxis(zero, zero, zero))
        for row0 in range(0, ROWS, BLOCK_R):
            for col0 in range(0, SIZE_X, BLOCK_C):
                tile = map_tile(row0, col0, SIZE_X, SIZE_Y, SIZE_Z, BLOCK_R, BLOCK_C, ACC)
                sums = merge_tile(sums, load_tile(base, tile, OTHER, ACC), tile, beta_log2e, NDIM, NORM)
        uniform = no
        if NORM != SOFTMAX and NORM != NONE:
            uniform = sums.total == 0.0
        n = map_normalizer(sums, beta_log2e, uniform, MAP_SIZE, NORM)
        ubar = scale_axes(sums.s1, n.inv_denom)
        m2 = PerAxis(zero, zero, zero)
        for row0 in range(0, ROWS, BLOCK_R):
            for col0 in range(0, SIZE_X, BLOCK_C):
                tile = map_tile(row0, col0, SIZE_X, SIZE_Y, SIZE_Z, BLOCK_R, BLOCK_C, ACC)
                z = load_tile(base, tile, OTHER, ACC)
                e = tile_weights(z, tile, sums.shift, beta_log2e, uniform, NORM)
                m2 = add_axes(m2, second_moments(marginals(e), tile, ubar, NDIM))
                if DIVERGENCE:
                    tp, tq = tile_divergence(z, e, tile, n, target, NDIM, NORM, REG)
                    div = div[0] + tp, div[1] + tq

    # ---- per-map outputs -------------------------------------------------------------------
    mass = tl.full([], 1.0, ACC)
    if NORM == NONE:
        mass = sums.total
    coords = PerAxis(axis_coord(ubar.x, mass, SIZE_X, NORMALIZED),
                     axis_coord(ubar.y, mass, SIZE_Y, NORMALIZED),
                     axis_coord(ubar.z, mass, SIZE_Z, NORMALIZED))
    variance = scale_axes(m2, n.inv_denom)
    reg_value = tl.zeros([], ACC)
    div_grad = tl.zeros([], ACC)
    if REG == JS:
        reg_value = (div[0] + div[1]) * (0.5 * LN2)
        div_grad = div[0] * (0.5 * LN2)
    elif REG == KL:
        reg_value = div[0] * LN2
        div_grad = reg_value + mass
    elif REG == VAR:
        reg_value = var_excess(variance.x, sigma_t)
        if NDIM >= 2:
            reg_value += var_excess(variance.y, sigma_t)
        if NDIM == 3:
            reg_value += var_excess(variance.z, sigma_t)
    out = map_id * NDIM
    store_axes(coords_ptr + out, coords, NDIM)
    store_axes(variance_ptr + out, variance, NDIM)
    tl.store(reg_losses_ptr + map_id, reg_value)
    if COORD_LOSS != LOSS_NONE:
        tl.store(coord_losses_ptr + map_id, coord_loss_value(coords, mu, NDIM, COORD_LOSS))
    denom = tl.where(n.uniform, 0.0, sums.total)
    if NORM == NONE:
        denom = tl.full([], 1.0, ACC)
    store_map_stats(stats_ptr, map_id, MapStats(sums.shift, denom, mass, div_grad, ubar), NDIM)


@triton.jit
def _dsnt_loss_kernel(coord_losses_ptr, reg_losses_ptr, mask_ptr, loss_ptr, maps, reg_weight_hi,
                      reg_weight_lo, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    # dsntnn's average_loss, in one program: a fixed order of summation, so deterministic.
    ACC: tl.constexpr = reg_losses_ptr.dtype.element_ty
    reg_weight = tl.cast(reg_weight_hi, ACC) + tl.cast(reg_weight_lo, ACC)
    lanes = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], ACC)
    weight = tl.zeros([BLOCK], ACC)
    for start in range(0, maps, BLOCK):
        m = start + lanes
        valid = m < maps
        losses = tl.load(coord_losses_ptr + m, mask=valid, other=0.0) + reg_weight * tl.load(
            reg_losses_ptr + m, mask=valid, other=0.0)
        if HAS_MASK:
            w = tl.load(mask_ptr + m, mask=valid, other=0.0)
            total += losses * w
            weight += w
        else:
            total += losses
            weight += valid.to(ACC)
    tl.store(loss_ptr, tl.sum(total, axis=0) / tl.maximum(tl.sum(weight, axis=0), 1.0))
