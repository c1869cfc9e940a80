"""The CUDA C++ kernels of dsnt_fwd / dsnt_bwd (csrc/cuda/dsnt_kernel.cu) on a GPU.

Layers: parity with the float64 reference (`dsnt_cuda.reference.dsnt_core`) for outputs and for
the gradients of logits and target, over dtypes, 1/2/3-D maps, odd sizes, every size class of
the kernels (warp <= 512 < block <= 4096 < streamed) and their boundaries, non-contiguous and
channels-last inputs, misaligned bases (scalar-load path), empty batches, > 65535 maps, every
normalization x regularizer; then gradcheck (float64), torch.library.opcheck, torch.compile
(fullgraph) parity and CUDA/CPU kernel agreement. All skipped without a GPU, except the check
that a CUDA build registered its CUDA kernels, which runs everywhere.

DSNT_GPU_TESTS_ON=cpu (make test sets it) runs the same checks on CPU tensors, i.e. against the
CPU kernels, which implement the same contract: the test code itself then runs without a GPU,
so a GPU machine does not meet it for the first time.
"""

import os

import pytest
import torch

from dsnt_cuda import _extension, reference

HAS_GPU = torch.cuda.is_available()
BUILD = _extension.build_info()
WITH_CUDA_BUILD = bool(BUILD.get("extension")) and bool(BUILD.get("with_cuda"))
HAS_CUDA_KERNELS = _extension.has_kernel("dsnt_fwd", "CUDA")
HAS_CPU_KERNELS = _extension.has_kernel("dsnt_fwd", "CPU")

DEVICE = os.environ.get("DSNT_GPU_TESTS_ON", "cuda")
DRY_RUN = DEVICE == "cpu"  # this file's checks against the CPU kernels (see the docstring)

_skip_without_gpu = pytest.mark.skipif(
    not (DRY_RUN and HAS_CPU_KERNELS) and not (HAS_GPU and HAS_CUDA_KERNELS),
    reason="needs a CUDA GPU and the CUDA build of dsnt_cuda._C",
)


def needs_gpu(test):
    """Marked `cuda` and skipped without a GPU (or without the CUDA kernels)."""
    return pytest.mark.cuda(_skip_without_gpu(test))

NORMS = ("softmax", "abs", "relu", "sigmoid", "none")
REGS = ("none", "js", "kl", "var")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Runs everywhere: a CUDA build must register the CUDA kernels (the extension imports without a GPU).


def test_cuda_kernels_registered_in_cuda_build():
    if not BUILD.get("extension"):
        pytest.skip(f"extension not built: {BUILD.get('error')}")
    if not BUILD.get("with_cuda"):
        pytest.skip("CPU-only build of dsnt_cuda._C")
    for op in ("dsnt_fwd", "dsnt_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dsnt_cuda::{op}", "CUDA"), op
    assert "90" in str(BUILD.get("cuda_architectures", "")), BUILD


# ----------------------------------------------------------------------------------------------
# Helpers


def ops():
    from dsnt_cuda import ops as _ops

    return _ops


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(shape, normalization, dtype=torch.float32, seed=0, device=DEVICE):
    """Logits (heatmaps for "none": positive, not summing to 1), targets, upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    B, L = shape[:2]
    n = len(shape) - 2
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    if normalization == "none" and z.numel() > 0:
        scale = 0.7 + 0.6 * torch.rand(B, L, *[1] * n, generator=g, dtype=torch.float64)
        z = torch.softmax(z.flatten(2), -1).view(shape) * scale
    target = torch.rand(B, L, n, generator=g, dtype=torch.float64) * 1.6 - 0.8
    upstream = (
        torch.randn(B, L, n, generator=g, dtype=torch.float64),
        torch.randn(B, L, n, generator=g, dtype=torch.float64) * 0.01,
        torch.randn(B, L, generator=g, dtype=torch.float64),
    )
    acc = acc_dtype(dtype)
    return z.to(device, dtype), target.to(device, acc), tuple(u.to(device, acc) for u in upstream)


def reference_results(z, target, options, upstream):
    """float64 reference on the same (already rounded) input values: outputs and gradients."""
    normalization, beta, normalized, reg, sigma_t = options
    z64 = z.detach().to(torch.float64).requires_grad_(True)
    t64 = target.detach().to(torch.float64).requires_grad_(True)
    outs = reference.dsnt_core(z64, t64, normalization, beta, normalized, reg, sigma_t)
    loss = sum((o * u.double()).sum() for o, u in zip(outs, upstream))
    gz, gt = torch.autograd.grad(loss, [z64, t64], allow_unused=True)
    gt = gt if gt is not None else torch.zeros_like(t64)
    return [o.detach() for o in outs], gz, gt


def kernel_results(z, target, options, upstream):
    z = z.detach().clone().requires_grad_(True)
    t = target.detach().clone().requires_grad_(True)
    outs = ops().dsnt_core_op(z, t, *options)
    loss = sum((o * u).sum() for o, u in zip(outs, upstream))
    gz, gt = torch.autograd.grad(loss, [z, t], allow_unused=True)
    gt = gt if gt is not None else torch.zeros_like(t)
    return [o.detach() for o in outs], gz, gt


def assert_close(actual, expected, tol, what):
    """|a - e| <= tol * (|e| + max|e| + 0.01): relative, with the tensor's scale (and, for
    all-zero references such as the divergence of a one-pixel map, 0.01) as the absolute floor."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}: non-finite mismatch"
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs()
    bad = ~(err <= tol * (expected.abs() + scale + 0.01))
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.numel()} off, max abs err {err.max().item():.3e}, "
        f"scale {scale.item():.3e}, tol {tol}"
    )


# Output tolerance per input dtype (half inputs are compared on their rounded values, so only the
# float32 accumulation counts); gradient tolerance includes the rounding of the stored gradient.
OUT_TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 5e-5, torch.bfloat16: 5e-5}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def check(shape, options, dtype=torch.float32, seed=0, scale_tol=1.0, z=None):
    normalization = options[0]
    zz, target, upstream = make_inputs(shape, normalization, dtype, seed)
    if z is not None:
        zz = z
    ref_outs, ref_gz, ref_gt = reference_results(zz, target, options, upstream)
    peak = ref_gz.abs().max().item() if ref_gz.numel() else 0.0
    if dtype == torch.float16 and peak > 1e4:
        # Gradients are linear in the upstream gradients: scale them so that dL/dz fits float16
        # (variance gradients of long axes reach ~1e9, beyond float16's 65504).
        factor = 1e4 / peak
        upstream = tuple(u * factor for u in upstream)
        ref_gz, ref_gt = ref_gz * factor, ref_gt * factor
    outs, gz, gt = kernel_results(zz, target, options, upstream)
    acc = acc_dtype(dtype)
    for name, o, r in zip(("coords", "variance", "reg_losses"), outs, ref_outs):
        assert o.dtype == acc, f"{name} dtype {o.dtype}"
        assert_close(o, r, OUT_TOL[dtype] * scale_tol, f"{name} {shape} {options} {dtype}")
    assert gz.dtype == zz.dtype and gz.shape == zz.shape
    assert_close(gz, ref_gz, GRAD_TOL[dtype] * scale_tol, f"grad logits {shape} {options} {dtype}")
    assert_close(gt, ref_gt, GRAD_TOL[dtype] * scale_tol, f"grad target {shape} {options} {dtype}")


# ----------------------------------------------------------------------------------------------
# Parity with the float64 reference


@needs_gpu
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 2, 64, 48), (2, 2, 9, 10, 11)], ids=str)
def test_modes_fp32(shape, normalization, reg):
    check(shape, (normalization, 1.0, True, reg, 1.0))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 1),  # one-pixel maps
        (2, 3, 37),  # 1-D, odd
        (3, 2, 7, 13),  # odd, not a multiple of any vector width
        (2, 3, 16, 16),  # warp class
        (1, 2, 512),  # warp class boundary
        (1, 2, 513),  # block class, just above
        (2, 2, 64, 64),  # block class boundary (4096)
        (1, 2, 4097),  # streamed, just above
        (1, 2, 5, 6, 7),  # 3-D odd
        (1, 2, 16, 16, 16),  # 3-D, 4096
        (1, 2, 70, 70),  # streamed 2-D, one partial tile
    ],
    ids=str,
)
@pytest.mark.parametrize(
    "normalization,reg", [("softmax", "js"), ("relu", "var"), ("none", "kl"), ("sigmoid", "none")]
)
def test_dtypes_and_sizes(shape, dtype, normalization, reg):
    check(shape, (normalization, 1.0, True, reg, 1.0), dtype=dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize(
    "normalization,reg", [("softmax", "js"), ("abs", "kl"), ("none", "var"), ("softmax", "var")]
)
def test_large_3d_streamed(dtype, normalization, reg):
    # 64^3 = 262144 elements per map: far above every on-chip threshold.
    check((1, 2, 64, 64, 64), (normalization, 1.0, True, reg, 1.0), dtype=dtype, scale_tol=4.0)


@needs_gpu
@pytest.mark.parametrize(
    "normalization,reg", [("softmax", "js"), ("relu", "kl"), ("none", "none"), ("sigmoid", "var")]
)
@pytest.mark.parametrize("shape", [(1, 1, 300000), (1, 1, 1, 300000)], ids=str)
def test_large_1d_streamed(shape, normalization, reg):
    # 300000 elements along one axis: the Gaussian target no longer fits a shared-memory table
    # (computed on the fly).
    check(shape, (normalization, 1.0, True, reg, 3.0), scale_tol=100.0)


@needs_gpu
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 2, 64, 64), (1, 1, 100, 100)], ids=str)
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("beta", [1.0, 0.5, 3.0])
def test_beta_and_pixel_grid(shape, normalized, beta):
    check(shape, ("softmax", beta, normalized, "js", 1.5))
    check(shape, ("none", 1.0, normalized, "var", 1.5))


@needs_gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_non_contiguous_and_channels_last(dtype):
    options = ("softmax", 1.0, True, "js", 1.0)
    base, _, _ = make_inputs((2, 3, 24, 20), "softmax", dtype)
    check((2, 3, 20, 24), options, dtype, z=base.transpose(-1, -2))  # transposed spatial dims
    check((2, 3, 24, 20), options, dtype, z=base.contiguous(memory_format=torch.channels_last))
    vol, _, _ = make_inputs((2, 3, 6, 8, 10), "softmax", dtype)
    check((2, 3, 6, 8, 10), options, dtype, z=vol.contiguous(memory_format=torch.channels_last_3d))
    wide, _, _ = make_inputs((2, 3, 24, 40), "softmax", dtype)
    check((2, 3, 24, 20), options, dtype, z=wide[..., ::2])  # strided


@needs_gpu
@pytest.mark.parametrize("n_elems", [64, 1024, 8192])
def test_misaligned_base_takes_scalar_path(n_elems):
    # A storage offset of one element breaks 16-byte alignment: the kernels must fall back to
    # scalar loads and stores with identical results.
    buf = torch.randn(2 * 3 * n_elems + 1, device=DEVICE, dtype=torch.float32)
    z = buf[1:].view(2, 3, n_elems)
    assert z.is_contiguous() and z.data_ptr() % 16 != 0
    for options in (("softmax", 1.0, True, "js", 1.0), ("abs", 1.0, False, "var", 2.0)):
        check((2, 3, n_elems), options, torch.float32, z=z)
        aligned = z.clone()
        a = ops().dsnt_core_op(z, make_inputs((2, 3, n_elems), "softmax")[1], *options)
        b = ops().dsnt_core_op(aligned, make_inputs((2, 3, n_elems), "softmax")[1], *options)
        for x, y in zip(a, b):
            assert_close(x, y, 1e-6, "misaligned vs aligned")


@needs_gpu
@pytest.mark.parametrize("shape", [(0, 3, 16, 16), (2, 0, 8), (0, 0, 4, 4, 4), (0, 2, 9000)], ids=str)
def test_empty_batch(shape):
    for normalization, reg in (("softmax", "js"), ("relu", "var")):
        z, target, upstream = make_inputs(shape, normalization)
        outs, gz, gt = kernel_results(z, target, (normalization, 1.0, True, reg, 1.0), upstream)
        n = len(shape) - 2
        assert outs[0].shape == (shape[0], shape[1], n) and outs[1].shape == (shape[0], shape[1], n)
        assert outs[2].shape == (shape[0], shape[1])
        assert gz.shape == z.shape and gt.shape == target.shape


@needs_gpu
@pytest.mark.parametrize(
    "shape", [(70000, 1, 4, 4), (1, 70001, 16, 16), (66000, 1, 24, 24)], ids=["warp", "warp-L", "block"]
)
def test_many_maps(shape):
    # More maps than 65535 (a grid y/z limit) and than one grid-stride pass of small grids.
    check(shape, ("softmax", 1.0, True, "js", 1.0))


@needs_gpu
def test_nan_confined_to_its_map_and_neg_inf():
    for shape in ((3, 2, 16, 16), (3, 2, 64, 64), (3, 2, 80, 80)):
        z, target, upstream = make_inputs(shape, "softmax")
        z[1, 0, 3, 5] = float("nan")
        z[2, 1, :, :5] = float("-inf")  # part of a softmax map at -inf: p = 0 there
        for normalization, reg in (("softmax", "js"), ("softmax", "var"), ("sigmoid", "kl")):
            options = (normalization, 1.0, True, reg, 1.0)
            outs, gz, _ = kernel_results(z, target, options, upstream)
            for o in outs:
                assert torch.isnan(o[1, 0]).all(), (shape, options)
                finite = torch.ones(o.shape[:2], dtype=torch.bool, device=DEVICE)
                finite[1, 0] = False
                if normalization == "sigmoid":
                    finite[2, 1] = False  # sigmoid(-inf) = 0 is fine too, but do not assert more
                assert torch.isfinite(o[finite]).all(), (shape, options)
            assert torch.isnan(gz[1, 0]).all()
            keep = torch.ones(shape[:2], dtype=torch.bool, device=DEVICE)
            keep[1, 0] = False
            assert torch.isfinite(gz[keep]).all(), (shape, options)
        # the -inf map agrees with the reference
        zc = z.clone()
        zc[1, 0, 3, 5] = 0.0
        options = ("softmax", 1.0, True, "js", 1.0)
        ref_outs, ref_gz, _ = reference_results(zc, target, options, upstream)
        outs, gz, _ = kernel_results(zc, target, options, upstream)
        for o, r in zip(outs, ref_outs):
            assert_close(o, r, 5e-5, "-inf map")
        assert_close(gz, ref_gz, 2e-4, "-inf map grad")


@needs_gpu
@pytest.mark.parametrize("shape", [(2, 2, 16, 16), (2, 2, 64, 64), (2, 2, 100, 100)], ids=str)
def test_uniform_fallback_zero_sum(shape):
    z, target, upstream = make_inputs(shape, "relu")
    z[0, 1] = -z[0, 1].abs() - 0.1  # relu sums to 0
    z[1, 0] = 0.0  # abs / relu sum to 0
    for normalization in ("relu", "abs"):
        for reg in ("js", "var"):
            options = (normalization, 1.0, True, reg, 1.0)
            outs, gz, gt = kernel_results(z, target, options, upstream)
            ref_outs, ref_gz, ref_gt = reference_results(z, target, options, upstream)
            for o, r in zip(outs, ref_outs):
                assert_close(o, r, 5e-5, f"uniform fallback {options}")
            assert_close(gz, ref_gz, 2e-4, f"uniform fallback grad {options}")
            assert_close(gt, ref_gt, 2e-4, f"uniform fallback target grad {options}")
            assert (gz[1, 0] == 0).all()
            stats = torch.ops.dsnt_cuda.dsnt_fwd(z, target, *options)[3]
            assert stats[1, 0, 1] == 0 and stats[1, 0, 0] == 0


@needs_gpu
def test_stats_and_backward_op_directly():
    shape = (2, 3, 20, 20)
    z, target, (gc, gv, gr) = make_inputs(shape, "softmax")
    coords, var, reg_losses, stats = torch.ops.dsnt_cuda.dsnt_fwd(z, target, "softmax", 2.0, True, "js", 1.0)
    zf = z.double().flatten(2)
    assert_close(stats[..., 0], zf.max(-1).values, 1e-6, "softmax shift (the unscaled max logit)")
    assert_close(stats[..., 1], torch.exp(2.0 * (zf - zf.max(-1, keepdim=True).values)).sum(-1), 1e-5, "denom")
    s_none = torch.ops.dsnt_cuda.dsnt_fwd(z, None, "none", 1.0, True, "var", 1.0)[3]
    assert (s_none[..., 0] == 0).all() and (s_none[..., 1] == 1).all()
    r_none = torch.ops.dsnt_cuda.dsnt_fwd(z, None, "softmax", 1.0, True, "none", 1.0)[2]
    assert (r_none == 0).all()
    # None upstream gradients are zeros; grad_target is zero unless asked for.
    args = (z, target, coords, var, stats, "softmax", 2.0, True, "js", 1.0)
    g_all_none, gt_none = torch.ops.dsnt_cuda.dsnt_bwd(None, None, None, *args, True)
    assert (g_all_none == 0).all() and (gt_none == 0).all()
    g1, gt1 = torch.ops.dsnt_cuda.dsnt_bwd(gc, None, gr, *args, False)
    assert (gt1 == 0).all() and gt1.dtype == target.dtype
    g2, gt2 = torch.ops.dsnt_cuda.dsnt_bwd(gc, torch.zeros_like(gv), gr, *args, True)
    assert_close(g1, g2, 1e-6, "None grad_variance == zeros")
    assert gt2.abs().sum() > 0
    # grad_target dtype follows the target's dtype
    _, gt3 = torch.ops.dsnt_cuda.dsnt_bwd(gc, None, gr, z, target.double(), coords, var, stats,
                                          "softmax", 2.0, True, "js", 1.0, True)
    assert gt3.dtype == torch.float64


@needs_gpu
def test_outputs_fully_written_over_poisoned_memory():
    # Fill the caching allocator's free blocks with NaN first: any element the kernels fail to
    # write comes back NaN.
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for shape in ((3, 5, 16, 16), (3, 5, 64, 64), (2, 3, 70, 70), (5, 7, 9)):
        for normalization, reg in (("softmax", "js"), ("relu", "var"), ("none", "none")):
            z, target, upstream = make_inputs(shape, normalization)
            sizes = (z.numel(), 4096, 512, 64, 16) * 4
            poison = [torch.full((s,), float("nan"), device=DEVICE) for s in sizes]
            del poison
            outs, gz, gt = kernel_results(z, target, (normalization, 1.0, True, reg, 1.0), upstream)
            for o in (*outs, gz, gt):
                assert torch.isfinite(o).all(), (shape, normalization, reg)
            stats = torch.ops.dsnt_cuda.dsnt_fwd(z, target, normalization, 1.0, True, reg, 1.0)[3]
            assert torch.isfinite(stats).all()


# ----------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, CPU agreement


@needs_gpu
@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("shape", [(2, 2, 5, 6), (1, 2, 3, 4, 5), (2, 1, 7), (1, 1, 70, 70)], ids=str)
def test_gradcheck_float64(shape, normalization, reg):
    if shape == (1, 1, 70, 70) and reg not in ("js", "var"):
        pytest.skip("one streamed shape per regularizer family is enough")
    z, target, _ = make_inputs(shape, normalization, torch.float64, seed=3)
    z.requires_grad_(True)
    target.requires_grad_(reg in ("js", "kl"))

    def fn(z, t):
        return ops().dsnt_core_op(z, t, normalization, 1.0, True, reg, 1.0)

    assert torch.autograd.gradcheck(
        fn, (z, target), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=z.numel() > 500
    )


def fwd_samples():
    for shape in ((2, 3, 16, 16), (1, 2, 70, 70), (2, 2, 5, 6, 7)):
        for normalization, reg in (("softmax", "js"), ("relu", "kl"), ("none", "var"), ("sigmoid", "none")):
            for dtype in (torch.float32, torch.float64):
                z, target, upstream = make_inputs(shape, normalization, dtype)
                yield (z, target, normalization, 1.0, True, reg, 1.0), upstream


@needs_gpu
def test_opcheck_fwd():
    for args, _ in fwd_samples():
        torch.library.opcheck(torch.ops.dsnt_cuda.dsnt_fwd.default, args)
        z = args[0].clone().requires_grad_(True)
        torch.library.opcheck(torch.ops.dsnt_cuda.dsnt_fwd.default, (z, *args[1:]))


@needs_gpu
def test_opcheck_bwd():
    for args, (gc, gv, gr) in fwd_samples():
        coords, var, _, stats = torch.ops.dsnt_cuda.dsnt_fwd(*args)
        z, target, *opts = args
        torch.library.opcheck(
            torch.ops.dsnt_cuda.dsnt_bwd.default, (gc, gv, gr, z, target, coords, var, stats, *opts, True)
        )
        maybe_target = None if opts[3] in ("none", "var") else target
        torch.library.opcheck(
            torch.ops.dsnt_cuda.dsnt_bwd.default,
            (None, gv, None, z, maybe_target, coords, var, stats, *opts, False),
        )


@needs_gpu
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 2, 70, 70)], ids=str)
def test_torch_compile_fullgraph(shape):
    torch._dynamo.reset()
    z, target, upstream = make_inputs(shape, "softmax")

    def loss_fn(z, t):
        coords, var, reg_losses = ops().dsnt_core_op(z, t, "softmax", 1.0, True, "js", 1.0)
        return ((coords - t).norm(dim=-1) + reg_losses).mean() + 0.01 * var.mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    eager = loss_fn(z1, target)
    comp = compiled(z2, target)
    assert_close(comp, eager, 1e-6, "compiled loss")
    (g1,) = torch.autograd.grad(eager, z1)
    (g2,) = torch.autograd.grad(comp, z2)
    assert_close(g2, g1, 1e-6, "compiled grad")


@needs_gpu
@pytest.mark.skipif(not HAS_CPU_KERNELS or DRY_RUN, reason="CPU kernels not built, or the dry run on CPU")
@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 2, 70, 70), (2, 2, 5, 6, 7), (2, 2, 33)], ids=str)
def test_cuda_matches_cpu_kernels(shape, normalization, reg):
    options = (normalization, 1.0, True, reg, 1.0)
    z, target, upstream = make_inputs(shape, normalization, torch.float64)
    outs_gpu, gz_gpu, gt_gpu = kernel_results(z, target, options, upstream)
    upstream_cpu = tuple(u.cpu() for u in upstream)
    outs_cpu, gz_cpu, gt_cpu = kernel_results(z.cpu(), target.cpu(), options, upstream_cpu)
    for a, b in zip(outs_gpu, outs_cpu):
        assert_close(a.cpu(), b, 1e-10, f"cuda vs cpu {options}")
    assert_close(gz_gpu.cpu(), gz_cpu, 1e-10, f"cuda vs cpu grad {options}")
    assert_close(gt_gpu.cpu(), gt_cpu, 1e-10, f"cuda vs cpu target grad {options}")
