"""Routes the per-map transform to the backend chosen for the call (see backends.py).

Every public function ends here, so each backend is reached through one place and computes the
same (coords, variance, reg_losses) triple (csrc/OPS.md).
"""

from dsnt_cuda import reference
from dsnt_cuda.backends import resolve_backend


def dsnt_core(logits, target, normalization, beta, normalized_coordinates, reg, sigma_t, backend=None):
    """(coords, variance, reg_losses) from the backend `backend` (None: the default in force)."""
    name = resolve_backend(backend, logits.device)
    args = (logits, target, normalization, beta, bool(normalized_coordinates), reg, sigma_t)
    if name == "reference":
        return reference.dsnt_core(*args)
    if name in ("cpu", "cuda"):
        from dsnt_cuda.ops import dsnt_core_op

        return dsnt_core_op(*args)
    from dsnt_cuda.triton import dsnt_core_triton

    return dsnt_core_triton(*args)
