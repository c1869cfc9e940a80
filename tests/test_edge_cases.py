"""Non-finite input and the maps that broke a kernel once, on every backend this process runs
(docs/ops.md, "Non-finite input"), through the package's one dispatch point.

- a NaN in one map makes that map's outputs NaN and no other map's, for every normalization,
  except what does not depend on the map (reg_losses of reg "none", grad_target without a
  regularizer gradient); the masked loss becomes NaN, as dsntnn's average_loss would;
- -inf logits are fine in part of a softmax map, an all -inf map is NaN (0/0, as torch's
  softmax), a NaN among leading -inf logits of a map too large for on-chip memory stays NaN (a
  streamed softmax once zeroed it);
- a rectified map that sums to 0 is uniform with a zero gradient;
- a peaked map near the edge of a long axis (a one-pass E[u^2] - E[u]^2 lost every digit there);
- a large "none" map with negative entries (its variance is negative; a clamp made it 0);
- huge logits with beta != 1 (an fma in one place and not another put the largest term far from
  1, or at inf for logits of 1e30);
- an axis longer than 46340 pixels (int32 S * S wrapped in the Gaussian target);
- a KL target outside the map (float32 Gaussian factors went subnormal);
- empty batches and 1-pixel axes.

Map sizes straddle the GPU kernels' size classes (warp / block / streamed). Under
TRITON_INTERPRET=1 (make test-triton) this file runs the triton backend on CPU tensors.
"""

import math

import pytest
import torch

from dsnt_cuda import reference
from dsnt_cuda.backends import dsnt_forward

from support import peaked_logits, random_targets, values_and_grads

NORMALIZATIONS = reference.NORMALIZATIONS


def forward(backend, z, target=None, normalization="softmax", reg="none", beta=1.0, mask=None,
            coord_loss="none"):
    """(coords, variance, reg_losses, coord_losses, loss) of the op on `backend`; `beta` a float or
    a per-map tensor."""
    beta, beta_map = (1.0, beta) if isinstance(beta, torch.Tensor) else (beta, None)
    return dsnt_forward(z, target, mask, beta_map, None, normalization, beta, True, reg, 1.0, coord_loss, 1.0,
                        backend)


def outputs_and_logits_grad(backend, device, z, target, normalization="softmax", reg="js", beta=1.0):
    """Outputs (float64, CPU) and the gradient w.r.t. the logits of a random weighting of them."""
    (outputs, (grad, _)) = values_and_grads(
        lambda zz, t: forward(backend, zz, t, normalization, reg, beta)[:3], z.to(device), target.to(device))
    return [o.cpu().double() for o in outputs], grad.cpu().double()


def reference_outputs(z, target, normalization="softmax", reg="js", beta=1.0):
    return reference.dsnt_core(z.double(), target.double(), normalization, beta, True, reg, 1.0)


def others(shape, bad):
    """A (B, L) mask that is True everywhere but at the map `bad`."""
    keep = torch.ones(shape, dtype=torch.bool)
    keep[bad] = False
    return keep


# Every normalization on a small map; on maps of the larger size classes the two whose kernels
# once lost the NaN (a streamed softmax, a scalar relu).
NAN_CASES = [(n, (2, 2, 16, 16)) for n in NORMALIZATIONS] + [
    (n, shape) for n in ("softmax", "relu") for shape in ((2, 2, 80, 80), (2, 2, 5000))]


@pytest.mark.parametrize("normalization, shape", NAN_CASES, ids=[f"{n}-{s}" for n, s in NAN_CASES])
def test_nan_in_one_map_stays_in_that_map(backend_device, normalization, shape):
    backend, device = backend_device
    z = torch.rand(shape, generator=torch.Generator().manual_seed(0)) + 0.1
    if normalization != "none":
        z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    z.view(2, 2, -1)[1, 0, 7] = math.nan
    keep = others((2, 2), (1, 0))
    for reg in ("none", "js"):
        outputs, grad = outputs_and_logits_grad(backend, device, z, random_targets(2, 2, len(shape) - 2),
                                                normalization, reg)
        for name, o in zip(("coords", "variance", "reg_losses"), outputs, strict=True):
            if reg == "none" and name == "reg_losses":
                assert (o == 0).all(), f"reg none must give zeros ({backend})"
                continue
            assert o[1, 0].isnan().all(), f"{name} of the NaN map is not NaN ({backend}, {reg})"
            assert o[keep].isfinite().all(), f"{name}: NaN leaked to other maps ({backend}, {reg})"
        assert grad[1, 0].isnan().any() and grad[keep].isfinite().all(), f"gradient ({backend}, {reg})"


def test_nan_map_leaves_what_does_not_depend_on_it(backend_device):
    """reg_losses of reg none stay 0; without a regularizer gradient, grad_target stays 0 (the
    target reaches the map only through the regularizer); the masked loss is NaN, and so are the
    NaN map's coord_losses only."""
    backend, device = backend_device
    z = torch.randn(1, 2, 6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z[0, 0, 2, 3] = math.nan
    z, target = z.to(device).requires_grad_(True), random_targets(1, 2, 2, device=device).requires_grad_(True)
    coords = forward(backend, z, target, reg="js")[0]
    (grad_target,) = torch.autograd.grad(coords.sum(), target, allow_unused=True)
    z = z.detach()
    assert grad_target is None or (grad_target.cpu() == 0).all(), f"{backend}: {grad_target}"
    assert (forward(backend, z, target.detach())[2].cpu() == 0).all()
    _, _, _, coord_losses, loss = forward(backend, z, target.detach(), reg="js", coord_loss="euclidean",
                                          mask=torch.ones(1, 2, dtype=torch.float64, device=device))
    assert loss.isnan() and coord_losses[0, 0].isnan() and coord_losses[0, 1].isfinite()


@pytest.mark.parametrize("shape", [(1, 2, 64, 80), (1, 2, 5000)], ids=str)
def test_nan_among_leading_minus_inf_in_large_softmax_map(backend_device, shape):
    backend, device = backend_device
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    flat = z.view(1, 2, -1)
    flat[0, 0, :1100] = -math.inf  # every thread's first elements are -inf ...
    flat[0, 0, 1] = math.nan  # ... and one of them is NaN
    flat[0, 1, :1100] = -math.inf  # the same band without the NaN: a finite map
    outputs, grad = outputs_and_logits_grad(backend, device, z, random_targets(1, 2, len(shape) - 2))
    for name, o in zip(("coords", "variance", "reg_losses"), outputs, strict=True):
        assert o[0, 0].isnan().all(), f"{name} of the NaN map is not NaN ({backend})"
        assert o[0, 1].isfinite().all(), f"{name} of the -inf map is not finite ({backend})"
    assert grad[0, 0].isnan().all() and grad[0, 1].isfinite().all()


def test_all_minus_inf_softmax_map_is_nan(backend_device):
    backend, device = backend_device
    z = torch.randn(2, 2, 5, 6, generator=torch.Generator().manual_seed(0))
    z[0, 1] = -math.inf
    coords = forward(backend, z.to(device))[0].cpu()
    assert coords[0, 1].isnan().all() and coords[others((2, 2), (0, 1))].isfinite().all()


@pytest.mark.parametrize("normalization", ["relu", "abs"])
def test_rectified_map_summing_to_zero_is_uniform_with_zero_gradient(backend_device, normalization):
    backend, device = backend_device
    z = torch.randn(2, 2, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z[1, 1] = -z[1, 1].abs() - 0.1 if normalization == "relu" else 0.0  # relu / abs sum to 0 there
    target = random_targets(2, 2, 2)
    outputs, grad = outputs_and_logits_grad(backend, device, z, target, normalization, "js")
    uniform = torch.zeros(1, 1, 4, 5, dtype=torch.float64) + 1 / 20
    expected = reference.coordinates(uniform)[0, 0], reference.variance(uniform)[0, 0]
    torch.testing.assert_close(outputs[0][1, 1], expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(outputs[1][1, 1], expected[1], rtol=0, atol=1e-12)
    assert (grad[1, 1] == 0).all() and grad.isfinite().all()


@pytest.mark.parametrize(
    "shape, peak", [((1, 1, 8192), (3,)), ((1, 1, 10000), (9994,)), ((1, 1, 300, 400), (397, 2))],
    ids=str,
)
def test_variance_of_a_peak_at_the_edge_of_a_long_axis(backend_device, shape, peak):
    backend, device = backend_device
    z = peaked_logits(shape, peak, width=0.8)
    target = random_targets(1, 1, len(shape) - 2)
    outputs, _ = outputs_and_logits_grad(backend, device, z, target, "softmax", "var")
    expected = reference_outputs(z, target, "softmax", "var")
    # The bump's variance is ~0.64 px^2; a cancelling formula gives 0 or ~1 here.
    for name, o, e in zip(("variance", "reg_losses"), outputs[1:], expected[1:], strict=True):
        assert torch.allclose(o, e, rtol=1e-3, atol=1e-5), f"{backend} {name}: {o.flatten()} vs {e.flatten()}"


@pytest.mark.parametrize("shape", [(1, 2, 70, 70), (1, 2, 6000)], ids=str)
def test_negative_variance_of_a_large_none_map(backend_device, shape):
    backend, device = backend_device
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    target = random_targets(1, 2, len(shape) - 2)
    outputs, _ = outputs_and_logits_grad(backend, device, z, target, "none", "none")
    expected = reference_outputs(z, target, "none", "none")
    assert (expected[1] < 0).any(), "the test needs a map whose variance is negative"
    assert torch.allclose(outputs[1], expected[1], rtol=1e-3, atol=1e-6), (
        f"{backend}: variance {outputs[1].flatten().tolist()} vs {expected[1].flatten().tolist()}")


@pytest.mark.parametrize("shape", [(1, 2, 3, 3), (1, 2, 80, 80)], ids=str)
@pytest.mark.parametrize("big", [1e7, 1e30])
@pytest.mark.parametrize("per_map_beta", [False, True], ids=["float_beta", "tensor_beta"])
def test_huge_logits_with_beta_not_one(backend_device, shape, big, per_map_beta):
    backend, device = backend_device
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    z[0, 0].view(-1)[0] = big  # one dominant pixel: p is one-hot there
    z[0, 1] = z[0, 1] * 1e-3 + big  # a whole map near `big`: beta z loses the small differences
    target = random_targets(1, 2, 2, dtype=torch.float32)
    beta = torch.tensor([1.3, 0.7], device=device) if per_map_beta else 1.3
    outputs, grad = outputs_and_logits_grad(backend, device, z, target, "softmax", "js", beta=beta)
    expected = reference_outputs(z, target, "softmax", "js", beta=beta.cpu() if per_map_beta else beta)
    for name, o, e in zip(("coords", "variance", "reg_losses"), outputs, expected, strict=True):
        assert o.isfinite().all(), f"{name} not finite ({backend}, {big})"
        assert torch.allclose(o, e, rtol=1e-4, atol=1e-5), f"{name} ({backend}, {big}): {o} vs {e}"
    assert grad.isfinite().all()


@pytest.mark.parametrize("reg", ["js", "kl"])
def test_axis_longer_than_46340(backend_device, reg):
    backend, device = backend_device
    z = torch.randn(1, 1, 50000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.tensor([[[0.1]]], dtype=torch.float64)
    outputs, grad = outputs_and_logits_grad(backend, device, z, target, "softmax", reg)
    expected = reference_outputs(z, target, "softmax", reg)
    assert torch.allclose(outputs[2], expected[2], rtol=1e-9), f"{backend}: {outputs[2]} vs {expected[2]}"
    assert grad.isfinite().all()


@pytest.mark.parametrize("target_x", [1.3, 1.35, 1.4])
def test_kl_with_the_target_outside_the_map(backend_device, target_x):
    """~10 px beyond the edge the target's per-axis factors go subnormal in float32 unless they
    are scaled; then log(q + eps) with q >> eps lost its digits (KL gradients off by %)."""
    backend, device = backend_device
    z = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([target_x, 0.1]).expand(2, 3, 2).contiguous()

    def kl_on(name):
        def kl(zz, tt):
            coords, _, reg_losses, _, _ = forward(name, zz, tt, reg="kl")
            return coords, reg_losses
        return kl

    got = values_and_grads(kl_on(backend), z.to(device), target.to(device))
    exact = values_and_grads(kl_on("reference"), z.double(), target.double())
    pairs = (("reg_losses", got[0][1], exact[0][1]), ("grad logits", got[1][0], exact[1][0]),
             ("grad target", got[1][1], exact[1][1]))
    for name, value, want in pairs:
        err = ((value.cpu().double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e} ({backend}, target x {target_x})"


@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (2, 0, 5, 5), (0, 0, 4)], ids=str)
def test_empty_batch_or_keypoints(backend_device, shape):
    backend, device = backend_device
    z = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.zeros(*shape[:2], len(shape) - 2, dtype=torch.float64, device=device)
    coords, variance, reg_losses, coord_losses, loss = forward(backend, z, target, reg="js", coord_loss="l1")
    assert coords.shape == variance.shape == target.shape
    assert reg_losses.shape == coord_losses.shape == shape[:2]
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss + coords.sum(), z)
    assert grad.shape == shape


@pytest.mark.parametrize("shape", [(2, 3, 1), (2, 3, 1, 1), (1, 2, 1, 5), (1, 2, 3, 1, 1)], ids=str)
def test_one_pixel_axes(backend_device, shape):
    backend, device = backend_device
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = random_targets(*shape[:2], len(shape) - 2)
    outputs, grad = outputs_and_logits_grad(backend, device, z, target, "softmax", "js")
    for o, e in zip(outputs, reference_outputs(z, target), strict=True):
        torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-12)
    assert grad.isfinite().all()
