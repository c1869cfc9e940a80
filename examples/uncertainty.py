"""Per-keypoint uncertainty from DSNT: `return_variance=True` gives the spread of each heatmap.

DSNT's coordinate is the mean of the normalized heatmap; its variance (per axis, in pixel²) says
how concentrated that heatmap is. A sharp, single peak has a small variance; a blurred or
ambiguous (two-peaked) map, or a keypoint the network cannot see, has a large one. No extra
parameters, no extra pass: the fused kernels compute it with the coordinates.

Part 1 shows the three cases on hand-made logits. Part 2 trains a tiny network for a few seconds
on images where the disk it must locate is sometimes missing (those keypoints are masked out of
the loss) and shows that the predicted spread separates visible from missing keypoints.

    python examples/uncertainty.py
"""

import os
import sys

import torch
from torch import nn

try:
    import dsnt_cuda
except ImportError:  # a source checkout that is not installed: use the package next to examples/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import dsnt_cuda

SIZE = 32


def blob(cx, cy, sigma, size=SIZE):
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


def part1():
    print("Part 1: hand-made heatmap logits on a 32×32 map")
    cases = {
        "sharp peak at (10, 20)": 12 * blob(10, 20, 1.0),
        "weak, blurred peak at (10, 20)": 4 * blob(10, 20, 3.0),
        "two peaks, (6, 6) and (26, 26)": 12 * blob(6, 6, 1.0) + 12 * blob(26, 26, 1.0),
    }
    logits = torch.stack(list(cases.values()))[None]  # (1, 3, 32, 32)
    coords, variance = dsnt_cuda.DSNT(coordinates="pixel", return_variance=True)(logits)
    for k, name in enumerate(cases):
        (x, y), (sx, sy) = coords[0, k].tolist(), variance[0, k].sqrt().tolist()
        print(f"  {name:32s} -> x = {x:5.2f} ± {sx:4.2f} px, y = {y:5.2f} ± {sy:4.2f} px")
    print("  (weak evidence is pulled toward the centre; two peaks average to a point between them;")
    print("   in both cases the spread says not to trust the coordinate)\n")


def make_batch(batch, generator, p_missing=0.3):
    centres = torch.rand(batch, 2, generator=generator) * (SIZE - 10) + 5
    visible = torch.rand(batch, generator=generator) > p_missing
    y, x = torch.meshgrid(
        torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij"
    )
    d = ((x - centres[:, 0, None, None]) ** 2 + (y - centres[:, 1, None, None]) ** 2).sqrt()
    images = torch.sigmoid(2 * (3.5 - d)) * visible[:, None, None]
    images = images + 0.2 * torch.randn(images.shape, generator=generator)
    target = dsnt_cuda.pixel_to_normalized_coordinates(centres[:, None], (SIZE, SIZE))
    return images[:, None], target, visible


def part2(steps=100):
    print(f"Part 2: a tiny network trained for {steps} steps; 30 % of the disks are missing (masked out)")
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 1, 5, padding=2),
    )
    criterion = dsnt_cuda.DSNTLoss()  # Euclidean + JS toward a 1-px Gaussian
    dsnt = dsnt_cuda.DSNT(coordinates="pixel", return_variance=True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        images, target, visible = make_batch(32, generator)
        loss = criterion(net(images), target, mask=visible[:, None].float()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    images, target, visible = make_batch(512, torch.Generator().manual_seed(1))
    with torch.no_grad():
        coords, variance = dsnt(net(images))
    spread = variance.sum(-1).sqrt()[:, 0]  # radial standard deviation in pixels
    error = (coords - dsnt_cuda.normalized_to_pixel_coordinates(target, (SIZE, SIZE))).norm(dim=-1)[:, 0]
    print(
        f"  visible disks: error {error[visible].mean():.2f} px, "
        f"predicted spread {spread[visible].mean():.2f} px"
        f" (median {spread[visible].median():.2f})"
    )
    print(
        f"  missing disks: predicted spread {spread[~visible].mean():.2f} px "
        f"(median {spread[~visible].median():.2f})"
    )
    threshold = 0.5 * (spread[visible].median() + spread[~visible].median())
    flagged = spread > threshold
    accuracy = (flagged == ~visible).float().mean()
    print(f"  'missing' = spread > {threshold:.1f} px: right for {accuracy:.1%} of the keypoints")


if __name__ == "__main__":
    part1()
    part2()
