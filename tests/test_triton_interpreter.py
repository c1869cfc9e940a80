"""Triton kernels run on CPU tensors in Triton's interpreter, against the float64 reference.

Runs only in a process started with TRITON_INTERPRET=1 (the Makefile runs this file on its own
so): the variable has to be set before triton is first imported, which a test cannot guarantee.
The interpreter is ~1000x slower than a GPU, so shapes are few and small; a map of 10 000
elements takes the looped (multi-chunk) path with the default block sizes, and the block sizes
are lowered for the other looped-path tests. Every output buffer is poisoned with NaN, so an
element a kernel forgets to write fails the comparison.
"""

import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

pytestmark = [
    pytest.mark.triton_interpreter,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs TRITON_INTERPRET=1 set before triton is imported (run this file in its own "
        "process: TRITON_INTERPRET=1 pytest tests/test_triton_interpreter.py)",
    ),
]

triton = pytest.importorskip("triton")

from dsnt_cuda import reference  # noqa: E402
from dsnt_cuda.triton import ops as tops  # noqa: E402

NORMS = ("softmax", "abs", "relu", "sigmoid", "none")
REGS = ("none", "js", "kl", "var")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tops, "_new_output", nan_output)


@pytest.fixture
def looped(monkeypatch):
    """Force the looped path on small maps: chunks of 16 elements, per-axis loops of 4."""
    monkeypatch.setattr(tops, "SINGLE_BLOCK_MAX", 16)
    monkeypatch.setattr(tops, "SINGLE_BLOCK_MAX_FP64", 16)
    monkeypatch.setattr(tops, "LOOP_BLOCK", 16)
    monkeypatch.setattr(tops, "AXIS_BLOCK_MAX", 4)


def make_inputs(shape, normalization, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L = shape[:2]
    n = len(shape) - 2
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    if normalization == "none":
        # a heatmap that need not sum to 1 (sums around 0.7-1.3), as dsntnn accepts
        z = torch.softmax(z.flatten(2), -1).view(shape) * (0.7 + 0.6 * torch.rand(B, L, *[1] * n, generator=g,
                                                                                     dtype=torch.float64))
    target = (torch.rand(B, L, n, generator=g, dtype=torch.float64) * 1.6 - 0.8)
    upstream = (
        torch.randn(B, L, n, generator=g, dtype=torch.float64),
        torch.randn(B, L, n, generator=g, dtype=torch.float64) * 0.1,
        torch.randn(B, L, generator=g, dtype=torch.float64),
    )
    return z.to(dtype), target, upstream


def reference_results(z, target, options, upstream):
    """Forward outputs and (grad_logits, grad_target) of the float64 reference by autograd."""
    normalization, beta, normalized, reg, sigma_t = options
    z64 = z.detach().to(torch.float64).requires_grad_(True)
    t64 = target.detach().to(torch.float64).requires_grad_(True)
    outs = reference.dsnt_core(z64, t64, normalization, beta, normalized, reg, sigma_t)
    loss = sum((o * g).sum() for o, g in zip(outs, upstream))
    grads = torch.autograd.grad(loss, [z64, t64], allow_unused=True)
    grad_t = grads[1] if grads[1] is not None else torch.zeros_like(t64)
    return [o.detach() for o in outs], grads[0], grad_t


def expected_stats(z, normalization, beta):
    """[shift, denom] of csrc/OPS.md: what backward needs to recompute p."""
    z = z.to(torch.float64).flatten(2)
    if normalization == "softmax":
        shift = z.amax(-1)  # the unscaled largest logit
        denom = torch.exp(beta * (z - shift.unsqueeze(-1))).sum(-1)
    elif normalization == "none":
        shift, denom = torch.zeros(z.shape[:2], dtype=z.dtype), torch.ones(z.shape[:2], dtype=z.dtype)
    else:
        shift, denom = torch.zeros(z.shape[:2], dtype=z.dtype), reference._rectify(z, normalization).sum(-1)
    return torch.stack([shift, denom], -1)


def run_triton(z, target, options, upstream):
    normalization, beta, normalized, reg, sigma_t = options
    coords, var, reg_losses, stats = tops.dsnt_fwd_triton(z, target, *options)
    grad_z, grad_t = tops.dsnt_bwd_triton(*upstream, z, target, coords, var, stats, *options, True)
    return (coords, var, reg_losses), stats, grad_z, grad_t


def assert_close(actual, expected, rtol, atol, what):
    actual = actual.to(torch.float64)
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements off; max abs err {err.max().item():.3e}, "
        f"first bad actual {actual[bad][:4].tolist()} expected {expected[bad][:4].tolist()}"
    )


def check_against_reference(shape, options, dtype=torch.float64, seed=0, tol=1e-10):
    z, target, upstream = make_inputs(shape, options[0], dtype, seed)
    outs, stats, grad_z, grad_t = run_triton(z, target, options, upstream)
    ref_outs, ref_grad_z, ref_grad_t = reference_results(z, target, options, upstream)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, e in zip(("coords", "variance", "reg_losses"), outs, ref_outs):
        assert a.dtype == acc and a.shape == e.shape, name
        assert_close(a, e, tol, tol, name)
    assert_close(stats, expected_stats(z, options[0], options[1]), tol, tol, "stats")
    assert grad_z.dtype == z.dtype and grad_z.shape == z.shape and grad_z.is_contiguous()
    # grad_logits is stored in the logits' dtype: allow its rounding on top of `tol`
    gtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, tol)
    scale = ref_grad_z.abs().max().item()
    assert_close(grad_z, ref_grad_z, gtol, gtol * scale, "grad_logits")
    if options[3] in ("js", "kl"):
        assert_close(grad_t, ref_grad_t, tol, tol * max(ref_grad_t.abs().max().item(), 1.0), "grad_target")
    else:
        assert (grad_t == 0).all()


# ---- every normalization x regularizer, 2-D, single-block and looped paths -----------------


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("normalization", NORMS)
def test_modes_2d_single_block(normalization, reg):
    beta = 1.3 if normalization == "softmax" else 1.0
    normalized = reg != "var"  # both grids over the matrix
    seed = zlib.crc32(f"{normalization}-{reg}".encode())
    check_against_reference((2, 2, 5, 7), (normalization, beta, normalized, reg, 1.2), seed=seed)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("normalization", NORMS)
def test_modes_2d_looped(looped, normalization, reg):
    beta = 0.8 if normalization == "softmax" else 1.0
    normalized = reg != "js"
    check_against_reference((1, 2, 6, 9), (normalization, beta, normalized, reg, 1.0), seed=7)


# ---- 1-D and 3-D ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["single", "looped"])
@pytest.mark.parametrize(
    "shape,normalization,reg,normalized",
    [
        ((2, 2, 11), "softmax", "js", True),
        ((1, 3, 13), "sigmoid", "var", False),
        ((1, 2, 3, 4, 5), "softmax", "kl", False),
        ((2, 1, 4, 3, 5), "relu", "js", True),
        ((1, 2, 2, 5, 4), "none", "var", True),
    ],
)
def test_1d_3d(request, path, shape, normalization, reg, normalized):
    if path == "looped":
        request.getfixturevalue("looped")
    check_against_reference(shape, (normalization, 1.0, normalized, reg, 0.9), seed=3)


def test_large_map_default_blocks():
    """10 000 elements > SINGLE_BLOCK_MAX: the looped path with the default chunk size."""
    assert 100 * 100 > tops.SINGLE_BLOCK_MAX
    check_against_reference((1, 1, 100, 100), ("softmax", 1.0, True, "js", 1.0), dtype=torch.float32,
                            tol=2e-5)


# ---- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["single", "looped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision_inputs(request, path, dtype):
    """Half inputs accumulate in float32; compared with the float64 reference of the same
    (already rounded) input values, so only accumulation error remains."""
    if path == "looped":
        request.getfixturevalue("looped")
    check_against_reference((2, 2, 6, 7), ("softmax", 1.0, True, "js", 1.0), dtype=dtype, seed=11, tol=2e-5)


def test_float64_scalars_keep_double_precision():
    """beta and sigma_t reach float64 kernels unrounded (hi + lo float32 pairs)."""
    check_against_reference((1, 2, 5, 6), ("softmax", 1 / 3, True, "kl", math.pi / 3), tol=1e-12)


# ---- special maps --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN maps: numpy warns, by design
@pytest.mark.parametrize("path", ["single", "looped"])
def test_special_maps(request, path):
    if path == "looped":
        request.getfixturevalue("looped")
    z = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    z[0, 1] = -torch.rand(5, 6, dtype=torch.float64)  # relu sums to 0: uniform map, zero gradient
    z[0, 2] = 0.0
    z[0, 2, 1, 3] = float("nan")  # a NaN map is NaN, and no other map
    target = torch.zeros(1, 4, 2, dtype=torch.float64)
    options = ("relu", 1.0, True, "js", 1.0)
    coords, var, reg_losses, stats = tops.dsnt_fwd_triton(z, target, *options)
    ref = reference.dsnt_core(z, target, *options)
    for a, e in zip((coords, var, reg_losses), ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, equal_nan=True)
    assert torch.isnan(coords[0, 2]).all() and torch.isfinite(coords[0, [0, 1, 3]]).all()
    assert stats[0, 1, 1] == 0
    torch.testing.assert_close(coords[0, 1], torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    upstream = (torch.ones(1, 4, 2, dtype=torch.float64), None, torch.ones(1, 4, dtype=torch.float64))
    grad_z, grad_t = tops.dsnt_bwd_triton(*upstream, z, target, coords, var, stats, *options, False)
    assert (grad_t == 0).all()  # needs_target_grad=False
    assert (grad_z[0, 1] == 0).all()
    assert torch.isfinite(grad_z[0, [0, 1, 3]]).all()

    # softmax: -inf logits get p = 0 and a zero gradient; a NaN softmax map stays contained
    z = torch.randn(1, 3, 5, 6, dtype=torch.float64)
    z[0, 0, :2] = float("-inf")
    z[0, 1, 4, 4] = float("nan")
    options = ("softmax", 1.0, False, "kl", 1.0)
    coords, var, reg_losses, stats = tops.dsnt_fwd_triton(z, target[:, :3], *options)
    ref = reference.dsnt_core(z, target[:, :3], *options)
    for a, e in zip((coords, var, reg_losses), ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, equal_nan=True)
    assert torch.isnan(reg_losses[0, 1]) and torch.isfinite(reg_losses[0, [0, 2]]).all()
    grad_z, _ = tops.dsnt_bwd_triton(upstream[0][:, :3], None, upstream[2][:, :3], z, target[:, :3], coords,
                                     var, stats, *options, False)
    assert (grad_z[0, 0, :2] == 0).all() and torch.isfinite(grad_z[0, [0, 2]]).all()


def test_sharp_map_variance_no_cancellation(looped):
    """A near-delta map far from the origin: the variance is tiny but must stay accurate."""
    z = torch.full((1, 1, 40, 40), -30.0, dtype=torch.float32)
    z[0, 0, 33, 35] = 0.0
    z[0, 0, 33, 36] = -2.0
    coords, var, _, _ = tops.dsnt_fwd_triton(z, None, "softmax", 1.0, False, "none", 1.0)
    ref = reference.dsnt_core(z.double(), None, "softmax", 1.0, False, "none", 1.0)
    torch.testing.assert_close(var.double(), ref[1], rtol=1e-4, atol=1e-9)


def test_strided_logits_and_empty_batch():
    z = torch.randn(2, 6, 5, 3, dtype=torch.float64).permute(0, 3, 2, 1)  # (2, 3, 5, 6) non-contiguous
    target = torch.zeros(2, 3, 2, dtype=torch.float64)
    options = ("softmax", 1.0, True, "js", 1.0)
    for a, e in zip(tops.dsnt_fwd_triton(z, target, *options)[:3], reference.dsnt_core(z, target, *options)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    outs = tops.dsnt_fwd_triton(torch.randn(0, 3, 4, 4), None, "softmax", 1.0, True, "none", 1.0)
    assert [tuple(o.shape) for o in outs] == [(0, 3, 2), (0, 3, 2), (0, 3), (0, 3, 2)]


def test_input_errors():
    z = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="normalization"):
        tops.dsnt_fwd_triton(z, None, "softplus", 1.0, True, "none", 1.0)
    with pytest.raises(ValueError, match="target"):
        tops.dsnt_fwd_triton(z, None, "softmax", 1.0, True, "js", 1.0)
    with pytest.raises(ValueError, match="sigma_t"):
        tops.dsnt_fwd_triton(z, None, "softmax", 1.0, True, "var", -1.0)
    with pytest.raises(ValueError, match="spatial"):
        tops.dsnt_fwd_triton(torch.randn(1, 2, 2, 2, 2, 2), None, "softmax", 1.0, True, "none", 1.0)


def test_maps_above_the_int32_offsets_are_refused(monkeypatch):
    """Element offsets inside a map are int32 in the kernels: larger maps get a clear error."""
    monkeypatch.setattr(tops, "MAX_MAP_SIZE", 16)
    z = torch.randn(1, 2, 4, 5)
    with pytest.raises(ValueError, match="at most"):
        tops.dsnt_fwd_triton(z, None, "softmax", 1.0, True, "none", 1.0)
    tops.dsnt_fwd_triton(z[..., :4], None, "softmax", 1.0, True, "none", 1.0)  # 16: accepted


def test_backward_rejects_saved_tensors_of_the_wrong_shape():
    """The kernel reads coords / variance / stats raw: a wrong shape must not reach it."""
    z = torch.randn(2, 3, 4, 5)
    target = torch.zeros(2, 3, 2)
    options = ("softmax", 1.0, True, "js", 1.0)
    coords, variance, _, stats = tops.dsnt_fwd_triton(z, target, *options)
    for name, bad in (("coords", (coords[:1], variance, stats)), ("variance", (coords, variance[..., :1], stats)),
                      ("stats", (coords, variance, stats[:, :2]))):
        with pytest.raises(ValueError, match=name):
            tops.dsnt_bwd_triton(None, None, None, z, target, *bad, *options, False)
    with pytest.raises(ValueError, match="target"):
        tops.dsnt_bwd_triton(None, None, None, z, target[:1], coords, variance, stats, *options, True)


# ---- autograd entry points -------------------------------------------------------------------


@pytest.mark.parametrize("via", ["dsnt_core_triton", "triton_op"])
def test_autograd_paths(via):
    """dsnt_core_triton (the backend="triton" entry) and the registered triton_op, eagerly on CPU:
    both differentiate in logits and target like the reference."""
    z, target, upstream = make_inputs((2, 2, 5, 6), "softmax", torch.float32, seed=5)
    options = ("softmax", 1.0, True, "js", 1.0)
    z1 = z.clone().requires_grad_(True)
    t1 = target.float().requires_grad_(True)
    if via == "dsnt_core_triton":
        outs = tops.dsnt_core_triton(z1, t1, *options)
    else:
        outs = torch.ops.dsnt_cuda.dsnt_fwd_triton(z1, t1, *options)[:3]
    loss = sum((o * g.float()).sum() for o, g in zip(outs, upstream))
    loss.backward()
    ref_outs, ref_gz, ref_gt = reference_results(z, target.float(), options, upstream)
    for a, e in zip(outs, ref_outs):
        assert_close(a.detach(), e, 2e-5, 2e-5, "forward")
    assert_close(z1.grad, ref_gz, 2e-5, 2e-5 * ref_gz.abs().max().item(), "grad_logits")
    assert_close(t1.grad, ref_gt, 2e-5, 2e-5 * ref_gt.abs().max().item(), "grad_target")


def test_gradcheck_float64():
    """torch.autograd.gradcheck of the autograd path (float64, a few maps, both inputs)."""
    z, target, _ = make_inputs((1, 2, 3, 4), "softmax", torch.float64, seed=2)
    z.requires_grad_(True)
    target.requires_grad_(True)

    def f(z, t):
        return tops.dsnt_core_triton(z, t, "softmax", 1.0, True, "js", 1.0)

    assert torch.autograd.gradcheck(f, (z, target), eps=1e-6, atol=1e-7)


def test_backend_dispatch():
    """backend="triton" of the library's dispatcher reaches these kernels on CPU tensors."""
    from dsnt_cuda.dispatch import dsnt_core

    z, target, _ = make_inputs((1, 3, 6, 5), "softmax", torch.float64, seed=9)
    ours = dsnt_core(z, target, "softmax", 1.0, True, "kl", 1.0, backend="triton")
    for a, e in zip(ours, reference.dsnt_core(z, target, "softmax", 1.0, True, "kl", 1.0)):
        assert_close(a, e, 1e-10, 1e-10, "dispatch")


# ---- the kernels also compile for the GPU ------------------------------------------------------

_COMPILE_SCRIPT = r"""
# Compiles kernel variants for sm_90 with no GPU: typing errors the interpreter forgives (loop-carried
# dtypes, non-constexpr globals, scalar specialization of sizes equal to 1) fail here.
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsnt_cuda.triton.kernels import _dsnt_bwd_kernel, _dsnt_fwd_kernel

def compile_one(fn, ptrs, consts, unit_sizes):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptrs["logits" if name in ("logits_ptr", "glogits_ptr") else "acc"]
        elif name in ("N", "SD", "SH", "SW"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    consts = dict(consts)
    for name in unit_sizes:  # Triton specializes integer arguments equal to 1 as constexprs
        sig[name] = "constexpr"
        consts[name] = 1
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

count = 0
for i, (norm, reg) in enumerate(itertools.product(range(5), range(4))):
    if (norm + reg) % 2 and norm != 0:
        continue  # a covering subset: every NORM, every REG, both paths, all NDIM
    ndim = 1 + i % 3
    single = i % 2 == 0
    fp64 = i % 7 == 0
    logits_type = "*fp64" if fp64 else ("*bf16" if i % 3 else "*fp16")
    ptrs = {"logits": logits_type, "acc": "*fp64" if fp64 else "*fp32"}
    units = {1: ["SD", "SH"], 2: ["SD"], 3: []}[ndim]
    consts = dict(NDIM=ndim, NORM=norm, REG=reg, NORMALIZED=i % 4 < 2, SINGLE=single,
                  BLOCK=1024 if single else 256, AXIS_BLOCK=64, FP64=fp64)
    compile_one(_dsnt_fwd_kernel, ptrs, consts, units)
    compile_one(_dsnt_bwd_kernel, ptrs, dict(consts, TARGET_GRAD=reg in (1, 2)), units)
    count += 2
print("compiled", count)
"""


def test_kernels_compile_for_sm90():
    """The interpreter runs the kernels' Python; this compiles them for an H100 (no GPU needed),
    in a process without TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout
