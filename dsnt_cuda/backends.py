"""Which implementation computes the fused ops: the process-wide default and its overrides.

Backends: "reference" (pure PyTorch, always there), "cpu" (fused C++ kernels on CPU tensors),
"cuda" (fused CUDA C++ kernels), "triton" (fused Triton kernels on CUDA tensors, or on CPU
tensors when TRITON_INTERPRET=1), and "auto" (the fastest available for the tensor's device).
"""

import contextlib
import importlib.util
import os
import threading

import torch

from dsnt_cuda import _extension

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

_state = threading.local()
_default = {"name": "auto"}


def _check_name(name):
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
def use_backend(name: str):
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


def backend_unavailable_reason(name: str, device: torch.device | None = None) -> str | None:
    """None when `name` can run on `device` (any device when None), else why not."""
    _check_name(name)
    if name in ("auto", "reference"):
        return None
    if name == "cpu":
        if not _extension.has_kernel("dsnt_fwd", "CPU"):
            return f"the C++ extension is not built or failed to load ({_extension.LOAD_ERROR})"
        if device is not None and device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got a tensor on {device}"
        return None
    if name == "cuda":
        if not _extension.has_kernel("dsnt_fwd", "CUDA"):
            return "the C++ extension was built without CUDA kernels (or is not built)"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        if device is not None and device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, got a tensor on {device}"
        return None
    # triton
    if not _triton_installed():
        return "triton is not installed"
    if device is not None and device.type == "cpu":
        if triton_interpreter_enabled():
            return None
        return "the triton backend takes CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)"
    if not torch.cuda.is_available() and not triton_interpreter_enabled():
        return "no CUDA GPU is available (set TRITON_INTERPRET=1 to run Triton on CPU tensors)"
    return None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on `device` (or on some device of this machine when None)."""
    dev = torch.device(device) if device is not None else None
    return [b for b in BACKENDS if backend_unavailable_reason(b, dev) is None]


def resolve_backend(name: str | None, device: torch.device) -> str:
    """The concrete backend for a call: `name` (or the default) checked against `device`."""
    name = get_backend() if name is None else name
    _check_name(name)
    if name == "auto":
        preferred = "cuda" if device.type == "cuda" else "cpu"
        return preferred if backend_unavailable_reason(preferred, device) is None else "reference"
    reason = backend_unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"dsnt_cuda backend {name!r} is not available: {reason}")
    return name
