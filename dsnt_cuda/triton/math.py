"""The math of DSNT as Triton helpers: csrc/dsnt_math.h, function for function, same names.

Units are the header's: base-2 logarithms inside the kernels (`l2p` is log2 p), natural units
formed once per map. Per-element helpers take tiles of the accumulation dtype (float32, or
float64 for float64 logits); the dtype picks the constants of `Precision<T>`. Per-axis and
per-map helpers take scalars; the header's arrays over axes are `PerAxis` (x, y, z), a per-axis
formula is one helper called per axis.

Differences from the header, all for the compiler's sake: there are no references, so helpers
return what the C++ adds to its arguments; a selection is computed on every lane (a tile has no
warp-uniform `any` / `all`); axes a map does not have are neutral (size 1, factor 1). Float
constants are never assigned to locals (Triton makes a float local float32) and enter
comparisons, tl.where and tl.maximum through `splat` (there a bare literal is rounded to float32).
"""

from typing import NamedTuple

import triton
import triton.language as tl

from dsnt_cuda.triton.modes import ABS, RELU, SIGMOID

# Lanes of an axis vector (per-axis values stored at once): x, y, z and one more.
AXES = tl.constexpr(4)

LN2 = tl.constexpr(0.693147180559945309417232121458176568)
LOG2E = tl.constexpr(1.44269504088896340735992468100189214)
DIV_EPS = tl.constexpr(1e-24)
LOG2_DIV_EPS = tl.constexpr(-79.726274144432671)
SQRT_HALF_LOG2E = tl.constexpr(0.84932180028801904272150283410288961)

# Precision<T> of dsnt_math.h, as (float32, float64) pairs: precision(x, PAIR) picks x's.
FAR_LOG2 = tl.constexpr((24.0, 53.0))
TINY = tl.constexpr((1.6777216e-17, 9.007199254740992e-09))
LOG2_FLOOR = tl.constexpr((-160.0, -1100.0))
MIN_NORMAL = tl.constexpr((1.17549435e-38, 2.2250738585072014e-308))


# Precision<T> as tensors of x's dtype: a float literal in a comparison, tl.where or
# tl.maximum is rounded to float32 first (9e-9 would move, 2.2e-308 would become 0).


@triton.jit
def splat(x, VALUE: tl.constexpr):
    return tl.full([], VALUE, x.dtype)


@triton.jit
def precision(x, PAIR: tl.constexpr):
    """A Precision<T> constant (a pair above) for x's dtype (float16 / bfloat16 compute in float32)."""
    return splat(x, PAIR[1] if x.dtype == tl.float64 else PAIR[0])


# ---- Arith<V>: exp2 / log2 and NaN-aware selections -------------------------------------------


@triton.jit
def _log2_device(x):
    # lg2.approx.ftz on the GPU for float32, as Arith<float> (about 2 ulp); float64 exact.
    if x.dtype == tl.float32:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        y = tl.math.log2(x)
    return y


@triton.jit
def _log2_host(x):
    return tl.math.log2(x)


# The interpreter runs no inline assembly: it takes numpy's log2 (the C++ host code's std::log2).
log2 = _log2_host if triton.knobs.runtime.interpret else _log2_device


@triton.jit
def exp2(x):
    # float32: one MUFU.EX2 (ex2.approx); float64: libdevice.
    return tl.math.exp2(x)


@triton.jit
def floor_at(x, lo):
    # x < lo ? lo : x, keeping NaN.
    return tl.where(x < lo, lo, x)


@triton.jit
def nan_max(a, b):
    # The larger of a, b; NaN if either is NaN (a NaN logit makes its map NaN).
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


class PerAxis(NamedTuple):
    """One value per spatial axis, x first (the header's arrays over axes); axes a map does not
    have hold 0."""
    x: tl.tensor
    y: tl.tensor
    z: tl.tensor


# ---- grids (docs/math.md §1) -------------------------------------------------------------------


@triton.jit
def centred_offset(size):
    return (size - 1) * 0.5


class GridAffine(NamedTuple):
    """The requested grid as v = scale * u + offset (u: centred pixels)."""
    scale: tl.tensor
    offset: tl.tensor


@triton.jit
def grid_affine(size, NORMALIZED: tl.constexpr):
    if NORMALIZED:
        scale = 2.0 / size
        offset = size * 0.0
    else:
        scale = size * 0.0 + 1.0
        offset = centred_offset(size)
    return GridAffine(scale, offset)


# ---- normalization (docs/math.md §2) -------------------------------------------------------------


@triton.jit
def softmax_log2_weight(z, shift, beta_log2e):
    # beta (z - shift) log2 e, never beta z - shift (docs/ops.md, stats).
    return (z - shift) * beta_log2e


@triton.jit
def rectify(z, NORM: tl.constexpr):
    if NORM == ABS:
        r = tl.abs(z)
    elif NORM == RELU:
        r = tl.where(z <= 0.0, 0.0, z)  # keeps NaN
    else:
        r = 1.0 / (1.0 + exp2(z * -LOG2E))
    return r


@triton.jit
def rectify_grad(z, NORM: tl.constexpr):
    # autograd's conventions at the kinks: abs'(0) = relu'(0) = 0
    if NORM == ABS:
        g = tl.where(z > 0.0, 1.0, tl.where(z < 0.0, -1.0, 0.0))
    elif NORM == RELU:
        g = tl.where(z > 0.0, 1.0, 0.0)
    else:
        s = rectify(z, NORM)
        g = s * (1.0 - s)
    return g


@triton.jit
def rectified_log2(z, r, NORM: tl.constexpr):
    if NORM == SIGMOID:
        l2r = -log2(1.0 + exp2(z * -LOG2E))
    else:
        l2r = log2(r)
    return floor_at(l2r, precision(r, LOG2_FLOOR))


# ---- divergence terms (docs/math.md §4, §6, §7) -------------------------------------------------


@triton.jit
def log2_mid(p, l2p, q, l2q):
    # log2 m, m = (p + q)/2: log2 max(p, q) - 1 where the smaller is below half an ulp of the
    # larger ("far"), else the one real logarithm per element of JS. q comes from target_q, which
    # carries the smallest normal number: p + q needs no clamp before the logarithm (the header's
    # floor_at(p + q, kMinNormal), one instruction an element; the 1e-38 is far below any eps).
    hi = tl.maximum(l2p, l2q)
    far = tl.abs(l2p - l2q) > precision(p, FAR_LOG2)
    return tl.where(far, hi, log2(p + q)) - 1.0


@triton.jit
def log2_plus_eps(x, l2x):
    # log2(x + eps): the analytic log2 x where x + eps rounds to x, a real logarithm below.
    return tl.where(x < precision(x, TINY), log2(x + DIV_EPS), l2x)


@triton.jit
def add_js_terms(p, l2p, q, l2q):
    # The JS summand in two halves (p part, q part): value sums both, p_part the first. The
    # caller scales once per map: reg = ln2/2 value, div_grad = ln2/2 p_part.
    l2m = log2_mid(p, l2p, q, l2q)
    return p * (l2p - l2m), q * (l2q - l2m)


@triton.jit
def add_kl_terms(p, l2p, q, l2q):
    # reg = ln2 value, div_grad = ln2 value + sum p
    return p * (l2p - log2_plus_eps(q, l2q))


@triton.jit
def js_grad_p(p, l2p, q, l2q, EXACT: tl.constexpr):
    # dDiv/dp / (ln2/2). EXACT: dsntnn's eps form below tiny (rectified and "none" maps, whose
    # gradient is not multiplied by p); softmax passes EXACT=False (docs/math.md §7.2).
    l2m = log2_mid(p, l2p, q, l2q)
    fast = l2p - l2m
    if EXACT:
        m = 0.5 * (p + q)
        exact = (log2(p + DIV_EPS) - log2(m + DIV_EPS)
                 + (p / (p + DIV_EPS) - m / (m + DIV_EPS)) * LOG2E)
        fast = tl.where(tl.minimum(p, m) < precision(p, TINY), exact, fast)
    return fast


@triton.jit
def kl_grad_p(p, l2p, q, l2q, EXACT: tl.constexpr):
    # dDiv/dp / ln2
    l2q_eps = log2_plus_eps(q, l2q)
    grad = l2p - l2q_eps + LOG2E
    if EXACT:
        exact = log2(p + DIV_EPS) - l2q_eps + p / (p + DIV_EPS) * LOG2E
        grad = tl.where(p < precision(p, TINY), exact, grad)
    return grad


@triton.jit
def js_target_weight(p, l2p, q, l2q):
    # w = (dJS/dq) q, natural units
    return q * (l2q - log2_mid(p, l2p, q, l2q)) * (0.5 * LN2)


@triton.jit
def kl_target_weight(p, q):
    return tl.where(q < precision(q, TINY), -p * q / (q + DIV_EPS), -p)
