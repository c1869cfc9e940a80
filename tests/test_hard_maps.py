"""Maps that broke a kernel once, run on every fused backend this process can reach.

- a NaN logit in a relu map (a scalar `z > 0 ? z : 0` turned it into 0);
- a NaN logit among -inf logits of a map too large for on-chip memory (the streamed softmax
  zeroed every element before its first finite logit, NaN included);
- a peaked map near the edge of a long axis (a one-pass E[u^2] - E[u]^2 variance lost every
  digit there);
- a large "none" map with negative entries (its variance is negative; a clamp made it 0);
- huge logits with beta != 1 (the exponent as beta z - shift, fused into an fma in one place and
  not another, put the largest term far from 1, or at inf for logits of 1e30);
- an axis longer than 46340 pixels (int32 S * S wrapped in the Gaussian target).

Backends: "cpu" (the compiled CPU kernels), "cuda" and "triton" on a GPU; under
TRITON_INTERPRET=1 (make test-triton) only "triton", on CPU tensors. Unreachable ones skip.
Each runs its op pair (docs/ops.md) through the autograd of dsnt_cuda.ops.
"""

import importlib.util
import math
import os

import pytest
import torch

from dsnt_cuda import _extension, reference
from map_inputs import peaked_logits

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GPU = torch.cuda.is_available()


def backend_device(backend):
    """The device `backend` runs on here, or pytest.skip with the reason."""
    if INTERPRETER:
        if backend != "triton":
            pytest.skip("the interpreter run covers the triton backend only")
        return "cpu"
    if backend == "cpu":
        if not _extension.has_kernel("dsnt_fwd", "CPU"):
            pytest.skip("the CPU kernels are not built")
        return "cpu"
    if not HAS_GPU:
        pytest.skip(f"the {backend} backend needs a CUDA GPU")
    if backend == "cuda" and not _extension.has_kernel("dsnt_fwd", "CUDA"):
        pytest.skip("the extension was built without CUDA")
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    return "cuda"


BACKENDS = ("cpu", "cuda", "triton")


def forward_op(backend):
    """The backend's forward op (autograd registered by dsnt_cuda.ops)."""
    if backend == "triton":
        import dsnt_cuda.triton  # noqa: F401  (registers the Triton ops)

        return torch.ops.dsnt_cuda.dsnt_fwd_triton
    return torch.ops.dsnt_cuda.dsnt_fwd


def core(backend, z, target, normalization, reg, beta=1.0):
    """(coords, variance, reg_losses) of the backend's op (docs/ops.md), differentiable."""
    outs = forward_op(backend)(z, target, None, None, None, normalization, beta, True, reg, 1.0, "none", 0.0)
    return outs[:3]


def run(backend, device, z, target, normalization, reg, upstream_seed=0, beta=1.0):
    """(coords, variance, reg_losses) and dLoss/dz of a fixed random upstream gradient."""
    z = z.to(device).requires_grad_(True)
    target = target.to(device)
    outs = core(backend, z, target, normalization, reg, beta)
    g = torch.Generator().manual_seed(upstream_seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in outs)
    (grad,) = torch.autograd.grad(loss, z)
    return [o.detach().cpu().double() for o in outs], grad.cpu().double()


def random_target(B, L, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, L, n, generator=g) * 1.6 - 0.8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 2, 16, 16), (2, 2, 80, 80), (2, 2, 5000)], ids=str)
def test_nan_in_relu_map(backend, shape):
    device = backend_device(backend)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    z.view(2, 2, -1)[1, 0, 7] = math.nan
    for reg in ("none", "js"):
        outs, grad = run(backend, device, z, random_target(2, 2, len(shape) - 2), "relu", reg)
        for name, o in zip(("coords", "variance", "reg_losses"), outs):
            if reg == "none" and name == "reg_losses":
                continue
            assert o[1, 0].isnan().all(), f"{name} of the NaN map is not NaN ({backend}, {reg})"
            others = torch.ones(2, 2, dtype=torch.bool)
            others[1, 0] = False
            assert o[others].isfinite().all(), f"{name}: NaN leaked to other maps ({backend}, {reg})"
        assert grad[1, 0].isnan().any() and grad[0].isfinite().all() and grad[1, 1].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 2, 64, 80), (1, 2, 5000)], ids=str)
def test_nan_among_leading_minus_inf_in_large_softmax_map(backend, shape):
    device = backend_device(backend)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    flat = z.view(1, 2, -1)
    flat[0, 0, :1100] = -math.inf  # every thread's first elements are -inf ...
    flat[0, 0, 1] = math.nan  # ... and one of them is NaN
    flat[0, 1, :1100] = -math.inf  # the same band without the NaN: a finite map
    outs, grad = run(backend, device, z, random_target(1, 2, len(shape) - 2), "softmax", "js")
    for name, o in zip(("coords", "variance", "reg_losses"), outs):
        assert o[0, 0].isnan().all(), f"{name} of the NaN map is not NaN ({backend})"
        assert o[0, 1].isfinite().all(), f"{name} of the -inf map is not finite ({backend})"
    assert grad[0, 0].isnan().all() and grad[0, 1].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape, peak", [((1, 1, 8192), (3,)), ((1, 1, 10000), (9994,)), ((1, 1, 300, 400), (397, 2))],
    ids=str,
)
def test_variance_of_a_peak_at_the_edge_of_a_long_axis(backend, shape, peak):
    device = backend_device(backend)
    z = peaked_logits(shape, peak, width=0.8)
    target = random_target(1, 1, len(shape) - 2)
    outs, _ = run(backend, device, z, target, "softmax", "var")
    expected = reference.dsnt_core(z.double(), target.double(), "softmax", 1.0, True, "var", 1.0)
    variance, reference_variance = outs[1], expected[1]
    # The bump's variance is ~0.64 px^2; a cancelling formula gives 0 or ~1 here.
    assert torch.allclose(variance, reference_variance, rtol=1e-3, atol=1e-5), (
        f"{backend}: variance {variance.flatten().tolist()} vs {reference_variance.flatten().tolist()}"
    )
    assert torch.allclose(outs[2], expected[2], rtol=1e-3, atol=1e-5), "var regularizer"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 2, 70, 70), (1, 2, 6000)], ids=str)
def test_negative_variance_of_a_large_none_map(backend, shape):
    device = backend_device(backend)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    target = random_target(1, 2, len(shape) - 2)
    outs, _ = run(backend, device, z, target, "none", "none")
    expected = reference.dsnt_core(z.double(), target.double(), "none", 1.0, True, "none", 1.0)
    assert (expected[1] < 0).any(), "the test needs a map whose variance is negative"
    assert torch.allclose(outs[1], expected[1], rtol=1e-3, atol=1e-6), (
        f"{backend}: variance {outs[1].flatten().tolist()} vs {expected[1].flatten().tolist()}"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 2, 3, 3), (1, 2, 80, 80)], ids=str)
@pytest.mark.parametrize("big", [1e7, 1e30])
def test_huge_logits_with_beta_not_one(backend, shape, big):
    device = backend_device(backend)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    z[0, 0].view(-1)[0] = big  # one dominant pixel: p is one-hot there
    z[0, 1] = z[0, 1] * 1e-3 + big  # a whole map near `big`: beta z loses the small differences
    target = random_target(1, 2, 2)
    outs, grad = run(backend, device, z, target, "softmax", "js", beta=1.3)
    expected = reference.dsnt_core(z.double(), target.double(), "softmax", 1.3, True, "js", 1.0)
    for name, o, e in zip(("coords", "variance", "reg_losses"), outs, expected):
        assert o.isfinite().all(), f"{name} not finite ({backend}, {big})"
        assert torch.allclose(o, e, rtol=1e-4, atol=1e-5), f"{name} ({backend}, {big}): {o} vs {e}"
    assert grad.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", ["js", "kl"])
def test_axis_longer_than_46340(backend, reg):
    device = backend_device(backend)
    z = torch.randn(1, 1, 50000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.tensor([[[0.1]]], dtype=torch.float64)
    outs, grad = run(backend, device, z, target, "softmax", reg)
    expected = reference.dsnt_core(z, target, "softmax", 1.0, True, reg, 1.0)
    assert torch.allclose(outs[2], expected[2], rtol=1e-9), f"{backend}: {outs[2]} vs {expected[2]}"
    assert grad.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target_x", [1.3, 1.35, 1.4])
def test_kl_with_the_target_outside_the_map(backend, target_x):
    """~10 px beyond the edge the target's per-axis factors go subnormal in float32 unless they
    are scaled; then log(q + eps) with q >> eps lost its digits (KL gradients off by %)."""
    device = backend_device(backend)
    z = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([target_x, 0.1]).expand(2, 3, 2).contiguous()
    zz = z.to(device).requires_grad_(True)
    tt = target.to(device).requires_grad_(True)
    coords, _, reg_losses = core(backend, zz, tt, "softmax", "kl")
    g = torch.Generator().manual_seed(1)
    up_c, up_r = torch.randn(2, 3, 2, generator=g), torch.randn(2, 3, generator=g)
    gz, gt = torch.autograd.grad((coords * up_c.to(device)).sum() + (reg_losses * up_r.to(device)).sum(), [zz, tt])
    z64, t64 = z.double().requires_grad_(True), target.double().requires_grad_(True)
    c64, _, r64 = reference.dsnt_core(z64, t64, "softmax", 1.0, True, "kl", 1.0)
    gz64, gt64 = torch.autograd.grad((c64 * up_c.double()).sum() + (r64 * up_r.double()).sum(), [z64, t64])
    for name, got, want in (("reg_losses", reg_losses, r64), ("grad logits", gz, gz64), ("grad target", gt, gt64)):
        err = ((got.detach().cpu().double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e} ({backend}, target x {target_x})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_map_leaves_what_does_not_depend_on_it(backend):
    """OPS.md: a NaN map's outputs are NaN, except reg_losses of reg none (0) and, without a
    regularizer gradient, grad_target (0)."""
    device = backend_device(backend)
    z = torch.randn(1, 2, 6, 7, generator=torch.Generator().manual_seed(0))
    z[0, 0, 2, 3] = math.nan
    target = random_target(1, 2, 2).to(device)
    z = z.to(device)
    fwd = forward_op(backend)
    bwd = torch.ops.dsnt_cuda.dsnt_bwd_triton if backend == "triton" else torch.ops.dsnt_cuda.dsnt_bwd
    options = ("softmax", 1.0, True, "none", 1.0, "none", 0.0)
    reg_losses = fwd(z, target, None, None, None, *options)[2]
    assert (reg_losses.cpu() == 0).all(), f"{backend}: {reg_losses}"
    options = ("softmax", 1.0, True, "js", 1.0, "none", 0.0)
    coords, variance, _, _, _, stats = fwd(z, target, None, None, None, *options)
    grad_coords = torch.ones_like(coords)
    _, grad_target, _ = bwd(grad_coords, None, None, None, None, z, target, None, None, None, coords, variance,
                            stats, *options, True, False)
    assert (grad_target.cpu() == 0).all(), f"{backend}: {grad_target}"
