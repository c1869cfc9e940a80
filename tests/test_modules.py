"""`DSNT` and `DSNTLoss`: the same values and gradients as the functions and the reference,
argument checks at construction, readable reprs, no state."""

import copy
import pickle

import dsntnn
import pytest
import torch
from torch import nn

import dsnt_cuda
from dsnt_cuda import DSNT, DSNTLoss, DSNTLossResult, reference

from support import CPU_BACKENDS, random_logits, random_targets

SHAPES = [(2, 3, 10), (2, 3, 7, 9), (1, 2, 3, 4, 5)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalization", ["softmax", "abs", "relu", "sigmoid"])
def test_dsnt_matches_reference(backend, shape, normalization):
    logits = random_logits(shape, seed=1)
    p = reference.normalize(logits, normalization, beta=1.5)
    for coordinates, normalized in (("normalized", True), ("pixel", False)):
        module = DSNT(
            normalization=normalization,
            beta=1.5,
            coordinates=coordinates,
            return_variance=True,
            backend=backend,
        )
        coords, var = module(logits)
        torch.testing.assert_close(coords, reference.coordinates(p, normalized), rtol=0, atol=1e-12)
        torch.testing.assert_close(var, reference.variance(p), rtol=0, atol=1e-12)
        only = DSNT(normalization=normalization, beta=1.5, coordinates=coordinates, backend=backend)(logits)
        torch.testing.assert_close(only, coords, rtol=0, atol=0)


def test_dsnt_none_normalization_is_dsntnn_dsnt():
    heatmaps = dsntnn.flat_softmax(random_logits((2, 3, 6, 8), seed=2))
    torch.testing.assert_close(DSNT(normalization="none")(heatmaps), dsntnn.dsnt(heatmaps))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dsnt_gradients_match_reference(backend):
    logits = random_logits((2, 3, 5, 6), seed=3).requires_grad_()
    module = DSNT(return_variance=True, backend=backend)
    coords, var = module(logits)
    w1, w2 = torch.randn_like(coords), torch.randn_like(var)
    (g,) = torch.autograd.grad((coords * w1).sum() + (var * w2).sum(), logits)
    ref_logits = logits.detach().requires_grad_()
    p = reference.normalize(ref_logits)
    (g_ref,) = torch.autograd.grad(
        (reference.coordinates(p) * w1).sum() + (reference.variance(p) * w2).sum(), ref_logits
    )
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reg", ["js", "kl", "var", None])
@pytest.mark.parametrize("coord_loss", ["euclidean", "l1", "mse"])
def test_dsnt_loss_matches_reference(backend, reg, coord_loss):
    logits = random_logits((3, 4, 7, 8), seed=4).requires_grad_()
    target = random_targets(3, 4, 2, seed=5).requires_grad_()
    mask = torch.tensor(
        [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    criterion = DSNTLoss(
        reg=reg, sigma_t=1.5, reg_weight=0.7, coord_loss=coord_loss, beta=1.2, backend=backend
    )
    res = criterion(logits, target, mask)
    assert isinstance(res, DSNTLossResult) and res.loss.dim() == 0
    ref = reference.dsnt_loss(
        logits, target, mask, reg=reg or "none", sigma_t=1.5, reg_weight=0.7, coord_loss=coord_loss, beta=1.2
    )
    for got, expected in zip(res, ref):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(res.loss, (logits, target))
    grads_ref = torch.autograd.grad(ref[0], (logits, target))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)


def test_dsnt_loss_default_is_dsntnn_recipe():
    """DSNTLoss() == flat_softmax -> dsnt -> euclidean + js(sigma_t=1) -> average_loss (dsntnn)."""
    logits = random_logits((2, 5, 16, 16), seed=6)
    target = random_targets(2, 5, 2, seed=7)
    mask = (torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) > 0.3).double()
    heatmaps = dsntnn.flat_softmax(logits)
    coords = dsntnn.dsnt(heatmaps)
    losses = dsntnn.euclidean_losses(coords, target) + dsntnn.js_reg_losses(heatmaps, target, sigma_t=1.0)
    expected = dsntnn.average_loss(losses, mask)
    res = DSNTLoss()(logits, target, mask)
    torch.testing.assert_close(res.loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.coords, coords, rtol=0, atol=1e-12)


def test_dsnt_loss_trains_a_tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))
    criterion = DSNTLoss()
    images = torch.zeros(8, 1, 12, 12)
    ys, xs = torch.randint(0, 12, (8,)), torch.randint(0, 12, (8,))
    images[torch.arange(8), 0, ys, xs] = 1.0
    pixel = torch.stack([xs, ys], -1).float()[:, None].expand(8, 2, 2)
    target = dsnt_cuda.pixel_to_normalized_coordinates(pixel, (12, 12))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        opt.zero_grad()
        res = criterion(model(images), target)
        res.loss.backward()
        opt.step()
        first = res.loss.item() if first is None else first
    assert res.loss.item() < 0.5 * first


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"normalization": "softplus"}, "normalization"),
        ({"beta": 0.0}, "beta"),
        ({"coordinates": "corners"}, "convention"),
        ({"backend": "gpu"}, "backend"),
    ],
)
def test_dsnt_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSNT(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reg": "l2"}, "reg"),
        ({"sigma_t": -1.0}, "sigma_t"),
        ({"coord_loss": "huber"}, "coord_loss"),
        ({"normalization": "exp"}, "normalization"),
        ({"coordinates": "xy"}, "convention"),
        ({"backend": "metal"}, "backend"),
    ],
)
def test_dsnt_loss_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSNTLoss(**kwargs)


def test_forward_rejects_bad_inputs():
    with pytest.raises(ValueError, match="spatial"):
        DSNT()(torch.randn(2, 3))
    with pytest.raises(ValueError, match="target"):
        DSNTLoss()(torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="mask"):
        DSNTLoss()(torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 2), torch.ones(3, 2))


def test_reprs():
    assert repr(DSNT()) == "DSNT(normalization='softmax', beta=1, coordinates='normalized')"
    assert (
        repr(
            DSNT(normalization="relu", coordinates="align_corners", return_variance=True, backend="reference")
        )
        == "DSNT(normalization='relu', coordinates='align_corners', return_variance=True, "
        "backend='reference')"
    )
    assert repr(DSNTLoss()) == (
        "DSNTLoss(coord_loss='euclidean', reg='js', sigma_t=1, reg_weight=1, normalization='softmax', beta=1)"
    )
    assert repr(DSNTLoss(reg=None, coord_loss="l1", beta=2, coordinates="pixel")) == (
        "DSNTLoss(coord_loss='l1', reg=None, normalization='softmax', beta=2, coordinates='pixel')"
    )
    assert "DSNT(" in repr(nn.Sequential(nn.Identity(), DSNT()))


def test_modules_are_stateless_and_copyable():
    for module in (DSNT(beta=2.0, return_variance=True), DSNTLoss(reg="kl", sigma_t=2.0)):
        assert list(module.parameters()) == [] and module.state_dict() == {}
        for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            assert repr(clone) == repr(module)
    logits = random_logits((1, 2, 4, 4), seed=8)
    module = DSNT(return_variance=True)
    for a, b in zip(module(logits), pickle.loads(pickle.dumps(module))(logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_default_backend_follows_use_backend():
    logits = random_logits((2, 2, 5, 5), seed=9)
    with dsnt_cuda.use_backend("reference"):
        a = DSNT()(logits)
    torch.testing.assert_close(DSNT()(logits), a, rtol=0, atol=1e-12)
