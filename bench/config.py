"""What the benchmark measures: shapes, dtypes, modes, providers, and the default selections.

The named shapes are the benchmark shapes of docs/performance.md §2 (plus `tiny` / `tiny3d` for
smoke tests).
`--shapes` also takes literal sizes such as `8x4x32x32` (B x L x S_1[ x S_2[ x S_3]]).
"""

import torch

SHAPES = {
    "pose2d": (32, 16, 64, 64),  # MPII-like
    "lowres": (32, 16, 16, 16),
    "wholebody": (64, 133, 64, 48),
    "face": (256, 98, 64, 64),
    "volume3d": (16, 17, 64, 64, 64),
    "batch1": (1, 17, 64, 48),  # launch-bound: one image
    # a CPU benchmark shape of docs/performance.md §2: 3-D, as many logits as pose2d
    "lowres3d": (32, 16, 16, 16, 16),
    # not benchmark shapes: for the smoke test and quick checks
    "tiny": (2, 3, 8, 8),
    "tiny3d": (2, 3, 4, 6, 8),
}
FULL_SHAPES = ("pose2d", "lowres", "lowres3d", "wholebody", "face", "volume3d")
DEFAULT_SHAPES = ("pose2d", "lowres", "lowres3d")

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
FULL_DTYPES = ("float32", "bfloat16")
DEFAULT_DTYPES = ("float32",)

MODES = ("inference", "training")

# Provider ids, in table order. "cuda" / "triton" / "cpu" are the fused backends of dsnt_cuda;
# "reference" is dsnt_cuda.reference run eagerly, "reference-compile" the same functions under
# torch.compile; "dsntnn" and "kornia" are the external baselines.
PROVIDERS = ("cuda", "triton", "cpu", "reference", "reference-compile", "dsntnn", "kornia")

# torch.compile on CPU costs ~15 s per (shape, dtype, mode) and its compiled code on large maps
# runs for seconds: with `--compile auto` it is measured on CPU only up to this many logits.
CPU_COMPILE_MAX_NUMEL = 4 * 1024 * 1024

# Timing budgets.
CPU_MIN_RUN_TIME = {"quick": 0.05, "default": 1.0, "full": 2.0}  # s, blocked_autorange
GPU_WARMUP_REP_MS = {"quick": (5, 20), "default": (25, 100), "full": (25, 200)}  # do_bench


def parse_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """(name, sizes) from a shape name of SHAPES or a literal like 32x16x64x64."""
    if spec in SHAPES:
        return spec, SHAPES[spec]
    try:
        sizes = tuple(int(s) for s in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"unknown shape {spec!r}; use one of {', '.join(SHAPES)} or BxLxHxW") from None
    if not 3 <= len(sizes) <= 5 or min(sizes) < 1:
        raise ValueError(f"shape {spec!r} must be B x L x S_1[ x S_2[ x S_3]] with positive sizes")
    return "x".join(map(str, sizes)), sizes


def shape_str(sizes) -> str:
    return "x".join(map(str, sizes))
