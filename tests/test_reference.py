"""The pure-PyTorch oracle itself: gradcheck of every differentiable input, the closed forms of
docs/math.md, and the documented rules for degenerate maps."""

import math

import pytest
import torch

from dsnt_cuda import reference

from support import random_heatmaps, random_logits, random_targets

NORMALIZATIONS = reference.NORMALIZATIONS
REGULARIZERS = reference.REGULARIZERS


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("reg", REGULARIZERS)
@pytest.mark.parametrize("shape", [(1, 2, 5), (2, 1, 3, 4), (1, 1, 2, 3, 2)], ids=str)
def test_gradcheck_logits_and_target(normalization, reg, shape):
    if normalization == "none":
        logits = random_heatmaps(shape, seed=1)
    else:  # keep abs/relu away from their kinks, where finite differences are meaningless
        logits = random_logits(shape, seed=1)
        logits = logits + 0.2 * torch.sign(logits)
    logits.requires_grad_(True)
    target = random_targets(shape[0], shape[1], len(shape) - 2, seed=2).requires_grad_(True)

    def fn(z, t):
        return reference.dsnt_core(z, t, normalization, 1.3, True, reg, 1.2)

    assert torch.autograd.gradcheck(fn, (logits, target), eps=1e-6, atol=1e-7)


def test_gradcheck_reference_helpers():
    mu = random_targets(2, 3, 2, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: reference.gaussian_heatmaps(m, [4, 5], 1.1), (mu,))
    a = random_targets(2, 3, 2, seed=4).requires_grad_(True)
    for loss in reference.COORD_LOSSES:
        def losses(x, y, loss=loss):
            return reference.coordinate_losses(x, y, loss)

        assert torch.autograd.gradcheck(losses, (a, mu))


def test_softmax_with_beta_is_softmax_of_scaled_logits():
    z = random_logits((2, 3, 4, 5), seed=5)
    p = reference.normalize(z, "softmax", beta=2.5)
    torch.testing.assert_close(p, torch.softmax(2.5 * z.flatten(2), -1).view_as(z))


@pytest.mark.parametrize("normalization", ["abs", "relu", "sigmoid"])
def test_rectified_maps_sum_to_one(normalization):
    p = reference.normalize(random_logits((2, 3, 4, 5), seed=6), normalization)
    torch.testing.assert_close(p.sum(dim=(2, 3)), torch.ones(2, 3, dtype=torch.float64))


def test_variance_of_a_two_pixel_map_in_pixels():
    h = torch.zeros(1, 1, 3, 8, dtype=torch.float64)
    h[0, 0, 1, 2] = h[0, 0, 1, 6] = 0.5  # x in {2, 6}: variance 4 px², y fixed: 0
    var = reference.variance(h)
    torch.testing.assert_close(var, torch.tensor([[[4.0, 0.0]]], dtype=torch.float64))


def test_js_is_bounded_by_ln2_and_zero_at_target():
    target = torch.tensor([[[0.3, -0.2]]], dtype=torch.float64)
    q = reference.gaussian_heatmaps(target, [16, 16], 1.0)
    assert reference.js_divergence(q, q, 2).abs().item() < 1e-12
    far = torch.zeros_like(q)
    far[..., 0, 0] = 1.0
    assert reference.js_divergence(far, q, 2).item() <= math.log(2) + 1e-12


def test_float16_input_is_computed_in_float32():
    z = random_logits((1, 2, 4, 4), seed=10).half()
    coords, var, reg = reference.dsnt_core(z, random_targets(1, 2, 2).half(), "softmax", 1.0, True, "kl", 1.0)
    assert coords.dtype == var.dtype == reg.dtype == torch.float32
    assert torch.isfinite(reg).all()
