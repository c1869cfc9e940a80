"""Coordinate conventions and the conversions between them.

An axis of `S` pixels (pixel `j` covers [j, j + 1) in image space, its centre at j + 1/2) has three
common coordinate systems, all affine in the pixel index `j`:

- ``"normalized"`` — pixel centres in (-1, 1): ``v(j) = (2j + 1)/S - 1``. dsntnn's convention
  and the default of this package; ±1 are the outer edges of the outer pixels, never reached.
- ``"pixel"`` — the pixel index itself: ``v(j) = j`` (0 .. S-1).
- ``"align_corners"`` — corner-aligned [-1, 1] (kornia's ``normalized_coordinates=True``, torch's
  ``grid_sample(align_corners=True)``): ``v(j) = -1 + 2j/(S - 1)``; ``v = 0`` for ``S = 1``.

Because the DSNT expectation is linear, the expected coordinate in any of them is the same affine
map of the expected pixel coordinate — exact for maps that sum to 1 (every normalization except
``"none"`` on an unnormalized heatmap). Variances scale by the square of the map's slope.

Coordinates are tensors ``(..., n)`` in (x, y, z) order (last tensor dim first); `size` is given
in tensor order ``(..., D, H, W)`` like dsntnn — the last `n` entries are used, so passing
``heatmaps.shape`` works as well as ``heatmaps.shape[-2:]``.
"""

from collections.abc import Sequence

import torch

CONVENTIONS = ("normalized", "pixel", "align_corners")


def check_convention(name: object) -> str:
    if not isinstance(name, str) or name not in CONVENTIONS:
        raise ValueError(
            f"unknown coordinate convention {name!r}; expected one of {', '.join(map(repr, CONVENTIONS))}"
        )
    return name


def _to_pixel_affine(convention: str, length):
    """(slope, offset) with ``pixel = slope * v + offset`` on an axis of `length` pixels."""
    if convention == "pixel":
        return 1.0, 0.0
    centre = (length - 1) / 2
    if convention == "normalized":
        return length / 2, centre
    # align_corners: v = (2j - (S - 1)) / (S - 1); an axis of 1 pixel has v = 0 (slope 1/2 keeps
    # the map invertible there: pixel 0 <-> 0).
    return max(length - 1, 1) / 2, centre


def _xyz_lengths(size, n: int):
    size = tuple(size)
    if len(size) < n:
        raise ValueError(f"size {size} has fewer than the {n} spatial dims of the coordinates")
    return size[len(size) - n :][::-1]  # (W, H[, D]) to match (x, y[, z])


def _check_coords(coords) -> None:
    if not isinstance(coords, torch.Tensor) or not coords.is_floating_point():
        raise TypeError("coords must be a floating-point torch.Tensor of shape (..., n)")


def convert_coordinates(coords: torch.Tensor, size: Sequence[int], src: str, dst: str) -> torch.Tensor:
    """Map coordinates (..., n) in (x, y, z) order from convention `src` to `dst`.

    `size` is the heatmap size in tensor order (..., H, W). Differentiable; the result has the
    dtype and device of `coords` (a new tensor even when ``src == dst``).
    """
    check_convention(src)
    check_convention(dst)
    _check_coords(coords)
    if src == dst:
        return coords.clone()
    per_axis = []
    for k, length in enumerate(_xyz_lengths(size, coords.shape[-1])):
        a_src, b_src = _to_pixel_affine(src, length)
        a_dst, b_dst = _to_pixel_affine(dst, length)
        # v_dst = (a_src * v_src + b_src - b_dst) / a_dst; the offsets are equal unless one side
        # is "pixel", so this is one multiply-add per axis.
        per_axis.append(coords[..., k] * (a_src / a_dst) + (b_src - b_dst) / a_dst)
    return torch.stack(per_axis, dim=-1)


def convert_variance(variance: torch.Tensor, size: Sequence[int], src: str, dst: str) -> torch.Tensor:
    """Map per-axis variances (..., n) between conventions' squared units (slope² scaling).

    `fused_dsnt(..., return_variance=True)` and `DSNT` return pixel² (``src="pixel"``).
    """
    check_convention(src)
    check_convention(dst)
    _check_coords(variance)
    if src == dst:
        return variance.clone()
    per_axis = []
    for k, length in enumerate(_xyz_lengths(size, variance.shape[-1])):
        ratio = _to_pixel_affine(src, length)[0] / _to_pixel_affine(dst, length)[0]
        per_axis.append(variance[..., k] * (ratio * ratio))
    return torch.stack(per_axis, dim=-1)


def coordinate_grid(length: int, convention: str = "normalized", dtype=None, device=None) -> torch.Tensor:
    """The coordinates ``v(j)`` of the `length` pixels of one axis in `convention`."""
    check_convention(convention)
    j = torch.arange(length, dtype=dtype if dtype is not None else torch.get_default_dtype(), device=device)
    slope, offset = _to_pixel_affine(convention, length)
    return (j - offset) / slope


_DESCRIPTIONS = {
    "normalized": "dsntnn's normalized (pixel-centre) coordinates",
    "pixel": "pixel indices",
    "align_corners": "corner-aligned [-1, 1] (kornia / grid_sample(align_corners=True))",
}


def _converter(source: str, dest: str):
    """The public `<source>_to_<dest>(coords, size)`: convert_coordinates between two conventions."""

    def convert(coords: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return convert_coordinates(coords, size, source, dest)

    convert.__name__ = convert.__qualname__ = f"{source}_to_{dest}"
    text = f"{_DESCRIPTIONS[source]} -> {_DESCRIPTIONS[dest]}."
    convert.__doc__ = text[0].upper() + text[1:] if source != "normalized" else text
    return convert


normalized_to_pixel = _converter("normalized", "pixel")
pixel_to_normalized = _converter("pixel", "normalized")
pixel_to_align_corners = _converter("pixel", "align_corners")
align_corners_to_pixel = _converter("align_corners", "pixel")
normalized_to_align_corners = _converter("normalized", "align_corners")
align_corners_to_normalized = _converter("align_corners", "normalized")


__all__ = [
    "CONVENTIONS",
    "align_corners_to_normalized",
    "align_corners_to_pixel",
    "check_convention",
    "convert_coordinates",
    "convert_variance",
    "coordinate_grid",
    "normalized_to_align_corners",
    "normalized_to_pixel",
    "pixel_to_align_corners",
    "pixel_to_normalized",
]
