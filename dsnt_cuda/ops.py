"""Python glue of the fused ops (docs/ops.md): fake kernels and autograd, once for every backend.

C++ registers the schemas and the CPU / CUDA kernels of `dsnt_cuda::dsnt_fwd` / `dsnt_bwd`; the
Triton backend registers `dsnt_cuda::dsnt_fwd_triton` / `dsnt_bwd_triton` with the same schemas.
`register_ops` gives a pair its fake kernels (so `torch.compile`, `torch.export` and
`torch.library.opcheck` can trace it) and, through `register_op_pair`, its autograd: the
forward's backward is the pair's backward op, one registration for every backend, in C++
(csrc/dsnt_autograd.cpp; the C++ pair registers it with its kernels). Nothing of heatmap size is
saved: the logits, the small inputs and the per-map outputs coords / variance / stats.
"""

import torch

from dsnt_cuda import _extension

# Forward and backward argument names, in schema order (docs/ops.md).
FWD_ARGS = (
    "logits", "target", "mask", "beta_map", "sigma_t_map", "normalization", "beta",
    "normalized_coordinates", "reg", "sigma_t", "coord_loss", "reg_weight",
)
STATS_BASE = 4  # stats has STATS_BASE + n entries per map

# The schemas of csrc/dsnt_ops.cpp, for the op pairs registered from Python (the Triton ops,
# torch.library.triton_op(..., schema=FWD_SCHEMA)): every backend has the same signature.
FWD_SCHEMA = (
    "(Tensor logits, Tensor? target, Tensor? mask, Tensor? beta_map, Tensor? sigma_t_map, "
    "str normalization, float beta, bool normalized_coordinates, str reg, float sigma_t, "
    "str coord_loss, float reg_weight) "
    "-> (Tensor coords, Tensor variance, Tensor reg_losses, Tensor coord_losses, Tensor loss, "
    "Tensor stats)"
)
BWD_SCHEMA = (
    "(Tensor? grad_coords, Tensor? grad_variance, Tensor? grad_reg_losses, "
    "Tensor? grad_coord_losses, Tensor? grad_loss, "
    "Tensor logits, Tensor? target, Tensor? mask, Tensor? beta_map, Tensor? sigma_t_map, "
    "Tensor coords, Tensor variance, Tensor stats, "
    "str normalization, float beta, bool normalized_coordinates, str reg, float sigma_t, "
    "str coord_loss, float reg_weight, bool needs_target_grad, bool needs_beta_grad) "
    "-> (Tensor grad_logits, Tensor grad_target, Tensor grad_beta_map)"
)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 logits, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dsnt_fwd_fake(logits, target, mask, beta_map, sigma_t_map, normalization, beta,
                  normalized_coordinates, reg, sigma_t, coord_loss, reg_weight):
    """Shapes and dtypes of dsnt_fwd's outputs (all in the accumulation dtype)."""
    torch._check(3 <= logits.dim() <= 5, lambda: "logits must be (B, L, S_1..S_n), n in 1..3")
    batch, keypoints = logits.shape[:2]
    n = logits.dim() - 2
    acc = accumulation_dtype(logits.dtype)
    per_point = logits.new_empty((batch, keypoints, n), dtype=acc)
    with_loss = coord_loss != "none"
    return (
        per_point,
        torch.empty_like(per_point),
        logits.new_empty((batch, keypoints), dtype=acc),
        logits.new_empty((batch, keypoints) if with_loss else (0,), dtype=acc),
        logits.new_empty(() if with_loss else (0,), dtype=acc),
        logits.new_empty((batch, keypoints, STATS_BASE + n), dtype=acc),
    )


def dsnt_bwd_fake(grad_coords, grad_variance, grad_reg_losses, grad_coord_losses, grad_loss,
                  logits, target, mask, beta_map, sigma_t_map, coords, variance, stats,
                  normalization, beta, normalized_coordinates, reg, sigma_t, coord_loss,
                  reg_weight, needs_target_grad, needs_beta_grad):
    """grad_logits: the logits' shape and dtype (contiguous); grad_target (B, L, n) in the
    target's dtype (acc when None); grad_beta_map: beta_map's shape and dtype ((0,) when None)."""
    batch, keypoints = logits.shape[:2]
    n = logits.dim() - 2
    acc = accumulation_dtype(logits.dtype)
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    target_dtype = target.dtype if target is not None else acc
    grad_target = logits.new_empty((batch, keypoints, n), dtype=target_dtype)
    grad_beta = logits.new_empty((0,), dtype=acc) if beta_map is None else beta_map.new_empty(beta_map.shape)
    return grad_logits, grad_target, grad_beta


def register_op_pair(fwd_name: str, bwd_name: str) -> None:
    """Autograd for a forward op with dsnt_fwd's schema (its fake kernel is registered apart),
    by qualified names ("dsnt_cuda::dsnt_fwd_triton", "dsnt_cuda::dsnt_bwd_triton"): the backward
    op has dsnt_bwd's schema. Differentiable inputs: logits, target, beta_map. The kernel is the
    C++ one of every fused pair (csrc/dsnt_autograd.cpp): a Python autograd.Function cost ~40 us a
    training step.
    """
    if not _extension.extension_loaded():
        raise RuntimeError(f"the autograd of {fwd_name} is in the C++ extension, which is not loaded: "
                           f"{_extension.LOAD_ERROR}")
    _extension._C.register_autograd(fwd_name, bwd_name)


def register_ops(fwd_name: str, bwd_name: str) -> None:
    """Fake kernels and autograd of an op pair with the schemas of dsnt_fwd / dsnt_bwd, given by
    qualified names ("dsnt_cuda::dsnt_fwd_triton", "dsnt_cuda::dsnt_bwd_triton")."""
    torch.library.register_fake(fwd_name)(dsnt_fwd_fake)
    torch.library.register_fake(bwd_name)(dsnt_bwd_fake)
    register_op_pair(fwd_name, bwd_name)


def _register_cpp_ops() -> bool:
    """Fake kernels of the C++ ops (their autograd is registered with them, in C++); False when
    the extension is not built."""
    if not _extension.extension_loaded() or not hasattr(torch.ops.dsnt_cuda, "dsnt_fwd"):
        return False
    torch.library.register_fake("dsnt_cuda::dsnt_fwd")(dsnt_fwd_fake)
    torch.library.register_fake("dsnt_cuda::dsnt_bwd")(dsnt_bwd_fake)
    return True


_register_cpp_ops()

__all__ = ["FWD_ARGS", "STATS_BASE", "FWD_SCHEMA", "BWD_SCHEMA", "accumulation_dtype", "dsnt_fwd_fake",
           "dsnt_bwd_fake", "register_op_pair", "register_ops"]
