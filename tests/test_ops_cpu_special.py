"""The CPU ops on special values (docs/ops.md "Non-finite input") and on the maps that broke earlier
kernels' precision, against the reference with tests/support.py's rule; and the portable build
of the kernels, which reruns these and test_ops_cpu.py's parity tests in a subprocess.
Runtime: about 1.5 minutes on two cores, most of it the portable-build subprocess.
"""

import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from support import (
    FWD_OUTPUTS,
    NORMS,
    REGS,
    ROOT,
    UPSTREAM,
    assert_close,
    check_cpp_ops,
    cpp_ops,
    make_case,
    max_error,
    needs_cpu_kernels,
    peaked_logits,
    reference_backward,
    reference_forward,
    run_ops,
)

pytestmark = needs_cpu_kernels
FWD, BWD = cpp_ops()

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
            outs, _ = check_cpp_ops(replace(case, logits=z), f"{reg} {upstream}")
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
        outs, grads = check_cpp_ops(replace(case, logits=z), reg)
        assert (grads[0][0, 1, :2] == 0).all() and outs[0][1, 1].isnan().all()


@pytest.mark.parametrize("beta_kind", ["scalar", "map"])
def test_special_beta_gradient_with_minus_inf_logits(beta_kind):
    """-inf logits add 0 to the beta gradient (their p is 0 for every beta), in the kernels and
    in the reference (which floors z - max z so that autograd does not form 0 * -inf = NaN); the
    same map with the -inf logits replaced by -1e4, whose p is 0 too, gives the same gradients."""
    case = make_case((2, 2, 5, 6), "softmax", "js", dtype=torch.float64, coord_loss="euclidean",
                     beta_kind=beta_kind, seed=53)
    z = case.logits.clone()
    z[0, 1, :2] = -math.inf
    _, grads = run_ops(FWD, BWD, replace(case, logits=z))
    reference = reference_backward(replace(case, logits=z))
    finite = z.clone()
    finite[0, 1, :2] = -1e4
    expected = reference_backward(replace(case, logits=finite))
    for got in (grads, reference):
        assert (got[0][0, 1, :2] == 0).all()
        torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[2], expected[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_special_zero_sum_rectified_maps_are_uniform(dtype):
    for reg in REGS:
        for norm, fill in (("relu", -1.0), ("relu", 0.0), ("abs", 0.0)):
            case = make_case((2, 2, 3, 5), norm, reg, dtype=dtype, coord_loss="euclidean", seed=51)
            z = case.logits.clone()
            z[1, 0] = fill
            outs, grads = check_cpp_ops(replace(case, logits=z), f"{norm} {fill} {reg}")
            assert outs[5][1, 0, 1] == 0 and (grads[0][1, 0] == 0).all()  # stats denom 0, no gradient


def test_special_huge_and_infinite_logits():
    for reg in REGS:
        for norm in ("softmax", "abs", "sigmoid", "relu"):
            case = make_case((2, 2, 5, 6), norm, reg, dtype=torch.float32, coord_loss="euclidean", beta=1.3,
                             seed=52)
            z = case.logits.clone()
            z[0, 0] *= 1e30
            z[1, 1, 2, 3] = 1e30
            check_cpp_ops(replace(case, logits=z), f"huge {norm} {reg}")
            z = case.logits.clone()
            z[0, 0, 1, 1] = math.inf
            z[1, 1, 2, 3] = -math.inf
            check_cpp_ops(replace(case, logits=z), f"inf {norm} {reg}")


@pytest.mark.parametrize("dtype, tiny", [(torch.float32, 1e-40), (torch.float64, 5.6e-309)],
                         ids=["f32", "f64"])
def test_special_rectified_sum_below_the_reciprocal_of_the_largest_float(dtype, tiny):
    """relu / abs maps whose only positive value is subnormal: 1 / denom overflows. The map is a
    delta at pixel 2 of 4 (normalized 0.25, variance 0); it was inf / NaN."""
    for norm in ("relu", "abs"):
        z = torch.tensor([[[-1.0, -1.0, tiny, -1.0]]], dtype=dtype)
        if norm == "abs":
            z = z.clamp(min=0)
        coords, variance, reg, _, _, stats = FWD(z, None, None, None, None, norm, 1.0, True, "var", 1.0,
                                                 "none", 0.0)
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
        check_cpp_ops(replace(case, logits=z, target=target), reg)


@pytest.mark.parametrize("reg", ["js", "kl"])
def test_precision_target_far_outside_the_map(reg):
    for k, mu in enumerate((3.0, -5.0, 20.0, 1e3)):
        case = make_case((2, 2, 16, 16), "softmax", reg, dtype=torch.float32, coord_loss="euclidean",
                         seed=60 + k)
        check_cpp_ops(replace(case, target=torch.full((2, 2, 2), mu, dtype=torch.float64)), str(mu))


@pytest.mark.parametrize("grid", [True, False])
def test_precision_none_heatmaps_with_a_large_mass(grid):
    """dsntnn-style heatmaps that do not sum to 1 (here ~2700): the variance gradient is a sum
    of terms ~1e8 that nearly cancel. Our float32 error, forward variance and gradient, at most
    twice the reference's, with no floor (it was 7-12x)."""
    g = torch.Generator().manual_seed(3)
    z = (torch.rand(2, 3, 64, 48, generator=g, dtype=torch.float64) * 1.76).float()
    for reg, upstream in (("none", ("grad_coords", "grad_variance")), ("var", ("grad_reg_losses",))):
        case = replace(make_case((2, 3, 64, 48), "none", reg, dtype=torch.float32,
                                 normalized_coordinates=grid, upstream=upstream, seed=4), logits=z)
        outs, grads = run_ops(FWD, BWD, case)
        exact_f, base_f = reference_forward(case), reference_forward(case, None)
        exact_b, base_b = reference_backward(case), reference_backward(case, None)
        assert max_error(outs[1], exact_f[1]) <= 2 * max_error(base_f[1], exact_f[1])
        assert max_error(grads[0], exact_b[0]) <= 2 * max_error(base_b[0], exact_b[0]), reg


# ---------------------------------------------------------------------------------------------
# The portable build of the kernels
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
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         os.path.join(ROOT, "tests", "test_ops_cpu.py"), "-k",
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
