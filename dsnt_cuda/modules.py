"""`nn.Module`s over the fused API: `DSNT` (logits -> coordinates) and `DSNTLoss` (the training loss).

Both hold only options (no parameters, no buffers), so they can sit anywhere in a model, be
moved between devices for free and be traced by `torch.compile` / `torch.export`. While
`torch.onnx.export` runs they route to the pure-PyTorch reference (ONNX has no fused op to call),
so a model ending in `DSNT` exports to plain ONNX operators.
"""

import torch
from torch import nn

from dsnt_cuda._validation import check_option, check_positive_number
from dsnt_cuda.backends import BACKENDS
from dsnt_cuda.conventions import check_convention, convert_coordinates
from dsnt_cuda.fused import DSNTLossResult, dsnt_loss, fused_dsnt
from dsnt_cuda.reference import COORD_LOSSES, NORMALIZATIONS, REGULARIZERS


def _check_backend(backend):
    if backend is not None:
        check_option("backend", backend, BACKENDS)
    return backend


class _ConstantFloat:
    """A float option of a module, stored as its exact repr.

    `torch.compile(dynamic=True)` turns float attributes of a module into symbolic graph inputs,
    which the fused API's argument checks (`math.isfinite`) and the ops' `float` schema arguments
    cannot take. Our options are constants of the model, so each is kept as a str (dynamo guards
    a str attribute as a constant) and parsed back per call, which dynamo folds: a module whose
    option changes recompiles instead of reusing a stale graph.
    """

    def __init__(self, check=None):
        self.check = check

    def __set_name__(self, owner, name):
        self.name = name
        self.attr = "_" + name + "_repr"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return float(getattr(obj, self.attr))

    def __set__(self, obj, value):
        value = self.check(self.name, value) if self.check is not None else float(value)
        setattr(obj, self.attr, repr(value))


def _backend_for_call(backend):
    # ONNX cannot call our fused ops; the reference is a decomposition into standard operators.
    if torch.onnx.is_in_onnx_export():
        return "reference"
    return backend


class DSNT(nn.Module):
    """Heatmap logits (B, L, S_1[, S_2[, S_3]]) -> coordinates (B, L, n), (x, y, z) order.

    Args:
        normalization: "softmax" (default; ``softmax(beta * z)`` over each map), "abs", "relu",
            "sigmoid" (``r(z) / sum r(z)``) or "none" (the input is already a heatmap).
        beta: inverse temperature of the softmax (kornia's ``temperature`` is ``1 / beta``).
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

    Returns ``coords`` or ``(coords, variance)``; float32 for half-precision logits.
    """

    beta = _ConstantFloat(check_positive_number)

    def __init__(
        self,
        normalization: str = "softmax",
        beta: float = 1.0,
        coordinates: str = "normalized",
        return_variance: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        self.normalization = check_option("normalization", normalization, NORMALIZATIONS)
        self.beta = beta
        self.coordinates = check_convention(coordinates)
        self.return_variance = bool(return_variance)
        self.backend = _check_backend(backend)

    def forward(self, logits: torch.Tensor):
        result = fused_dsnt(
            logits,
            normalization=self.normalization,
            beta=self.beta,
            normalized_coordinates=self.coordinates == "normalized",
            return_variance=self.return_variance,
            backend=_backend_for_call(self.backend),
        )
        coords, variance = result if self.return_variance else (result, None)
        if self.coordinates == "align_corners":  # an affine map of the pixel expectation
            coords = convert_coordinates(coords, logits.shape[2:], "pixel", "align_corners")
        return (coords, variance) if self.return_variance else coords

    def extra_repr(self) -> str:
        parts = [f"normalization={self.normalization!r}"]
        if self.normalization == "softmax":
            parts.append(f"beta={self.beta:g}")
        parts.append(f"coordinates={self.coordinates!r}")
        if self.return_variance:
            parts.append("return_variance=True")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class DSNTLoss(nn.Module):
    """The DSNT training loss from logits: coordinate loss + ``reg_weight`` × regularizer, averaged.

    ``forward(logits, target, mask=None)`` returns a `DSNTLossResult` — ``(loss, coords,
    coord_losses, reg_losses)`` — so the coordinates the loss saw come for free (no second pass
    for metrics). Train with ``criterion(logits, target).loss.backward()``.

    Args:
        reg: "js" (default, the paper's best), "kl", "var" or None.
        sigma_t: standard deviation of the Gaussian target in pixels (default 1).
        reg_weight: weight of the regularizer (default 1).
        coord_loss: "euclidean" (default), "l1" or "mse".
        normalization, beta, backend: as for `DSNT`.
        coordinates: the convention of ``target`` and of the returned ``coords``
            ("normalized", default; "pixel"; "align_corners"). The losses themselves are always
            computed in normalized units (the scale the paper's hyper-parameters assume): a
            target in another convention is mapped there first.

    ``mask`` is an optional (B, L) weight per keypoint: the loss is
    ``sum(losses * mask) / max(sum(mask), 1)``.
    """

    beta = _ConstantFloat(check_positive_number)
    sigma_t = _ConstantFloat(check_positive_number)
    reg_weight = _ConstantFloat()

    def __init__(
        self,
        reg: str | None = "js",
        sigma_t: float = 1.0,
        reg_weight: float = 1.0,
        coord_loss: str = "euclidean",
        normalization: str = "softmax",
        beta: float = 1.0,
        coordinates: str = "normalized",
        backend: str | None = None,
    ):
        super().__init__()
        self.reg = None if reg is None or reg == "none" else check_option("reg", reg, REGULARIZERS)
        self.sigma_t = sigma_t
        self.reg_weight = reg_weight
        self.coord_loss = check_option("coord_loss", coord_loss, COORD_LOSSES)
        self.normalization = check_option("normalization", normalization, NORMALIZATIONS)
        self.beta = beta
        self.coordinates = check_convention(coordinates)
        self.backend = _check_backend(backend)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> DSNTLossResult:
        size = logits.shape[2:]
        if self.coordinates != "normalized" and isinstance(target, torch.Tensor):
            target = convert_coordinates(target, size, self.coordinates, "normalized")
        result = dsnt_loss(
            logits,
            target,
            mask=mask,
            reg=self.reg,
            sigma_t=self.sigma_t,
            reg_weight=self.reg_weight,
            coord_loss=self.coord_loss,
            normalization=self.normalization,
            beta=self.beta,
            backend=_backend_for_call(self.backend),
        )
        if self.coordinates != "normalized":
            result = result._replace(
                coords=convert_coordinates(result.coords, size, "normalized", self.coordinates)
            )
        return result

    def extra_repr(self) -> str:
        parts = [f"coord_loss={self.coord_loss!r}", f"reg={self.reg!r}"]
        if self.reg is not None:
            parts += [f"sigma_t={self.sigma_t:g}", f"reg_weight={self.reg_weight:g}"]
        parts.append(f"normalization={self.normalization!r}")
        if self.normalization == "softmax":
            parts.append(f"beta={self.beta:g}")
        if self.coordinates != "normalized":
            parts.append(f"coordinates={self.coordinates!r}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


__all__ = ["DSNT", "DSNTLoss"]
