"""Python glue of the compiled ops `torch.ops.dsnt_cuda.dsnt_fwd` / `dsnt_bwd` (csrc/OPS.md).

C++ registers the schemas and the CPU / CUDA kernels; this module adds what belongs to Python:
- fake (meta) kernels, so `torch.compile` and `torch.library.opcheck` can trace the ops;
- autograd: `dsnt_fwd`'s backward is the op `dsnt_bwd` (nothing of heatmap size is saved: the
  logits, the target and the small per-map outputs coords / variance / stats);
- `dsnt_core_op`, the (coords, variance, reg_losses) entry point used by `dsnt_cuda.dispatch`.

`register_dsnt_autograd(fwd_op, bwd_op)` is reusable: the Triton ops
(`dsnt_cuda::dsnt_fwd_triton` / `dsnt_bwd_triton`, same schemas) register the same autograd.

Importing this module without the compiled extension does nothing (the reference and Triton
backends work without it).
"""

import torch

from dsnt_cuda import _extension


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dsnt_fwd_fake(logits, target, normalization, beta, normalized_coordinates, reg, sigma_t):
    """Shapes and dtypes of dsnt_fwd: coords, variance (B, L, n), reg_losses (B, L), stats
    (B, L, 2), all in the accumulation dtype (float64 for float64 logits, float32 otherwise)."""
    torch._check(3 <= logits.dim() <= 5, lambda: "logits must be (B, L, S_1..S_n), n in 1..3")
    batch, keypoints = logits.shape[:2]
    n = logits.dim() - 2
    acc = _acc_dtype(logits.dtype)
    coords = logits.new_empty((batch, keypoints, n), dtype=acc)
    variance = logits.new_empty((batch, keypoints, n), dtype=acc)
    reg_losses = logits.new_empty((batch, keypoints), dtype=acc)
    stats = logits.new_empty((batch, keypoints, 2), dtype=acc)
    return coords, variance, reg_losses, stats


def dsnt_bwd_fake(grad_coords, grad_variance, grad_reg_losses, logits, target, coords, variance,
                  stats, normalization, beta, normalized_coordinates, reg, sigma_t,
                  needs_target_grad):
    """grad_logits: logits' shape and dtype, contiguous; grad_target: (B, L, n) in the target's
    dtype (the accumulation dtype when target is None)."""
    batch, keypoints = logits.shape[:2]
    n = logits.dim() - 2
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    target_dtype = target.dtype if target is not None else _acc_dtype(logits.dtype)
    grad_target = logits.new_empty((batch, keypoints, n), dtype=target_dtype)
    return grad_logits, grad_target


def register_dsnt_autograd(fwd_op, bwd_op) -> None:
    """Make `fwd_op` (schema of dsnt_fwd) differentiable in logits and target through `bwd_op`
    (schema of dsnt_bwd, called as a function).

    `fwd_op` is anything `torch.library.register_autograd` accepts (an op name such as
    "dsnt_cuda::dsnt_fwd", an OpOverload, a triton_op / custom_op); `bwd_op` a callable.
    Saved for backward: logits, target, coords, variance, stats. stats is not differentiable.
    """

    def setup_context(ctx, inputs, output):
        logits, target, normalization, beta, normalized_coordinates, reg, sigma_t = inputs
        coords, variance, _reg_losses, stats = output
        ctx.save_for_backward(logits, target, coords, variance, stats)
        ctx.params = (normalization, beta, normalized_coordinates, reg, sigma_t)
        ctx.mark_non_differentiable(stats)
        # Unused outputs come as None instead of zero tensors: the op treats None as zeros.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_coords, grad_variance, grad_reg_losses, _grad_stats):
        logits, target, coords, variance, stats = ctx.saved_tensors
        needs_logits, needs_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_target = bool(needs_target) and target is not None
        if not (needs_logits or needs_target):
            return (None,) * 7
        grad_logits, grad_target = bwd_op(
            grad_coords, grad_variance, grad_reg_losses, logits, target, coords, variance, stats,
            *ctx.params, needs_target,
        )
        return (
            grad_logits if needs_logits else None,
            grad_target if needs_target else None,
            None, None, None, None, None,
        )

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


def dsnt_core_op(logits, target, normalization, beta, normalized_coordinates, reg, sigma_t):
    """(coords, variance, reg_losses) from the compiled kernels (CPU or CUDA by the device)."""
    coords, variance, reg_losses, _stats = torch.ops.dsnt_cuda.dsnt_fwd(
        logits, target, normalization, beta, bool(normalized_coordinates), reg, sigma_t
    )
    return coords, variance, reg_losses


def _register() -> bool:
    """Fake kernels and autograd of the compiled ops; False when the extension is not built."""
    if not _extension.extension_loaded() or not hasattr(torch.ops.dsnt_cuda, "dsnt_fwd"):
        return False
    torch.library.register_fake("dsnt_cuda::dsnt_fwd")(dsnt_fwd_fake)
    torch.library.register_fake("dsnt_cuda::dsnt_bwd")(dsnt_bwd_fake)
    register_dsnt_autograd("dsnt_cuda::dsnt_fwd", torch.ops.dsnt_cuda.dsnt_bwd.default)
    return True


REGISTERED = _register()

__all__ = [
    "REGISTERED", "dsnt_core_op", "dsnt_fwd_fake", "dsnt_bwd_fake", "register_dsnt_autograd",
]
