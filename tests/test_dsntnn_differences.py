"""dsntnn's documented examples, and each intentional difference from dsntnn (README, 'Differences
from dsntnn'): the defects that dsnt_cuda fixes instead of copying."""

import dsntnn
import numpy as np
import pytest
import torch

import dsnt_cuda

from support import random_logits, random_targets


def test_normalized_linspace_docstring_example():
    assert dsnt_cuda.normalized_linspace(4).tolist() == [-0.75, -0.25, 0.25, 0.75]


def test_single_hot_pixel_gives_its_centre(cpu_backend):
    heatmaps = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    heatmaps[0, 0, 2, 4] = 1.0  # row (y) 2, column (x) 4
    with dsnt_cuda.use_backend(cpu_backend):
        normalized = dsnt_cuda.dsnt(heatmaps)
        pixels = dsnt_cuda.dsnt(heatmaps, normalized_coordinates=False)
    assert normalized.tolist() == [[[0.8, 0.0]]]
    assert pixels.tolist() == [[[4.0, 2.0]]]


def test_readme_training_example_runs_and_learns(cpu_backend):
    """dsntnn's README recipe: conv -> flat_softmax -> dsnt, euclidean + JS, average_loss."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, kernel_size=3, padding=1)
    image = torch.randn(4, 3, 16, 16)
    target = torch.tensor([[[0.5, -0.5], [-0.25, 0.25]]]).repeat(4, 1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    with dsnt_cuda.use_backend(cpu_backend):
        for _ in range(60):
            heatmaps = dsnt_cuda.flat_softmax(model(image))
            coords = dsnt_cuda.dsnt(heatmaps)
            per_point = dsnt_cuda.euclidean_losses(coords, target)
            loss = dsnt_cuda.average_loss(per_point + dsnt_cuda.js_reg_losses(heatmaps, target, sigma_t=1.0))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_sharpen_heatmaps_docstring_example_approximates_the_mode():
    logits = torch.full((1, 1, 9, 9), -4.0, dtype=torch.float64)
    logits[0, 0, 6, 2] = 2.0
    logits[0, 0, 1, 7] = 1.0  # a second, lower peak pulls the plain expectation away from the mode
    heatmaps = dsnt_cuda.flat_softmax(logits)
    mode = dsnt_cuda.dsnt(heatmaps, normalized_coordinates=False)
    sharp = dsnt_cuda.soft_argmax(dsnt_cuda.sharpen_heatmaps(heatmaps, alpha=6), normalized_coordinates=False)
    assert torch.allclose(sharp, torch.tensor([[[2.0, 6.0]]], dtype=torch.float64), atol=0.05)
    assert (mode - torch.tensor([[[2.0, 6.0]]], dtype=torch.float64)).abs().max() > 0.5


# ---- the fixed defects ------------------------------------------------------------------------


def test_flat_softmax_accepts_non_contiguous_input():
    logits = random_logits((2, 3, 6, 5), seed=1)
    transposed = logits.transpose(-1, -2)  # (2, 3, 5, 6), not contiguous
    with pytest.raises(RuntimeError):
        dsntnn.flat_softmax(transposed)  # dsntnn's .view fails here
    expected = dsntnn.flat_softmax(transposed.contiguous())
    torch.testing.assert_close(dsnt_cuda.flat_softmax(transposed), expected)


@pytest.mark.parametrize("name", ["kl_reg_losses", "js_reg_losses"])
def test_divergences_of_float16_heatmaps_are_finite(cpu_backend, name):
    logits = random_logits((2, 3, 16, 16), seed=2, scale=4.0)
    heatmaps = dsntnn.flat_softmax(logits).half()  # many entries flush to exactly 0 in float16
    mu = random_targets(2, 3, 2, seed=3).half()
    assert (heatmaps == 0).any()
    assert torch.isnan(getattr(dsntnn, name)(heatmaps, mu, 1.0)).any()  # dsntnn's defect
    with dsnt_cuda.use_backend(cpu_backend):
        ours = getattr(dsnt_cuda, name)(heatmaps, mu, 1.0)
    assert ours.dtype == torch.float32  # losses of half inputs come back in float32
    expected = getattr(dsntnn, name)(heatmaps.double(), mu.double(), 1.0)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)


def test_sharpen_heatmaps_normalizes_each_map_separately():
    heatmaps = dsntnn.flat_softmax(random_logits((2, 3, 4, 5), seed=4))
    sharp = dsnt_cuda.sharpen_heatmaps(heatmaps, alpha=3)
    torch.testing.assert_close(sharp.sum(dim=(2, 3)), torch.ones(2, 3, dtype=torch.float64))
    for b in range(2):
        for k in range(3):  # each map equals dsntnn master's formula on that map alone
            one = heatmaps[b, k] ** 3
            torch.testing.assert_close(sharp[b, k], one / one.sum())
    assert torch.equal(heatmaps, dsntnn.flat_softmax(random_logits((2, 3, 4, 5), seed=4)))  # not in place


def test_coordinate_conversions_accept_numpy_in_x_y_order():
    size = [4, 10]  # (H, W): x runs over 10 columns, y over 4 rows
    coords = np.array([[[0.9, -0.75]]])
    pixels = dsnt_cuda.normalized_to_pixel_coordinates(coords, size)
    np.testing.assert_allclose(pixels, [[[9.0, 0.0]]])
    np.testing.assert_allclose(dsnt_cuda.pixel_to_normalized_coordinates(pixels, size), coords)
    tensor = dsnt_cuda.normalized_to_pixel_coordinates(torch.from_numpy(coords), size)
    np.testing.assert_allclose(tensor.numpy(), pixels)
    # dsntnn does not flip the size for numpy input and gets x wrong
    assert not np.allclose(dsntnn.normalized_to_pixel_coordinates(coords, size), pixels)
