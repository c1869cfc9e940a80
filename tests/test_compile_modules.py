"""`torch.compile(fullgraph=True, dynamic=True)` of small models ending in `DSNT` / `DSNTLoss`:
no graph breaks, eager's values and gradients (the learnable temperature's included), for each
backend that runs here (CUDA variants skip without a GPU). Inductor compiles take ~15-20 s on 2
CPU cores, so each backend compiles one model that holds both modules, one with a constant beta,
one with a learnable beta per keypoint (the reference without inductor: see below)."""

import pytest
import torch
from torch import nn

import dsnt_cuda
from dsnt_cuda import DSNT, DSNTLoss

from support import CPU_BACKENDS

CUDA_BACKENDS = (
    [b for b in ("cuda", "triton") if b in dsnt_cuda.available_backends("cuda")]
    if torch.cuda.is_available()
    else []
)


class ConvDSNT(nn.Module):
    """conv -> (DSNT coordinates + variance in align-corners units, DSNTLoss with a learnable beta
    per keypoint and a per-keypoint sigma_t)."""

    def __init__(self, backend, keypoints=3):
        super().__init__()
        self.conv = nn.Conv2d(1, keypoints, 3, padding=1)
        self.dsnt = DSNT(coordinates="align_corners", return_variance=True, backend=backend)
        self.loss = DSNTLoss(reg="js", sigma_t=torch.linspace(1.0, 2.0, keypoints), beta=2.0, backend=backend,
                             learnable_beta=True, num_keypoints=keypoints)

    def forward(self, images, target):
        logits = self.conv(images)
        coords, variance = self.dsnt(logits)
        res = self.loss(logits, target)
        return coords, variance, res.loss, res.coords


def _inputs(batch, h, w, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, h, w, generator=g)
    target = torch.rand(batch, 3, 2, generator=g) * 1.6 - 0.8
    return images.to(device), target.to(device)


def _run(model, images, target):
    """Outputs, then the gradients of a weighted sum of them w.r.t. the parameters and images."""
    images = images.clone().requires_grad_()
    outputs = model(images, target)
    total = sum((o * (i + 1)).sum() for i, o in enumerate(outputs))
    grads = torch.autograd.grad(total, [images, *model.parameters()])
    return [o.detach() for o in outputs], grads


def _check_compiled_matches_eager(backend, device, shapes, atol):
    torch.manual_seed(0)
    model = ConvDSNT(backend).to(device)
    # Inductor turns the reference's dozens of ops into C++ kernels (~90 s on 2 cores); the fused
    # backends are one opaque op each. The reference runs through AOTAutograd (graph, fake
    # tensors, joint forward / backward) without inductor's code generation.
    compiler = "aot_eager" if backend == "reference" else "inductor"
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=compiler)
    for i, (b, h, w) in enumerate(shapes):
        images, target = _inputs(b, h, w, device, seed=i)
        expected = _run(model, images, target)
        got = _run(compiled, images, target)
        for a, e in zip(got[0] + list(got[1]), expected[0] + list(expected[1])):
            assert a.dtype == e.dtype and a.shape == e.shape
            torch.testing.assert_close(a, e, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_graph_breaks(backend):
    torch._dynamo.reset()
    model = ConvDSNT(backend)
    explanation = torch._dynamo.explain(model)(*_inputs(2, 9, 11))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_model_matches_eager(backend):
    torch._dynamo.reset()
    # Same batch, new spatial sizes: dynamic=True serves both without recompiling.
    _check_compiled_matches_eager(backend, "cpu", [(2, 9, 11), (2, 12, 7)], atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_dsnt_does_not_recompile_for_new_sizes(backend):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), DSNT(beta=3.0, coordinates="pixel", backend=backend))
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, (b, h, w) in enumerate([(3, 7, 9), (5, 10, 13), (4, 16, 6)]):
            images = _inputs(b, h, w, seed=i)[0]
            if i == 0:  # the first call compiles; error_on_recompile only rejects the next ones
                with torch._dynamo.config.patch(error_on_recompile=False):
                    out = compiled(images)
            else:
                out = compiled(images)
            torch.testing.assert_close(out, model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_changed_option_recompiles_instead_of_reusing_a_stale_graph(backend):
    """Float options are guarded constants: a second module with another beta gets its own graph."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True, backend="eager")
    def apply(module, x):
        return module(x)

    x = torch.randn(2, 3, 6, 7)
    for beta in (1.0, 4.0):
        module = DSNT(beta=beta, backend=backend)
        torch.testing.assert_close(apply(module, x), module(x), rtol=0, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["cuda"])
def test_compiled_model_matches_eager_cuda(backend):
    if backend not in dsnt_cuda.available_backends("cuda"):
        pytest.skip(dsnt_cuda.backends.backend_unavailable_reason(backend, torch.device("cuda")))
    torch._dynamo.reset()
    _check_compiled_matches_eager(backend, "cuda", [(2, 9, 11), (2, 12, 7)], atol=1e-4)
