"""`torch.export` of a model using the fused ops on the cpu backend: the graph calls
`torch.ops.dsnt_cuda.dsnt_fwd` itself (no decomposition), and the exported program gives eager's
values and gradients, for new shapes too, also after a save / load round trip; an unmasked
loss over an empty batch is 0 as in eager (not the NaN of a traced max(n, 1)), on every backend.

AOTInductor (the exported program compiled and run from C++) is the ctest `test_aoti`
(tests/cpp/aoti_export.py, tests/cpp/test_aoti.cpp).
"""

import pytest
import torch
from torch import nn
from torch.export import Dim

import dsnt_cuda
from dsnt_cuda.backends import backend_unavailable_reason

needs_cpu_backend = pytest.mark.skipif(
    "cpu" not in dsnt_cuda.available_backends("cpu"),
    reason=f"the cpu backend is not available: {backend_unavailable_reason('cpu')}",
)

FUSED_OP = torch.ops.dsnt_cuda.dsnt_fwd.default if hasattr(torch.ops.dsnt_cuda, "dsnt_fwd") else None


class Keypoints(nn.Module):
    """conv head -> fused_dsnt (coordinates + variance) and dsnt_loss (JS, masked)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, images, target, mask):
        logits = self.head(images)
        coords, variance = dsnt_cuda.fused_dsnt(logits, return_variance=True, backend="cpu")
        result = dsnt_cuda.dsnt_loss(logits, target, mask=mask, sigma_t=1.5, beta=2.0, backend="cpu")
        return coords, variance, result.loss, result.reg_losses


class UnmaskedLoss(nn.Module):
    """dsnt_loss without a mask: the loss is the plain mean over B * L keypoints."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, logits, target):
        return dsnt_cuda.dsnt_loss(logits, target, backend=self.backend).loss


def _inputs(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, height, width, generator=g)
    target = torch.rand(batch, 3, 2, generator=g) * 1.6 - 0.8
    mask = (torch.rand(batch, 3, generator=g) > 0.3).float()
    return images, target, mask


BATCH, HEIGHT, WIDTH = Dim("batch"), Dim("height"), Dim("width")
DYNAMIC = {
    "images": {0: BATCH, 2: HEIGHT, 3: WIDTH},
    "target": {0: BATCH},
    "mask": {0: BATCH},
}


def _export(strict=False):
    torch.manual_seed(0)
    model = Keypoints().eval()
    ep = torch.export.export(model, _inputs(2, 9, 11), dynamic_shapes=DYNAMIC, strict=strict)
    return model, ep


def _targets(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def _assert_calls_fused_op(ep, count):
    targets = _targets(ep)
    assert targets.count(FUSED_OP) == count, targets
    # A decomposition would show the softmax / exponential of the reference instead.
    decomposed = [t for t in targets if "softmax" in str(t) or "exp" in str(t)]
    assert not decomposed, decomposed


@needs_cpu_backend
@pytest.mark.parametrize("strict", [False, True])
def test_exported_graph_calls_the_fused_op_and_matches_eager(strict):
    model, ep = _export(strict)
    _assert_calls_fused_op(ep, 2)  # fused_dsnt's and dsnt_loss's
    # run_decompositions (what AOTInductor and other backends consume) keeps the op too.
    _assert_calls_fused_op(ep.run_decompositions(), 2)
    exported = ep.module()
    for i, shape in enumerate([(2, 9, 11), (4, 16, 7), (1, 5, 13)]):
        args = _inputs(*shape, seed=i)
        with torch.no_grad():
            expected = model(*args)
            got = exported(*args)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and g.dtype == e.dtype
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@needs_cpu_backend
def test_exported_program_gradients_match_eager():
    """The exported graph calls the op, whose autograd (dsnt_bwd) gives eager's gradients."""
    model, ep = _export()
    exported = ep.module()
    images, target, mask = _inputs(3, 10, 8, seed=5)

    def grads(module):
        x = images.clone().requires_grad_()
        coords, variance, loss, _ = module(x, target, mask)
        total = loss + coords.sum() + 0.01 * variance.sum()
        return torch.autograd.grad(total, [x, *module.parameters()])

    for g, e in zip(grads(exported), grads(model)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@needs_cpu_backend
def test_exported_program_survives_save_and_load(tmp_path):
    model, ep = _export()
    path = tmp_path / "keypoints.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    _assert_calls_fused_op(loaded, 2)
    args = _inputs(2, 12, 6, seed=7)
    with torch.no_grad():
        for g, e in zip(loaded.module()(*args), model(*args)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_exported_unmasked_loss_of_an_empty_batch_is_zero_not_nan(cpu_backend):
    """The export's batch range includes 0, where eager's mean over no keypoints is 0."""
    model = UnmaskedLoss(cpu_backend)
    logits, target = torch.randn(2, 3, 6, 5), torch.rand(2, 3, 2) - 0.5
    dims = {"logits": {0: BATCH}, "target": {0: BATCH}}
    exported = torch.export.export(model, (logits, target), dynamic_shapes=dims).module()
    for batch in (0, 3):
        args = (torch.randn(batch, 3, 6, 5), torch.rand(batch, 3, 2) - 0.5)
        expected = model(*args)
        torch.testing.assert_close(exported(*args), expected, rtol=1e-6, atol=1e-7)
    assert model(*(torch.randn(0, 3, 6, 5), torch.rand(0, 3, 2))).item() == 0.0
