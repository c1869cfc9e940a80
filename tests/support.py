"""What every backend's tests share: random op inputs, the float64 reference results, one
tolerance rule.

- `make_case(...)` builds the arguments of the fused ops (docs/ops.md) from fresh random values
  (never zeros): logits (heatmaps for `none`), target means, optional mask, beta / sigma_t as a
  float or a tensor, and upstream gradients for the backward (each may be None).
- `reference_forward` / `reference_backward` run `dsnt_cuda.reference.dsnt_fwd` (pure PyTorch,
  autograd) on the same case: the oracle. Run in float64 it is the truth; run on the case's own
  dtype it is the plain-PyTorch baseline of the tolerance rule.
- `run_ops(fwd, bwd, case)` calls any backend's op pair (C++ ops, Triton launchers, the CUDA
  emulation) with the same arguments.
- `gradcheck_logits(case)`: float64 logits where finite differences are smooth;
- `CUDA_SIZE_CLASSES`, `CUDA_CLASS_SHAPE`: the CUDA kernels' size classes and a map for each
  (tests/conftest.py's `size_class` fixture forces one);
- `assert_close(actual, exact, baseline, what)`: NaN exactly where the truth has NaN, and an
  error against the truth at most twice the baseline's error plus a floor of a few ulps of the
  output's dtype (flash-attention's rule). Errors are measured relative to max(1, |truth|) per
  element, so large values are compared relatively and small ones absolutely. The floor is in
  ulps of the coarser of the output dtype and the accumulation dtype (`floor_dtype`: a float64
  grad_target of float32 logits is computed in float32), and for map-sized outputs
  (`map_dims` > 0, grad_logits) relative to the largest |truth| of the same map: a gradient
  element is G_i - sum p G, and any correct evaluation order leaves ulps of the map's largest
  terms in it (the float64 reference itself is that far from the exact value).

For the tests of the public API (every backend through the same functions):
- `backends_on(device)`, `BACKEND_CASES`: the backends this process tests, found at run time
  (`dsnt_cuda.available_backends`), so cpu / cuda / triton are covered wherever they run;
- `random_logits`, `random_heatmaps`, `random_targets`, `peaked_logits`: seeded inputs;
- `values_and_grads(fn, *inputs)`: outputs of `fn` and the gradients of a random weighting of
  them with respect to every floating input, the comparison unit of API tests, compared by
  `assert_all_close` (map-shaped gradients with the per-map floor).
"""

import math
import os
from dataclasses import dataclass, field, replace

import pytest
import torch

import dsnt_cuda
from dsnt_cuda import _extension, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMS = reference.NORMALIZATIONS
REGS = reference.REGULARIZERS
FWD_OUTPUTS = ("coords", "variance", "reg_losses", "coord_losses", "loss")
BWD_OUTPUTS = ("grad_logits", "grad_target", "grad_beta_map")
UPSTREAM = ("grad_coords", "grad_variance", "grad_reg_losses", "grad_coord_losses", "grad_loss")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class OpCase:
    """The arguments of dsnt_fwd (schema order) plus upstream gradients for dsnt_bwd."""

    logits: torch.Tensor
    target: torch.Tensor | None
    mask: torch.Tensor | None
    beta_map: torch.Tensor | None
    sigma_t_map: torch.Tensor | None
    normalization: str
    beta: float
    normalized_coordinates: bool
    reg: str
    sigma_t: float
    coord_loss: str
    reg_weight: float
    upstream: dict = field(default_factory=dict)  # UPSTREAM name -> tensor or None

    def fwd_args(self) -> tuple:
        return (self.logits, self.target, self.mask, self.beta_map, self.sigma_t_map,
                self.normalization, self.beta, self.normalized_coordinates, self.reg, self.sigma_t,
                self.coord_loss, self.reg_weight)

    def options(self) -> tuple:
        return self.fwd_args()[5:]

    @property
    def beta_argument(self):
        """beta as the public API takes it: the per-map tensor when the case has one, else the float."""
        return self.beta if self.beta_map is None else self.beta_map

    @property
    def sigma_t_argument(self):
        return self.sigma_t if self.sigma_t_map is None else self.sigma_t_map

    def cast(self, dtype: torch.dtype) -> "OpCase":
        """The same case with the logits in `dtype` (everything else unchanged)."""
        return replace(self, logits=self.logits.to(dtype))

    def to(self, device) -> "OpCase":
        def move(t):
            return t.to(device) if isinstance(t, torch.Tensor) else t

        return replace(self, logits=move(self.logits), target=move(self.target), mask=move(self.mask),
                       beta_map=move(self.beta_map), sigma_t_map=move(self.sigma_t_map),
                       upstream={k: move(v) for k, v in self.upstream.items()})


def _per_map_tensor(kind, batch, keypoints, low, high, g):
    """None ("float"), or a tensor of shape () / (L,) / (B, L) with values in [low, high)."""
    shapes = {"scalar": (), "keypoint": (keypoints,), "map": (batch, keypoints)}
    if kind == "float":
        return None
    return torch.rand(shapes[kind], generator=g, dtype=torch.float64) * (high - low) + low


def make_case(shape, normalization="softmax", reg="js", *, dtype=torch.float32, seed=0,
              coord_loss="none", normalized_coordinates=True, beta=1.3, beta_kind="float",
              sigma_t=1.0, sigma_kind="float", mask=False, reg_weight=0.7, upstream=UPSTREAM,
              scale=2.0, target_spread=0.8) -> OpCase:
    """A random case. `beta_kind` / `sigma_kind`: "float", "scalar", "keypoint" or "map".
    `upstream`: the names of the upstream gradients to give (others None)."""
    g = generator(seed)
    batch, keypoints, n = shape[0], shape[1], len(shape) - 2
    z = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if normalization == "none":  # dsntnn's heatmap input: positive, roughly but not exactly normalized
        mass = 0.7 + 0.6 * torch.rand((batch, keypoints) + (1,) * n, generator=g, dtype=torch.float64)
        z = torch.softmax(z.flatten(2), -1).view(shape) * mass
    target = (torch.rand(batch, keypoints, n, generator=g, dtype=torch.float64) * 2 - 1) * target_spread
    weights = None
    if mask:
        weights = (torch.rand(batch, keypoints, generator=g, dtype=torch.float64) > 0.3).double()
    grads = {
        "grad_coords": torch.randn(batch, keypoints, n, generator=g, dtype=torch.float64),
        "grad_variance": torch.randn(batch, keypoints, n, generator=g, dtype=torch.float64) * 0.01,
        "grad_reg_losses": torch.randn(batch, keypoints, generator=g, dtype=torch.float64),
        "grad_coord_losses": torch.randn(batch, keypoints, generator=g, dtype=torch.float64),
        "grad_loss": torch.randn((), generator=g, dtype=torch.float64),
    }
    if coord_loss == "none":
        upstream = [u for u in upstream if u not in ("grad_coord_losses", "grad_loss")]
    return OpCase(
        logits=z.to(dtype),
        target=target,
        mask=weights,
        beta_map=_per_map_tensor(beta_kind, batch, keypoints, 0.5, 2.0, g),
        sigma_t_map=_per_map_tensor(sigma_kind, batch, keypoints, 0.7, 2.0, g),
        normalization=normalization,
        beta=beta,
        normalized_coordinates=normalized_coordinates,
        reg=reg,
        sigma_t=sigma_t,
        coord_loss=coord_loss,
        reg_weight=reg_weight,
        upstream={name: (grads[name] if name in upstream else None) for name in UPSTREAM},
    )


def _differentiable(case: OpCase, dtype):
    """The case's differentiable inputs as fresh leaves (logits in `dtype`, or as they are)."""
    logits = case.logits.detach().to(dtype or case.logits.dtype).requires_grad_(True)
    target = case.target.detach().clone().requires_grad_(True) if case.target is not None else None
    beta_map = case.beta_map.detach().clone().requires_grad_(True) if case.beta_map is not None else None
    return logits, target, beta_map


def reference_forward(case: OpCase, dtype=torch.float64):
    """(coords, variance, reg_losses, coord_losses, loss) of the reference on the case's inputs,
    with the logits in `dtype` (None: the case's own dtype)."""
    logits, target, beta_map = _differentiable(case, dtype)
    with torch.no_grad():
        outs = reference.dsnt_fwd(logits, target, case.mask, beta_map, case.sigma_t_map,
                                  *case.options())
    return tuple(o.detach() for o in outs)


def reference_backward(case: OpCase, dtype=torch.float64):
    """(grad_logits, grad_target, grad_beta_map) of sum(output * upstream) on the reference.
    Gradients that do not flow (no target, no beta_map, beta of a non-softmax map) are zeros of
    the op's shapes, as the ops return them."""
    logits, target, beta_map = _differentiable(case, dtype)
    outs = reference.dsnt_fwd(logits, target, case.mask, beta_map, case.sigma_t_map, *case.options())
    total = logits.new_zeros((), dtype=torch.float64)
    for out, name in zip(outs, UPSTREAM):
        up = case.upstream.get(name)
        if up is not None and out.numel() > 0:
            total = total + (out.double() * up.to(out.device)).sum()
    inputs = [t for t in (logits, target, beta_map) if t is not None]
    grads = [None] * len(inputs)
    if total.requires_grad:
        grads = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = dict(zip([id(t) for t in inputs], grads))

    def grad_of(t, like):
        g = grads.get(id(t)) if t is not None else None
        return torch.zeros_like(like) if g is None else g.detach()

    acc = reference.accumulation_dtype(logits.dtype)
    grad_target = grad_of(target, target) if target is not None else logits.new_zeros(
        (*logits.shape[:2], logits.dim() - 2), dtype=acc)
    grad_beta = grad_of(beta_map, beta_map) if beta_map is not None else logits.new_zeros((0,), dtype=acc)
    return grad_of(logits, logits), grad_target, grad_beta


def run_ops(fwd, bwd, case: OpCase, needs_target_grad=True, needs_beta_grad=True):
    """Forward outputs (stats included) and backward outputs of a backend's op pair."""
    outs = fwd(*case.fwd_args())
    coords, variance, _reg, _cl, _loss, stats = outs
    up = case.upstream
    grads = bwd(up.get("grad_coords"), up.get("grad_variance"), up.get("grad_reg_losses"),
                up.get("grad_coord_losses"), up.get("grad_loss"),
                case.logits, case.target, case.mask, case.beta_map, case.sigma_t_map,
                coords, variance, stats, *case.options(),
                needs_target_grad and case.target is not None, needs_beta_grad and case.beta_map is not None)
    return tuple(outs), tuple(grads)


def max_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """max |a - e| / max(1, |e|) over elements where the truth is finite (0 for empty tensors)."""
    a, e = actual.detach().double().cpu(), exact.detach().double().cpu()
    finite = e.isfinite()
    if not finite.any():
        return 0.0
    return ((a - e).abs() / e.abs().clamp(min=1))[finite].max().item()


# Floor of the rule, in units of the output dtype's epsilon: what any two correct summation
# orders of a small map may differ by.
FLOOR_ULPS = 64


def _map_scale(exact: torch.Tensor, map_dims: int) -> torch.Tensor:
    """max(1, largest finite |truth| of each map) / max(1, |truth|), broadcast per element."""
    e = exact.detach().double().cpu().abs()
    finite = torch.where(e.isfinite(), e, torch.zeros_like(e))
    largest = finite.amax(dim=tuple(range(-map_dims, 0)), keepdim=True) if e.numel() else finite
    return largest.clamp(min=1) / e.clamp(min=1)


def assert_close(actual, exact, baseline, what: str, floor_dtype=None, map_dims: int = 0):
    """`actual` against the float64 `exact`, allowed twice `baseline`'s error (the reference in
    the case's dtype; None: float64 inputs, where the floor alone applies). `floor_dtype`: the
    accumulation dtype, when coarser than the output's; `map_dims`: trailing dims that form one
    map (the floor then scales with the map's largest value)."""
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    a, e = actual.detach().cpu(), exact.detach().cpu()
    for pattern in (torch.isnan, torch.isinf):
        assert torch.equal(pattern(a.double()), pattern(e.double())), (
            f"{what}: {pattern.__name__[2:]} pattern differs from the reference")
    if not actual.is_floating_point() or a.numel() == 0:
        return
    eps = torch.finfo(actual.dtype).eps
    if floor_dtype is not None:
        eps = max(eps, torch.finfo(floor_dtype).eps)
    base = 2 * max_error(baseline, exact) if baseline is not None else 0.0
    ad, ed = a.double(), e.double()
    finite = ed.isfinite()
    err = (ad - ed).abs() / ed.abs().clamp(min=1)
    allowed = base + FLOOR_ULPS * eps * (_map_scale(e, map_dims) if map_dims else torch.ones_like(ed))
    excess = torch.where(finite, err - allowed, torch.zeros_like(err))
    worst = excess.argmax()
    assert excess.flatten()[worst] <= 0, (
        f"{what}: error {err.flatten()[worst].item():.3g} > allowed {allowed.flatten()[worst].item():.3g}")


def check_against_reference(fwd, bwd, case: OpCase, what: str = "", needs_target_grad=True,
                            needs_beta_grad=True):
    """Run a backend's op pair on `case` and compare every output and gradient with the reference
    (float64 truth; the case's dtype as the baseline). A gradient not asked for
    (`needs_*_grad` false) must be zeros."""
    outs, grads = run_ops(fwd, bwd, case, needs_target_grad, needs_beta_grad)
    exact_f = reference_forward(case)
    exact_b = reference_backward(case)
    low = case.logits.dtype != torch.float64
    base_f = reference_forward(case, None) if low else (None,) * 5
    base_b = reference_backward(case, None) if low else (None,) * 3
    not_asked = (False, not needs_target_grad, not needs_beta_grad)
    exact_b = tuple(torch.zeros_like(e) if zero else e for e, zero in zip(exact_b, not_asked))
    base_b = tuple(None if zero else b for b, zero in zip(base_b, not_asked))
    acc = reference.accumulation_dtype(case.logits.dtype)
    for name, a, e, b in zip(FWD_OUTPUTS, outs, exact_f, base_f):
        assert_close(a, e, b, f"{what} {name}", floor_dtype=acc)
    map_dims = {"grad_logits": case.logits.dim() - 2}
    for name, a, e, b in zip(BWD_OUTPUTS, grads, exact_b, base_b):
        assert_close(a, e, b, f"{what} {name}", floor_dtype=acc, map_dims=map_dims.get(name, 0))
    return outs, grads


def gradcheck_logits(case: OpCase) -> torch.Tensor:
    """The case's float64 logits moved where finite differences are smooth: away from the relu /
    abs kinks; for "none", maps well above 0, where log p curves."""
    z = case.logits
    if case.normalization in ("abs", "relu"):
        z = z + torch.where(z >= 0, 0.2, -0.2).to(z)
    if case.normalization == "none":
        g = generator(22)
        z = (torch.rand(z.shape, generator=g, dtype=torch.float64) + 0.5) / math.prod(z.shape[2:])
        z = z.to(case.logits.device)
    return z


# The size classes of the CUDA kernels (docs/performance.md §5), forced by DSNT_CUDA_FORCE_CLASS
# (the `size_class` fixture of conftest.py), and a float32 map each class can hold (the automatic
# class for the first two; the cluster class splits it over several CTAs, the streamed class
# over several tiles).
CUDA_SIZE_CLASSES = ("warp", "block", "cluster", "streamed")
CUDA_CLASS_SHAPE = {"warp": (2, 9, 16, 16), "block": (1, 3, 40, 41), "cluster": (1, 2, 70, 70),
                    "streamed": (1, 2, 70, 70)}


# --------------------------------------------------------------------------------------------
# The public API's tests: backends, inputs, values and gradients
# --------------------------------------------------------------------------------------------

# Triton's interpreter must be on before triton is imported, so it runs in a process of its own
# (make test-triton), which tests the triton backend only; the main process tests the others.
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def devices_here() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() and not TRITON_INTERPRETER else ["cpu"]


def backends_on(device: str) -> list[str]:
    """The concrete backends this process tests on tensors of `device`."""
    names = [b for b in dsnt_cuda.available_backends(device) if b != "auto"]
    if TRITON_INTERPRETER:
        return [b for b in names if b == "triton"]
    return [b for b in names if not (b == "triton" and device == "cpu")]


# (backend, device) of every backend this process runs; ids like "cpu-cpu", "triton-cuda".
BACKEND_CASES = [pytest.param((b, d), id=f"{b}-{d}") for d in devices_here() for b in backends_on(d)]
CPU_BACKENDS = backends_on("cpu")


def random_logits(shape, dtype=torch.float64, seed=0, scale=2.0, device="cpu"):
    """Standard-normal logits times `scale`: peaked but not degenerate softmax maps."""
    x = torch.randn(shape, generator=generator(seed), dtype=torch.float64) * scale
    return x.to(device=device, dtype=dtype)


def random_heatmaps(shape, dtype=torch.float64, seed=0, device="cpu"):
    """Positive maps that do NOT sum to 1 (dsntnn accepts those; its results are plain sums)."""
    x = torch.rand(shape, generator=generator(seed), dtype=torch.float64) + 0.05
    return x.to(device=device, dtype=dtype)


def random_targets(batch, keypoints, dims, dtype=torch.float64, seed=1, device="cpu"):
    """Target means in normalized units, inside the map (|mu| < 0.9)."""
    x = torch.rand((batch, keypoints, dims), generator=generator(seed), dtype=torch.float64)
    return ((x * 2 - 1) * 0.9).to(device=device, dtype=dtype)


def peaked_logits(shape, peak, width):
    """float32 log of a Gaussian bump of `width` pixels at pixel `peak` (one entry per axis)."""
    z = torch.zeros(shape, dtype=torch.float64)
    for axis, (size, centre) in enumerate(zip(shape[2:], peak, strict=True)):
        j = torch.arange(size, dtype=torch.float64) - centre
        view = [1] * len(shape)
        view[2 + axis] = size
        z = z - (j * j / (2 * width * width)).view(view)
    return z.float()


def values_and_grads(fn, *inputs, seed=7):
    """(outputs, grads): `fn(*inputs)` (a tensor or a tuple of tensors) and the gradients of a
    seeded random weighting of its outputs w.r.t. each floating tensor input (None for others,
    zeros where no gradient flows)."""
    leaves = [t.detach().clone().requires_grad_(True) if _floating(t) else t for t in inputs]
    outputs = fn(*leaves)
    outputs = tuple(outputs) if isinstance(outputs, tuple) else (outputs,)
    g = generator(seed)
    weighted = [(o.double() * torch.rand(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
                for o in outputs if o.requires_grad]
    wanted = [t for t in leaves if _floating(t)]
    grads = [None] * len(wanted)
    if weighted:
        grads = torch.autograd.grad(sum(weighted), wanted, allow_unused=True)
    by_leaf = {id(t): (torch.zeros_like(t) if d is None else d) for t, d in zip(wanted, grads, strict=True)}
    return tuple(o.detach() for o in outputs), tuple(by_leaf.get(id(t)) for t in leaves)


def assert_all_close(actual, expected, what: str, map_dims=()) -> None:
    """assert_close of each pair against float64 truths (the floor rule); `map_dims[i]` > 0 for
    the i-th pair when it is a gradient of the maps (the floor scales per map, as for the ops)."""
    map_dims = tuple(map_dims) + (0,) * (len(actual) - len(map_dims))
    for i, (a, e, dims) in enumerate(zip(actual, expected, map_dims, strict=True)):
        if a is not None or e is not None:
            assert_close(a, e, None, f"{what} [{i}]", map_dims=dims)


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


# ---- the C++ ops on CPU tensors, and torch.compile ---------------------------------------------

needs_cpu_kernels = pytest.mark.skipif(not _extension.has_kernel("dsnt_fwd", "CPU"),
                                       reason="C++ extension not built")


def cpp_ops():
    """torch.ops.dsnt_cuda's (dsnt_fwd, dsnt_bwd) with their fake kernels and autograd registered
    (dsnt_cuda.ops imported), or (None, None) when the extension is not built."""
    if not _extension.extension_loaded():
        return None, None
    from dsnt_cuda import ops  # noqa: F401  (fake kernels and autograd of the ops)

    return torch.ops.dsnt_cuda.dsnt_fwd, torch.ops.dsnt_cuda.dsnt_bwd


def check_cpp_ops(case: OpCase, what: str = ""):
    """check_against_reference on the C++ op pair (for CPU cases: the CPU kernels)."""
    return check_against_reference(*cpp_ops(), case, what)


def assert_compiled_matches_eager(loss_fn, logits, target, backend="inductor") -> None:
    """torch.compile(loss_fn, fullgraph=True) gives eager's loss and its gradients with respect to
    `logits` and `target` (loss_fn's two arguments)."""
    torch._dynamo.reset()
    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend=backend)):
        x = logits.detach().clone().requires_grad_(True)
        t = target.detach().clone().requires_grad_(True)
        loss = fn(x, t)
        results.append((loss.detach(), *torch.autograd.grad(loss, (x, t))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
