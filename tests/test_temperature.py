"""A learnable softmax temperature and per-keypoint / per-map targets, on every backend here.

beta (the inverse temperature) may be a float or a tensor broadcastable to (B, L) that takes a
gradient; sigma_t a float or such a tensor (no gradient); the modules can learn beta as a
log-parameter. kornia's `spatial_soft_argmax2d(x, temperature=T)` is the outside reference.
"""

import kornia
import pytest
import torch
from torch import nn

import dsnt_cuda

from support import assert_close, random_logits, random_targets

BETA_SHAPES = {"scalar": (), "keypoint": (3,), "map": (2, 3), "keypoint_row": (1, 3), "batch_column": (2, 1)}


def random_beta(kind, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(BETA_SHAPES[kind], generator=g, dtype=torch.float64) * 1.5 + 0.5).to(device)


@pytest.mark.parametrize("kind", BETA_SHAPES)
def test_gradcheck_beta_through_fused_dsnt_and_dsnt_loss(backend_device, kind):
    backend, device = backend_device
    logits = random_logits((2, 3, 4, 5), seed=1, device=device)
    target = random_targets(2, 3, 2, seed=2, device=device)
    beta = random_beta(kind, device).requires_grad_(True)

    def coords_and_variance(b):
        return dsnt_cuda.fused_dsnt(logits, beta=b, return_variance=True, backend=backend)

    def losses(b):
        result = dsnt_cuda.dsnt_loss(logits, target, beta=b, reg="kl", backend=backend)
        return result.loss, result.reg_losses

    assert torch.autograd.gradcheck(coords_and_variance, (beta,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(losses, (beta,), eps=1e-6, atol=1e-7)


def test_gradcheck_beta_logits_and_target_together(backend_device):
    backend, device = backend_device
    logits = random_logits((2, 3, 4, 5), seed=3, device=device).requires_grad_(True)
    target = random_targets(2, 3, 2, seed=4, device=device).requires_grad_(True)
    beta = random_beta("keypoint", device).requires_grad_(True)

    def loss(z, t, b):
        return dsnt_cuda.dsnt_loss(z, t, beta=b, reg="js", sigma_t=1.3, backend=backend).loss

    assert torch.autograd.gradcheck(loss, (logits, target, beta), eps=1e-6, atol=1e-7)


def test_tensor_beta_gets_a_gradient_even_when_the_logits_do_not(backend_device):
    """The reported defect: a tensor beta became a float, so its .grad stayed None."""
    backend, device = backend_device
    logits = random_logits((2, 3, 6, 6), dtype=torch.float32, seed=5, device=device)
    beta = torch.tensor(0.7, device=device, requires_grad=True)
    dsnt_cuda.fused_dsnt(logits, beta=beta, backend=backend).sum().backward()
    assert beta.grad is not None and beta.grad.dtype == torch.float32 and beta.grad.item() != 0


def test_per_map_sigma_t_equals_one_call_per_value(backend_device):
    """js_reg_losses with one sigma_t per map equals calling it with each float (dsntnn's API)."""
    backend, device = backend_device
    heatmaps = dsnt_cuda.flat_softmax(random_logits((2, 3, 7, 6), seed=6, device=device))
    mu = random_targets(2, 3, 2, seed=7, device=device)
    sigma_t = random_beta("map", device, seed=8)
    with dsnt_cuda.use_backend(backend):
        per_map = dsnt_cuda.js_reg_losses(heatmaps, mu, sigma_t)
        one_by_one = torch.stack([
            torch.stack([dsnt_cuda.js_reg_losses(heatmaps[b:b + 1, k:k + 1], mu[b:b + 1, k:k + 1],
                                                 sigma_t[b, k].item())[0, 0] for k in range(3)])
            for b in range(2)])
    assert_close(per_map, one_by_one, None, "js with per-map sigma_t")


@pytest.mark.parametrize("temperature", [0.4, 1.0, 2.5])
def test_kornia_parity_with_a_tensor_temperature(backend_device, temperature):
    """spatial_soft_argmax2d(x, temperature=T, normalized_coordinates=True) == ours with beta = 1/T
    in align-corners coordinates: values and the gradient of T."""
    backend, device = backend_device
    logits = random_logits((2, 3, 9, 7), seed=9, device=device)
    size = logits.shape[2:]

    def theirs(t):
        return kornia.geometry.subpix.spatial_soft_argmax2d(logits, temperature=t,
                                                            normalized_coordinates=True)

    def ours(t):
        pixel = dsnt_cuda.fused_dsnt(logits, beta=1 / t, normalized_coordinates=False, backend=backend)
        return dsnt_cuda.convert_coordinates(pixel, size, "pixel", "align_corners")

    weights = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    results = []
    for fn in (ours, theirs):
        t = torch.tensor(temperature, dtype=torch.float64, device=device, requires_grad=True)
        coords = fn(t)
        (coords * weights).sum().backward()
        results.append((coords.detach(), t.grad))
    (coords, grad_t), (expected, expected_grad_t) = results
    assert_close(coords, expected, None, "coordinates")
    assert_close(grad_t, expected_grad_t, None, "d/dtemperature")


# ---- learnable temperature in the modules -------------------------------------------------------


@pytest.mark.parametrize("num_keypoints", [None, 3])
def test_learnable_beta_trains_with_the_model(cpu_backend, num_keypoints):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1),
                          dsnt_cuda.DSNT(beta=2.0, learnable_beta=True, num_keypoints=num_keypoints,
                                         backend=cpu_backend))
    criterion = dsnt_cuda.DSNTLoss(learnable_beta=True, num_keypoints=num_keypoints, backend=cpu_backend)
    (log_beta,) = [p for name, p in model.named_parameters() if name.endswith("log_beta")]
    assert log_beta.shape == (() if num_keypoints is None else (3,))
    torch.testing.assert_close(model[1].beta.detach(), torch.full(log_beta.shape, 2.0))
    assert [name for name, _ in criterion.named_parameters()] == ["log_beta"]
    params = [*model.parameters(), *criterion.parameters()]
    optimizer = torch.optim.SGD(params, lr=1.0)
    images, target = torch.randn(4, 1, 8, 8), random_targets(4, 3, 2, dtype=torch.float32)
    before = [p.detach().clone() for p in (log_beta, criterion.log_beta)]
    for _ in range(3):
        optimizer.zero_grad()
        coords = model(images)
        loss = criterion(model[0](images), target).loss + (coords - target).square().mean()
        loss.backward()
        optimizer.step()
    for p, old in zip((log_beta, criterion.log_beta), before, strict=True):
        assert p.grad is not None and not torch.equal(p.detach(), old), "the temperature did not train"
    assert (model[1].beta > 0).all() and (criterion.beta > 0).all()  # positive by construction


def test_learnable_beta_module_matches_the_functional_api(cpu_backend):
    module = dsnt_cuda.DSNT(beta=1.7, learnable_beta=True, num_keypoints=3, return_variance=True,
                            backend=cpu_backend).double()
    logits = random_logits((2, 3, 5, 6), seed=10)
    got = module(logits)
    # log(1.7) rounded to float32 (the parameter's dtype when it was made), then exp in float64
    expected_beta = torch.full((3,), 1.7, dtype=torch.float64)
    torch.testing.assert_close(module.beta.detach(), expected_beta, rtol=1e-6, atol=0)
    expected = dsnt_cuda.fused_dsnt(logits, beta=module.beta.detach(), return_variance=True,
                                    backend=cpu_backend)
    for a, e in zip(got, expected, strict=True):
        assert_close(a, e, None, "learnable module vs fused_dsnt")


def test_module_sigma_t_tensor_is_a_buffer(cpu_backend):
    sigma_t = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    criterion = dsnt_cuda.DSNTLoss(sigma_t=sigma_t, backend=cpu_backend)
    assert list(criterion.state_dict()) == ["sigma_t_map"] and list(criterion.parameters()) == []
    logits, target = random_logits((2, 3, 6, 5), seed=11), random_targets(2, 3, 2)
    expected = dsnt_cuda.dsnt_loss(logits, target, sigma_t=sigma_t, backend=cpu_backend)
    for a, e in zip(criterion(logits, target), expected, strict=True):
        assert_close(a, e, None, "module sigma_t buffer")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_keypoints": 3}, "needs learnable_beta=True"),
        ({"learnable_beta": True, "normalization": "relu"}, "needs normalization='softmax'"),
        ({"learnable_beta": True, "num_keypoints": 0}, "num_keypoints must be a positive int"),
        ({"learnable_beta": True, "beta": -1.0}, "beta must be finite and > 0"),
    ],
)
def test_learnable_beta_options_are_checked(kwargs, message):
    for module in (dsnt_cuda.DSNT, dsnt_cuda.DSNTLoss):
        with pytest.raises(ValueError, match=message):
            module(**kwargs)


def test_learnable_beta_must_match_the_keypoints():
    with pytest.raises(ValueError, match=r"learns 4 betas \(num_keypoints\) but the logits have 3"):
        dsnt_cuda.DSNT(learnable_beta=True, num_keypoints=4)(random_logits((2, 3, 5, 5)))
    with pytest.raises(ValueError, match="sigma_t tensor has shape"):
        dsnt_cuda.DSNTLoss(sigma_t=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"sigma_t must be broadcastable to \(B, L\) = \(2, 3\)"):
        dsnt_cuda.DSNTLoss(sigma_t=torch.ones(4))(random_logits((2, 3, 5, 5)), random_targets(2, 3, 2))


def test_compat_make_gauss_takes_a_tensor_sigma():
    means = random_targets(2, 3, 2, seed=12)
    sigma = torch.tensor([0.8, 1.0, 1.6], dtype=torch.float64)
    maps = dsnt_cuda.make_gauss(means, [6, 7], sigma)
    for k in range(3):
        expected = dsnt_cuda.make_gauss(means[:, k], [6, 7], sigma[k].item())
        assert_close(maps[:, k], expected, None, "make_gauss")


def test_readme_learnable_temperature_example():
    """The README's example, with a tiny conv head: per-joint widths and a learnable beta per
    joint, trained by the model's optimizer."""
    torch.manual_seed(0)
    coco_sigmas = torch.tensor([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62,
                                1.07, 1.07, .87, .87, .89, .89])
    joint_widths = coco_sigmas / coco_sigmas.min()
    head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 17, 1))
    criterion = dsnt_cuda.DSNTLoss(learnable_beta=True, num_keypoints=17, sigma_t=joint_widths)
    optimizer = torch.optim.Adam([*head.parameters(), *criterion.parameters()], lr=1e-2)
    images, target = torch.randn(2, 3, 12, 12), random_targets(2, 17, 2, dtype=torch.float32)
    loss = criterion(head(images), target).loss
    loss.backward()
    optimizer.step()
    assert criterion.beta.shape == (17,) and (criterion.beta > 0).all()
    assert not torch.equal(criterion.beta.detach(), torch.ones(17))
