"""The CPU kernels of torch.ops.dsnt_cuda.dsnt_fwd / dsnt_bwd (docs/ops.md) against the reference.

Every comparison goes through tests/support.py: fresh random cases (make_case), the float64
reference as the truth, and one tolerance rule (our error at most twice the plain-PyTorch
reference's error in the case's dtype, plus a floor of 64 ulps). Layers: float64 parity over
normalization x regularizer x grid x shapes x beta / sigma_t kinds x coordinate loss x mask x
upstream gradients -> float32 / float16 / bfloat16 on the 2x rule -> gradcheck (logits, target,
beta_map) -> opcheck -> torch.compile; then special values, precision cases that broke earlier
kernels, layouts, bad input, and the portable build of the kernels in a subprocess.
Runtime: about a minute on two cores (the portable-build subprocess included).
"""

import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from dsnt_cuda import _extension, reference
from map_inputs import peaked_logits
from support import (FWD_OUTPUTS, UPSTREAM, assert_close, check_against_reference, make_case, max_error,
                     reference_backward, reference_forward, run_ops)

pytestmark = pytest.mark.skipif(not _extension.has_kernel("dsnt_fwd", "CPU"), reason="C++ extension not built")

if _extension.extension_loaded():
    from dsnt_cuda import ops  # noqa: F401  (fake kernels and autograd of the ops)

    FWD, BWD = torch.ops.dsnt_cuda.dsnt_fwd, torch.ops.dsnt_cuda.dsnt_bwd

NORMS = reference.NORMALIZATIONS
REGS = reference.REGULARIZERS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(case, what=""):
    return check_against_reference(FWD, BWD, case, what)


# ---------------------------------------------------------------------------------------------
# float64 parity
# ---------------------------------------------------------------------------------------------

# (shape, normalized grid, coord_loss, beta kind, sigma_t kind, mask, upstream gradients given):
# odd sizes, 1-pixel axes, 1-3-D, every per-map scalar kind, every loss, partial and no upstream.
VARIANTS = [
    ((2, 3, 7), True, "euclidean", "float", "float", False, UPSTREAM),
    ((2, 2, 5, 6), False, "none", "scalar", "keypoint", False, ("grad_coords", "grad_reg_losses")),
    ((1, 2, 3, 4, 5), True, "l1", "keypoint", "map", True, UPSTREAM),
    ((2, 1, 1, 9), True, "mse", "map", "scalar", True, ("grad_loss",)),
    ((1, 2, 6, 1), False, "none", "float", "map", False, ("grad_variance",)),
    ((1, 1, 2, 1, 3), True, "euclidean", "map", "keypoint", True, ("grad_coord_losses", "grad_reg_losses")),
    ((3, 2, 11, 13), True, "mse", "keypoint", "float", False, ()),
]


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("norm", NORMS)
def test_float64_matches_reference(norm, reg):
    for k, (shape, grid, loss, beta_kind, sigma_kind, mask, upstream) in enumerate(VARIANTS):
        case = make_case(shape, norm, reg, dtype=torch.float64, seed=100 * k + 7 * NORMS.index(norm) + REGS.index(reg),
                         coord_loss=loss, normalized_coordinates=grid, beta_kind=beta_kind,
                         sigma_kind=sigma_kind, mask=mask, upstream=upstream)
        check(case, f"{shape} {loss} {beta_kind}/{sigma_kind} {upstream}")


def test_gradients_only_when_asked():
    case = make_case((2, 3, 6, 5), "softmax", "js", dtype=torch.float64, coord_loss="euclidean",
                     beta_kind="map", seed=3)
    _, full = run_ops(FWD, BWD, case)
    _, partial = run_ops(FWD, BWD, case, needs_target_grad=False, needs_beta_grad=False)
    assert full[1].abs().min() > 0 and full[2].abs().min() > 0
    assert (partial[1] == 0).all() and (partial[2] == 0).all()
    assert torch.equal(partial[0], full[0])
    assert partial[1].dtype == case.target.dtype and partial[2].shape == case.beta_map.shape


def test_target_and_beta_gradient_dtypes_and_shapes():
    case = make_case((2, 3, 4, 4), "softmax", "kl", dtype=torch.bfloat16, coord_loss="l1", seed=4)
    case = replace(case, target=case.target.half(), beta_map=torch.tensor([1.2, 0.7, 1.5], dtype=torch.float16))
    outs, grads = run_ops(FWD, BWD, case)
    assert all(o.dtype == torch.float32 for o in outs)
    assert grads[0].dtype == torch.bfloat16 and grads[0].is_contiguous()
    assert grads[1].dtype == torch.float16 and grads[2].dtype == torch.float16 and grads[2].shape == (3,)
    exact = reference_backward(case)
    torch.testing.assert_close(grads[2].double(), exact[2].double(), rtol=2e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# float32 / float16 / bfloat16: twice the reference's error in that dtype
# ---------------------------------------------------------------------------------------------

LOW_VARIANTS = [((2, 3, 9, 11), "euclidean", "keypoint", "map", True),
                ((2, 2, 4, 5, 3), "mse", "map", "scalar", False),
                ((3, 2, 17), "l1", "scalar", "keypoint", True)]


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_twice_reference_error(dtype, norm, reg):
    for k, (shape, loss, beta_kind, sigma_kind, mask) in enumerate(LOW_VARIANTS):
        case = make_case(shape, norm, reg, dtype=dtype, seed=17 * k + NORMS.index(norm) + 7 * REGS.index(reg),
                         coord_loss=loss, beta_kind=beta_kind, sigma_kind=sigma_kind, mask=mask)
        check(case, f"{shape}")


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


def gradcheck_logits(case):
    """Logits where finite differences are smooth: away from relu / abs kinks; "none" maps well
    above 0, where log p curves."""
    z = case.logits
    if case.normalization in ("abs", "relu"):
        z = z + torch.where(z >= 0, 0.2, -0.2).double()
    if case.normalization == "none":
        g = torch.Generator().manual_seed(22)
        z = (torch.rand(z.shape, generator=g, dtype=torch.float64) + 0.5) / math.prod(z.shape[2:])
    return z


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_logits_target_beta(norm):
    for reg, shape, grid, loss, beta_kind in [("js", (1, 2, 4, 5), True, "euclidean", "keypoint"),
                                              ("kl", (2, 1, 3, 2, 2), False, "none", "map"),
                                              ("var", (1, 2, 6), True, "mse", "scalar"),
                                              ("none", (2, 2, 3, 4), True, "l1", "map")]:
        case = make_case(shape, norm, reg, dtype=torch.float64, coord_loss=loss, normalized_coordinates=grid,
                         beta_kind=beta_kind, sigma_kind="keypoint", mask=True, sigma_t=0.8, seed=21)
        leaves = [gradcheck_logits(case).clone().requires_grad_(True), case.target.clone().requires_grad_(True),
                  case.beta_map.clone().requires_grad_(True)]

        def f(x, t, b):
            outs = FWD(x, t, case.mask, b, case.sigma_t_map, *case.options())[:5]
            return tuple(o for o in outs if o.numel() > 0)

        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5), (reg, shape)


def opcheck_cases():
    for k, (norm, reg, shape, loss, beta_kind, sigma_kind) in enumerate([
        ("softmax", "js", (2, 3, 5, 4), "euclidean", "map", "keypoint"),
        ("relu", "kl", (1, 2, 3, 3, 2), "none", "float", "scalar"),
        ("none", "var", (2, 2, 7), "mse", "keypoint", "map"),
        ("sigmoid", "none", (1, 3, 4, 4), "l1", "scalar", "float"),
        ("abs", "js", (2, 1, 6, 1), "none", "float", "float"),
    ]):
        for dtype in (torch.float32, torch.float64):
            yield make_case(shape, norm, reg, dtype=dtype, coord_loss=loss, beta_kind=beta_kind,
                            sigma_kind=sigma_kind, mask=k % 2 == 0, seed=30 + k)


def test_opcheck_forward():
    for case in opcheck_cases():
        x = case.logits.clone().requires_grad_(True)
        t = case.target.clone().requires_grad_(True)
        b = case.beta_map.clone().requires_grad_(True) if case.beta_map is not None else None
        torch.library.opcheck(FWD.default, (x, t, case.mask, b, case.sigma_t_map, *case.options()))
        torch.library.opcheck(FWD.default, case.fwd_args())


def test_opcheck_backward():
    for i, case in enumerate(opcheck_cases()):
        coords, variance, _, _, _, stats = FWD(*case.fwd_args())
        up = case.upstream
        grads = [up[n] for n in UPSTREAM]
        if i % 3 == 1:
            grads[0] = None
        torch.library.opcheck(
            BWD.default,
            (*grads, case.logits, case.target, case.mask, case.beta_map, case.sigma_t_map, coords, variance,
             stats, *case.options(), i % 2 == 0, case.beta_map is not None),
        )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def loss_fn(x, t):
        loss = FWD(x, t, None, None, None, "softmax", 1.0, True, "js", 1.0, "euclidean", 1.0)[4]
        return loss * 2

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    case = make_case((2, 3, 8, 6), "softmax", "js", dtype=torch.float32, seed=40)
    results = []
    for f in (loss_fn, compiled):
        x = case.logits.clone().requires_grad_(True)
        t = case.target.float().requires_grad_(True)
        loss = f(x, t)
        results.append((loss.detach(), *torch.autograd.grad(loss, (x, t))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Special values (docs/ops.md "Non-finite input")
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_special_nan_stays_in_its_map(norm):
    for reg in REGS:
        for k, upstream in enumerate((UPSTREAM, ("grad_coords",), ("grad_reg_losses",), ("grad_variance",))):
            case = make_case((2, 3, 4, 5), norm, reg, dtype=torch.float32, coord_loss="euclidean", mask=True,
                             upstream=upstream, seed=52 + k)
            z = case.logits.clone()
            z[1, 2, 3, 1] = math.nan
            outs, _ = check(replace(case, logits=z), f"{reg} {upstream}")
            assert outs[0][1, 2].isnan().all() and not outs[0][:, :2].isnan().any()
            assert outs[2][1, 2].isnan() == (reg != "none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_special_minus_inf_and_all_minus_inf_softmax(dtype):
    for reg in REGS:
        case = make_case((2, 2, 5, 6), "softmax", reg, dtype=dtype, coord_loss="euclidean", seed=50)
        z = case.logits.clone()
        z[0, 1, :2] = -math.inf  # p = 0 there
        z[1, 0, :, 3:] = -math.inf
        z[1, 1] = -math.inf  # a NaN map, as torch.softmax
        outs, grads = check(replace(case, logits=z), reg)
        assert (grads[0][0, 1, :2] == 0).all() and outs[0][1, 1].isnan().all()


def test_special_beta_gradient_with_minus_inf_logits():
    """-inf logits add 0 to the beta gradient (their p is 0 for every beta); the reference's
    autograd gives 0 * -inf = NaN there, so it is compared on the same map with the -inf logits
    replaced by -1e4, whose p is 0 too."""
    case = make_case((2, 2, 5, 6), "softmax", "js", dtype=torch.float64, coord_loss="euclidean",
                     beta_kind="map", seed=53)
    z = case.logits.clone()
    z[0, 1, :2] = -math.inf
    _, grads = run_ops(FWD, BWD, replace(case, logits=z))
    finite = z.clone()
    finite[0, 1, :2] = -1e4
    torch.testing.assert_close(grads[2], reference_backward(replace(case, logits=finite))[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_special_zero_sum_rectified_maps_are_uniform(dtype):
    for reg in REGS:
        for norm, fill in (("relu", -1.0), ("relu", 0.0), ("abs", 0.0)):
            case = make_case((2, 2, 3, 5), norm, reg, dtype=dtype, coord_loss="euclidean", seed=51)
            z = case.logits.clone()
            z[1, 0] = fill
            outs, grads = check(replace(case, logits=z), f"{norm} {fill} {reg}")
            assert outs[5][1, 0, 1] == 0 and (grads[0][1, 0] == 0).all()  # stats denom 0, no gradient


def test_special_huge_and_infinite_logits():
    for reg in REGS:
        for norm in ("softmax", "abs", "sigmoid", "relu"):
            case = make_case((2, 2, 5, 6), norm, reg, dtype=torch.float32, coord_loss="euclidean", beta=1.3, seed=52)
            z = case.logits.clone()
            z[0, 0] *= 1e30
            z[1, 1, 2, 3] = 1e30
            check(replace(case, logits=z), f"huge {norm} {reg}")
            z = case.logits.clone()
            z[0, 0, 1, 1] = math.inf
            z[1, 1, 2, 3] = -math.inf
            check(replace(case, logits=z), f"inf {norm} {reg}")


@pytest.mark.parametrize("dtype, tiny", [(torch.float32, 1e-40), (torch.float64, 5.6e-309)], ids=["f32", "f64"])
def test_special_rectified_sum_below_the_reciprocal_of_the_largest_float(dtype, tiny):
    """relu / abs maps whose only positive value is subnormal: 1 / denom overflows. The map is a
    delta at pixel 2 of 4 (normalized 0.25, variance 0); it was inf / NaN."""
    for norm in ("relu", "abs"):
        z = torch.tensor([[[-1.0, -1.0, tiny, -1.0]]], dtype=dtype)
        if norm == "abs":
            z = z.clamp(min=0)
        coords, variance, reg, _, _, stats = FWD(z, None, None, None, None, norm, 1.0, True, "var", 1.0, "none", 0.0)
        assert coords.item() == 0.25 and variance.item() == 0 and reg.item() == 1.0, (norm, coords, variance)
        assert stats[0, 0, 1] == z.clamp(min=0).sum()
        # every forward output against the reference (the backward's 1 / denom is out of range
        # in the output dtype itself)
        case = replace(make_case((1, 1, 4), norm, "js", dtype=dtype, coord_loss="mse", seed=1), logits=z)
        outs = FWD(*case.fwd_args())
        for name, a, e in zip(FWD_OUTPUTS, outs, reference_forward(case)):
            assert_close(a, e, None, name)


# ---------------------------------------------------------------------------------------------
# Precision cases that broke earlier kernels (float32, the 2x rule)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peak", [5, 8186])
def test_precision_peaked_map_on_a_long_axis(peak):
    """A sharp map near the end of an 8192-pixel axis: |ubar| ~ 4090 px, whose float ulp is
    2.4e-4 px. The backward must not lose that rounding into the variance gradient, nor a float
    ubar_g into the JS target gradient."""
    z = peaked_logits((1, 1, 8192), (peak,), 2.0)
    target = torch.tensor([[[(2 * peak + 1) / 8192 - 1 + 3e-4]]], dtype=torch.float64)
    for reg in ("none", "var", "js", "kl"):
        case = make_case((1, 1, 8192), "softmax", reg, dtype=torch.float32, coord_loss="euclidean", seed=1)
        check(replace(case, logits=z, target=target), reg)


@pytest.mark.parametrize("reg", ["js", "kl"])
def test_precision_target_far_outside_the_map(reg):
    for k, mu in enumerate((3.0, -5.0, 20.0, 1e3)):
        case = make_case((2, 2, 16, 16), "softmax", reg, dtype=torch.float32, coord_loss="euclidean", seed=60 + k)
        check(replace(case, target=torch.full((2, 2, 2), mu, dtype=torch.float64)), str(mu))


@pytest.mark.parametrize("grid", [True, False])
def test_precision_none_heatmaps_with_a_large_mass(grid):
    """dsntnn-style heatmaps that do not sum to 1 (here ~2700): the variance gradient is a sum
    of terms ~1e8 that nearly cancel. Our float32 error, forward variance and gradient, at most
    twice the reference's, with no floor (it was 7-12x)."""
    g = torch.Generator().manual_seed(3)
    z = (torch.rand(2, 3, 64, 48, generator=g, dtype=torch.float64) * 1.76).float()
    for reg, upstream in (("none", ("grad_coords", "grad_variance")), ("var", ("grad_reg_losses",))):
        case = replace(make_case((2, 3, 64, 48), "none", reg, dtype=torch.float32, normalized_coordinates=grid,
                                 upstream=upstream, seed=4), logits=z)
        outs, grads = run_ops(FWD, BWD, case)
        exact_f, base_f = reference_forward(case), reference_forward(case, None)
        exact_b, base_b = reference_backward(case), reference_backward(case, None)
        assert max_error(outs[1], exact_f[1]) <= 2 * max_error(base_f[1], exact_f[1])
        assert max_error(grads[0], exact_b[0]) <= 2 * max_error(base_b[0], exact_b[0]), reg


# ---------------------------------------------------------------------------------------------
# Outputs, layouts, empty inputs
# ---------------------------------------------------------------------------------------------


def test_stats_slots():
    case = make_case((2, 3, 5, 4), "softmax", "js", dtype=torch.float64, beta_kind="map", seed=8)
    outs = FWD(*case.fwd_args())
    stats = outs[5]
    z = case.logits.flatten(2)
    beta = case.beta_map.unsqueeze(-1)
    torch.testing.assert_close(stats[..., 0], z.amax(-1))
    torch.testing.assert_close(stats[..., 1], (beta * (z - z.amax(-1, keepdim=True))).exp().sum(-1))
    assert (stats[..., 2] == 1).all()
    # div_grad = sum p dJS/dp, by autograd on the reference
    p = reference.normalize(case.logits, "softmax", case.beta_map).detach().requires_grad_(True)
    js = reference.regularizer_losses(p, case.target, "js", case.sigma_t)
    (dp,) = torch.autograd.grad(js.sum(), p)
    torch.testing.assert_close(stats[..., 3], (p * dp).flatten(2).sum(-1))
    ubar = reference.to_xyz([(m * reference.centred_pixel_grid(m.shape[-1], m.dtype, m.device)).sum(-1)
                             for m in reference.marginals(p.detach())])
    torch.testing.assert_close(stats[..., 4:], ubar)
    for norm in ("relu", "none"):
        stats = FWD(case.logits.abs(), None, None, None, None, norm, 1.0, True, "none", 1.0, "none", 0.0)[5]
        assert (stats[..., 0] == 0).all() and (stats[..., 3] == 0).all()
        torch.testing.assert_close(stats[..., 1 if norm == "relu" else 2], case.logits.abs().flatten(2).sum(-1))


def test_outputs_fully_written():
    """With uninitialized memory poisoned (NaN), every output element must still be written."""
    import torch.utils.deterministic as det

    old_alg, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        for norm in NORMS:
            for reg in REGS:
                for dtype in (torch.float32, torch.bfloat16):
                    case = make_case((3, 2, 5, 7), norm, reg, dtype=dtype, coord_loss="mse", beta_kind="map", seed=11)
                    outs, grads = run_ops(FWD, BWD, case)
                    for t in (*outs, *grads):
                        assert not t.isnan().any(), (norm, reg, dtype)
    finally:
        torch.use_deterministic_algorithms(old_alg)
        det.fill_uninitialized_memory = old_fill


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "expanded"])
def test_non_contiguous_logits(layout):
    case = make_case((2, 3, 6, 5), "softmax", "js", dtype=torch.float64, coord_loss="euclidean", seed=3)
    z = case.logits
    if layout == "channels_last":
        x = z.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = z.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":
        x = torch.stack([z, torch.zeros_like(z)], dim=-1)[..., 0]
    else:
        x = z[:1].expand(2, 3, 6, 5)
        z = x.contiguous()
    assert not x.is_contiguous()
    outs, grads = run_ops(FWD, BWD, replace(case, logits=x))
    expect_outs, expect_grads = run_ops(FWD, BWD, replace(case, logits=z))
    for a, b in zip((*outs, *grads), (*expect_outs, *expect_grads)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4), (0, 0, 2, 2, 2)])
def test_empty_batch(shape):
    case = make_case(shape, "softmax", "js", dtype=torch.float32, coord_loss="euclidean", mask=True, seed=2)
    outs, grads = run_ops(FWD, BWD, case)
    n = len(shape) - 2
    assert outs[0].shape == (shape[0], shape[1], n) and outs[5].shape == (shape[0], shape[1], 4 + n)
    assert outs[4].shape == () and outs[4].item() == 0  # average_loss of nothing
    assert grads[0].shape == shape and grads[1].shape == (shape[0], shape[1], n)


def test_no_coordinate_loss_gives_empty_loss_outputs():
    case = make_case((2, 3, 4, 4), "softmax", "var", dtype=torch.float32, seed=5)
    _, _, _, coord_losses, loss, _ = FWD(*case.fwd_args())
    assert coord_losses.shape == (0,) and loss.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def fwd_with(**changes):
    case = make_case((1, 2, 3, 3), "softmax", "js", dtype=torch.float32, coord_loss="euclidean", seed=9)
    args = dict(zip(ops.FWD_ARGS, case.fwd_args()))
    args.update(changes)
    return lambda: FWD(*args.values())


@pytest.mark.parametrize("call, match", [
    (fwd_with(logits=torch.randn(3, 4)), "spatial dims"),
    (fwd_with(logits=torch.randn(1, 2, 2, 2, 2, 2)), "spatial dims"),
    (fwd_with(logits=torch.ones(1, 2, 3, dtype=torch.int64)), "float16, bfloat16"),
    (fwd_with(logits=torch.randn(1, 2, 0, 3)), "spatial size"),
    (fwd_with(target=torch.zeros(1, 2, 3)), "target must have shape"),
    (fwd_with(target=torch.zeros(1, 2, 2, dtype=torch.int32)), "target must be a floating"),
    (fwd_with(target=None), "target"),
    (fwd_with(reg="none", target=None), "target"),
    (fwd_with(normalized_coordinates=False), "normalized_coordinates"),
    (fwd_with(mask=torch.ones(2, 1)), "mask must have shape"),
    (fwd_with(mask=torch.ones(1, 2, dtype=torch.int64)), "mask must be"),
    (fwd_with(beta=0.0), "beta"),
    (fwd_with(beta=math.inf), "beta"),
    (fwd_with(beta_map=torch.tensor([1.0, 0.0])), "beta_map"),
    (fwd_with(beta_map=torch.tensor([1.0, math.nan])), "beta_map"),
    (fwd_with(beta_map=torch.ones(3)), "broadcastable"),
    (fwd_with(beta_map=torch.ones(2, dtype=torch.int64)), "beta_map must be a floating"),
    (fwd_with(sigma_t=0.0), "sigma_t"),
    (fwd_with(sigma_t=math.nan), "sigma_t"),
    (fwd_with(sigma_t_map=torch.tensor([[1.0, 1e-30]])), "sigma_t_map"),
    (fwd_with(reg_weight=math.inf), "reg_weight"),
    (fwd_with(normalization="softermax"), "normalization"),
    (fwd_with(reg="l2"), "regularizer"),
    (fwd_with(coord_loss="huber"), "coord_loss"),
])
def test_bad_forward_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_backward_input_raises():
    case = make_case((2, 3, 4, 4), "softmax", "js", dtype=torch.float32, coord_loss="euclidean", seed=10)
    coords, variance, _, _, _, stats = FWD(*case.fwd_args())
    up = case.upstream

    def bwd(**changes):
        args = dict(grad_coords=up["grad_coords"], grad_variance=None, grad_reg_losses=None, grad_coord_losses=None,
                    grad_loss=up["grad_loss"], logits=case.logits, target=case.target, mask=None, beta_map=None,
                    sigma_t_map=None, coords=coords, variance=variance, stats=stats)
        args.update(changes)
        return BWD(*args.values(), *case.options(), True, False)

    bwd()
    for changes, match in [({"grad_coords": torch.ones(2, 3, 3)}, "grad_coords"),
                           ({"stats": stats[..., :2]}, "stats"),
                           ({"grad_loss": torch.ones(2)}, "grad_loss"),
                           ({"coords": coords[:1]}, "coords")]:
        with pytest.raises(ValueError, match=match):
            bwd(**changes)
    with pytest.raises(ValueError, match="coord_loss is 'none'"):
        BWD(None, None, None, None, torch.ones(()), case.logits, case.target, None, None, None, coords, variance,
            stats, "softmax", 1.0, True, "js", 1.0, "none", 1.0, False, False)
    # the gradients of the empty coord_losses / loss of coord_loss "none" (AOTAutograd passes
    # zeros of their shape) are no gradient
    empty = torch.zeros(0)
    with_empty = BWD(up["grad_coords"], None, None, empty, empty, case.logits, case.target, None, None, None,
                     coords, variance, stats, "softmax", 1.0, True, "js", 1.0, "none", 1.0, True, False)
    without = BWD(up["grad_coords"], None, None, None, None, case.logits, case.target, None, None, None,
                  coords, variance, stats, "softmax", 1.0, True, "js", 1.0, "none", 1.0, True, False)
    assert all(torch.equal(a, b) for a, b in zip(with_empty, without))


# ---------------------------------------------------------------------------------------------
# The portable build of the kernels, and the CMake library
# ---------------------------------------------------------------------------------------------


def cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=path, **env), cwd=ROOT)


@pytest.mark.skipif(os.environ.get("DSNT_CUDA_CPU_KERNELS") == "generic", reason="already the portable build")
def test_portable_kernels_in_subprocess():
    """DSNT_CUDA_CPU_KERNELS=generic: the parity, special-value and precision tests pass on the
    portable build too, and it is a different build (float32 results not bit-identical)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "float64_matches or special or precision or (low_precision and float32)"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env=dict(os.environ, DSNT_CUDA_CPU_KERNELS="generic"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    if cpu_has_avx2():
        code = ("import torch, dsnt_cuda.ops\nfrom support import make_case\n"
                "case = make_case((4, 4, 32, 32), 'softmax', 'js', seed=1, coord_loss='euclidean')\n"
                "outs = torch.ops.dsnt_cuda.dsnt_fwd(*case.fwd_args())\n"
                "print(' '.join(float(x).hex() for o in outs[:3] for x in o.flatten()))\n")
        avx2, generic = run_python(code), run_python(code, DSNT_CUDA_CPU_KERNELS="generic")
        assert avx2.returncode == 0 and generic.returncode == 0, avx2.stderr + generic.stderr
        assert avx2.stdout != generic.stdout


CMAKE_LIB = os.path.join(ROOT, "cmake-build", "libdsnt_cuda_ops.so")


@pytest.mark.skipif(not os.path.exists(CMAKE_LIB), reason="CMake library not built")
def test_cmake_library_loads_with_load_library():
    code = (
        "import torch\n"
        f"torch.ops.load_library({CMAKE_LIB!r})\n"
        "x = torch.zeros(1, 1, 3, 5); x[0, 0, 2, 4] = 50.0\n"
        "c = torch.ops.dsnt_cuda.dsnt_fwd(x, None, None, None, None, 'softmax', 1.0, False, 'none', 1.0, 'none', 0.0)[0]\n"
        "assert torch.allclose(c, torch.tensor([[[4.0, 2.0]]]), atol=1e-6), c\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
