"""Which implementation computes the fused op, and the one place every call goes through.

Backends: "reference" (pure PyTorch, always there), "cpu" (fused C++ kernels on CPU tensors),
"cuda" (fused CUDA C++ kernels), "triton" (fused Triton kernels on CUDA tensors, or on CPU
tensors when TRITON_INTERPRET=1), and "auto" (the fastest available for the tensor's device).

`dsnt_forward` is the single dispatch point of the package: the backend table maps a name to the
forward op (docs/ops.md's `dsnt_fwd` arguments), and every public function calls it once. While
`torch.onnx.export` runs (both exporters) it uses the reference whatever backend was asked for:
ONNX has no fused op, and the reference is a composition of standard operators. torch.export
and torch.compile keep the fused op in the graph.
"""

import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator

import torch

from dsnt_cuda import _extension, reference

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
# The backends that run fused kernels, in the order "auto" prefers them per device type.
AUTO_PREFERENCE = {"cuda": "cuda", "cpu": "cpu"}

_state = threading.local()
_default = {"name": "auto"}


def _check_name(name: object) -> None:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def set_backend(name: str) -> None:
    """Set the process-wide default backend (the `backend=` argument of each call overrides it)."""
    _check_name(name)
    _default["name"] = name


def get_backend() -> str:
    """The backend in force: the innermost `use_backend` block, else the process-wide default."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _default["name"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another default backend (per thread, restored on exit)."""
    _check_name(name)
    stack = _state.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cpp_reason(name: str, dispatch_key: str, device: torch.device | None) -> str | None:
    if not _extension.has_kernel("dsnt_fwd", dispatch_key):
        if not _extension.extension_loaded():
            return f"the C++ extension is not built or failed to load ({_extension.LOAD_ERROR})"
        return f"the C++ extension was built without {name} kernels"
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is available"
    if device is not None and device.type != name:
        return f"the {name} backend takes {name.upper()} tensors, got a tensor on {device}"
    return None


def _triton_reason(device: torch.device | None) -> str | None:
    if not _triton_installed():
        return "triton is not installed"
    if not _extension.extension_loaded():  # dsnt_cuda.ops.register_op_pair
        return ("the triton backend's autograd is in the C++ extension, which is not loaded "
                f"({_extension.LOAD_ERROR})")
    if device is not None and device.type == "cpu":
        if triton_interpreter_enabled():
            return None
        return "the triton backend takes CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)"
    if not torch.cuda.is_available() and not triton_interpreter_enabled():
        return "no CUDA GPU is available (set TRITON_INTERPRET=1 to run Triton on CPU tensors)"
    return None


def backend_unavailable_reason(name: str, device: torch.device | None = None) -> str | None:
    """None when `name` can run on `device` (any device when None), else why not."""
    _check_name(name)
    if name in ("auto", "reference"):
        return None
    if name == "triton":
        return _triton_reason(device)
    return _cpp_reason(name, name.upper(), device)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on `device` (or on some device of this machine when None)."""
    dev = torch.device(device) if device is not None else None
    return [b for b in BACKENDS if backend_unavailable_reason(b, dev) is None]


def _resolve(name: object, device_type: str) -> str:
    """The concrete backend that `name` means on `device_type`, or a clear error."""
    _check_name(name)
    device = torch.device(device_type)
    if name == "auto":
        preferred = AUTO_PREFERENCE.get(device_type)
        if preferred is None or backend_unavailable_reason(preferred, device) is not None:
            return "reference"
        return preferred
    reason = backend_unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"dsnt_cuda backend {name!r} is not available: {reason}")
    return name


# Availability does not change while a process runs: each (name, device type) is resolved once,
# which keeps the per-call cost of dispatch to a dict look-up.
_resolved: dict[tuple[str, str], str] = {}


def resolve_backend(name: str | None, device: torch.device) -> str:
    """The concrete backend of a call: `name` (None: the default in force) checked against
    `device`; "reference" while torch.onnx.export runs."""
    if torch.onnx.is_in_onnx_export():
        return "reference"
    if name is None:
        name = get_backend()
    elif type(name) is not str:
        _check_name(name)
    key = (name, device.type)
    resolved = _resolved.get(key)
    if resolved is None:
        resolved = _resolved[key] = _resolve(name, device.type)
    if resolved == "triton" and torch.jit.is_tracing():
        raise RuntimeError(
            "torch.jit.trace cannot record the Triton kernels of the dsnt_cuda 'triton' backend; "
            "trace with backend='cuda' (or 'reference'), or use torch.export / torch.compile, "
            "which keep the Triton op in the graph"
        )
    return resolved


def _triton_forward() -> Callable:
    import dsnt_cuda.triton  # noqa: F401  (importing registers the Triton ops)

    return torch.ops.dsnt_cuda.dsnt_fwd_triton.default


# name -> the forward callable: (logits, target, mask, beta_map, sigma_t_map, normalization,
# beta, normalized_coordinates, reg, sigma_t, coord_loss, reg_weight) -> (coords, variance,
# reg_losses, coord_losses, loss[, stats]). Resolved on first use.
_FORWARD_TABLE: dict[str, Callable[[], Callable]] = {
    "reference": lambda: reference.dsnt_fwd,
    "cpu": lambda: torch.ops.dsnt_cuda.dsnt_fwd.default,
    "cuda": lambda: torch.ops.dsnt_cuda.dsnt_fwd.default,
    "triton": _triton_forward,
}
_forward_ops: dict[str, Callable] = {}


def forward_op(name: str) -> Callable:
    """The forward callable of a concrete backend (not "auto")."""
    op = _forward_ops.get(name)
    if op is None:
        op = _forward_ops[name] = _FORWARD_TABLE[name]()
    return op


def dsnt_forward(logits, target, mask, beta_map, sigma_t_map, normalization, beta,
                 normalized_coordinates, reg, sigma_t, coord_loss, reg_weight, backend=None):
    """docs/ops.md's dsnt_fwd on the backend of the call: (coords, variance, reg_losses,
    coord_losses, loss). Arguments are not checked here: the public functions check them."""
    op = forward_op(resolve_backend(backend, logits.device))
    outputs = op(logits, target, mask, beta_map, sigma_t_map, normalization, beta,
                 normalized_coordinates, reg, sigma_t, coord_loss, reg_weight)
    return outputs[:5]


__all__ = [
    "BACKENDS", "available_backends", "backend_unavailable_reason", "dsnt_forward", "forward_op",
    "get_backend", "resolve_backend", "set_backend", "triton_interpreter_enabled", "use_backend",
]
