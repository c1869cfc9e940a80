"""The Triton backend of the fused DSNT ops (docs/ops.md): kernels in forward.py / backward.py,
the math they share in math.py / tiles.py, launchers and registration in ops.py.

Importing this package never fails when triton is missing: the launchers then raise a clear
error, and `TRITON_AVAILABLE` / `IMPORT_ERROR` say why. With triton present, importing registers
the ops `torch.ops.dsnt_cuda.dsnt_fwd_triton` / `dsnt_bwd_triton` (with autograd).
"""

try:
    import triton  # noqa: F401
except ImportError as _error:
    TRITON_AVAILABLE = False
    IMPORT_ERROR = _error

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"the dsnt_cuda Triton backend needs triton, not installed: {IMPORT_ERROR}")

    dsnt_fwd_triton = dsnt_bwd_triton = _unavailable
else:
    from dsnt_cuda.triton.ops import dsnt_bwd_triton, dsnt_fwd_triton

    TRITON_AVAILABLE = True
    IMPORT_ERROR = None

__all__ = ["dsnt_fwd_triton", "dsnt_bwd_triton", "TRITON_AVAILABLE", "IMPORT_ERROR"]
