"""Property tests: random geometry and options (beta / sigma_t as floats or per-map tensors, a
mask, every loss), each fused backend on CPU tensors through `dsnt_loss` against the float64
reference — values and gradients of logits, target and beta — with shapes hypothesis picks,
1-pixel axes included."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dsnt_cuda
from dsnt_cuda import reference

from support import CPU_BACKENDS, assert_close, make_case, reference_backward, reference_forward

FUSED = [b for b in CPU_BACKENDS if b != "reference"]
KINDS = ("float", "scalar", "keypoint", "map")


@st.composite
def cases(draw):
    dims = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 9)) for _ in range(dims)]
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), *sizes)
    normalization = draw(st.sampled_from([n for n in reference.NORMALIZATIONS if n != "none"]))
    return make_case(
        shape, normalization, draw(st.sampled_from(reference.REGULARIZERS)), dtype=torch.float64,
        seed=draw(st.integers(0, 2**31 - 1)), coord_loss=draw(st.sampled_from(reference.COORD_LOSSES)),
        beta=draw(st.floats(0.25, 4.0)), beta_kind=draw(st.sampled_from(KINDS)),
        sigma_t=draw(st.floats(0.3, 3.0)), sigma_kind=draw(st.sampled_from(KINDS)),
        mask=draw(st.booleans()), scale=3.0)


@pytest.mark.skipif(not FUSED, reason="no fused backend runs on CPU tensors here (C++ extension not built)")
@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_dsnt_loss_matches_reference_on_random_problems(backend, case):
    def loss(z, t, b):
        result = dsnt_cuda.dsnt_loss(z, t, mask=case.mask, reg=case.reg, sigma_t=case.sigma_t_argument,
                                     reg_weight=case.reg_weight, coord_loss=case.coord_loss,
                                     normalization=case.normalization,
                                     beta=case.beta if b is None else b, backend=backend)
        return result.coords, result.reg_losses, result.coord_losses, result.loss

    z = case.logits.clone().requires_grad_(True)
    t = case.target.clone().requires_grad_(True)
    b = case.beta_map.clone().requires_grad_(True) if case.beta_map is not None else None
    coords, reg_losses, coord_losses, total = loss(z, t, b)
    exact = reference_forward(case)
    for name, got, want in (("coords", coords, exact[0]), ("reg_losses", reg_losses, exact[2]),
                            ("coord_losses", coord_losses, exact[3]), ("loss", total, exact[4])):
        assert_close(got, want, None, name)
    up = case.upstream
    weighted = (coords * up["grad_coords"]).sum() + (reg_losses * up["grad_reg_losses"]).sum() + (
        coord_losses * up["grad_coord_losses"]).sum() + total * up["grad_loss"]
    wanted = [x for x in (z, t, b) if x is not None]
    grads = torch.autograd.grad(weighted, wanted, allow_unused=True)
    # dsnt_loss does not return the variance: no upstream gradient for it
    exact_grads = reference_backward(replace(case, upstream=dict(case.upstream, grad_variance=None)))
    names = ("grad_logits", "grad_target", "grad_beta_map")
    for name, got, want in zip(names, grads, exact_grads, strict=False):
        map_dims = case.logits.dim() - 2 if name == "grad_logits" else 0
        assert_close(torch.zeros_like(want) if got is None else got, want, None, name, map_dims=map_dims)
