"""The Triton backend of the fused DSNT ops (see ops.py and kernels.py).

Importing this package never fails when triton is missing: the functions below then raise a
clear error when called, and `TRITON_AVAILABLE` / `IMPORT_ERROR` say why. With triton present,
importing registers the ops `dsnt_cuda::dsnt_fwd_triton` / `dsnt_cuda::dsnt_bwd_triton`.
"""

try:
    import triton  # noqa: F401
except ImportError as _error:
    TRITON_AVAILABLE = False
    IMPORT_ERROR = _error

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"the dsnt_cuda Triton backend needs triton, not installed: {IMPORT_ERROR}")

    dsnt_fwd_triton = dsnt_bwd_triton = dsnt_core_triton = _unavailable
else:
    from dsnt_cuda.triton.ops import dsnt_bwd_triton, dsnt_core_triton, dsnt_fwd_triton

    TRITON_AVAILABLE = True
    IMPORT_ERROR = None

__all__ = ["dsnt_fwd_triton", "dsnt_bwd_triton", "dsnt_core_triton", "TRITON_AVAILABLE", "IMPORT_ERROR"]
