"""A small, complete workout of the CUDA kernels for compute-sanitizer (memcheck, racecheck,
synccheck, initcheck).

Every size class (warp, block, cluster and streamed, the last two also forced), every dtype, every
normalization and regularizer (with the masked euclidean loss), vector and scalar (misaligned)
loads, forward and backward, on shapes small enough for the sanitizers' slowdown. Exits non-zero
if an op raises or a result is not finite where it must be.

    compute-sanitizer --tool memcheck python3 scripts/sanitizer_driver.py [--quick]

--quick (scripts/gpu_check.sh, four tools in about a minute and a half) keeps every shape, dtype,
mode and the misaligned loads, each at least once, rather than every combination on float32.

DSNT_GPU_TESTS_ON=cpu runs the same cases on the CPU kernels (tests/test_gpu_scripts_dry_run.py
does, so this script's own code runs without a GPU).
"""

import os
import sys

import torch

from dsnt_cuda.backends import dsnt_forward

DEV = os.environ.get("DSNT_GPU_TESTS_ON", "cuda")
BACKEND = "cuda" if DEV == "cuda" else "cpu"  # the C++ kernels of that device, never a fallback
# name: (shape, size class forced through DSNT_CUDA_FORCE_CLASS or None for the automatic one)
SHAPES = {
    "warp": ((2, 9, 16, 16), None),  # 18 maps: more than one 8-map block, a partial last block
    "warp-odd": ((2, 3, 7, 5), None),
    "block": ((2, 2, 40, 41), None),
    "block-3d": ((1, 2, 16, 16, 16), None),
    "stream": ((1, 2, 70, 70), None),
    "cluster": ((1, 2, 70, 70), "cluster"),
    "streamed": ((1, 2, 70, 70), "streamed"),
    "stream-1d": ((1, 1, 9001), None),  # odd length; axis above the table cap: target on the fly
    "stream-3d": ((1, 1, 20, 20, 21), None),  # 3-D streamed, target tabulated
}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MODES = (("softmax", "js"), ("abs", "kl"), ("relu", "var"), ("sigmoid", "none"), ("none", "js"))


def transform(z, target, normalization, reg, mask=None, reg_weight=1.0):
    """coords, variance, reg_losses and the masked euclidean loss, forward, from the fused op."""
    coords, var, reg_losses, _, loss = dsnt_forward(
        z, target, mask, None, None, normalization, 1.0, True, reg, 1.0,
        "none" if target is None else "euclidean", reg_weight, BACKEND)
    return coords, var, reg_losses, loss


def run(shape, dtype, normalization, reg, misaligned=False):
    g = torch.Generator().manual_seed(0)
    n = len(shape) - 2
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    if normalization == "none":
        z = torch.softmax(z.flatten(2), -1).view(shape)
    if misaligned:
        buf = torch.empty(z.numel() + 1, dtype=dtype, device=DEV)
        buf[1:].copy_(z.flatten())
        z = buf[1:].view(shape)
    else:
        z = z.to(DEV, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    target = (torch.rand(shape[0], shape[1], n, generator=g, dtype=torch.float64) * 1.6 - 0.8).to(DEV, acc)
    z.requires_grad_(True)
    target.requires_grad_(True)
    mask = (torch.rand(shape[:2], generator=g) > 0.3).to(DEV)
    # small weights on the variance paths: their gradients grow like S^4 and must fit float16
    reg_weight = 1e-9 if reg == "var" else 1.0
    coords, var, reg_losses, mean_loss = transform(z, target, normalization, reg, mask, reg_weight)
    loss = coords.sum() + 1e-6 * var.sum() + reg_weight * reg_losses.sum() + mean_loss
    gz, gt = torch.autograd.grad(loss, [z, target], allow_unused=True)
    if DEV == "cuda":
        torch.cuda.synchronize()
    ok = all(torch.isfinite(t).all().item() for t in (coords, var, reg_losses, mean_loss, gz))
    if gt is not None:
        ok = ok and torch.isfinite(gt).all().item()
    return ok


def full_cases():
    """All modes on float32 (softmax/js also misaligned), one mode per other dtype, every shape."""
    for name in SHAPES:
        for d, dtype in enumerate(DTYPES):
            for i, mode in enumerate(MODES):
                if dtype != torch.float32 and i != d % len(MODES):
                    continue
                for misaligned in (False, True) if dtype == torch.float32 and i == 0 else (False,):
                    yield name, dtype, mode, misaligned


def quick_cases():
    """Each shape once on float32 (the modes in turn), misaligned loads on the first shape, each
    other dtype on a different shape: every shape, dtype and mode at least once."""
    for k, name in enumerate(SHAPES):
        yield name, torch.float32, MODES[k % len(MODES)], k == 0
    for d, dtype in enumerate(DTYPES[1:], start=1):
        yield list(SHAPES)[2 * d], dtype, MODES[d], False


def main():
    failures = 0
    count = 0
    cases = quick_cases() if "--quick" in sys.argv else full_cases()
    for name, dtype, (normalization, reg), misaligned in cases:
        shape, size_class = SHAPES[name]
        os.environ.pop("DSNT_CUDA_FORCE_CLASS", None)
        if size_class is not None:
            os.environ["DSNT_CUDA_FORCE_CLASS"] = size_class  # read by the CUDA host at each launch
        count += 1
        try:
            ok = run(shape, dtype, normalization, reg, misaligned)
        except Exception as error:  # noqa: BLE001  (report and go on)
            ok = False
            print(f"ERROR {name} {dtype} {normalization}/{reg} misaligned={misaligned}: {error}")
        if not ok:
            failures += 1
            print(f"FAIL {name} {shape} {dtype} {normalization}/{reg} misaligned={misaligned}")
    os.environ.pop("DSNT_CUDA_FORCE_CLASS", None)
    # empty inputs launch nothing
    for shape in ((0, 3, 16, 16), (2, 0, 100)):
        count += 1
        z = torch.randn(shape, device=DEV, requires_grad=True)
        out = transform(z, None, "softmax", "var")
        (out[0].sum() + out[1].sum()).backward()
    if DEV == "cuda":
        torch.cuda.synchronize()
    print(f"sanitizer driver: {count} cases, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
