"""How the Triton kernels see a map: tiles of rows x columns, per-axis sums, per-map scalars, and
the Gaussian target's per-axis tables.

A map of `SIZE_Z x SIZE_Y x SIZE_X` contiguous elements (axes a map does not have have size 1)
is `ROWS = SIZE_Z * SIZE_Y` rows of `SIZE_X` columns. A tile is `BLOCK_R x BLOCK_C` of them:
per-axis quantities are per column (x) or per row (y, z), never per element (docs/math.md §7.4),
and every size is a constexpr, so row -> (y, z) and the masks cost little.
"""

from typing import NamedTuple

import triton
import triton.language as tl

from dsnt_cuda.triton.map_math import (
    TargetAxisSums,
    TargetNorm,
    target_axis_mean,
    target_centre,
    target_log2_coef,
    target_log2_factor,
    target_norm,
)
from dsnt_cuda.triton.math import (
    AXES,
    LOG2_FLOOR,
    MIN_NORMAL,
    PerAxis,
    centred_offset,
    exp2,
    nan_max,
    precision,
)


class MapTile(NamedTuple):
    offsets: tl.tensor    # [BLOCK_R, BLOCK_C] element offsets in the map (int32: maps <= 2^30)
    mask: tl.tensor       # [BLOCK_R, BLOCK_C] inside the map
    col_valid: tl.tensor  # [BLOCK_C]
    row_valid: tl.tensor  # [BLOCK_R]
    u_x: tl.tensor        # [BLOCK_C] centred pixel coordinate of each column
    u_y: tl.tensor        # [BLOCK_R]
    u_z: tl.tensor        # [BLOCK_R]


@triton.jit
def map_tile(row0, col0, SIZE_X: tl.constexpr, SIZE_Y: tl.constexpr, SIZE_Z: tl.constexpr,
             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_R)
    cols = col0 + tl.arange(0, BLOCK_C)
    row_valid = rows < SIZE_Y * SIZE_Z
    col_valid = cols < SIZE_X
    if SIZE_Z == 1:  # a row is a y (no division, even by a constant)
        y = rows
        z = rows * 0
    else:
        y = rows % SIZE_Y
        z = rows // SIZE_Y
    return MapTile(
        rows[:, None] * SIZE_X + cols[None, :],
        row_valid[:, None] & col_valid[None, :],
        col_valid,
        row_valid,
        cols.to(ACC) - centred_offset(SIZE_X),
        y.to(ACC) - centred_offset(SIZE_Y),
        z.to(ACC) - centred_offset(SIZE_Z),
    )


@triton.jit
def load_tile(base_ptr, tile: MapTile, other, ACC: tl.constexpr):
    # Upcast right after the load: half types are stored, never computed with.
    return tl.load(base_ptr + tile.offsets, mask=tile.mask, other=other).to(ACC)


@triton.jit
def shift_base(shift):
    # The softmax shift a tile's weights are formed against: an all -inf map (so far) gets
    # weights 2^-inf = 0 rather than 2^(-inf + inf) = NaN; its denominator stays 0.
    return tl.where(shift == -float("inf"), 0.0, shift)


# ---- sums over a tile ---------------------------------------------------------------------------


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _sum2_device(a, b):
    # two sums of 1-D tensors in one reduction (one exchange between warps instead of two)
    return tl.reduce((a, b), 0, _add2)


@triton.jit
def _max_all_device(x):
    return tl.reduce(x, None, nan_max)


@triton.jit
def _sum2_host(a, b):
    return tl.sum(a, axis=0), tl.sum(b, axis=0)


@triton.jit
def _max_all_host(x):
    return tl.max(x) + tl.sum(tl.where(x != x, x, 0.0))  # numpy's max skips NaN


# The interpreter runs a reduction with a jitted combine function element by element in Python:
# there, the same sums through numpy.
_HOST = triton.knobs.runtime.interpret
sum2 = _sum2_host if _HOST else _sum2_device
max_all = _max_all_host if _HOST else _max_all_device  # the largest element, NaN if any is NaN


class Marginals(NamedTuple):
    """Sums of a tile over rows (per column: the x marginal) and over columns (per row)."""
    cols: tl.tensor
    rows: tl.tensor


@triton.jit
def marginals(x):
    return Marginals(tl.sum(x, axis=0), tl.sum(x, axis=1))


@triton.jit
def _row_sums(m: Marginals, table_y, table_z, NDIM: tl.constexpr):
    zero = tl.zeros([], m.rows.dtype)
    y = zero
    z = zero
    if NDIM == 2:
        y = tl.sum(m.rows * table_y, axis=0)
    elif NDIM == 3:
        y, z = sum2(m.rows * table_y, m.rows * table_z)
    return y, z


@triton.jit
def total_and_first_moments(m: Marginals, tile: MapTile, NDIM: tl.constexpr):
    # (sum x, PerAxis of sum x u_k) of a tile, from its marginals
    total, x = sum2(m.cols, m.cols * tile.u_x)
    y, z = _row_sums(m, tile.u_y, tile.u_z, NDIM)
    return total, PerAxis(x, y, z)


@triton.jit
def axis_sums(m: Marginals, table_x, table_y, table_z, NDIM: tl.constexpr):
    # PerAxis of sum_i x_i t_k(i_k), from the marginals and per-column / per-row tables t_k
    y, z = _row_sums(m, table_y, table_z, NDIM)
    return PerAxis(tl.sum(m.cols * table_x, axis=0), y, z)


@triton.jit
def second_moments(m: Marginals, tile: MapTile, ubar: PerAxis, NDIM: tl.constexpr):
    # PerAxis of sum x (u_k - ubar_k)^2, about the given centred means
    dx = tile.u_x - ubar.x
    dy = tile.u_y - ubar.y
    dz = tile.u_z - ubar.z
    return axis_sums(m, dx * dx, dy * dy, dz * dz, NDIM)


@triton.jit
def add_axes(a: PerAxis, b: PerAxis):
    return PerAxis(a.x + b.x, a.y + b.y, a.z + b.z)


@triton.jit
def scale_axes(a: PerAxis, s):
    return PerAxis(a.x * s, a.y * s, a.z * s)


# ---- per-axis values in memory: (maps, NDIM) tensors ----------------------------------------------


@triton.jit
def load_axes(ptr, NDIM: tl.constexpr, ACC: tl.constexpr):
    zero = tl.zeros([], ACC)
    y = zero
    z = zero
    if NDIM >= 2:
        y = tl.load(ptr + 1).to(ACC)
    if NDIM == 3:
        z = tl.load(ptr + 2).to(ACC)
    return PerAxis(tl.load(ptr).to(ACC), y, z)


@triton.jit
def store_axes(ptr, v: PerAxis, NDIM: tl.constexpr):
    lanes = tl.arange(0, AXES)
    tl.store(ptr + lanes, tl.where(lanes == 0, v.x, tl.where(lanes == 1, v.y, v.z)), mask=lanes < NDIM)


# ---- per-map scalars: a float, or a (B, L) view read through its strides -----------------------


@triton.jit
def per_map_scalar(ptr, b, keypoint, stride_b, stride_l, hi, lo, HAS_MAP: tl.constexpr, ACC: tl.constexpr):
    # A float argument arrives as a float32 pair hi + lo: float64 kernels see it to ~1e-15.
    if HAS_MAP:
        value = tl.load(ptr + b * stride_b + keypoint * stride_l).to(ACC)
    else:
        value = tl.cast(hi, ACC) + tl.cast(lo, ACC)
    return value


# ---- the Gaussian target of one map ------------------------------------------------------------


class TargetAxis(NamedTuple):
    centre: tl.tensor  # the target mean in centred pixels
    sums: TargetAxisSums


class Target(NamedTuple):
    coef: tl.tensor  # target_log2_coef(sigma_t)
    x: TargetAxis
    y: TargetAxis
    z: TargetAxis
    norm: TargetNorm
    log2_scale: tl.tensor  # log2 of norm.scale (-inf when empty)


@triton.jit
def target_axis_sums(centre, coef, SIZE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # off = max_j l2(j), at the pixel nearest the centre (NaN / -inf follow the centre), then the
    # sums of g~ = 2^(l2 - off): O(SIZE) per map.
    half = centred_offset(SIZE)
    nearest = tl.minimum(tl.maximum(tl.floor(centre + half + 0.5), 0.0), SIZE - 1.0) - half
    off = target_log2_factor(nearest, centre, coef)
    base = tl.where(off == -float("inf"), 0.0, off)
    lanes = tl.arange(0, BLOCK)
    sum_g = tl.zeros([], ACC)
    sum_gu = tl.zeros([], ACC)
    for j0 in range(0, SIZE, BLOCK):
        j = j0 + lanes
        u = j.to(ACC) - half
        g = tl.where(j < SIZE, exp2(target_log2_factor(u, centre, coef) - base), 0.0)
        a, b = sum2(g, g * u)
        sum_g += a
        sum_gu += b
    return TargetAxis(centre, TargetAxisSums(off, sum_g, sum_gu))


@triton.jit
def target_axis(mu, coef, K: tl.constexpr, SIZE: tl.constexpr, NDIM: tl.constexpr,
                AXIS_BLOCK: tl.constexpr, ACC: tl.constexpr):
    # An axis the map lacks is neutral: factor 1 (off 0, sum_g 1, sum_gu 0).
    zero = tl.zeros([], ACC)
    axis = TargetAxis(zero, TargetAxisSums(zero, zero + 1.0, zero))
    if K < NDIM:
        axis = target_axis_sums(target_centre(mu, SIZE), coef, SIZE, AXIS_BLOCK, ACC)
    return axis


@triton.jit
def target_setup(mu: PerAxis, sigma_t, SIZE_X: tl.constexpr, SIZE_Y: tl.constexpr,
                 SIZE_Z: tl.constexpr, NDIM: tl.constexpr, AXIS_BLOCK: tl.constexpr, ACC: tl.constexpr):
    # mu: the target means in normalized units
    coef = target_log2_coef(sigma_t)
    x = target_axis(mu.x, coef, 0, SIZE_X, NDIM, AXIS_BLOCK, ACC)
    y = target_axis(mu.y, coef, 1, SIZE_Y, NDIM, AXIS_BLOCK, ACC)
    z = target_axis(mu.z, coef, 2, SIZE_Z, NDIM, AXIS_BLOCK, ACC)
    norm = target_norm(x.sums, y.sums, z.sums)
    log2_scale = x.sums.off + y.sums.off + z.sums.off - norm.log2_norm
    return Target(coef, x, y, z, norm, tl.where(norm.empty, -float("inf"), log2_scale))


@triton.jit
def target_means(t: Target):
    # ubar_g per axis
    return PerAxis(target_axis_mean(t.x.sums, t.norm), target_axis_mean(t.y.sums, t.norm),
                   target_axis_mean(t.z.sums, t.norm))


class TargetTile(NamedTuple):
    """log2 q = l2_col + l2_row and q = g_col * g_row on a tile (0 / floored outside the map)."""
    l2_col: tl.tensor
    g_col: tl.tensor
    l2_row: tl.tensor
    g_row: tl.tensor


@triton.jit
def target_axis_table(u, valid, a: TargetAxis, coef):
    # the scaled factor of one axis, log2 and linear, per column or row
    base = tl.where(a.sums.off == -float("inf"), 0.0, a.sums.off)
    l2 = tl.where(valid, target_log2_factor(u, a.centre, coef) - base, -float("inf"))
    return l2, exp2(l2)


@triton.jit
def target_tile(t: Target, tile: MapTile, NDIM: tl.constexpr):
    l2_x, g_x = target_axis_table(tile.u_x, tile.col_valid, t.x, t.coef)
    l2_row, g_row = target_axis_table(tile.u_y, tile.row_valid, t.y, t.coef)
    if NDIM == 3:
        l2_z, g_z = target_axis_table(tile.u_z, tile.row_valid, t.z, t.coef)
        l2_row += l2_z
        g_row *= g_z
    # Floored parts (NaN kept): log2 q stays finite where q is 0 (0 * log2 q must be 0, not NaN).
    floor = precision(l2_x, LOG2_FLOOR)
    return TargetTile(tl.maximum(l2_x, floor, propagate_nan=tl.PropagateNan.ALL), g_x,
                      tl.maximum(l2_row + t.log2_scale, floor, propagate_nan=tl.PropagateNan.ALL),
                      g_row * t.norm.scale)


@triton.jit
def target_q(tt: TargetTile):
    # (q, log2 q) of the tile's elements; q + the smallest normal number, so that log2_mid's
    # log2(p + q) is finite without a clamp
    q = tt.g_col[None, :] * tt.g_row[:, None] + precision(tt.g_col, MIN_NORMAL)
    return q, tt.l2_col[None, :] + tt.l2_row[:, None]
