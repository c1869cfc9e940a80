"""The CPU kernels of torch.ops.dsnt_cuda.dsnt_fwd / dsnt_bwd (docs/ops.md) against the reference.

Every comparison goes through tests/support.py: fresh random cases (make_case), the float64
reference as the truth, and one tolerance rule (our error at most twice the plain-PyTorch
reference's error in the case's dtype, plus a floor of 64 ulps). Layers: float64 parity over
normalization x regularizer x grid x shapes x beta / sigma_t kinds x coordinate loss x mask x
upstream gradients -> float32 / float16 / bfloat16 on the 2x rule -> gradcheck (logits, target,
beta_map) -> opcheck -> torch.compile; then outputs, layouts and bad input. Special values,
precision cases and the portable build: test_ops_cpu_special.py.
Runtime: about a minute on two cores.
"""

import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from dsnt_cuda import _extension, reference

from support import (
    NORMS,
    REGS,
    ROOT,
    UPSTREAM,
    assert_compiled_matches_eager,
    check_cpp_ops,
    cpp_ops,
    gradcheck_logits,
    make_case,
    needs_cpu_kernels,
    reference_backward,
    run_ops,
)

pytestmark = needs_cpu_kernels
FWD, BWD = cpp_ops()


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
        seed = 100 * k + 7 * NORMS.index(norm) + REGS.index(reg)
        case = make_case(shape, norm, reg, dtype=torch.float64, seed=seed,
                         coord_loss=loss, normalized_coordinates=grid, beta_kind=beta_kind,
                         sigma_kind=sigma_kind, mask=mask, upstream=upstream)
        check_cpp_ops(case, f"{shape} {loss} {beta_kind}/{sigma_kind} {upstream}")


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
    case = replace(case, target=case.target.half(),
                   beta_map=torch.tensor([1.2, 0.7, 1.5], dtype=torch.float16))
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
        check_cpp_ops(case, f"{shape}")


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_logits_target_beta(norm):
    for reg, shape, grid, loss, beta_kind in [("js", (1, 2, 4, 5), True, "euclidean", "keypoint"),
                                              ("kl", (2, 1, 3, 2, 2), False, "none", "map"),
                                              ("var", (1, 2, 6), True, "mse", "scalar"),
                                              ("none", (2, 2, 3, 4), True, "l1", "map")]:
        case = make_case(shape, norm, reg, dtype=torch.float64, coord_loss=loss, normalized_coordinates=grid,
                         beta_kind=beta_kind, sigma_kind="keypoint", mask=True, sigma_t=0.8, seed=21)
        leaves = [gradcheck_logits(case).clone().requires_grad_(True),
                  case.target.clone().requires_grad_(True), case.beta_map.clone().requires_grad_(True)]

        def f(x, t, b, case=case):
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
    def loss_fn(x, t):
        loss = FWD(x, t, None, None, None, "softmax", 1.0, True, "js", 1.0, "euclidean", 1.0)[4]
        return loss * 2

    case = make_case((2, 3, 8, 6), "softmax", "js", dtype=torch.float32, seed=40)
    assert_compiled_matches_eager(loss_fn, case.logits, case.target.float(), backend=backend)


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
        torch.testing.assert_close(stats[..., 1 if norm == "relu" else 2],
                                   case.logits.abs().flatten(2).sum(-1))


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
                    case = make_case((3, 2, 5, 7), norm, reg, dtype=dtype, coord_loss="mse", beta_kind="map",
                                     seed=11)
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
    from dsnt_cuda import ops  # the extension is built here (pytestmark)

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
        args = dict(grad_coords=up["grad_coords"], grad_variance=None, grad_reg_losses=None,
                    grad_coord_losses=None, grad_loss=up["grad_loss"], logits=case.logits, target=case.target,
                    mask=None, beta_map=None, sigma_t_map=None, coords=coords, variance=variance, stats=stats)
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
        BWD(None, None, None, None, torch.ones(()), case.logits, case.target, None, None, None, coords,
            variance, stats, "softmax", 1.0, True, "js", 1.0, "none", 1.0, False, False)
    # the gradients of the empty coord_losses / loss of coord_loss "none" (AOTAutograd passes
    # zeros of their shape) are no gradient
    empty = torch.zeros(0)
    with_empty = BWD(up["grad_coords"], None, None, empty, empty, case.logits, case.target, None, None, None,
                     coords, variance, stats, "softmax", 1.0, True, "js", 1.0, "none", 1.0, True, False)
    without = BWD(up["grad_coords"], None, None, None, None, case.logits, case.target, None, None, None,
                  coords, variance, stats, "softmax", 1.0, True, "js", 1.0, "none", 1.0, True, False)
    assert all(torch.equal(a, b) for a, b in zip(with_empty, without))


# ---------------------------------------------------------------------------------------------
# The libtorch-only library of the CMake build (scripts/cmake_test.sh)
# ---------------------------------------------------------------------------------------------


def test_cmake_library_loads_with_load_library():
    lib = os.path.join(ROOT, "cmake-build", "libdsnt_cuda_ops.so")
    if not os.path.exists(lib):
        pytest.skip("CMake library not built")
    code = (
        "import torch\n"
        f"torch.ops.load_library({lib!r})\n"
        "x = torch.zeros(1, 1, 3, 5); x[0, 0, 2, 4] = 50.0\n"
        "c = torch.ops.dsnt_cuda.dsnt_fwd(x, None, None, None, None, 'softmax', 1.0, False, 'none', 1.0,"
        " 'none', 0.0)[0]\n"
        "assert torch.allclose(c, torch.tensor([[[4.0, 2.0]]]), atol=1e-6), c\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not _extension.extension_loaded(), reason="the C++ extension is not built")
def test_import_after_another_library_defined_the_ops_is_no_abort():
    """Ops already defined (as by libdsnt_cuda_ops.so through torch.ops.load_library): importing
    dsnt_cuda must not load _C, whose second TORCH_LIBRARY(dsnt_cuda) would abort the process."""
    code = (
        "import torch\n"
        "lib = torch.library.Library('dsnt_cuda', 'DEF')  # stands in for libdsnt_cuda_ops.so\n"
        "lib.define('dsnt_fwd(Tensor logits) -> Tensor')\n"
        "import dsnt_cuda\n"
        "info = dsnt_cuda.build_info()\n"
        "assert not info['extension'] and 'already registered' in info['error'], info\n"
        "assert dsnt_cuda.available_backends('cpu') == ['auto', 'reference']\n"
        "x = torch.randn(2, 3, 5, 4)\n"
        "torch.testing.assert_close(dsnt_cuda.fused_dsnt(x), dsnt_cuda.fused_dsnt(x, backend='reference'))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
