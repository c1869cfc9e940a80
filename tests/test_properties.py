"""Property tests: random geometry and options, every CPU-capable backend against the float64
reference (values and gradients), with shapes hypothesis picks, including 1-pixel axes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dsnt_cuda
from dsnt_cuda import reference

BACKENDS = [b for b in dsnt_cuda.available_backends("cpu") if b not in ("auto", "reference", "triton")]


@st.composite
def problems(draw):
    dims = draw(st.integers(1, 3))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), *[draw(st.integers(1, 9)) for _ in range(dims)])
    seed = draw(st.integers(0, 2**31 - 1))
    options = dict(
        normalization=draw(st.sampled_from(reference.NORMALIZATIONS)),
        beta=draw(st.floats(0.25, 4.0)),
        normalized_coordinates=draw(st.booleans()),
        reg=draw(st.sampled_from(reference.REGULARIZERS)),
        sigma_t=draw(st.floats(0.3, 3.0)),
    )
    return shape, seed, options


@pytest.mark.skipif(not BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None)
@given(problem=problems())
def test_backend_matches_reference_on_random_problems(backend, problem):
    shape, seed, options = problem
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if options["normalization"] == "none":
        logits = logits.abs() + 0.01
    target = (torch.rand((*shape[:2], len(shape) - 2), generator=g, dtype=torch.float64) * 2 - 1)
    weights = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((*shape[:2], len(shape) - 2),) * 2 + (shape[:2],)]
    args = (options["normalization"], options["beta"], options["normalized_coordinates"], options["reg"],
            options["sigma_t"])

    def run(fn):
        z = logits.clone().requires_grad_(True)
        t = target.clone().requires_grad_(True)
        outs = fn(z, t, *args)
        total = sum((o * w).sum() for o, w in zip(outs, weights))
        gz, gt = torch.autograd.grad(total, (z, t), allow_unused=True)
        return [o.detach() for o in outs], gz, torch.zeros_like(t) if gt is None else gt

    ours = run(lambda *a: dsnt_cuda.dispatch.dsnt_core(*a, backend=backend))
    expected = run(reference.dsnt_core)
    for a, b in zip([*ours[0], ours[1], ours[2]], [*expected[0], expected[1], expected[2]]):
        scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 * scale)
