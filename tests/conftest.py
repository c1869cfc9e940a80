"""Shared test helpers: seeded random inputs (never zeros) and the backends this machine runs."""

import pytest
import torch

import dsnt_cuda


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(shape, dtype=torch.float64, seed=0, scale=2.0, device="cpu"):
    """Standard-normal logits times `scale`: peaked but not degenerate softmax maps."""
    x = torch.randn(shape, generator=make_generator(seed), dtype=torch.float64) * scale
    return x.to(device=device, dtype=dtype)


def random_heatmaps(shape, dtype=torch.float64, seed=0, device="cpu"):
    """Positive maps that do NOT sum to 1 (dsntnn accepts those; its results are plain sums)."""
    x = torch.rand(shape, generator=make_generator(seed), dtype=torch.float64) + 0.05
    return x.to(device=device, dtype=dtype)


def random_targets(batch, keypoints, dims, dtype=torch.float64, seed=1, device="cpu"):
    """Target means in normalized units, inside the map (|mu| < 0.9)."""
    x = torch.rand((batch, keypoints, dims), generator=make_generator(seed), dtype=torch.float64)
    return ((x * 2 - 1) * 0.9).to(device=device, dtype=dtype)


CPU_BACKENDS = [b for b in dsnt_cuda.available_backends("cpu") if b != "auto"]
# Triton on CPU tensors only runs in the interpreter, tested in its own process.
CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    """Each backend that runs on CPU tensors here ("reference", and "cpu" when built)."""
    return request.param
