"""The per-map values the Triton forward saves for its backward (`stats`, docs/ops.md): one row
of STAT_MEAN + NDIM values a map, written by the forward and read by the backward here only."""

from typing import NamedTuple

import triton
import triton.language as tl

from dsnt_cuda.ops import STATS_BASE
from dsnt_cuda.triton.tiles import load_axes, store_axes

# Slots of a row: the four scalars, then STAT_MEAN + k is ubar of axis k.
STAT_SHIFT = tl.constexpr(0)
STAT_DENOM = tl.constexpr(1)
STAT_MASS = tl.constexpr(2)
STAT_DIV_GRAD = tl.constexpr(3)
STAT_MEAN = tl.constexpr(STATS_BASE)


class MapStats(NamedTuple):
    shift: tl.tensor  # softmax: the largest logit
    denom: tl.tensor  # sum of the weights (0: a uniform rectified map; none: 1)
    mass: tl.tensor
    div_grad: tl.tensor
    ubar: tl.tensor  # the mean per axis (an axis vector)


@triton.jit
def store_map_stats(stats_ptr, map_id, s: MapStats, NDIM: tl.constexpr):
    row = stats_ptr + map_id * (STAT_MEAN + NDIM)
    tl.store(row + STAT_SHIFT, s.shift)
    tl.store(row + STAT_DENOM, s.denom)
    tl.store(row + STAT_MASS, s.mass)
    tl.store(row + STAT_DIV_GRAD, s.div_grad)
    store_axes(row + STAT_MEAN, s.ubar, NDIM)


@triton.jit
def load_map_stats(stats_ptr, map_id, NDIM: tl.constexpr, ACC: tl.constexpr):
    row = stats_ptr + map_id * (STAT_MEAN + NDIM)
    return MapStats(tl.load(row + STAT_SHIFT), tl.load(row + STAT_DENOM), tl.load(row + STAT_MASS),
                    tl.load(row + STAT_DIV_GRAD), load_axes(row + STAT_MEAN, NDIM, ACC))
