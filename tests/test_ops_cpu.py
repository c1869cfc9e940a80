"""The CPU kernels of torch.ops.dsnt_cuda.dsnt_fwd / dsnt_bwd against the float64 reference.

Layers (shared/STYLE.md): float64 parity of values and of logits / target gradients -> gradcheck
-> opcheck -> torch.compile(fullgraph=True) parity; then special values and bad inputs.
Half-precision tolerances follow the flash-attention rule: our error against the float64
reference is at most twice the error of the reference run in that dtype (plus a tiny floor).
"""

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

from dsnt_cuda import _extension
from dsnt_cuda import reference as ref

pytestmark = pytest.mark.skipif(
    not _extension.has_kernel("dsnt_fwd", "CPU"), reason="C++ extension not built"
)

if _extension.extension_loaded():
    from dsnt_cuda import ops  # noqa: F401  (fake kernels and autograd)
    from dsnt_cuda.ops import dsnt_core_op

NORMS = ref.NORMALIZATIONS
REGS = ref.REGULARIZERS
# Odd sizes, 1-pixel axes, 1-D / 2-D / 3-D.
SHAPES = [(2, 3, 7), (2, 2, 5, 6), (1, 2, 3, 4, 5), (2, 1, 1, 9), (1, 2, 6, 1), (1, 1, 2, 1, 3)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_inputs(shape, norm, seed, dtype=torch.float64, scale=2.0):
    """Fresh random logits (heatmaps for `none`) and target means inside the map."""
    g = gen(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if norm == "none":  # dsntnn's heatmap input: positive, roughly but not exactly normalized
        mass = 1 + 0.1 * torch.rand(shape[:2] + (1,) * (len(shape) - 2), generator=g,
                                    dtype=torch.float64)
        x = torch.softmax(x.flatten(2), -1).view(shape) * mass
    n = len(shape) - 2
    t = torch.rand(shape[0], shape[1], n, generator=g, dtype=torch.float64) * 1.6 - 0.8
    return x.to(dtype), t


def beta_for(norm):
    return 1.7 if norm == "softmax" else 1.0


def run(fn, logits, target, norm, beta, grid, reg, sigma, weights=None, seed=0):
    """Outputs of fn and the gradients of a random linear function of them."""
    x = logits.detach().clone().requires_grad_(True)
    t = target.detach().clone().requires_grad_(True)
    outs = fn(x, t, norm, beta, grid, reg, sigma)
    if weights is None:
        g = gen(seed + 1000)
        weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    total = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    gx, gt = torch.autograd.grad(total, (x, t), allow_unused=True)
    gt = torch.zeros_like(t) if gt is None else gt
    return [o.detach() for o in outs], gx, gt, weights


def max_err(a, b):
    """Largest |a - b| scaled by max(1, |b|) (relative for large values), NaN-aware."""
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return 0.0
    both_nan = a.isnan() & b.isnan()
    diff = ((a - b).abs() / b.abs().clamp(min=1)).masked_fill(both_nan, 0)
    return diff.max().item()


# ---------------------------------------------------------------------------------------------
# float64 parity, every normalization x regularizer x grid x shape
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norm", NORMS)
def test_float64_matches_reference(shape, norm):
    for k, (reg, grid) in enumerate(itertools.product(REGS, (True, False))):
        seed = 1000 * SHAPES.index(shape) + 100 * NORMS.index(norm) + k
        logits, target = make_inputs(shape, norm, seed)
        args = (norm, beta_for(norm), grid, reg, 1.3)
        ours, gx, gt, w = run(dsnt_core_op, logits, target, *args, seed=seed)
        theirs, rgx, rgt, _ = run(ref.dsnt_core, logits, target, *args, weights=w)
        for name, a, b in zip(("coords", "variance", "reg"), ours, theirs):
            assert a.dtype == torch.float64 and a.shape == b.shape
            assert max_err(a, b) < 1e-10, (name, reg, grid, max_err(a, b))
        assert max_err(gx, rgx) < 1e-9, ("grad_logits", reg, grid, max_err(gx, rgx))
        assert max_err(gt, rgt) < 1e-9, ("grad_target", reg, grid, max_err(gt, rgt))


# ---------------------------------------------------------------------------------------------
# float32 / float16 / bfloat16: error <= 2 x the reference's own error in that dtype
# ---------------------------------------------------------------------------------------------

LOW_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reg", REGS)
def test_low_precision_within_twice_reference_error(dtype, norm, reg):
    for k, shape in enumerate([(2, 3, 9, 11), (2, 2, 4, 5, 3), (3, 2, 17)]):
        seed = 17 * k + NORMS.index(norm) + 7 * REGS.index(reg)
        logits, target = make_inputs(shape, norm, seed, dtype=dtype)
        args = (norm, beta_for(norm), True, reg, 1.0)
        exact, egx, egt, w = run(ref.dsnt_core, logits.double(), target, *args, seed=seed)
        ours, gx, gt, _ = run(dsnt_core_op, logits, target, *args, weights=w)
        base, bgx, bgt, _ = run(ref.dsnt_core, logits, target, *args, weights=w)
        acc = torch.float32
        for name, a, b, e in zip(("coords", "variance", "reg"), ours, base, exact):
            assert a.dtype == acc, (name, a.dtype)
            tol = 2 * max_err(b, e) + 1e-5
            assert max_err(a, e) <= tol, (name, shape, max_err(a, e), tol)
        assert gx.dtype == dtype
        tol = 2 * max_err(bgx, egx) + (1e-5 if dtype == torch.float32 else 1e-3)
        assert max_err(gx, egx) <= tol, ("grad_logits", shape, max_err(gx, egx), tol)
        tol = 2 * max_err(bgt, egt) + 1e-5
        assert max_err(gt, egt) <= tol, ("grad_target", shape, max_err(gt, egt), tol)


def test_float32_peaked_heatmaps_js_kl():
    """Trained-like maps (sharp peak near the target): the float fast-log paths stay exact."""
    g = gen(5)
    B, L, H, W = 4, 3, 32, 24
    target = torch.rand(B, L, 2, generator=g, dtype=torch.float64) * 1.6 - 0.8
    ys = ref.normalized_linspace(H, dtype=torch.float64).view(1, 1, H, 1)
    xs = ref.normalized_linspace(W, dtype=torch.float64).view(1, 1, 1, W)
    mx, my = target[..., 0, None, None], target[..., 1, None, None]
    logits = -((xs - mx) ** 2 + (ys - my) ** 2) * 300 + torch.randn(B, L, H, W, generator=g) * 0.1
    for reg, beta in itertools.product(("js", "kl"), (1.0, 0.3, 3.0)):
        args = ("softmax", beta, True, reg, 1.0)
        exact, egx, egt, w = run(ref.dsnt_core, logits, target, *args)
        ours, gx, gt, _ = run(dsnt_core_op, logits.float(), target.float(), *args, weights=w)
        for a, e in zip(ours, exact):
            assert max_err(a, e) < 2e-5, (reg, beta, max_err(a, e))
        assert max_err(gx, egx) < 2e-5, (reg, beta, max_err(gx, egx))
        assert max_err(gt, egt) < 2e-4, (reg, beta, max_err(gt, egt))


# ---------------------------------------------------------------------------------------------
# Layouts, empty inputs, dtypes of the results
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "expanded"])
def test_non_contiguous_inputs(layout):
    logits, target = make_inputs((2, 3, 6, 5), "softmax", 3)
    if layout == "channels_last":
        x = logits.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = logits.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":
        x = torch.stack([logits, torch.zeros_like(logits)], dim=-1)[..., 0]  # stride 2
    else:
        x = logits[:1].expand(2, 3, 6, 5)
        logits = x.contiguous()
    assert not x.is_contiguous()
    for reg in REGS:
        args = ("softmax", 1.0, True, reg, 1.0)
        ours, gx, gt, w = run(dsnt_core_op, x, target, *args)
        theirs, rgx, rgt, _ = run(ref.dsnt_core, logits, target, *args, weights=w)
        for a, b in zip(ours, theirs):
            assert max_err(a, b) < 1e-10
        assert max_err(gx, rgx) < 1e-9 and max_err(gt, rgt) < 1e-9


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4), (0, 0, 2, 2, 2)])
def test_empty_batch(shape):
    x = torch.randn(shape, dtype=torch.float32, requires_grad=True)
    n = len(shape) - 2
    t = torch.zeros(shape[0], shape[1], n, requires_grad=True)
    coords, var, reg = dsnt_core_op(x, t, "softmax", 1.0, True, "js", 1.0)
    assert coords.shape == (shape[0], shape[1], n) and var.shape == coords.shape
    assert reg.shape == shape[:2]
    (coords.sum() + var.sum() + reg.sum()).backward()
    assert x.grad.shape == x.shape and t.grad.shape == t.shape


def test_outputs_fully_written():
    """With uninitialized memory poisoned (NaN), every output element must still be written."""
    import torch.utils.deterministic as det

    old_alg, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        for norm, reg in itertools.product(NORMS, REGS):
            logits, target = make_inputs((3, 2, 5, 7), norm, 11)
            x = logits.float()
            c, v, r, s = torch.ops.dsnt_cuda.dsnt_fwd(x, target.float(), norm, 1.0, True, reg, 1.0)
            for o in (c, v, r, s):
                assert not o.isnan().any(), (norm, reg)
            gl, gt = torch.ops.dsnt_cuda.dsnt_bwd(
                torch.ones_like(c), None, torch.ones_like(r), x, target.half(), c, v, s, norm,
                1.0, True, reg, 1.0, True,
            )
            assert not gl.isnan().any() and not gt.isnan().any(), (norm, reg)
            assert gt.dtype == torch.float16 and gl.dtype == torch.float32
    finally:
        torch.use_deterministic_algorithms(old_alg)
        det.fill_uninitialized_memory = old_fill


def test_stats_and_result_dtypes():
    logits, target = make_inputs((2, 2, 4, 4), "softmax", 2, dtype=torch.bfloat16)
    c, v, r, s = torch.ops.dsnt_cuda.dsnt_fwd(logits, target, "softmax", 2.0, True, "js", 1.0)
    assert {c.dtype, v.dtype, r.dtype, s.dtype} == {torch.float32}
    z = logits.float().flatten(2)
    shift = z.max(-1).values  # the unscaled largest logit (csrc/OPS.md)
    torch.testing.assert_close(s[..., 0], shift)
    torch.testing.assert_close(s[..., 1], (2.0 * (z - shift[..., None])).exp().sum(-1))
    _, _, _, s = torch.ops.dsnt_cuda.dsnt_fwd(logits, None, "none", 1.0, True, "none", 1.0)
    assert (s[..., 0] == 0).all() and (s[..., 1] == 1).all()
    _, _, _, s = torch.ops.dsnt_cuda.dsnt_fwd(logits, None, "relu", 1.0, True, "none", 1.0)
    torch.testing.assert_close(s[..., 1], logits.float().relu().flatten(2).sum(-1))


def test_target_gradient_only_when_asked():
    logits, target = make_inputs((2, 2, 5, 5), "softmax", 4)
    c, v, r, s = torch.ops.dsnt_cuda.dsnt_fwd(logits, target, "softmax", 1.0, True, "js", 1.0)
    _, gt = torch.ops.dsnt_cuda.dsnt_bwd(
        None, None, torch.ones_like(r), logits, target, c, v, s, "softmax", 1.0, True, "js", 1.0,
        False,
    )
    assert (gt == 0).all() and gt.dtype == target.dtype
    gl, gt = torch.ops.dsnt_cuda.dsnt_bwd(
        None, None, None, logits, None, c, v, s, "softmax", 1.0, True, "none", 1.0, True,
    )
    assert (gl == 0).all() and (gt == 0).all() and gt.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck(norm):
    for reg, shape, grid in [("js", (1, 2, 4, 5), True), ("kl", (2, 1, 3, 2, 2), False),
                             ("var", (1, 2, 6), True), ("none", (1, 1, 3, 4), False)]:
        logits, target = make_inputs(shape, norm, 21)
        if norm in ("abs", "relu"):  # keep away from the kinks at 0
            logits = logits + torch.where(logits >= 0, 0.2, -0.2).double()
        if norm == "none":  # finite differences need p well above 0 where log p curves
            logits = (torch.rand(shape, generator=gen(22), dtype=torch.float64) + 0.5) / math.prod(shape[2:])
        x = logits.clone().requires_grad_(True)
        t = target.clone().requires_grad_(True)

        def f(x, t):
            return dsnt_core_op(x, t, norm, beta_for(norm), grid, reg, 0.8)

        assert torch.autograd.gradcheck(f, (x, t), eps=1e-6, atol=1e-6, rtol=1e-5), (reg, shape)


def _opcheck_samples():
    samples = []
    for k, (norm, reg, shape) in enumerate([
        ("softmax", "js", (2, 3, 5, 4)), ("relu", "kl", (1, 2, 3, 3, 2)), ("none", "var", (2, 2, 7)),
        ("sigmoid", "none", (1, 3, 4, 4)), ("abs", "js", (2, 1, 6, 1)),
    ]):
        for dtype in (torch.float32, torch.float64):
            logits, target = make_inputs(shape, norm, 30 + k, dtype=dtype)
            samples.append((logits, target.to(dtype), norm, beta_for(norm), k % 2 == 0, reg, 1.0))
    return samples


def test_opcheck_fwd():
    for logits, target, *rest in _opcheck_samples():
        x = logits.clone().requires_grad_(True)
        t = target.clone().requires_grad_(rest[3] in ("js", "kl"))
        torch.library.opcheck(torch.ops.dsnt_cuda.dsnt_fwd.default, (x, t, *rest))
        maybe_target = None if rest[3] in ("none", "var") else target
        torch.library.opcheck(torch.ops.dsnt_cuda.dsnt_fwd.default, (logits, maybe_target, *rest))


def test_opcheck_bwd():
    for i, (logits, target, norm, beta, grid, reg, sigma) in enumerate(_opcheck_samples()):
        c, v, r, s = torch.ops.dsnt_cuda.dsnt_fwd(logits, target, norm, beta, grid, reg, sigma)
        grads = [torch.randn_like(c), torch.randn_like(v), torch.randn_like(r)]
        if i % 3 == 1:
            grads[1] = None
        if i % 3 == 2:
            grads = [None, None, grads[2]]
        torch.library.opcheck(
            torch.ops.dsnt_cuda.dsnt_bwd.default,
            (*grads, logits, target, c, v, s, norm, beta, grid, reg, sigma, i % 2 == 0),
        )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def loss_fn(x, t):
        coords, var, reg = dsnt_core_op(x, t, "softmax", 1.0, True, "js", 1.0)
        return (torch.linalg.vector_norm(coords - t, dim=-1) + reg + 0.01 * var.sum(-1)).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    logits, target = make_inputs((2, 3, 8, 6), "softmax", 40, dtype=torch.float32)
    target = target.float()
    results = []
    for f in (loss_fn, compiled):
        x = logits.clone().requires_grad_(True)
        t = target.clone().requires_grad_(True)
        loss = f(x, t)
        loss.backward()
        results.append((loss.detach(), x.grad, t.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Special values
# ---------------------------------------------------------------------------------------------


def _ref64(x, t, norm, reg, beta=1.0):
    return ref.dsnt_core(x.double(), t.double(), norm, beta, True, reg, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_minus_inf_in_softmax_map(dtype):
    logits, target = make_inputs((2, 2, 5, 6), "softmax", 50, dtype=dtype)
    logits[0, 1, :2] = -math.inf
    logits[1, 0, :, 3:] = -math.inf
    for reg in REGS:
        ours, gx, gt, w = run(dsnt_core_op, logits, target.to(dtype), "softmax", 1.0, True, reg, 1.0)
        exact, egx, egt, _ = run(ref.dsnt_core, logits.double(), target, "softmax", 1.0, True, reg,
                                 1.0, weights=w)
        for a, e in zip(ours, exact):
            assert torch.isfinite(a).all() and max_err(a, e) < 1e-5, reg
        assert torch.isfinite(gx).all() and max_err(gx, egx) < 1e-5
        assert (gx[0, 1, :2] == 0).all()


def test_huge_logits():
    logits, target = make_inputs((2, 2, 5, 6), "softmax", 51, dtype=torch.float32)
    logits[0, 0] *= 1e30
    logits[1, 1, 2, 3] = 1e30
    for norm, reg in itertools.product(("softmax", "abs", "sigmoid"), REGS):
        ours, gx, gt, w = run(dsnt_core_op, logits, target.float(), norm, 1.0, True, reg, 1.0)
        exact, egx, egt, _ = run(ref.dsnt_core, logits.double(), target, norm, 1.0, True, reg, 1.0,
                                 weights=w)
        for a, e in zip(ours, exact):
            assert torch.isfinite(a).all() and max_err(a, e) < 1e-4, (norm, reg)
        assert torch.isfinite(gx).all() and torch.isfinite(gt).all(), (norm, reg)


@pytest.mark.parametrize("norm", NORMS)
def test_nan_stays_in_its_map(norm):
    logits, target = make_inputs((2, 3, 4, 5), norm, 52, dtype=torch.float32)
    logits[1, 2, 3, 1] = math.nan
    for reg in REGS:
        x = logits.clone().requires_grad_(True)
        c, v, r = dsnt_core_op(x, target.float(), norm, 1.0, True, reg, 1.0)
        bad = torch.zeros(2, 3, dtype=torch.bool)
        bad[1, 2] = True
        assert c[1, 2].isnan().all() and v[1, 2].isnan().all()
        assert not c[~bad].isnan().any() and not v[~bad].isnan().any()
        if reg != "none":
            assert r[1, 2].isnan() and not r[~bad].isnan().any()
        (c.sum() + v.sum() + r.sum()).backward()
        assert not x.grad[~bad].isnan().any(), (norm, reg)
        assert x.grad[1, 2].isnan().any()


def test_equal_logits_and_uniform_fallback():
    x = torch.full((2, 2, 4, 6), 3.0, requires_grad=True)
    c, v, r = dsnt_core_op(x, None, "softmax", 1.0, True, "none", 1.0)
    torch.testing.assert_close(c, torch.zeros_like(c), atol=1e-6, rtol=0)
    # pixel variance of a uniform axis of S pixels: (S^2 - 1)/12
    torch.testing.assert_close(v[..., 0], torch.full((2, 2), 35 / 12))
    torch.testing.assert_close(v[..., 1], torch.full((2, 2), 15 / 12))
    # An all-negative relu map (and an all-zero abs map) falls back to the uniform map.
    for norm, fill in (("relu", -1.0), ("abs", 0.0)):
        z = torch.full((1, 2, 3, 5), fill, requires_grad=True)
        t = torch.zeros(1, 2, 2, requires_grad=True)
        c, v, r = dsnt_core_op(z, t, norm, 1.0, False, "js", 1.0)
        torch.testing.assert_close(c, torch.tensor([2.0, 1.0]).expand(1, 2, 2))
        exact = ref.dsnt_core(z.detach().double(), t.detach().double(), norm, 1.0, False, "js", 1.0)
        torch.testing.assert_close(r.double(), exact[2], rtol=1e-5, atol=1e-6)
        (c.sum() + v.sum() + r.sum()).backward()
        assert (z.grad == 0).all()
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("reg", ["js", "kl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_divergence_no_nan(reg, dtype):
    """p underflows in half precision and the target sits far away: dsntnn gives NaN here."""
    g = gen(60)
    logits = (torch.randn(2, 3, 16, 16, generator=g) * 12).to(dtype)
    target = torch.tensor([0.95, -0.95]).expand(2, 3, 2).clone()
    x = logits.clone().requires_grad_(True)
    t = target.clone().requires_grad_(True)
    c, v, r = dsnt_core_op(x, t, "softmax", 1.0, True, reg, 1.0)
    (c.sum() + r.sum()).backward()
    for tensor in (c, v, r, x.grad, t.grad):
        assert torch.isfinite(tensor).all()
    exact = ref.dsnt_core(logits.double(), target.double(), "softmax", 1.0, True, reg, 1.0)
    assert max_err(r, exact[2]) < 1e-4


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _fwd(x, t=None, norm="softmax", beta=1.0, reg="none", sigma=1.0):
    return torch.ops.dsnt_cuda.dsnt_fwd(x, t, norm, beta, True, reg, sigma)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: _fwd(torch.randn(3, 4)), "spatial dims"),
        (lambda: _fwd(torch.randn(1, 1, 2, 2, 2, 2)), "spatial dims"),
        (lambda: _fwd(torch.ones(1, 2, 3, dtype=torch.int64)), "float16, bfloat16"),
        (lambda: _fwd(torch.randn(1, 2, 0, 3)), "empty"),
        (lambda: _fwd(torch.randn(1, 2, 3, 3), torch.zeros(1, 2, 3), reg="js"), "target"),
        (lambda: _fwd(torch.randn(1, 2, 3, 3), torch.zeros(2, 2), reg="kl"), "target"),
        (lambda: _fwd(torch.randn(1, 2, 3, 3), None, reg="js"), "target"),
        (lambda: _fwd(torch.randn(1, 2, 3, 3), torch.zeros(1, 2, 2), reg="js", sigma=0.0), "sigma_t"),
        (lambda: _fwd(torch.randn(1, 2, 3, 3), None, reg="var", sigma=math.nan), "sigma_t"),
        (lambda: _fwd(torch.randn(1, 2, 3), beta=math.inf), "beta"),
        (lambda: _fwd(torch.randn(1, 2, 3), beta=0.0), "beta"),
        (lambda: _fwd(torch.randn(1, 2, 3), norm="softermax"), "normalization"),
        (lambda: _fwd(torch.randn(1, 2, 3), reg="l2"), "regularizer"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()


def test_bad_backward_inputs_raise():
    x = torch.randn(2, 3, 4, 4)
    c, v, r, s = _fwd(x)
    with pytest.raises((RuntimeError, ValueError), match="grad_coords"):
        torch.ops.dsnt_cuda.dsnt_bwd(torch.ones(2, 3, 3), None, None, x, None, c, v, s, "softmax",
                                     1.0, True, "none", 1.0, False)
    with pytest.raises((RuntimeError, ValueError), match="stats"):
        torch.ops.dsnt_cuda.dsnt_bwd(None, None, None, x, None, c, v, s[..., :1], "softmax", 1.0,
                                     True, "none", 1.0, False)


@pytest.mark.skipif(os.environ.get("DSNT_CUDA_CPU_KERNELS") == "generic", reason="already generic")
def test_portable_kernels_in_subprocess():
    """The portable (non-AVX2) build of the kernels passes the parity and special-value tests."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, DSNT_CUDA_CPU_KERNELS="generic", PYTHONPATH=path)
    selection = ("float64_matches or low_precision or peaked or minus_inf or huge or nan or equal"
                 " or half_divergence")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selection],
        capture_output=True, text=True, timeout=600, env=env, cwd=root,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The libtorch-only library of the CMake build (scripts/cmake_test.sh)
# ---------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMAKE_LIB = os.path.join(ROOT, "cmake-build", "libdsnt_cuda_ops.so")


@pytest.mark.skipif(not os.path.exists(CMAKE_LIB), reason="CMake library not built")
def test_cmake_library_loads_with_load_library():
    code = (
        "import torch, sys\n"
        f"torch.ops.load_library({CMAKE_LIB!r})\n"
        "x = torch.zeros(1, 1, 3, 5); x[0, 0, 2, 4] = 50.0\n"
        "c = torch.ops.dsnt_cuda.dsnt_fwd(x, None, 'softmax', 1.0, False, 'none', 1.0)[0]\n"
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
