"""Launchers and op registration of the Triton kernels (csrc/OPS.md contract).

- `dsnt_fwd_triton` / `dsnt_bwd_triton`: plain launchers with the OPS.md argument lists and
  results. They run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before
  triton was imported.
- `torch.ops.dsnt_cuda.dsnt_fwd_triton` / `dsnt_bwd_triton`: the same launchers registered as
  `torch.library.triton_op`s (kernels launched through `wrap_triton`, so torch.compile traces
  into them), with autograd on the forward op.
- `dsnt_core_triton`: (coords, variance, reg_losses) with autograd, for backend="triton".
"""

import contextlib
import math
import struct
from typing import Optional

import torch
import triton

from dsnt_cuda._validation import check_core_args, check_heatmaps, check_option
from dsnt_cuda.backends import triton_interpreter_enabled
from dsnt_cuda.reference import NORMALIZATIONS, REGULARIZERS
from dsnt_cuda.triton.kernels import _dsnt_bwd_kernel, _dsnt_fwd_kernel

_NORM_CODES = {name: code for code, name in enumerate(("softmax", "abs", "relu", "sigmoid", "none"))}
_REG_CODES = {name: code for code, name in enumerate(("none", "js", "kl", "var"))}
assert set(_NORM_CODES) == set(NORMALIZATIONS) and set(_REG_CODES) == set(REGULARIZERS)

# Maps of up to SINGLE_BLOCK_MAX elements are reduced in registers by one block of
# next_power_of_2(map size); larger maps loop over chunks of LOOP_BLOCK. Module attributes so
# that tests can lower them to reach the looped path with small maps.
SINGLE_BLOCK_MAX = 8192
# float64 maps in registers spill heavily above this (ptxas, sm_90: ~10 KB a thread at 8192).
SINGLE_BLOCK_MAX_FP64 = 2048
LOOP_BLOCK = 2048
AXIS_BLOCK_MAX = 1024


def _new_output(shape, dtype, device):
    # Every output element is written by the kernels (tests replace this with a NaN fill).
    return torch.empty(shape, dtype=dtype, device=device)


def _wrap(kernel):
    # wrap_triton makes the launch visible to torch.compile; older torch refuses the
    # interpreter's InterpretedFunction, which is then launched as is.
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        return kernel


def _split_float(value: float):
    # Triton passes Python floats as float32: send hi + lo so that float64 kernels see ~1e-15.
    # (struct, not a tensor: this also runs under FakeTensor tracing.)
    try:
        hi = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        hi = value
    return hi, float(value - hi)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_device(logits: torch.Tensor) -> None:
    if logits.device.type == "cuda":
        return
    if logits.device.type == "cpu" and triton_interpreter_enabled():
        return
    raise RuntimeError(
        f"the Triton kernels take CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 set before "
        f"triton is imported), got a tensor on {logits.device}"
    )


# Element offsets inside a map are int32 in the kernels (with a block of slack), as in the CUDA
# C++ kernels.
MAX_MAP_SIZE = 1 << 30


def _check_map_size(map_size) -> None:
    if int(map_size) > MAX_MAP_SIZE:
        raise ValueError(f"a map may have at most {MAX_MAP_SIZE} elements, got {int(map_size)}")


def _device_of(x: torch.Tensor):
    """Triton launches on the *current* CUDA device: make it the tensors' one (a tensor on cuda:1
    with cuda:0 current would otherwise run on the wrong GPU). Compiled code guards itself."""
    if x.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _launch_config(map_size: int, dtype: torch.dtype):
    """(SINGLE, BLOCK, num_warps) for a map of `map_size` elements of `dtype`."""
    map_size = int(map_size)  # (a SymInt under dynamic-shape tracing: the block size specializes)
    if map_size <= (SINGLE_BLOCK_MAX_FP64 if dtype == torch.float64 else SINGLE_BLOCK_MAX):
        block = max(triton.next_power_of_2(map_size), 16)
        single = True
    else:
        block = LOOP_BLOCK
        single = False
    num_warps = min(max(block // 256, 1), 16)
    return single, block, num_warps


def _axis_block(sizes, reg: str) -> int:
    """Block of the per-axis loops (Gaussian target sums): the longest axis, capped; a constant
    when there is no target (it is a constexpr: any other value would compile another kernel)."""
    if reg not in ("js", "kl"):
        return 16
    return min(max(triton.next_power_of_2(int(max(sizes))), 16), AXIS_BLOCK_MAX)


def _geometry(logits: torch.Tensor):
    spatial = tuple(logits.shape[2:])
    n = len(spatial)
    sizes = (1,) * (3 - n) + spatial  # (SD, SH, SW)
    return n, sizes, math.prod(spatial), logits.shape[0] * logits.shape[1]


def _launch_input(logits: torch.Tensor):
    """What both launchers start from: the contiguous logits on a device Triton runs on, their
    geometry (n, (SD, SH, SW), map size, maps) and the accumulation dtype."""
    _check_device(logits)
    x = logits.contiguous()
    n, sizes, map_size, maps = _geometry(x)
    _check_map_size(map_size)
    return x, n, sizes, map_size, maps, _acc_dtype(x.dtype)


def dsnt_fwd_triton(
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    normalization: str,
    beta: float,
    normalized_coordinates: bool,
    reg: str,
    sigma_t: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coords, variance, reg_losses, stats) of csrc/OPS.md, from one Triton kernel launch."""
    beta, sigma_t = check_core_args(logits, target, normalization, beta, reg, sigma_t)
    x, n, (sd, sh, sw), map_size, maps, acc = _launch_input(logits)
    B, L = x.shape[:2]
    coords = _new_output((B, L, n), acc, x.device)
    variance = _new_output((B, L, n), acc, x.device)
    reg_losses = _new_output((B, L), acc, x.device)
    stats = _new_output((B, L, 2), acc, x.device)
    if maps == 0:
        return coords, variance, reg_losses, stats
    tgt = target.to(acc).contiguous() if reg in ("js", "kl") else coords
    single, block, num_warps = _launch_config(map_size, x.dtype)
    with _device_of(x):
        _wrap(_dsnt_fwd_kernel)[(maps,)](
            x, tgt, coords, variance, reg_losses, stats,
            map_size, sd, sh, sw,
            *_split_float(float(beta)), *_split_float(float(sigma_t)),
            NDIM=n, NORM=_NORM_CODES[normalization], REG=_REG_CODES[reg],
            NORMALIZED=bool(normalized_coordinates), SINGLE=single, BLOCK=block,
            AXIS_BLOCK=_axis_block((sd, sh, sw), reg), FP64=acc == torch.float64,
            num_warps=num_warps,
        )
    return coords, variance, reg_losses, stats


def dsnt_bwd_triton(
    grad_coords: Optional[torch.Tensor],
    grad_variance: Optional[torch.Tensor],
    grad_reg_losses: Optional[torch.Tensor],
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    coords: torch.Tensor,
    variance: torch.Tensor,
    stats: torch.Tensor,
    normalization: str,
    beta: float,
    normalized_coordinates: bool,
    reg: str,
    sigma_t: float,
    needs_target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_logits, grad_target) of csrc/OPS.md, from one Triton kernel launch."""
    check_heatmaps(logits, "logits")
    check_option("normalization", normalization, NORMALIZATIONS)
    check_option("reg", reg, REGULARIZERS)
    x, n, (sd, sh, sw), map_size, maps, acc = _launch_input(logits)
    B, L = x.shape[:2]
    if reg in ("js", "kl") and target is None:
        raise ValueError(f"reg={reg!r} needs target means")
    # Without a regularizer gradient (None = zeros) the target gets nothing (a NaN map: 0, not
    # 0 * NaN), as in the C++ kernels.
    target_grad = bool(needs_target_grad) and reg in ("js", "kl") and grad_reg_losses is not None
    target_dtype = target.dtype if target is not None else acc

    def upstream(grad, shape, name):
        if grad is None:
            return torch.zeros(shape, dtype=acc, device=x.device)
        if tuple(grad.shape) != shape or grad.device != x.device:
            raise ValueError(f"{name} must be {shape} on {x.device}, got {tuple(grad.shape)} on {grad.device}")
        return grad.to(acc).contiguous()

    for name, saved, shape in (("coords", coords, (B, L, n)), ("variance", variance, (B, L, n)),
                               ("stats", stats, (B, L, 2))):
        # read raw by the kernel: a wrong shape or device would be an out-of-bounds access
        if tuple(saved.shape) != shape or saved.device != x.device:
            raise ValueError(f"{name} must be {shape} on {x.device}, got {tuple(saved.shape)} on {saved.device}")
    if target is not None and reg in ("js", "kl") and (tuple(target.shape) != (B, L, n) or target.device != x.device):
        raise ValueError(f"target must be {(B, L, n)} on {x.device}, got {tuple(target.shape)} on {target.device}")
    gc = upstream(grad_coords, (B, L, n), "grad_coords")
    gv = upstream(grad_variance, (B, L, n), "grad_variance")
    gr = upstream(grad_reg_losses, (B, L), "grad_reg_losses")
    c = coords.to(acc).contiguous()
    v = variance.to(acc).contiguous()
    st = stats.to(acc).contiguous()
    grad_logits = _new_output(x.shape, x.dtype, x.device)
    grad_target_acc = torch.zeros((B, L, n), dtype=acc, device=x.device)
    if maps > 0:
        # (a fresh buffer, never an input, stands in for an unused target pointer)
        tgt = target.to(acc).contiguous() if reg in ("js", "kl") else grad_target_acc
        single, block, num_warps = _launch_config(map_size, x.dtype)
        with _device_of(x):
            _wrap(_dsnt_bwd_kernel)[(maps,)](
                gc, gv, gr, x, tgt, c, v, st, grad_logits, grad_target_acc,
                map_size, sd, sh, sw,
                *_split_float(float(beta)), *_split_float(float(sigma_t)),
                NDIM=n, NORM=_NORM_CODES[normalization], REG=_REG_CODES[reg],
                NORMALIZED=bool(normalized_coordinates), TARGET_GRAD=target_grad, SINGLE=single,
                BLOCK=block, AXIS_BLOCK=_axis_block((sd, sh, sw), reg), FP64=acc == torch.float64,
                num_warps=num_warps,
            )
    return grad_logits, grad_target_acc.to(target_dtype)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


def _backward_args(ctx, grad_coords, grad_variance, grad_reg_losses):
    logits, target, coords, variance, stats = ctx.saved_tensors
    if not ctx.has_target:
        target = None
    return (grad_coords, grad_variance, grad_reg_losses, logits, target, coords, variance, stats,
            *ctx.options, ctx.needs_input_grad[1] and ctx.has_target)


def _save(ctx, logits, target, options, coords, variance, stats):
    ctx.has_target = target is not None
    ctx.options = options
    ctx.save_for_backward(logits, target if target is not None else coords, coords, variance, stats)


def _setup_context(ctx, inputs, output):
    logits, target, *options = inputs
    coords, variance, _reg_losses, stats = output
    _save(ctx, logits, target, tuple(options), coords, variance, stats)


def _backward(ctx, grad_coords, grad_variance, grad_reg_losses, _grad_stats):
    grad_logits, grad_target = torch.ops.dsnt_cuda.dsnt_bwd_triton(
        *_backward_args(ctx, grad_coords, grad_variance, grad_reg_losses)
    )
    return grad_logits, (grad_target if ctx.has_target else None), None, None, None, None, None


dsnt_fwd_triton_op = torch.library.triton_op("dsnt_cuda::dsnt_fwd_triton", dsnt_fwd_triton,
                                             mutates_args=())
dsnt_bwd_triton_op = torch.library.triton_op("dsnt_cuda::dsnt_bwd_triton", dsnt_bwd_triton,
                                             mutates_args=())
torch.library.register_autograd("dsnt_cuda::dsnt_fwd_triton", _backward,
                                setup_context=_setup_context)


class _DsntTritonFunction(torch.autograd.Function):
    """The raw launchers under autograd: the path for CPU tensors in the Triton interpreter,
    where the custom-op machinery (and torch.compile) has nothing to add."""

    @staticmethod
    def forward(ctx, logits, target, normalization, beta, normalized_coordinates, reg, sigma_t):
        options = (normalization, beta, normalized_coordinates, reg, sigma_t)
        coords, variance, reg_losses, stats = dsnt_fwd_triton(logits, target, *options)
        _save(ctx, logits, target, options, coords, variance, stats)
        ctx.mark_non_differentiable(stats)
        return coords, variance, reg_losses, stats

    @staticmethod
    def backward(ctx, grad_coords, grad_variance, grad_reg_losses, _grad_stats):
        grad_logits, grad_target = dsnt_bwd_triton(
            *_backward_args(ctx, grad_coords, grad_variance, grad_reg_losses)
        )
        return grad_logits, (grad_target if ctx.has_target else None), None, None, None, None, None


def dsnt_core_triton(logits, target, normalization, beta, normalized_coordinates, reg, sigma_t):
    """(coords, variance, reg_losses) from the Triton kernels, differentiable in logits and target."""
    beta, sigma_t = check_core_args(logits, target, normalization, beta, reg, sigma_t)
    if reg not in ("js", "kl"):
        target = None  # ignored by the kernels; no gradient flows to it
    args = (logits, target, normalization, beta, bool(normalized_coordinates), reg, sigma_t)
    if logits.device.type == "cuda":
        coords, variance, reg_losses, _stats = torch.ops.dsnt_cuda.dsnt_fwd_triton(*args)
    else:
        _check_device(logits)
        coords, variance, reg_losses, _stats = _DsntTritonFunction.apply(*args)
    return coords, variance, reg_losses
