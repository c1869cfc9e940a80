"""The CUDA kernels (csrc/cuda/dsnt_kernel.cu) run on the CPU under a host emulation of the CUDA
thread model (tests/cuda_emulation/), against the float64 reference.

No GPU has run these kernels yet; this exercises their logic where CI runs: every size class
(warp <= 512 < block <= 4096 < streamed), 1-3-D maps, the normalizations and regularizers,
half / double, misaligned bases (scalar loads), NaN confinement and a target outside the map,
forward and backward, with NaN-filled outputs and poisoned shared memory. It cannot see what
only a GPU shows (memory model, timing, fast-math); tests/test_ops_cuda.py does that on a GPU.
Needs a C++ compiler and the torch headers (as the extension build does); skips otherwise.
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


@pytest.fixture(scope="module")
def emu():
    return emulate.load_ops(os.environ.get("DSNT_EMU_LIBRARY") or emulate.build("ops-plain")[0])


def make_inputs(shape, normalization, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, n = shape[0], shape[1], len(shape) - 2
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    if normalization == "none":
        z = torch.softmax(z.flatten(2), -1).view(shape) * (0.7 + 0.6 * torch.rand(B, L, *[1] * n, generator=g,
                                                                              dtype=torch.float64))
    target = torch.rand(B, L, n, generator=g, dtype=torch.float64) * 1.6 - 0.8
    upstream = (torch.randn(B, L, n, generator=g, dtype=torch.float64),
                torch.randn(B, L, n, generator=g, dtype=torch.float64) * 0.01,
                torch.randn(B, L, generator=g, dtype=torch.float64))
    return z.to(dtype), target, upstream


def reference_results(z, target, options, upstream):
    z64 = z.detach().double().requires_grad_(True)
    t64 = target.detach().double().requires_grad_(True)
    outs = reference.dsnt_core(z64, t64, *options)
    loss = sum((o * u).sum() for o, u in zip(outs, upstream))
    gz, gt = torch.autograd.grad(loss, [z64, t64], allow_unused=True)
    return [o.detach() for o in outs], gz, (gt if gt is not None else torch.zeros_like(t64))


def emulated_results(emu, z, target, options, upstream):
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    t = target.to(acc)
    coords, variance, reg_losses, stats = emu.dsnt_fwd(z, t, *options)
    up = [u.to(acc) for u in upstream]
    gz, gt = emu.dsnt_bwd(*up, z, t, coords, variance, stats, *options, True)
    return [coords, variance, reg_losses], gz, gt


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


TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (5e-5, 2e-4), torch.float16: (5e-5, 2e-3)}
SHAPES = {
    "warp": (2, 9, 16, 16),  # 18 maps: more than one 8-map block, a partial last block
    "warp-odd-1d": (2, 3, 37),
    "block": (2, 2, 40, 41),
    "block-3d": (1, 2, 16, 16, 16),  # 4096: the largest on-chip map
    "stream": (1, 2, 70, 70),
    "stream-1d": (1, 1, 9001),  # an axis above the shared-memory table: target on the fly
    "stream-3d": (1, 1, 20, 20, 21),
}
MODES = (("softmax", 1.3, "js"), ("relu", 1.0, "kl"), ("sigmoid", 1.0, "var"), ("abs", 1.0, "js"),
         ("none", 1.0, "kl"))


def check(emu, shape, mode, dtype=torch.float32, seed=0, z=None, target=None):
    normalization, beta, reg = mode
    zz, tt, upstream = make_inputs(shape, normalization, dtype, seed)
    zz = zz if z is None else z
    tt = tt if target is None else target
    options = (normalization, beta, True, reg, 1.0)
    outs, gz, gt = emulated_results(emu, zz, tt, options, upstream)
    ref_outs, ref_gz, ref_gt = reference_results(zz, tt, options, upstream)
    out_tol, grad_tol = TOL[dtype]
    for name, o, r in zip(("coords", "variance", "reg_losses"), outs, ref_outs):
        assert_close(o, r, out_tol, f"{name} {shape} {mode} {dtype}")
    assert gz.dtype == zz.dtype and gz.shape == zz.shape
    assert_close(gz, ref_gz, grad_tol, f"grad logits {shape} {mode} {dtype}")
    if reg in ("js", "kl"):
        assert_close(gt, ref_gt, grad_tol, f"grad target {shape} {mode} {dtype}")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-{m[2]}")
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_size_classes_and_modes(emu, shape, mode):
    check(emu, shape, mode)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES["warp"], SHAPES["block"], SHAPES["stream"]], ids=["warp", "block", "stream"])
def test_other_dtypes(emu, shape, dtype):
    check(emu, shape, ("softmax", 1.0, "js"), dtype=dtype)


def test_misaligned_base_takes_the_scalar_path(emu):
    z, _, _ = make_inputs((1, 2, 70, 70), "softmax", torch.float32)
    buffer = torch.empty(z.numel() + 1)
    buffer[1:] = z.flatten()
    check(emu, (1, 2, 70, 70), ("softmax", 1.0, "js"), z=buffer[1:].view(1, 2, 70, 70))


@pytest.mark.parametrize("shape", [SHAPES["warp"], SHAPES["stream"]], ids=["warp", "stream"])
def test_nan_confined_to_its_map(emu, shape):
    z, target, upstream = make_inputs(shape, "softmax", torch.float32)
    z.view(shape[0] * shape[1], -1)[1, 3] = math.nan
    outs, gz, _ = emulated_results(emu, z, target, ("softmax", 1.0, True, "js", 1.0), upstream)
    flat = [o.view(shape[0] * shape[1], -1) for o in outs] + [gz.view(shape[0] * shape[1], -1)]
    for t in flat:
        assert t[1].isnan().all() and t[torch.arange(t.shape[0]) != 1].isfinite().all()


def test_kl_with_the_target_outside_the_map(emu):
    _, target, _ = make_inputs((2, 3, 64, 64), "softmax", torch.float32)
    target = target.clone()
    target[..., 0] = 1.35
    check(emu, (2, 3, 64, 64), ("softmax", 1.0, "kl"), target=target)


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
    check(emu, (1, 2, 70, 70), ("none", 1.0, "none"), z=z)
