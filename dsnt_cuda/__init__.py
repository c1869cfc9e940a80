"""dsnt_cuda: fused DSNT coordinate regression for PyTorch.

- dsntnn-compatible functions (`dsnt`, `flat_softmax`, `js_reg_losses`, ...), drop-in;
- the fused API from logits: `fused_dsnt` (inference) and `dsnt_loss` (training);
- `nn.Module`s `DSNT` and `DSNTLoss`, coordinate conventions (`dsnt_cuda.conventions`);
- backends "auto", "cuda", "triton", "cpu", "reference" (`set_backend`, `use_backend`);
- `dsnt_cuda.reference`: the pure-PyTorch oracle.
"""

from dsnt_cuda import (
    _extension,
    conventions,
    ops,  # noqa: F401  (registers the fake kernels and autograd of the compiled ops)
    reference,
)
from dsnt_cuda.backends import BACKENDS, available_backends, get_backend, set_backend, use_backend
from dsnt_cuda.compat import (
    average_loss,
    dsnt,
    euclidean_losses,
    flat_softmax,
    js_reg_losses,
    kl_reg_losses,
    l1_losses,
    linear_expectation,
    make_gauss,
    mse_losses,
    normalized_linspace,
    normalized_to_pixel_coordinates,
    pixel_to_normalized_coordinates,
    sharpen_heatmaps,
    soft_argmax,
    variance_reg_losses,
)
from dsnt_cuda.conventions import convert_coordinates, convert_variance
from dsnt_cuda.fused import DSNTLossResult, dsnt_loss, fused_dsnt
from dsnt_cuda.modules import DSNT, DSNTLoss
from dsnt_cuda.version import __version__

build_info = _extension.build_info

__all__ = [
    "BACKENDS",
    "DSNT",
    "DSNTLoss",
    "DSNTLossResult",
    "__version__",
    "available_backends",
    "average_loss",
    "build_info",
    "conventions",
    "convert_coordinates",
    "convert_variance",
    "dsnt",
    "dsnt_loss",
    "euclidean_losses",
    "flat_softmax",
    "fused_dsnt",
    "get_backend",
    "js_reg_losses",
    "kl_reg_losses",
    "l1_losses",
    "linear_expectation",
    "make_gauss",
    "mse_losses",
    "normalized_linspace",
    "normalized_to_pixel_coordinates",
    "pixel_to_normalized_coordinates",
    "reference",
    "set_backend",
    "sharpen_heatmaps",
    "soft_argmax",
    "use_backend",
    "variance_reg_losses",
]
