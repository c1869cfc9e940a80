"""The CUDA kernels (csrc/cuda/dsnt_kernel.cu) run on the CPU under the host emulation of the CUDA
thread model (tests/cuda_emulation/), against the float64 reference.

Every path of the kernels: each size class (warp N <= 512 < block N <= 4096 < stream), forward and
backward, 1-3-D maps, every logits dtype, both grids, each normalization and regularizer, None
upstream gradients, needs_target_grad False, the uniform fallback of zero-sum rectified maps,
NaN and -inf maps, misaligned bases (scalar loads), a target outside the map; with NaN-filled
outputs, poisoned shared memory and several blocks at once. The cases marked `sanitized` also run
under ThreadSanitizer and AddressSanitizer + UBSan (tests/test_cuda_emulated_sanitized.py).
This checks logic, indexing and synchronization; it cannot see what only a GPU shows (memory
model, timing, fast math): tests/test_ops_cuda.py does that on a GPU. Needs a C++ compiler and
ninja; skips otherwise.

The kernels' argument lists (csrc/OPS.md) enter only through emulated_results(): a new op contract
is one edit there.
"""

import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dsnt_cuda import reference
from map_inputs import peaked_logits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cuda_emulation"))
import emulate  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(emulate.CXX) is None or shutil.which(emulate.ninja()) is None,
                                reason="needs a C++ compiler and ninja")
SANITIZED = pytest.mark.sanitized


@pytest.fixture(scope="module")
def emu():
    # A sanitized run (tests/test_cuda_emulated_sanitized.py) names its prebuilt library.
    library = os.environ.get("DSNT_EMU_LIBRARY") or emulate.build("ops-plain")[0]
    return emulate.load_ops(library)


def emulated_results(emu, z, target, options, upstream, needs_target_grad=True):
    """Forward, then backward with `upstream` (None entries allowed), of the emulated ops:
    ([coords, variance, reg_losses], grad_logits, grad_target)."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    t = target.to(acc)
    coords, variance, reg_losses, stats = emu.dsnt_fwd(z, t, *options)
    up = [None if u is None else u.to(acc) for u in upstream]
    gz, gt = emu.dsnt_bwd(*up, z, t, coords, variance, stats, *options, needs_target_grad)
    return [coords, variance, reg_losses], gz, gt


def reference_results(z, target, options, upstream, needs_target_grad=True):
    z64 = z.detach().double().requires_grad_(True)
    t64 = target.detach().double().requires_grad_(True)
    outs = reference.dsnt_core(z64, t64, *options)
    terms = [(o * u).sum() for o, u in zip(outs, upstream) if u is not None]
    gz, gt = torch.autograd.grad(sum(terms), [z64, t64], allow_unused=True) if terms else (None, None)
    gz = torch.zeros_like(z64) if gz is None else gz
    gt = gt if gt is not None and needs_target_grad else torch.zeros_like(t64)
    return [o.detach() for o in outs], gz, gt


def make_inputs(shape, normalization, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, n = shape[0], shape[1], len(shape) - 2
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    if normalization == "none":
        scale = 0.7 + 0.6 * torch.rand(B, L, *[1] * n, generator=g, dtype=torch.float64)
        z = torch.softmax(z.flatten(2), -1).view(shape) * scale
    target = torch.rand(B, L, n, generator=g, dtype=torch.float64) * 1.6 - 0.8
    upstream = (torch.randn(B, L, n, generator=g, dtype=torch.float64),
                torch.randn(B, L, n, generator=g, dtype=torch.float64) * 0.01,
                torch.randn(B, L, generator=g, dtype=torch.float64))
    return z.to(dtype), target, upstream


def assert_close(actual, expected, tol, what):
    """|a - e| <= tol (|e| + max|e| + 0.01), NaN where the reference has NaN only."""
    actual, expected = actual.double(), expected.double()
    assert torch.equal(actual.isfinite(), expected.isfinite()), f"{what}: non-finite mismatch"
    actual, expected = actual[expected.isfinite()], expected[expected.isfinite()]
    if expected.numel() == 0:
        return
    err = (actual - expected).abs()
    bound = tol * (expected.abs() + expected.abs().max() + 0.01)
    assert (err <= bound).all(), f"{what}: max abs err {err.max().item():.3e}"


# (outputs, gradients), relative to the largest reference value. Accumulation is float64 for
# float64 logits, float32 otherwise; half logits only round the logits gradient they store.
# Largest errors seen: float64 1e-15 / 8e-15, float32 3e-7 / 4e-5 (grad target, js),
# float16 2e-7 / 2e-4, bfloat16 2e-7 / 1.1e-3.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-4), torch.float16: (1e-5, 1e-3),
       torch.bfloat16: (1e-5, 5e-3)}
SHAPES = {
    "warp": (2, 9, 16, 16),  # 18 maps: more than one 8-map block, a partial last block
    "warp-odd-1d": (2, 3, 37),
    "block": (1, 3, 40, 41),
    "block-3d": (1, 2, 16, 16, 16),  # 4096: the largest on-chip map
    "stream": (1, 2, 70, 70),
    "stream-1d": (1, 1, 9001),  # an axis above the shared-memory table: target on the fly
    "stream-3d": (1, 1, 20, 20, 21),
}
CLASSES = ["warp", "block", "stream"]
NORMALIZATIONS = ["softmax", "relu", "sigmoid", "abs", "none"]
REGULARIZERS = ["js", "kl", "var", "none"]
BETA = {"softmax": 1.3}


def check(emu, shape, normalization="softmax", reg="js", dtype=torch.float32, *, normalized=True, z=None,
          target=None, none_upstream=(), needs_target_grad=True, seed=0):
    """The emulated kernels against the reference on one input (random unless z / target given);
    none_upstream: indices of the upstream gradients passed as None."""
    zz, tt, upstream = make_inputs(shape, normalization, dtype, seed)
    zz = zz if z is None else z
    tt = tt if target is None else target
    upstream = [None if i in none_upstream else u for i, u in enumerate(upstream)]
    options = (normalization, BETA.get(normalization, 1.0), normalized, reg, 1.0)
    outs, gz, gt = emulated_results(emu, zz, tt, options, upstream, needs_target_grad)
    ref_outs, ref_gz, ref_gt = reference_results(zz, tt, options, upstream, needs_target_grad)
    out_tol, grad_tol = TOL[dtype]
    what = f"{tuple(zz.shape)} {normalization}-{reg} {dtype} normalized={normalized}"
    for name, o, r in zip(("coords", "variance", "reg_losses"), outs, ref_outs):
        assert_close(o, r, out_tol, f"{name} {what}")
    assert gz.dtype == zz.dtype and gz.shape == zz.shape
    assert_close(gz, ref_gz, grad_tol, f"grad logits {what}")
    assert_close(gt, ref_gt, grad_tol, f"grad target {what}")


def classes(sanitized=()):
    """The three size classes as parameters; those named in `sanitized` also run sanitized."""
    return [pytest.param(SHAPES[c], id=c, marks=[SANITIZED] if c in sanitized else []) for c in CLASSES]


SANITIZED_MODES = {("warp", "softmax", "js"), ("block", "relu", "kl"), ("stream", "sigmoid", "var")}


def modes(sizes, pairs):
    return [pytest.param(SHAPES[s], n, r, id=f"{s}-{n}-{r}", marks=[SANITIZED] if (s, n, r) in SANITIZED_MODES else [])
            for s in sizes for n, r in pairs]


# Each size class sees every normalization and, over them, every regularizer.
MODES = [("softmax", "js"), ("relu", "kl"), ("sigmoid", "var"), ("abs", "none"), ("none", "kl")]


@pytest.mark.parametrize("shape, normalization, reg", modes(["warp"], [(n, r) for n in NORMALIZATIONS for r in REGULARIZERS]))
def test_every_normalization_and_regularizer(emu, shape, normalization, reg):
    check(emu, shape, normalization, reg)


@pytest.mark.parametrize("shape, normalization, reg", modes(["block", "stream"], MODES))
def test_size_classes(emu, shape, normalization, reg):
    check(emu, shape, normalization, reg)


@pytest.mark.parametrize("shape, normalization, reg", modes(["warp-odd-1d", "block-3d", "stream-1d", "stream-3d"], MODES[:2]))
def test_1d_and_3d_maps(emu, shape, normalization, reg):
    check(emu, shape, normalization, reg)


@pytest.mark.parametrize("shape", classes(sanitized=("block",)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(emu, shape, dtype):
    check(emu, shape, "softmax", "js", dtype)


@pytest.mark.parametrize("normalization, reg", [("softmax", "kl"), ("none", "js")])
@pytest.mark.parametrize("shape", classes(sanitized=("stream",)))
def test_pixel_grid(emu, shape, normalization, reg):
    check(emu, shape, normalization, reg, normalized=False)


# Indices into (grad_coords, grad_variance, grad_reg_losses). Without grad_reg_losses the
# divergence terms are skipped (the stream class then takes sum p G from the saved outputs).
NONE_UPSTREAM = {"coords": (0,), "variance": (1,), "reg_losses": (2,), "all": (0, 1, 2)}


@pytest.mark.parametrize("shape", classes(sanitized=("stream",)))
@pytest.mark.parametrize("none", NONE_UPSTREAM, ids=lambda k: f"none-{k}")
def test_none_upstream_gradients(emu, shape, none):
    check(emu, shape, "softmax", "js", none_upstream=NONE_UPSTREAM[none])


@pytest.mark.parametrize("shape", classes())
def test_no_target_gradient_wanted(emu, shape):
    check(emu, shape, "softmax", "kl", needs_target_grad=False)


@pytest.mark.parametrize("shape", classes(sanitized=("warp",)))
@pytest.mark.parametrize("normalization", ["relu", "abs"])
def test_uniform_fallback_of_zero_sum_maps(emu, shape, normalization):
    z, _, _ = make_inputs(shape, normalization, torch.float32)
    flat = z.view(shape[0] * shape[1], -1)
    flat[0] = -flat[0].abs() if normalization == "relu" else 0.0  # map 0 sums to 0 once rectified
    check(emu, shape, normalization, "js", z=z)


# Non-finite logits: a NaN anywhere makes its map NaN; an all -inf softmax map is 0 / 0 = NaN;
# a band of -inf is fine (p = 0 there). check() wants NaN exactly where the reference has it.
NON_FINITE = {"nan": (math.nan, slice(5, 6)), "all-minus-inf": (-math.inf, slice(None)),
              "minus-inf-band": (-math.inf, slice(0, 100))}


@pytest.mark.parametrize("shape", classes())
@pytest.mark.parametrize("kind", NON_FINITE)
def test_non_finite_maps(emu, shape, kind):
    value, where = NON_FINITE[kind]
    z, _, _ = make_inputs(shape, "softmax", torch.float32)
    z.view(shape[0] * shape[1], -1)[1, where] = value
    check(emu, shape, "softmax", "kl", z=z)


@SANITIZED
def test_misaligned_base_takes_the_scalar_path(emu):
    z, _, _ = make_inputs((1, 2, 70, 70), "softmax", torch.float32)
    buffer = torch.empty(z.numel() + 1)
    buffer[1:] = z.flatten()
    check(emu, (1, 2, 70, 70), z=buffer[1:].view(1, 2, 70, 70))


def test_kl_with_the_target_outside_the_map(emu):
    _, target, _ = make_inputs((2, 3, 64, 64), "softmax", torch.float32)
    target = target.clone()
    target[..., 0] = 1.35
    check(emu, (2, 3, 64, 64), "softmax", "kl", target=target)


# The maps of tests/test_hard_maps.py that broke these kernels once (found by review; see there).


def test_nan_in_a_relu_map_and_among_leading_minus_inf(emu):
    for normalization, shape, band in (("relu", (2, 2, 16, 16), 0), ("softmax", (1, 2, 64, 80), 1100)):
        z, target, upstream = make_inputs(shape, normalization, torch.float32)
        flat = z.view(shape[0] * shape[1], -1)
        flat[:, :band] = -math.inf
        flat[0, 1] = math.nan
        outs, gz, _ = emulated_results(emu, z, target, (normalization, 1.0, True, "js", 1.0), upstream)
        for t in [o.view(shape[0] * shape[1], -1) for o in outs] + [gz.view(shape[0] * shape[1], -1)]:
            assert t[0].isnan().any() and t[1:].isfinite().all(), normalization


@pytest.mark.parametrize("shape, peak", [((1, 1, 8192), (3,)), ((1, 1, 300, 400), (397, 2))], ids=str)
def test_variance_of_a_peak_at_the_edge_of_a_long_axis(emu, shape, peak):
    z = peaked_logits(shape, peak, width=0.8)
    _, target, upstream = make_inputs(shape, "softmax", torch.float32)
    options = ("softmax", 1.0, True, "var", 1.0)
    # Forward only. The backward of every backend rebuilds the mean from the saved float32
    # coordinate, one ulp of which is 1.2e-4 px near the edge of an 8192-px axis: gradients hold
    # ~2e-4 of their scale there (the CPU kernels too), beyond this file's tolerance.
    outs, _, _ = emulated_results(emu, z, target, options, upstream)
    ref_outs, _, _ = reference_results(z, target, options, upstream)
    for name, o, r in zip(("coords", "variance", "reg_losses"), outs, ref_outs):
        assert_close(o, r, 5e-5, f"{name} {shape}")


def test_negative_variance_of_a_large_none_map(emu):
    z = torch.randn(1, 2, 70, 70, generator=torch.Generator().manual_seed(0)) * 1e-3
    check(emu, (1, 2, 70, 70), "none", "none", z=z)
