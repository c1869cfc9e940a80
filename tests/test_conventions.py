"""Coordinate conventions: conversion helpers, the modules' `coordinates=` option, kornia parity.

kornia facts checked here (kornia 0.9), each asserted only where the definitions agree:
- `spatial_soft_argmax2d(x, temperature=T)` is `softmax(x / T)`: our `beta` is `1 / T`.
- Its `normalized_coordinates=True` grid is corner-aligned (`create_meshgrid`'s default
  `align_corners=True`): our "align_corners" convention; `False` is our "pixel".
- `kl_div_loss_2d(pred, target)` is KL(target || pred) — the arguments are in the opposite order to
  ours (`kl_reg_losses(heatmaps, mu, sigma)` is KL(heatmap || Gaussian)); it takes no epsilon
  (0 log 0 = 0, a zero in `pred` under a positive `target` gives inf), we add 1e-24 inside both
  logs: the two agree wherever the Gaussian is far above 1e-24 on the heatmap's support.
- `js_div_loss_2d` is the symmetric JS divergence; its epsilon-free value equals ours to ~1e-24.
- Both reduce with `reduction="mean"` over the B·N maps, our `average_loss` with no mask.
"""

import kornia
import pytest
import torch

import dsnt_cuda
from dsnt_cuda import conventions
from dsnt_cuda.conventions import CONVENTIONS, convert_coordinates, convert_variance, coordinate_grid

from support import CPU_BACKENDS, random_logits, random_targets

SIZES = [(1,), (2,), (7,), (16,)]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 5, 16])
def test_grids_match_their_definitions(length):
    j = torch.arange(length, dtype=torch.float64)
    expected = {
        "normalized": (2 * j + 1) / length - 1,
        "pixel": j,
        "align_corners": -1 + 2 * j / (length - 1) if length > 1 else torch.zeros(1, dtype=torch.float64),
    }
    for name in CONVENTIONS:
        torch.testing.assert_close(
            coordinate_grid(length, name, dtype=torch.float64), expected[name], rtol=0, atol=1e-15
        )
    torch.testing.assert_close(
        coordinate_grid(length, "normalized", dtype=torch.float64),
        dsnt_cuda.normalized_linspace(length, dtype=torch.float64),
        rtol=0,
        atol=1e-15,
    )


@pytest.mark.parametrize("length", [1, 2, 5, 16])
@pytest.mark.parametrize("src", CONVENTIONS)
@pytest.mark.parametrize("dst", CONVENTIONS)
def test_convert_maps_grid_onto_grid(length, src, dst):
    """Every conversion sends the pixel grid of one convention onto the other's, on each axis."""
    g_src = coordinate_grid(length, src, dtype=torch.float64)
    g_dst = coordinate_grid(length, dst, dtype=torch.float64)
    pts = torch.stack([g_src, g_src.flip(0)], dim=-1)  # (S, 2): x and y on a square map
    out = convert_coordinates(pts, (length, length), src, dst)
    torch.testing.assert_close(out, torch.stack([g_dst, g_dst.flip(0)], dim=-1), rtol=0, atol=1e-13)


@pytest.mark.parametrize("size", [(5, 8), (3, 4, 6), (1, 9)])
def test_round_trips_and_xyz_order(size):
    n = len(size)
    coords = torch.rand(4, 3, n, dtype=torch.float64) * 2 - 1
    for src in CONVENTIONS:
        for dst in CONVENTIONS:
            back = convert_coordinates(convert_coordinates(coords, size, src, dst), size, dst, src)
            if src == "align_corners" or dst == "align_corners":
                # An axis of 1 pixel has only v = 0 in align_corners; points elsewhere are not on it.
                ok = [k for k, s in enumerate(size[::-1]) if s > 1]
                torch.testing.assert_close(back[..., ok], coords[..., ok], rtol=0, atol=1e-13)
            else:
                torch.testing.assert_close(back, coords, rtol=0, atol=1e-13)
    # x goes with the last size entry (W), y with the one before (H).
    pix = conventions.normalized_to_pixel(torch.tensor([[1.0, -1.0, 0.0][:n]], dtype=torch.float64), size)
    w = size[-1]
    assert pix[0, 0].item() == pytest.approx(w - 0.5)  # the right edge of the last column
    assert pix[0, 1].item() == pytest.approx(-0.5)


def test_size_may_be_the_whole_heatmap_shape():
    coords = torch.rand(2, 3, 2, dtype=torch.float64)
    heatmaps = torch.zeros(2, 3, 10, 20)
    torch.testing.assert_close(
        conventions.normalized_to_align_corners(coords, heatmaps.shape),
        conventions.normalized_to_align_corners(coords, heatmaps.shape[-2:]),
    )


def test_named_helpers_agree_with_dsntnn_helpers():
    coords = torch.rand(2, 3, 2, dtype=torch.float64) * 2 - 1
    size = (12, 7)
    torch.testing.assert_close(
        conventions.normalized_to_pixel(coords, size), dsnt_cuda.normalized_to_pixel_coordinates(coords, size)
    )
    torch.testing.assert_close(
        conventions.pixel_to_normalized(coords * 5, size),
        dsnt_cuda.pixel_to_normalized_coordinates(coords * 5, size),
    )
    for name, (src, dst) in {
        "pixel_to_align_corners": ("pixel", "align_corners"),
        "align_corners_to_pixel": ("align_corners", "pixel"),
        "normalized_to_align_corners": ("normalized", "align_corners"),
        "align_corners_to_normalized": ("align_corners", "normalized"),
    }.items():
        torch.testing.assert_close(
            getattr(conventions, name)(coords, size), convert_coordinates(coords, size, src, dst)
        )


def test_convert_is_differentiable_and_rejects_bad_input():
    coords = torch.rand(1, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c: convert_coordinates(c, (5, 9), "normalized", "align_corners"), (coords,)
    )
    with pytest.raises(ValueError, match="convention"):
        convert_coordinates(coords, (5, 9), "normalised", "pixel")
    with pytest.raises(ValueError, match="fewer"):
        convert_coordinates(coords, (9,), "normalized", "pixel")
    with pytest.raises(TypeError):
        convert_coordinates(torch.zeros(1, 2, 2, dtype=torch.long), (5, 9), "pixel", "normalized")


def test_convert_variance_scales_by_slope_squared():
    logits = random_logits((2, 3, 6, 11), seed=3)
    p = dsnt_cuda.reference.normalize(logits)
    var_pix = dsnt_cuda.reference.variance(p)
    for dst in CONVENTIONS:
        # Variance of the map's coordinate in convention dst, straight from its definition.
        gx, gy = coordinate_grid(11, dst, dtype=torch.float64), coordinate_grid(6, dst, dtype=torch.float64)
        mx, my = p.sum(-2), p.sum(-1)
        vx = (mx * gx**2).sum(-1) - (mx * gx).sum(-1) ** 2
        vy = (my * gy**2).sum(-1) - (my * gy).sum(-1) ** 2
        torch.testing.assert_close(
            convert_variance(var_pix, (6, 11), "pixel", dst), torch.stack([vx, vy], -1)
        )


# --------------------------------------------------------------------------------------------
# The modules' coordinates= option
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 9), (2, 3, 6, 11), (1, 2, 4, 5, 3), (2, 2, 1, 7)])
def test_dsnt_module_coordinates_are_the_expectation_of_each_grid(backend, shape):
    logits = random_logits(shape, seed=5)
    p = dsnt_cuda.reference.normalize(logits)
    for name in CONVENTIONS:
        grids = [coordinate_grid(s, name, dtype=torch.float64) for s in shape[2:]]
        expected = dsnt_cuda.linear_expectation(p, grids).flip(-1)  # tensor order -> (x, y, z)
        got = dsnt_cuda.DSNT(coordinates=name, backend=backend)(logits)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dsnt_loss_module_coordinates_option(backend):
    logits = random_logits((2, 4, 8, 10), seed=6)
    target = random_targets(2, 4, 2, seed=7)
    base = dsnt_cuda.DSNTLoss(backend=backend)(logits, target)
    for name in CONVENTIONS:
        t = convert_coordinates(target, (8, 10), "normalized", name)
        res = dsnt_cuda.DSNTLoss(coordinates=name, backend=backend)(logits, t)
        torch.testing.assert_close(res.loss, base.loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(
            res.coords, convert_coordinates(base.coords, (8, 10), "normalized", name), rtol=0, atol=1e-12
        )


# --------------------------------------------------------------------------------------------
# kornia parity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("beta", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("hw", [(8, 8), (5, 13), (1, 6), (16, 12)])
@pytest.mark.parametrize("normalized", [True, False])
def test_spatial_soft_argmax2d_parity(backend, beta, hw, normalized):
    logits = random_logits((2, 3, *hw), dtype=torch.float64, seed=11)
    expected = kornia.geometry.subpix.spatial_soft_argmax2d(
        logits, temperature=1.0 / beta, normalized_coordinates=normalized
    )
    module = dsnt_cuda.DSNT(
        beta=beta, coordinates="align_corners" if normalized else "pixel", backend=backend
    )
    torch.testing.assert_close(module(logits), expected, rtol=0, atol=1e-12)


def test_kornia_temperature_is_the_inverse_of_beta():
    """The issue's "temperature = beta" only holds at 1: kornia divides by it, we multiply."""
    logits = random_logits((1, 2, 7, 7), seed=12, scale=3.0)
    ours = dsnt_cuda.DSNT(beta=4.0, coordinates="pixel", backend="reference")(logits)
    same = kornia.geometry.subpix.spatial_soft_argmax2d(
        logits, temperature=0.25, normalized_coordinates=False
    )
    other = kornia.geometry.subpix.spatial_soft_argmax2d(
        logits, temperature=4.0, normalized_coordinates=False
    )
    torch.testing.assert_close(ours, same, rtol=0, atol=1e-12)
    assert (ours - other).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spatial_soft_argmax2d_parity_float32(dtype):
    logits = random_logits((4, 5, 32, 24), dtype=dtype, seed=13)
    expected = kornia.geometry.subpix.spatial_soft_argmax2d(logits, normalized_coordinates=True)
    got = dsnt_cuda.DSNT(coordinates="align_corners")(logits)  # default backend
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def _gauss(target, hw, sigma):
    return dsnt_cuda.make_gauss(target, hw, sigma)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sigma_t", [0.5, 1.0, 3.0])
def test_js_div_loss_2d_parity(backend, sigma_t):
    """JS is symmetric and both ε-conventions vanish at this scale: equal for any Gaussian width."""
    hw = (12, 10)
    logits = random_logits((3, 4, *hw), seed=14)
    target = random_targets(3, 4, 2, seed=15)
    p = dsnt_cuda.reference.normalize(logits)
    q = _gauss(target, hw, sigma_t)
    res = dsnt_cuda.DSNTLoss(reg="js", sigma_t=sigma_t, backend=backend)(logits, target)
    torch.testing.assert_close(
        res.reg_losses, kornia.losses.js_div_loss_2d(p, q, reduction="none"), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        res.reg_losses, kornia.losses.js_div_loss_2d(q, p, reduction="none"), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        res.reg_losses.mean(), kornia.losses.js_div_loss_2d(p, q, reduction="mean"), rtol=1e-10, atol=1e-12
    )
    # As heatmaps in, through the dsntnn-compatible function too.
    torch.testing.assert_close(
        dsnt_cuda.js_reg_losses(p, target, sigma_t),
        kornia.losses.js_div_loss_2d(p, q, reduction="none"),
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kl_div_loss_2d_parity_where_the_gaussian_is_far_above_eps(backend):
    """Ours is KL(heatmap || Gaussian) = kornia's kl_div_loss_2d(pred=Gaussian, target=heatmap)."""
    hw = (8, 8)
    sigma_t = 2.5  # the Gaussian's smallest cell is ~1e-5 here: the 1e-24 ε is invisible
    logits = random_logits((2, 3, *hw), seed=16)
    target = random_targets(2, 3, 2, seed=17)
    p = dsnt_cuda.reference.normalize(logits)
    q = _gauss(target, hw, sigma_t)
    assert q.min() > 1e-8
    res = dsnt_cuda.DSNTLoss(reg="kl", sigma_t=sigma_t, backend=backend)(logits, target)
    torch.testing.assert_close(
        res.reg_losses, kornia.losses.kl_div_loss_2d(q, p, reduction="none"), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(res.reg_losses.mean(), kornia.losses.kl_div_loss_2d(q, p, reduction="mean"))
    # The other argument order is the other divergence, KL(Gaussian || heatmap): not ours.
    reverse = kornia.losses.kl_div_loss_2d(p, q, reduction="none")
    assert (reverse - res.reg_losses).abs().max() > 1e-3


def test_kl_differs_from_kornia_where_the_gaussian_underflows():
    """A narrow Gaussian underflows to 0 in float32 where a softmax map is still positive: kornia's
    ε-free KL is then inf; ours (ε = 1e-24 inside the logs, like dsntnn) stays finite and large."""
    hw = (16, 16)
    logits = random_logits((1, 2, *hw), dtype=torch.float32, seed=18)
    target = torch.tensor([[[-0.9, -0.9], [0.9, 0.9]]])
    q = _gauss(target, hw, 0.5)
    assert (q == 0).any()
    p = dsnt_cuda.reference.normalize(logits)
    theirs = kornia.losses.kl_div_loss_2d(q, p, reduction="none")
    ours = dsnt_cuda.DSNTLoss(reg="kl", sigma_t=0.5)(logits, target).reg_losses
    assert torch.isinf(theirs).all()
    assert torch.isfinite(ours).all() and (ours > 10).all()
