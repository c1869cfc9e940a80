"""The implementations being timed, each behind the same two calls.

Every provider gives, for a mode,
- inference: `f(logits) -> coords (B, L, n)`, no autograd;
- training:  `f(logits, target) -> scalar loss`, the standard DSNT loss (euclidean + JS,
  sigma_t = 1 px, plain mean), differentiated with `torch.autograd.grad` by the caller.

The baselines are imported, never re-typed: the pure-PyTorch oracle is `dsnt_cuda.reference`
(eager and under torch.compile), and dsntnn / kornia are the external libraries.
"""

import importlib
import importlib.util

import torch

import dsnt_cuda
from bench import config
from dsnt_cuda import backends, reference

SIGMA_T = 1.0  # px, the standard loss (docs/math.md §5)


class Provider:
    name = ""
    note = ""  # printed once under the table when the provider appears in it

    def unavailable(self, device: torch.device, sizes, dtype, mode, opts) -> str | None:
        """None when this provider can run the case, else a short reason to print."""
        return None

    def inference_fn(self):
        raise NotImplementedError

    def loss_fn(self):
        raise NotImplementedError

    def function(self, mode):
        return self.inference_fn() if mode == "inference" else self.loss_fn()


class Fused(Provider):
    """dsnt_cuda's fused ops through the public API with an explicit backend."""

    def __init__(self, backend: str):
        self.name = backend
        self.backend = backend

    def unavailable(self, device, sizes, dtype, mode, opts):
        if self.backend == "triton" and device.type == "cpu":
            return "Triton runs CPU tensors only in its interpreter (not worth timing)"
        if self.backend == "cpu" and device.type != "cpu":
            return "the cpu backend takes CPU tensors"
        if self.backend == "cuda" and device.type != "cuda":
            return "the cuda backend takes CUDA tensors"
        return backends.backend_unavailable_reason(self.backend, device)

    def inference_fn(self):
        backend = self.backend
        return lambda x: dsnt_cuda.fused_dsnt(x, backend=backend)

    def loss_fn(self):
        backend = self.backend
        return lambda x, t: dsnt_cuda.dsnt_loss(x, t, reg="js", sigma_t=SIGMA_T, backend=backend).loss


def _reference_inference(x):
    return reference.coordinates(reference.normalize(x, "softmax", 1.0), True)


def _reference_loss(x, t):
    return reference.dsnt_loss(x, t, reg="js", sigma_t=SIGMA_T)[0]


class Reference(Provider):
    """dsnt_cuda.reference, the pure-PyTorch oracle, run eagerly."""

    name = "reference"

    def inference_fn(self):
        return _reference_inference

    def loss_fn(self):
        return _reference_loss


class ReferenceCompiled(Provider):
    """The same reference functions under torch.compile (dynamic=False, one graph per case).

    Compilation happens on the first call, which the runner times separately (`compile_s`).
    """

    name = "reference-compile"
    note = (
        "reference-compile: dsnt_cuda.reference under torch.compile(dynamic=False); "
        "compile_s is the first call (compilation included), excluded from the timings."
    )

    def __init__(self):
        self._cache = {}

    def unavailable(self, device, sizes, dtype, mode, opts):
        policy = opts.get("compile", "auto")
        if policy == "none":
            return "--compile none"
        numel = 1
        for s in sizes:
            numel *= s
        if policy == "auto" and device.type == "cpu" and numel > config.CPU_COMPILE_MAX_NUMEL:
            return (
                f"compile on CPU limited to <= {config.CPU_COMPILE_MAX_NUMEL} logits (--compile all to force)"
            )
        return None

    def compiled(self, key, mode):
        # dynamo caches per code object, so every case of a mode shares one cache: dynamic=False
        # keeps one static graph per shape/dtype, and the limits below keep all of them cached.
        if key not in self._cache:
            for name in (
                "cache_size_limit",
                "recompile_limit",
                "accumulated_cache_size_limit",
                "accumulated_recompile_limit",
            ):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
            fn = _reference_inference if mode == "inference" else _reference_loss
            self._cache[key] = torch.compile(fn, dynamic=False)
        return self._cache[key]


class Dsntnn(Provider):
    """dsntnn 0.5.3, its documented recipe:
    flat_softmax -> dsnt -> euclidean_losses + js_reg_losses(sigma_t=1) -> average_loss."""

    name = "dsntnn"

    def unavailable(self, device, sizes, dtype, mode, opts):
        if importlib.util.find_spec("dsntnn") is None:
            return "dsntnn is not installed"
        return None

    def inference_fn(self):
        dsntnn = importlib.import_module("dsntnn")
        return lambda x: dsntnn.dsnt(dsntnn.flat_softmax(x))

    def loss_fn(self):
        dsntnn = importlib.import_module("dsntnn")

        def loss(x, t):
            heatmaps = dsntnn.flat_softmax(x)
            coords = dsntnn.dsnt(heatmaps)
            euclidean = dsntnn.euclidean_losses(coords, t)
            reg = dsntnn.js_reg_losses(heatmaps, t, sigma_t=SIGMA_T)
            return dsntnn.average_loss(euclidean + reg)

        return loss


class Kornia(Provider):
    """kornia.geometry.subpix.spatial_soft_argmax2d: coordinates only, 2-D maps only."""

    name = "kornia"
    note = (
        "kornia: spatial_soft_argmax2d puts pixel centres at -1 + 2j/(S-1) (corners at +-1), "
        "not dsntnn's (2j+1)/S - 1; its max_err is measured after converting."
    )

    def unavailable(self, device, sizes, dtype, mode, opts):
        if mode != "inference":
            return "coordinates only (no DSNT training loss)"
        if len(sizes) != 4:
            return "2-D maps only"
        if importlib.util.find_spec("kornia") is None:
            return "kornia is not installed"
        return None

    def inference_fn(self):
        subpix = importlib.import_module("kornia.geometry.subpix")
        return lambda x: subpix.spatial_soft_argmax2d(x, normalized_coordinates=True)


def kornia_to_dsntnn(coords: torch.Tensor, sizes) -> torch.Tensor:
    """kornia's normalized (x, y) -> dsntnn's convention, for the error check only."""
    height, width = sizes[-2], sizes[-1]
    out = coords.float().clone()
    for k, length in enumerate((width, height)):
        pixel = (out[..., k] + 1) * (length - 1) / 2
        out[..., k] = (2 * pixel + 1) / length - 1
    return out


def make_providers(names) -> list[Provider]:
    table = {
        "cuda": lambda: Fused("cuda"),
        "triton": lambda: Fused("triton"),
        "cpu": lambda: Fused("cpu"),
        "reference": Reference,
        "reference-compile": ReferenceCompiled,
        "dsntnn": Dsntnn,
        "kornia": Kornia,
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; expected some of {', '.join(table)}")
    return [table[n]() for n in config.PROVIDERS if n in names]
