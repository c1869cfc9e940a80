"""`nn.Module`s over the fused API: `DSNT` (logits -> coordinates) and `DSNTLoss` (the training loss).

By default both hold only options (no parameters, no buffers), so they can sit anywhere in a
model, be moved between devices for free and be traced by `torch.compile` / `torch.export`.
`learnable_beta=True` makes the softmax's inverse temperature a parameter: `log_beta`, one value
or one per keypoint (`num_keypoints`), trained by the model's optimizer; beta = exp(log_beta) is
positive by construction, so its values are not checked per call (no device sync). A tensor
`sigma_t` of `DSNTLoss` (e.g. one width per keypoint) is a buffer: it moves with the module.

Like every function of the package, the modules compute through the reference while
`torch.onnx.export` runs (backends.py): a model ending in `DSNT` exports to plain ONNX operators.
"""

import math

import torch
from torch import nn

from dsnt_cuda._validation import (
    check_heatmaps,
    check_mask,
    check_number,
    check_option,
    check_points,
    check_real,
    per_map_argument,
)
from dsnt_cuda.backends import BACKENDS
from dsnt_cuda.conventions import check_convention, convert_coordinates
from dsnt_cuda.fused import DSNTLossResult, PerMap, coordinates, loss, regularizer_name
from dsnt_cuda.reference import COORD_LOSSES, NORMALIZATIONS


def _check_backend(backend: str | None) -> str | None:
    if backend is not None:
        check_option("backend", backend, BACKENDS)
    return backend


class _ConstantFloat:
    """A float option of a module, stored as its exact repr.

    `torch.compile(dynamic=True)` turns float attributes of a module into symbolic graph inputs,
    which the ops' `float` schema arguments cannot take. Our options are constants of the model,
    so each is kept as a str (dynamo guards a str attribute as a constant) and parsed back per
    call, which dynamo folds: a module whose option changes recompiles instead of reusing a stale
    graph.
    """

    def __init__(self, check, public_name: str | None = None):
        self.check = check
        self.public_name = public_name  # the option's name in error messages

    def __set_name__(self, owner, name):
        self.public_name = self.public_name or name
        self.attr = "_" + name + "_repr"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return float(getattr(obj, self.attr))

    def __set__(self, obj, value):
        setattr(obj, self.attr, repr(self.check(self.public_name, value)))


def _check_positive(name: str, value: object) -> float:
    return check_number(name, value, torch.float32)


class _Temperature(nn.Module):
    """The softmax's inverse temperature `beta` of DSNT / DSNTLoss: a constant, or learnable."""

    _constant_beta = _ConstantFloat(_check_positive, "beta")

    def _init_beta(self, beta: float, normalization: str, learnable: bool,
                   num_keypoints: int | None) -> None:
        self._constant_beta = beta
        self.learnable_beta = bool(learnable)
        if num_keypoints is not None and not self.learnable_beta:
            raise ValueError("num_keypoints is the number of learnable betas: it needs learnable_beta=True")
        if not self.learnable_beta:
            return
        if normalization != "softmax":
            raise ValueError(f"a learnable beta needs normalization='softmax' ({normalization!r} "
                             "does not use beta)")
        if num_keypoints is not None and (type(num_keypoints) is not int or num_keypoints < 1):
            raise ValueError(f"num_keypoints must be a positive int, got {num_keypoints!r}")
        shape = () if num_keypoints is None else (num_keypoints,)
        self.log_beta = nn.Parameter(torch.full(shape, math.log(self._constant_beta)))

    @property
    def beta(self) -> float | torch.Tensor:
        """The inverse temperature: the float option, or exp(log_beta) when learnable."""
        return self.log_beta.exp() if self.learnable_beta else self._constant_beta

    def _beta_for(self, logits: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        """(beta, beta_map) of the op for these logits."""
        if not self.learnable_beta:
            return self._constant_beta, None
        log_beta = self.log_beta
        if log_beta.dim() == 1 and log_beta.shape[0] != logits.shape[1]:
            raise ValueError(f"this module learns {log_beta.shape[0]} betas (num_keypoints) but the "
                             f"logits have {logits.shape[1]} keypoints")
        if log_beta.device != logits.device:
            raise ValueError(f"the learnable beta is on {log_beta.device} but the logits are on "
                             f"{logits.device}; move the module with .to(device)")
        return 1.0, log_beta.exp()

    def _beta_repr(self, normalization: str) -> list[str]:
        if self.learnable_beta:
            keypoints = [] if self.log_beta.dim() == 0 else [f"num_keypoints={self.log_beta.shape[0]}"]
            return ["learnable_beta=True", *keypoints]
        return [f"beta={self._constant_beta:g}"] if normalization == "softmax" else []


class DSNT(_Temperature):
    """Heatmap logits (B, L, S_1[, S_2[, S_3]]) -> coordinates (B, L, n), (x, y, z) order.

    Args:
        normalization: "softmax" (default; ``softmax(beta * z)`` over each map), "abs", "relu",
            "sigmoid" (``r(z) / sum r(z)``) or "none" (the input is already a heatmap).
        beta: inverse temperature of the softmax (kornia's ``temperature`` is ``1 / beta``); the
            initial value when learnable.
        coordinates: "normalized" (pixel centres in (-1, 1), dsntnn's convention; default),
            "pixel" (pixel indices) or "align_corners" (corner-aligned [-1, 1], kornia's
            ``normalized_coordinates=True``); see `dsnt_cuda.conventions`. "align_corners" is
            the affine image of the pixel expectation, exact for maps that sum to 1 (all
            normalizations but "none" on an unnormalized heatmap).
        return_variance: also return the per-axis variance of each map, always in **pixel²**
            (B, L, n): the spread of the prediction, a per-keypoint uncertainty
            (``variance.sqrt()`` is a standard deviation in pixels). Convert it with
            `dsnt_cuda.conventions.convert_variance` if needed.
        backend: "auto", "cuda", "triton", "cpu", "reference", or None for the default in force.
        learnable_beta: make beta a parameter, ``beta = exp(log_beta)`` (softmax only).
        num_keypoints: with ``learnable_beta``, learn one beta per keypoint (L of them) instead
            of one for all.

    Returns ``coords`` or ``(coords, variance)``; float32 for half-precision logits.
    """

    def __init__(
        self,
        normalization: str = "softmax",
        beta: float = 1.0,
        coordinates: str = "normalized",
        return_variance: bool = False,
        backend: str | None = None,
        *,
        learnable_beta: bool = False,
        num_keypoints: int | None = None,
    ):
        super().__init__()
        self.normalization = check_option("normalization", normalization, NORMALIZATIONS)
        self._init_beta(beta, normalization, learnable_beta, num_keypoints)
        self.coordinates = check_convention(coordinates)
        self.return_variance = bool(return_variance)
        self.backend = _check_backend(backend)

    def forward(self, logits: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        check_heatmaps(logits, "heatmaps" if self.normalization == "none" else "logits")
        beta, beta_map = self._beta_for(logits)
        result = coordinates(logits, self.normalization, beta, beta_map,
                             self.coordinates == "normalized", self.return_variance, self.backend)
        coords, variance = result if self.return_variance else (result, None)
        if self.coordinates == "align_corners":  # an affine map of the pixel expectation
            coords = convert_coordinates(coords, logits.shape[2:], "pixel", "align_corners")
        return (coords, variance) if self.return_variance else coords

    def extra_repr(self) -> str:
        parts = [f"normalization={self.normalization!r}", *self._beta_repr(self.normalization),
                 f"coordinates={self.coordinates!r}"]
        if self.return_variance:
            parts.append("return_variance=True")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class DSNTLoss(_Temperature):
    """The DSNT training loss from logits: coordinate loss + ``reg_weight`` × regularizer, averaged.

    ``forward(logits, target, mask=None)`` returns a `DSNTLossResult` — ``(loss, coords,
    coord_losses, reg_losses)`` — so the coordinates the loss saw come for free (no second pass
    for metrics). Train with ``criterion(logits, target).loss.backward()``.

    Args:
        reg: "js" (default, the paper's best), "kl", "var" or None.
        sigma_t: standard deviation of the Gaussian target in pixels (default 1): a float, or a
            tensor of shape () or (L,) (one width per keypoint, e.g. COCO's per-joint sigmas),
            kept as a buffer. Per-instance widths (B, L): call `dsnt_cuda.dsnt_loss`.
        reg_weight: weight of the regularizer (default 1).
        coord_loss: "euclidean" (default), "l1" or "mse".
        normalization, beta, backend, learnable_beta, num_keypoints: as for `DSNT`.
        coordinates: the convention of ``target`` and of the returned ``coords``
            ("normalized", default; "pixel"; "align_corners"). The losses themselves are always
            computed in normalized units (the scale the paper's hyper-parameters assume): a
            target in another convention is mapped there first.

    ``mask`` is an optional (B, L) weight per keypoint: the loss is
    ``sum(losses * mask) / max(sum(mask), 1)``.
    """

    _constant_sigma_t = _ConstantFloat(_check_positive, "sigma_t")
    reg_weight = _ConstantFloat(check_real)

    def __init__(
        self,
        reg: str | None = "js",
        sigma_t: PerMap = 1.0,
        reg_weight: float = 1.0,
        coord_loss: str = "euclidean",
        normalization: str = "softmax",
        beta: float = 1.0,
        coordinates: str = "normalized",
        backend: str | None = None,
        *,
        learnable_beta: bool = False,
        num_keypoints: int | None = None,
    ):
        super().__init__()
        self.reg = None if reg is None or reg == "none" else regularizer_name(reg)
        self._init_sigma_t(sigma_t)
        self.reg_weight = reg_weight
        self.coord_loss = check_option("coord_loss", coord_loss, COORD_LOSSES)
        self.normalization = check_option("normalization", normalization, NORMALIZATIONS)
        self._init_beta(beta, normalization, learnable_beta, num_keypoints)
        self.coordinates = check_convention(coordinates)
        self.backend = _check_backend(backend)

    def _init_sigma_t(self, sigma_t: PerMap) -> None:
        if not isinstance(sigma_t, torch.Tensor):
            self._constant_sigma_t = sigma_t
            self.sigma_t_map = None
            return
        if sigma_t.dim() > 1:
            raise ValueError(f"a module's sigma_t tensor has shape () or (L,), got {tuple(sigma_t.shape)}; "
                             "pass per-instance widths to dsnt_cuda.dsnt_loss")
        self._constant_sigma_t = 1.0
        # Checked as the per-map sigma_t of maps with as many keypoints as it has values.
        per_map_argument("sigma_t", sigma_t, sigma_t.new_empty((1, sigma_t.numel(), 1)))
        self.register_buffer("sigma_t_map", sigma_t.detach().clone())

    @property
    def sigma_t(self) -> float | torch.Tensor:
        return self._constant_sigma_t if self.sigma_t_map is None else self.sigma_t_map

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> DSNTLossResult:
        check_heatmaps(logits, "heatmaps" if self.normalization == "none" else "logits")
        check_points(target, logits, "target")
        check_mask(mask, logits)
        size = logits.shape[2:]
        if self.coordinates != "normalized":
            target = convert_coordinates(target, size, self.coordinates, "normalized")
        beta, beta_map = self._beta_for(logits)
        if self.sigma_t_map is not None:  # its values were checked when it was given
            per_map_argument("sigma_t", self.sigma_t_map, logits, check_values=False)
        result = loss(logits, target, mask, beta, beta_map, self._constant_sigma_t, self.sigma_t_map,
                      self.normalization, regularizer_name(self.reg), self.reg_weight,
                      self.coord_loss, self.backend)
        if self.coordinates != "normalized":
            result = result._replace(
                coords=convert_coordinates(result.coords, size, "normalized", self.coordinates)
            )
        return result

    def extra_repr(self) -> str:
        parts = [f"coord_loss={self.coord_loss!r}", f"reg={self.reg!r}"]
        if self.reg is not None:
            sigma = "tensor" if self.sigma_t_map is not None else f"{self._constant_sigma_t:g}"
            parts += [f"sigma_t={sigma}", f"reg_weight={self.reg_weight:g}"]
        parts += [f"normalization={self.normalization!r}", *self._beta_repr(self.normalization)]
        if self.coordinates != "normalized":
            parts.append(f"coordinates={self.coordinates!r}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


__all__ = ["DSNT", "DSNTLoss"]
