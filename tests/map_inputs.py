"""Inputs shared by test files that feed the same hard maps to different kernels."""

import torch


def peaked_logits(shape, peak, width):
    """float32 log of a Gaussian bump of `width` pixels at pixel `peak` (one entry per axis)."""
    z = torch.zeros(shape, dtype=torch.float64)
    for axis, (size, centre) in enumerate(zip(shape[2:], peak)):
        j = torch.arange(size, dtype=torch.float64) - centre
        view = [1] * len(shape)
        view[2 + axis] = size
        z = z - (j * j / (2 * width * width)).view(view)
    return z.float()
