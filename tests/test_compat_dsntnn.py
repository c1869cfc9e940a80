"""The dsntnn-compatible API against dsntnn 0.5.3 itself: values and gradients, every backend
that runs on CPU tensors here, 1-D/2-D/3-D maps of odd and 1-pixel sizes."""

import zlib

import dsntnn
import pytest
import torch

import dsnt_cuda

from support import (
    assert_close,
    random_heatmaps,
    random_logits,
    random_targets,
    values_and_grads,
)

# dsntnn's float64 result is the "exact" one but is itself rounded (by another formula than
# ours): in float64 its error is estimated as its float32 error times the ratio of the epsilons.
FLOAT64_BUDGET_SCALE = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
SHAPES = [(2, 3, 7), (2, 3, 5, 7), (1, 2, 4, 3, 5), (2, 2, 1, 6), (2, 1, 1, 1), (3, 2, 16, 16),
          (1, 1, 2, 1, 3)]


def heatmaps_and_means(shape, summing, seed):
    """float64 heatmaps (summing to 1, or not: dsntnn accepts both) and target means."""
    if summing:
        heatmaps = dsntnn.flat_softmax(random_logits(shape, seed=seed))
    else:
        heatmaps = random_heatmaps(shape, seed=seed)
    return heatmaps, random_targets(shape[0], shape[1], len(shape) - 2, seed=seed + 100)


def assert_matches_dsntnn(ours, theirs, inputs, dtype, what, maps_first=True):
    """Values and gradients of `ours` on `inputs` in `dtype` against dsntnn's in float64 (the
    truth), allowed twice dsntnn's own error in `dtype` (support.assert_close's rule). In float64
    dsntnn's own rounding is the budget, estimated from its float32 error."""
    low = [t.to(dtype) for t in inputs]
    got = values_and_grads(ours, *low)
    exact = values_and_grads(theirs, *inputs)
    baseline = values_and_grads(theirs, *(t.float() for t in inputs))
    scale = FLOAT64_BUDGET_SCALE if dtype == torch.float64 else 1.0
    values, grads = len(got[0]), got[1]
    for i, (a, e, b) in enumerate(zip(got[0] + grads, exact[0] + exact[1], baseline[0] + baseline[1],
                                      strict=True)):
        # the gradient of the first input (the maps) is map-shaped: the per-map floor
        map_dims = inputs[0].dim() - 2 if maps_first and i == values else 0
        # a baseline whose error is `scale` times the float32 run's
        assert_close(a, e, e + (b.double() - e) * scale, f"{what} [{i}]", map_dims=map_dims)


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
    inputs = heatmaps_and_means(shape, summing, seed=zlib.crc32(repr((case, shape)).encode()) % 1000)
    with dsnt_cuda.use_backend(cpu_backend):
        assert values_and_grads(ours, *(t.to(dtype) for t in inputs))[0][0].dtype == dtype
        assert_matches_dsntnn(ours, theirs, inputs, dtype, f"{case} {cpu_backend}")


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
        assert_matches_dsntnn(lambda z, t: recipe(dsnt_cuda, z, t), lambda z, t: recipe(dsntnn, z, t),
                              (logits, target), torch.float64, "recipe")


def assert_same(ours, theirs, what):
    assert_close(ours, theirs, None, what)


def test_elementwise_helpers_match_dsntnn():
    a, b = random_targets(3, 4, 2, seed=5), random_targets(3, 4, 2, seed=6)
    mask = (torch.rand(3, 4, generator=torch.Generator().manual_seed(8)) > 0.3).double()
    for name in ("euclidean_losses", "l1_losses", "mse_losses"):
        assert_same(getattr(dsnt_cuda, name)(a, b), getattr(dsntnn, name)(a, b), name)
    losses = dsnt_cuda.euclidean_losses(a, b)
    assert_same(dsnt_cuda.average_loss(losses), dsntnn.average_loss(losses), "average_loss")
    assert_same(dsnt_cuda.average_loss(losses, mask), dsntnn.average_loss(losses, mask), "masked average")
    assert dsnt_cuda.average_loss(losses, torch.zeros_like(mask)).item() == 0.0  # no 0/0


@pytest.mark.parametrize("length", [1, 2, 5, 64, 7.0])
def test_normalized_linspace_matches_dsntnn(length):
    assert torch.equal(dsnt_cuda.normalized_linspace(length, dtype=torch.float32),
                       dsntnn.normalized_linspace(length, dtype=torch.float32))


@pytest.mark.parametrize("size", [[5, 7], [4, 3, 6], [9], [1, 1]], ids=str)
def test_make_gauss_matches_dsntnn_with_gradients(size):
    mu = random_targets(2, 3, len(size), seed=9)
    for normalize in (True, False):
        ours, theirs = (
            lambda m, lib=lib, normalize=normalize: lib.make_gauss(m, size, 1.3, normalize=normalize)
            for lib in (dsnt_cuda, dsntnn))
        assert_matches_dsntnn(ours, theirs, (mu,), torch.float64, f"make_gauss normalize={normalize}",
                              maps_first=False)


def test_linear_expectation_and_soft_argmax_match_dsntnn():
    h = dsntnn.flat_softmax(random_logits((2, 3, 4, 6), seed=10))
    values = [torch.linspace(-3, 2, 4, dtype=torch.float64), torch.linspace(0, 1, 6, dtype=torch.float64)]
    values[1] = values[1] ** 2
    assert_same(dsnt_cuda.linear_expectation(h, values), dsntnn.linear_expectation(h, values), "expectation")
    assert_same(dsnt_cuda.soft_argmax(h), dsntnn.soft_argmax(h), "soft_argmax")


@pytest.mark.parametrize("size", [[5, 7], [4, 3, 6]], ids=str)
def test_coordinate_conversions_match_dsntnn_for_tensors(size):
    coords = random_targets(2, 3, len(size), seed=11)
    pixels = dsnt_cuda.normalized_to_pixel_coordinates(coords, size)
    assert_same(pixels, dsntnn.normalized_to_pixel_coordinates(coords, size), "to pixels")
    assert_same(dsnt_cuda.pixel_to_normalized_coordinates(pixels, size), coords, "round trip")
