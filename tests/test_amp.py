"""Automatic mixed precision: a conv -> DSNT / DSNTLoss model under `torch.autocast`.

The conv emits half-precision logits; coordinates, variances and losses come back float32 (the
fused API accumulates in float32), the gradient w.r.t. the logits in the logits' dtype. Values are
compared two ways: tightly against the pure-PyTorch reference fed the same half logits (so the
only difference is our kernels), and loosely against the float32 model, with a tolerance set by
the half dtype's error on the logits (the rule of tests/support.py: at most about twice the
reference's own error in that dtype, plus a little).
"""

import pytest
import torch
from torch import nn

import dsnt_cuda
from dsnt_cuda import DSNT, DSNTLoss

from support import CPU_BACKENDS


class Net(nn.Module):
    def __init__(self, backend, keypoints=4):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, keypoints, 3, padding=1)
        )
        self.dsnt = DSNT(return_variance=True, backend=backend)
        self.loss = DSNTLoss(backend=backend)

    def forward(self, images, target):
        logits = self.body(images)
        logits.retain_grad()
        coords, variance = self.dsnt(logits)
        res = self.loss(logits, target)
        return logits, coords, variance, res


def _data(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 24, 20, generator=g)
    target = torch.rand(4, 4, 2, generator=g) * 1.6 - 0.8
    return images.to(device), target.to(device)


def _step(model, images, target, autocast_dtype=None):
    model.zero_grad()
    device = images.device.type
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, coords, variance, res = model(images, target)
    (res.loss + coords.sum() * 0.1 + variance.sum() * 1e-3).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return logits, coords, variance, res, grads


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _check_amp(backend, device, dtype):
    torch.manual_seed(0)
    model = Net(backend).to(device)
    reference_model = Net("reference").to(device)
    reference_model.load_state_dict(model.state_dict())
    images, target = _data(device)

    logits, coords, variance, res, grads = _step(model, images, target, dtype)
    assert logits.dtype == dtype and logits.grad.dtype == dtype
    for t in (coords, variance, res.loss, res.coords, res.coord_losses, res.reg_losses):
        assert t.dtype == torch.float32
    for t in (coords, variance, res.loss, logits.grad):
        assert torch.isfinite(t).all()

    # Same half logits through the reference: only our kernels differ.
    ref_logits, ref_coords, ref_var, ref_res, ref_grads = _step(reference_model, images, target, dtype)
    torch.testing.assert_close(coords, ref_coords, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(variance, ref_var, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.loss, ref_res.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad.float(), rtol=2e-2, atol=1e-5)

    # Against float32: the half logits' rounding is the error budget.
    _, f32_coords, f32_var, f32_res, f32_grads = _step(reference_model, images, target, None)
    for got, ref_half, full in (
        (coords, ref_coords, f32_coords),
        (res.loss, ref_res.loss, f32_res.loss),
        (variance, ref_var, f32_var),
    ):
        budget = 2 * _max_err(ref_half, full) + 1e-4 * full.abs().max().item() + 1e-5
        assert _max_err(got, full) <= budget
    for g, g_ref, g_full in zip(grads, ref_grads, f32_grads):
        budget = 2 * _max_err(g_ref, g_full) + 1e-3 * g_full.abs().max().item() + 1e-6
        assert _max_err(g, g_full) <= budget
    # And in absolute terms the coordinates are well inside a pixel of float32 (maps are 20-24 px).
    assert _max_err(coords, f32_coords) < 0.02


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_cpu_bfloat16(backend):
    _check_amp(backend, "cpu", torch.bfloat16)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_cpu_float16(backend):
    _check_amp(backend, "cpu", torch.float16)


def test_autocast_default_backend_module_outputs():
    """The modules alone (default backend) on bf16 logits: float32 out, bf16 gradient in."""
    logits = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    coords, variance = DSNT(return_variance=True)(logits)
    res = DSNTLoss()(logits, torch.zeros(2, 3, 2))
    assert coords.dtype == variance.dtype == res.loss.dtype == torch.float32
    (res.loss + coords.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16


CUDA_CASES = [(b, d) for b in ("cuda", "triton", "reference") for d in (torch.float16, torch.bfloat16)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend, dtype", CUDA_CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CUDA_CASES])
def test_autocast_cuda(backend, dtype):
    if backend not in dsnt_cuda.available_backends("cuda"):
        pytest.skip(dsnt_cuda.backends.backend_unavailable_reason(backend, torch.device("cuda")))
    _check_amp(backend, "cuda", dtype)
