"""Launchers, launch plans and registration of the Triton kernels (docs/ops.md contract v2).

- `dsnt_fwd_triton` / `dsnt_bwd_triton`: plain functions with the arguments and results of
  `dsnt_cuda::dsnt_fwd` / `dsnt_bwd`, launching the kernels on the tensors' device: CUDA, or CPU
  when TRITON_INTERPRET=1 was set before triton was imported.
- `torch.ops.dsnt_cuda.dsnt_fwd_triton` / `dsnt_bwd_triton`: the same functions as
  `torch.library.triton_op`s with the C++ ops' schemas; fake kernels and autograd come from
  `dsnt_cuda.ops.register_ops`, as for every backend.

In the interpreter (CPU tensors) the registered ops run eagerly as on a GPU, autograd included:
the triton_op calls the launcher, whose kernels the interpreter runs. What traces a triton_op
into its launcher on fake tensors (torch.compile, opcheck's aot_dispatch) needs a GPU: there the
launch is recorded, in the interpreter it would run on tensors without data.

Inputs are validated by the Python API (and the C++ ops check theirs); these launchers check
only what would make a kernel read out of bounds: the device, the map size (int32 offsets), and
the shapes and devices of every tensor a kernel reads by index.
"""

import contextlib
import math
import struct

import torch
import triton

from dsnt_cuda import ops as _ops
from dsnt_cuda.triton.backward import _dsnt_bwd_kernel
from dsnt_cuda.triton.forward import _dsnt_fwd_kernel, _dsnt_loss_kernel
from dsnt_cuda.triton.math import AXES as _AXES
from dsnt_cuda.triton.modes import COORD_LOSSES, NORMALIZATIONS, REGULARIZERS

# Launch plan knobs, module attributes so that tests can lower them (looped paths, several
# programs per map, per-axis loops with small maps). A map whose padded tile has at most
# SINGLE_TILE_MAX elements (float64: SINGLE_TILE_MAX_FP64) is held in registers by one program;
# larger maps loop over tiles of LOOP_TILE elements, at most COL_BLOCK_MAX columns wide. A thread
# holds PER_THREAD elements of a tile (float64: a quarter), of a single tile WIDE_PER_THREAD: the
# per-map set-up and reductions are paid once per thread, so more elements a thread cost fewer
# instructions an element, as long as they fit sm_90's 255 registers (the backward's target and
# beta gradient sums do not at 64). The backward gives each program CHUNK_TILES tiles of a map.
SINGLE_TILE_MAX = 8192
SINGLE_TILE_MAX_FP64 = 2048
LOOP_TILE = 4096
COL_BLOCK_MAX = 1024
PER_THREAD = 32
WIDE_PER_THREAD = 64
CHUNK_TILES = 8
AXIS_BLOCK_MAX = 1024

AXES = _AXES.value  # lanes of an axis vector: x, y, z, and the beta gradient in backward partials

# Element offsets inside a map are int32 in the kernels, as in the CUDA kernels.
MAX_MAP_SIZE = 1 << 30


def _new_output(shape, dtype, device):
    # Every element is written by a kernel (the tests swap this for a NaN fill).
    return torch.empty(shape, dtype=dtype, device=device)


def _split_float(value: float):
    # Triton passes Python floats as float32: send hi + lo so that float64 kernels see ~1e-15.
    # (struct, not a tensor: this also runs while torch.compile traces.)
    try:
        hi = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        hi = value
    return hi, float(value - hi)


def _check_device(logits: torch.Tensor) -> None:
    if logits.device.type == "cuda" or (logits.device.type == "cpu" and triton.knobs.runtime.interpret):
        return
    raise RuntimeError(f"the Triton kernels take CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 "
                       f"set before triton is imported), got a tensor on {logits.device}")


def _check_read(t, name: str, shape, device) -> None:
    """A tensor the kernels read by index: exactly `shape`, on `device`."""
    if t is None:
        return
    if tuple(t.shape) != tuple(shape) or t.device != device:
        raise ValueError(f"{name} must have shape {tuple(shape)} on {device}, "
                         f"got {tuple(t.shape)} on {t.device}")


def _device_of(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    if x.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


class _Geometry:
    """The contiguous logits as (B, L) maps of SIZE_Z x SIZE_Y x SIZE_X elements, and a plan."""

    def __init__(self, logits: torch.Tensor):
        _check_device(logits)
        self.logits = logits.contiguous()
        spatial = [int(s) for s in self.logits.shape[2:]]
        self.ndim = len(spatial)
        self.batch, self.keypoints = (int(s) for s in self.logits.shape[:2])
        self.maps = self.batch * self.keypoints
        self.sizes = tuple(spatial[::-1]) + (1,) * (3 - self.ndim)  # x, y, z
        self.map_size = math.prod(spatial)
        if self.map_size > MAX_MAP_SIZE:
            raise ValueError(f"a map may have at most {MAX_MAP_SIZE} elements (int32 offsets), "
                             f"got {self.map_size}")
        self.acc = torch.float64 if self.logits.dtype == torch.float64 else torch.float32
        self.device = self.logits.device
        self.rows = self.sizes[1] * self.sizes[2]
        fp64 = self.acc == torch.float64
        cols = triton.next_power_of_2(self.sizes[0])
        single_max = SINGLE_TILE_MAX_FP64 if fp64 else SINGLE_TILE_MAX
        self.single = cols * triton.next_power_of_2(self.rows) <= single_max
        if self.single:
            self.block_c, self.block_r = cols, triton.next_power_of_2(self.rows)
        else:
            self.block_c = min(cols, COL_BLOCK_MAX, LOOP_TILE)
            self.block_r = max(1, min(triton.next_power_of_2(self.rows), LOOP_TILE // self.block_c))
        # (a grid's second dimension holds at most 65535 programs)
        self.chunk_rows = self.block_r * max(CHUNK_TILES, triton.cdiv(self.rows, 65535 * self.block_r))
        self.chunks = triton.cdiv(self.rows, self.chunk_rows)
        self.axis_block = min(triton.next_power_of_2(max(self.sizes)), AXIS_BLOCK_MAX)

    def num_warps(self, wide: bool) -> int:
        if self.acc == torch.float64:
            per_thread = PER_THREAD // 4
        else:
            per_thread = WIDE_PER_THREAD if wide and self.single else PER_THREAD
        return min(max(self.block_r * self.block_c // (32 * per_thread), 1), 8)

    def constants(self, normalization, reg, coord_loss, normalized_coordinates, wide: bool):
        return dict(NDIM=self.ndim, SIZE_X=self.sizes[0], SIZE_Y=self.sizes[1], SIZE_Z=self.sizes[2],
                    NORM=NORMALIZATIONS[normalization], REG=REGULARIZERS[reg],
                    COORD_LOSS=COORD_LOSSES[coord_loss], NORMALIZED=bool(normalized_coordinates),
                    BLOCK_R=self.block_r, BLOCK_C=self.block_c, AXIS_BLOCK=self.axis_block,
                    num_warps=self.num_warps(wide))

    def per_map(self, t, name):
        """A per-map scalar tensor as a (B, L) view in acc (strides 0 where broadcast), or None."""
        if t is None:
            return None
        if t.device != self.device or t.dim() > 2:
            raise ValueError(f"{name} must be broadcastable to (B, L) on {self.device}, got {tuple(t.shape)} "
                             f"on {t.device}")
        try:
            return t.to(self.acc).expand(self.batch, self.keypoints)
        except RuntimeError as error:
            raise ValueError(f"{name} must be broadcastable to (B, L) = ({self.batch}, {self.keypoints}), "
                             f"got {tuple(t.shape)}") from error

    def as_acc(self, t, name, shape):
        if t is None:
            return None
        _check_read(t, name, shape, self.device)
        return t.to(self.acc).contiguous()


def _strides(view):
    return (view.stride(0), view.stride(1)) if view is not None else (0, 0)


def dsnt_fwd_triton(logits, target, mask, beta_map, sigma_t_map, normalization, beta,
                    normalized_coordinates, reg, sigma_t, coord_loss, reg_weight):
    """(coords, variance, reg_losses, coord_losses, loss, stats) of docs/ops.md."""
    g = _Geometry(logits)
    per_point = (g.batch, g.keypoints, g.ndim)
    with_loss = coord_loss != "none"
    coords = _new_output(per_point, g.acc, g.device)
    variance = _new_output(per_point, g.acc, g.device)
    reg_losses = _new_output(per_point[:2], g.acc, g.device)
    coord_losses = _new_output(per_point[:2] if with_loss else (0,), g.acc, g.device)
    loss = _new_output(() if with_loss else (0,), g.acc, g.device)
    stats = _new_output((g.batch, g.keypoints, _ops.STATS_BASE + g.ndim), g.acc, g.device)
    needs_target = reg in ("js", "kl") or with_loss
    target_acc = g.as_acc(target if needs_target else None, "target", per_point)
    beta_view, sigma_view = g.per_map(beta_map, "beta_map"), g.per_map(sigma_t_map, "sigma_t_map")
    with _device_of(g.logits):
        if g.maps > 0:
            torch.library.wrap_triton(_dsnt_fwd_kernel)[(g.maps,)](
                g.logits, _or(target_acc, coords), _or(beta_view, coords), _or(sigma_view, coords),
                coords, variance, reg_losses, coord_losses, stats,
                g.keypoints, *_strides(beta_view), *_strides(sigma_view),
                *_split_float(float(beta)), *_split_float(float(sigma_t)),
                HAS_BETA_MAP=beta_view is not None, HAS_SIGMA_MAP=sigma_view is not None,
                **g.constants(normalization, reg, coord_loss, normalized_coordinates, wide=True),
            )
        if with_loss:
            mask_acc = g.as_acc(mask, "mask", per_point[:2])
            torch.library.wrap_triton(_dsnt_loss_kernel)[(1,)](
                coord_losses, reg_losses, _or(mask_acc, reg_losses), loss, g.maps,
                *_split_float(float(reg_weight)), HAS_MASK=mask_acc is not None, BLOCK=1024,
            )
    return coords, variance, reg_losses, coord_losses, loss, stats


def dsnt_bwd_triton(grad_coords, grad_variance, grad_reg_losses, grad_coord_losses, grad_loss,
                    logits, target, mask, beta_map, sigma_t_map, coords, variance, stats,
                    normalization, beta, normalized_coordinates, reg, sigma_t, coord_loss,
                    reg_weight, needs_target_grad, needs_beta_grad):
    """(grad_logits, grad_target, grad_beta_map) of docs/ops.md."""
    g = _Geometry(logits)
    per_point = (g.batch, g.keypoints, g.ndim)
    with_loss = coord_loss != "none"
    needs_target = reg in ("js", "kl") or with_loss
    coords = g.as_acc(coords, "coords", per_point)
    variance = g.as_acc(variance, "variance", per_point)
    stats = g.as_acc(stats, "stats", (*per_point[:2], _ops.STATS_BASE + g.ndim))
    target_acc = g.as_acc(target if needs_target else None, "target", per_point)
    grad_coords = g.as_acc(grad_coords, "grad_coords", per_point)
    grad_variance = g.as_acc(grad_variance, "grad_variance", per_point)
    grad_reg_losses = g.as_acc(grad_reg_losses, "grad_reg_losses", per_point[:2])
    grad_coord_losses = g.as_acc(grad_coord_losses if with_loss else None, "grad_coord_losses", per_point[:2])
    grad_loss = g.as_acc(grad_loss.reshape(()) if with_loss and grad_loss is not None else None, "grad_loss",
                         ())
    mask_acc = g.as_acc(mask if grad_loss is not None else None, "mask", per_point[:2])
    mask_total = mask_acc.sum().clamp(min=1) if mask_acc is not None else None
    beta_view, sigma_view = g.per_map(beta_map, "beta_map"), g.per_map(sigma_t_map, "sigma_t_map")
    target_grad = bool(needs_target_grad) and target_acc is not None
    beta_grad = bool(needs_beta_grad) and beta_view is not None and normalization == "softmax"

    grad_logits = _new_output(g.logits.shape, g.logits.dtype, g.device)
    partials = _new_output((g.batch, g.keypoints, g.chunks, AXES), g.acc, g.device)
    if g.maps > 0:
        with _device_of(g.logits):
            torch.library.wrap_triton(_dsnt_bwd_kernel)[(g.maps, g.chunks)](
                _or(grad_coords, coords), _or(grad_variance, coords), _or(grad_reg_losses, coords),
                _or(grad_coord_losses, coords), _or(grad_loss, coords),
                g.logits, _or(target_acc, coords), _or(mask_acc, coords), _or(mask_total, coords),
                _or(beta_view, coords), _or(sigma_view, coords),
                coords, variance, stats, grad_logits, partials,
                g.keypoints, g.maps, *_strides(beta_view), *_strides(sigma_view),
                *_split_float(float(beta)), *_split_float(float(sigma_t)), *_split_float(float(reg_weight)),
                HAS_GRAD_COORDS=grad_coords is not None, HAS_GRAD_VARIANCE=grad_variance is not None,
                HAS_GRAD_REG=grad_reg_losses is not None, HAS_GRAD_COORD_LOSS=grad_coord_losses is not None,
                HAS_GRAD_LOSS=grad_loss is not None, HAS_MASK=mask_acc is not None,
                HAS_BETA_MAP=beta_view is not None, HAS_SIGMA_MAP=sigma_view is not None,
                TARGET_GRAD=target_grad, BETA_GRAD=beta_grad, CHUNK_ROWS=g.chunk_rows,
                **g.constants(normalization, reg, coord_loss, normalized_coordinates,
                              wide=not (target_grad or beta_grad)),
            )
    sums = partials[:, :, 0] if g.chunks == 1 else partials.sum(2)
    target_dtype = target.dtype if target is not None else g.acc
    grad_target = sums[..., : g.ndim].to(target_dtype).contiguous()
    if beta_map is None:
        grad_beta = torch.empty((0,), dtype=g.acc, device=g.device)
    else:
        grad_beta = sums[..., AXES - 1].sum_to_size(beta_map.shape).to(beta_map.dtype).contiguous()
    return grad_logits, grad_target, grad_beta


def _or(t, fallback):
    # A pointer the kernel never reads (its HAS_* flag is off) still needs a tensor.
    return fallback if t is None else t


dsnt_fwd_triton_op = torch.library.triton_op("dsnt_cuda::dsnt_fwd_triton", dsnt_fwd_triton,
                                             mutates_args=(), schema=_ops.FWD_SCHEMA)
dsnt_bwd_triton_op = torch.library.triton_op("dsnt_cuda::dsnt_bwd_triton", dsnt_bwd_triton,
                                             mutates_args=(), schema=_ops.BWD_SCHEMA)
_ops.register_ops("dsnt_cuda::dsnt_fwd_triton", "dsnt_cuda::dsnt_bwd_triton")
