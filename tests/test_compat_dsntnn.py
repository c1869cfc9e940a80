"""The dsntnn-compatible API against dsntnn 0.5.3 itself: values and gradients, every backend
that runs on CPU tensors here, 1-D/2-D/3-D maps of odd and 1-pixel sizes."""

import zlib

import dsntnn
import pytest
import torch
from conftest import random_heatmaps, random_logits, random_targets

import dsnt_cuda

SHAPES = [(2, 3, 7), (2, 3, 5, 7), (1, 2, 4, 3, 5), (2, 2, 1, 6), (2, 1, 1, 1), (3, 2, 16, 16), (1, 1, 2, 1, 3)]
# (rtol, atol) against dsntnn run in float64.
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}


def make_inputs(shape, dtype, summing, seed):
    if summing:
        heatmaps = dsntnn.flat_softmax(random_logits(shape, seed=seed))
    else:
        heatmaps = random_heatmaps(shape, seed=seed)
    mu = random_targets(shape[0], shape[1], len(shape) - 2, seed=seed + 100)
    return heatmaps.to(dtype), mu.to(dtype)


def grads_of(fn, *inputs):
    """Values of fn(*inputs) and the gradients of a random weighting of them."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_close(actual, expected, dtype):
    rtol, atol = TOLERANCE[dtype]
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


CASES = {
    "dsnt": (lambda h, mu: dsnt_cuda.dsnt(h), lambda h, mu: dsntnn.dsnt(h)),
    "dsnt_pixels": (
        lambda h, mu: dsnt_cuda.dsnt(h, normalized_coordinates=False),
        lambda h, mu: dsntnn.dsnt(h, normalized_coordinates=False),
    ),
    "js": (lambda h, mu: dsnt_cuda.js_reg_losses(h, mu, 1.0), lambda h, mu: dsntnn.js_reg_losses(h, mu, 1.0)),
    "kl": (lambda h, mu: dsnt_cuda.kl_reg_losses(h, mu, 1.5), lambda h, mu: dsntnn.kl_reg_losses(h, mu, 1.5)),
    "var": (
        lambda h, mu: dsnt_cuda.variance_reg_losses(h, 0.8),
        lambda h, mu: dsntnn.variance_reg_losses(h, 0.8),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("summing", [True, False], ids=["sums_to_1", "unnormalized"])
def test_values_and_gradients_match_dsntnn(cpu_backend, case, shape, dtype, summing):
    ours, theirs = CASES[case]
    heatmaps, mu = make_inputs(shape, dtype, summing, seed=zlib.crc32(repr((case, shape)).encode()) % 1000)
    with dsnt_cuda.use_backend(cpu_backend):
        value, grads = grads_of(ours, heatmaps, mu)
    expected, expected_grads = grads_of(theirs, heatmaps.double(), mu.double())
    assert value.dtype == dtype
    assert_close(value, expected, dtype)
    assert_close(grads[0], expected_grads[0], dtype)  # d/d heatmaps
    if case in ("js", "kl"):  # d/d target means
        assert_close(grads[1], expected_grads[1], dtype)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 4, 3, 5), (2, 2, 9)], ids=str)
def test_standard_recipe_matches_dsntnn(cpu_backend, shape):
    """flat_softmax -> dsnt -> euclidean + js -> average_loss, the documented training loss."""
    logits = random_logits(shape, seed=3)
    target = random_targets(shape[0], shape[1], len(shape) - 2, seed=4)

    def recipe(module, z, t):
        heatmaps = module.flat_softmax(z)
        coords = module.dsnt(heatmaps)
        losses = module.euclidean_losses(coords, t) + module.js_reg_losses(heatmaps, t, sigma_t=1.0)
        return module.average_loss(losses)

    with dsnt_cuda.use_backend(cpu_backend):
        value, grads = grads_of(lambda z, t: recipe(dsnt_cuda, z, t), logits, target)
    expected, expected_grads = grads_of(lambda z, t: recipe(dsntnn, z, t), logits, target)
    for a, b in zip([value, *grads], [expected, *expected_grads]):
        assert_close(a, b, torch.float64)


def test_elementwise_helpers_match_dsntnn():
    a, b = random_targets(3, 4, 2, seed=5), random_targets(3, 4, 2, seed=6)
    mask = (torch.rand(3, 4, generator=torch.Generator().manual_seed(8)) > 0.3).double()
    for name in ("euclidean_losses", "l1_losses", "mse_losses"):
        assert_close(getattr(dsnt_cuda, name)(a, b), getattr(dsntnn, name)(a, b), torch.float64)
    losses = dsnt_cuda.euclidean_losses(a, b)
    assert_close(dsnt_cuda.average_loss(losses), dsntnn.average_loss(losses), torch.float64)
    assert_close(dsnt_cuda.average_loss(losses, mask), dsntnn.average_loss(losses, mask), torch.float64)
    assert dsnt_cuda.average_loss(losses, torch.zeros_like(mask)).item() == 0.0  # no 0/0


@pytest.mark.parametrize("length", [1, 2, 5, 64, 7.0])
def test_normalized_linspace_matches_dsntnn(length):
    assert torch.equal(dsnt_cuda.normalized_linspace(length, dtype=torch.float32),
                       dsntnn.normalized_linspace(length, dtype=torch.float32))


@pytest.mark.parametrize("size", [[5, 7], [4, 3, 6], [9], [1, 1]], ids=str)
def test_make_gauss_matches_dsntnn_with_gradients(size):
    mu = random_targets(2, 3, len(size), seed=9)
    for normalize in (True, False):
        value, grads = grads_of(lambda m: dsnt_cuda.make_gauss(m, size, 1.3, normalize=normalize), mu)
        expected, expected_grads = grads_of(lambda m: dsntnn.make_gauss(m, size, 1.3, normalize=normalize), mu)
        assert_close(value, expected, torch.float64)
        assert_close(grads[0], expected_grads[0], torch.float64)


def test_linear_expectation_and_soft_argmax_match_dsntnn():
    h = dsntnn.flat_softmax(random_logits((2, 3, 4, 6), seed=10))
    values = [torch.linspace(-3, 2, 4, dtype=torch.float64), torch.linspace(0, 1, 6, dtype=torch.float64) ** 2]
    assert_close(dsnt_cuda.linear_expectation(h, values), dsntnn.linear_expectation(h, values), torch.float64)
    assert_close(dsnt_cuda.soft_argmax(h), dsntnn.soft_argmax(h), torch.float64)


@pytest.mark.parametrize("size", [[5, 7], [4, 3, 6]], ids=str)
def test_coordinate_conversions_match_dsntnn_for_tensors(size):
    coords = random_targets(2, 3, len(size), seed=11)
    pixels = dsnt_cuda.normalized_to_pixel_coordinates(coords, size)
    assert_close(pixels, dsntnn.normalized_to_pixel_coordinates(coords, size), torch.float64)
    assert_close(dsnt_cuda.pixel_to_normalized_coordinates(pixels, size), coords, torch.float64)
