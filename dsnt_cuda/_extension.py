"""Loads the compiled extension `dsnt_cuda._C` if it was built; the package works without it."""

import importlib.util
import sys

import torch

_C = None
LOAD_ERROR = None
if importlib.util.find_spec("dsnt_cuda._C") is None:
    LOAD_ERROR = "dsnt_cuda._C is not built (pip install --no-build-isolation . or make build)"
elif "dsnt_cuda._C" not in sys.modules and hasattr(torch.ops.dsnt_cuda, "dsnt_fwd"):
    # Another library defines the ops already (libdsnt_cuda_ops.so through torch.ops.load_library):
    # _C's second TORCH_LIBRARY(dsnt_cuda) would abort the process.
    LOAD_ERROR = ("dsnt_cuda._C was not loaded: the dsnt_cuda ops are already registered in this "
                  "process by another library (libdsnt_cuda_ops.so?); use one or the other")
else:
    try:
        from dsnt_cuda import _C  # importing registers the torch.ops.dsnt_cuda ops
    except ImportError as error:  # built against another torch, missing symbols, ...
        LOAD_ERROR = f"dsnt_cuda._C failed to load: {error}"


def extension_loaded() -> bool:
    return _C is not None


def build_info() -> dict:
    """What the compiled extension contains: torch / CUDA versions and GPU architectures."""
    if _C is None:
        return {"extension": False, "error": str(LOAD_ERROR)}
    info = dict(_C.build_info())
    info["extension"] = True
    return info


# Registration is fixed once _C is imported, so torch.compile may treat the answer as a constant
# (dynamo cannot trace the dispatcher query itself: it would break the graph on every call).
@torch.compiler.assume_constant_result
def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether torch.ops.dsnt_cuda.<op_name> has a kernel registered for dispatch_key."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dsnt_cuda::{op_name}", dispatch_key)
