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
- `assert_close(actual, exact, baseline, what)`: NaN exactly where the truth has NaN, and an
  error against the truth at most twice the baseline's error plus a floor of a few ulps of the
  output's dtype (flash-attention's rule). Errors are measured relative to max(1, |truth|) per
  element, so large values are compared relatively and small ones absolutely.
"""

from dataclasses import dataclass, field, replace

import torch

from dsnt_cuda import reference

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
    weights = (torch.rand(batch, keypoints, generator=g, dtype=torch.float64) > 0.3).double() if mask else None
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
    grads = torch.autograd.grad(total, inputs, allow_unused=True) if total.requires_grad else [None] * len(inputs)
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


def assert_close(actual, exact, baseline, what: str, compute_dtype=None):
    """`actual` against the float64 `exact`, allowed twice `baseline`'s error (the reference in
    the case's dtype; None: float64 inputs, where the floor alone applies). `compute_dtype`: the
    dtype the value was computed in when narrower than its own (a float32 kernel's gradient of a
    float64 target): the floor is in its ulps."""
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    a, e = actual.detach().cpu(), exact.detach().cpu()
    assert torch.equal(a.double().isnan(), e.double().isnan()), f"{what}: NaN pattern differs from the reference"
    assert torch.equal(a.double().isinf(), e.double().isinf()), f"{what}: inf pattern differs from the reference"
    floor = FLOOR_ULPS * torch.finfo(actual.dtype).eps if actual.is_floating_point() else 0.0
    if compute_dtype is not None:
        floor = max(floor, FLOOR_ULPS * torch.finfo(compute_dtype).eps)
    allowed = floor + (2 * max_error(baseline, exact) if baseline is not None else 0.0)
    err = max_error(a, e)
    assert err <= allowed, f"{what}: error {err:.3g} > allowed {allowed:.3g}"


def check_against_reference(fwd, bwd, case: OpCase, what: str = ""):
    """Run a backend's op pair on `case` and compare every output and gradient with the reference
    (float64 truth; the case's dtype as the baseline)."""
    outs, grads = run_ops(fwd, bwd, case)
    exact_f = reference_forward(case)
    exact_b = reference_backward(case)
    low = case.logits.dtype != torch.float64
    base_f = reference_forward(case, None) if low else (None,) * 5
    base_b = reference_backward(case, None) if low else (None,) * 3
    acc = reference.accumulation_dtype(case.logits.dtype)  # what every kernel computes in
    for name, a, e, b in zip(FWD_OUTPUTS, outs, exact_f, base_f):
        assert_close(a, e, b, f"{what} {name}", acc)
    for name, a, e, b in zip(BWD_OUTPUTS, grads, exact_b, base_b):
        assert_close(a, e, b, f"{what} {name}", acc)
    return outs, grads
