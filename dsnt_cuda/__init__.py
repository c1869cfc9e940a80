"""dsnt_cuda: fused DSNT coordinate regression for PyTorch.

- dsntnn-compatible functions (`dsnt`, `flat_softmax`, `js_reg_losses`, ...), drop-in;
- the fused API from logits: `fused_dsnt` (inference) and `dsnt_loss` (training);
- backends "auto", "cuda", "triton", "cpu", "reference" (`set_backend`, `use_backend`);
- `dsnt_cuda.reference`: the pure-PyTorch oracle.
"""

from dsnt_cuda import _extension, reference
from dsnt_cuda.backends import (
    BACKENDS,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
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
from dsnt_cuda.fused import DSNTLossResult, dsnt_loss, fused_dsnt
from dsnt_cuda.version import __version__

from dsnt_cuda import ops  # noqa: F401, I001  (fake kernels and autograd of the compiled ops)

build_info = _extension.build_info

__all__ = [
    "BACKENDS", "available_backends", "get_backend", "set_backend", "use_backend", "build_info",
    "reference", "fused_dsnt", "dsnt_loss", "DSNTLossResult", "__version__",
    "normalized_linspace", "flat_softmax", "linear_expectation", "soft_argmax", "dsnt",
    "euclidean_losses", "l1_losses", "mse_losses", "make_gauss", "average_loss",
    "kl_reg_losses", "js_reg_losses", "variance_reg_losses", "normalized_to_pixel_coordinates",
    "pixel_to_normalized_coordinates", "sharpen_heatmaps",
]

# --- modules and conventions (ecosystem) ---
from dsnt_cuda import conventions  # noqa: E402
from dsnt_cuda.conventions import convert_coordinates, convert_variance  # noqa: E402
from dsnt_cuda.modules import DSNT, DSNTLoss  # noqa: E402

__all__ += ["DSNT", "DSNTLoss", "conventions", "convert_coordinates", "convert_variance"]
