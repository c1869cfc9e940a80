"""The CUDA C++ kernels of torch.ops.dsnt_cuda.dsnt_fwd / dsnt_bwd (csrc/cuda/: host*.cu and
launch_plan.cu plan the launches, the *_kernel.cuh / forward_*.cuh / backward*.cuh kernels run
them) on a GPU, against the contract of docs/ops.md.

Every comparison goes through tests/support.py (make_case, the float64 reference, one tolerance
rule). Layers: parity over dtypes, 1-3-D and odd maps, every size class (warp / block / cluster /
streamed, forced with DSNT_CUDA_FORCE_CLASS) and maps on both sides of each class boundary, every
normalization x regularizer, per-map beta / sigma_t tensors (the beta gradient), the loss
epilogue (mask, coordinate loss, reg_weight), the standard-loss kernels (softmax + JS, no target
or beta gradient), strided / channels-last / misaligned logits, empty batches, > 65535 maps,
non-finite maps; then gradcheck (float64: logits, target, beta_map), opcheck of both ops,
outputs that must not depend on garbage, CUDA / CPU kernel agreement, tensors on two devices.
All marked `cuda` and skipped without a GPU, except the checks of a CUDA build, which run
wherever it is built.

Dry run: DSNT_GPU_TESTS_ON=cpu (make test-python) runs the same tests on CPU tensors against the
CPU kernels (same contract), on fewer parameters, so a GPU machine never runs this code first;
the forced size class is then a no-op, and what needs two devices or the CUDA allocator skips.
"""

import ctypes
import json
import os
from dataclasses import replace

import pytest
import torch

from dsnt_cuda import _extension, reference

from support import (
    CUDA_CLASS_SHAPE,
    CUDA_SIZE_CLASSES,
    UPSTREAM,
    assert_close,
    check_against_reference,
    gradcheck_logits,
    make_case,
    run_ops,
)

BUILD = _extension.build_info()
DEVICE = os.environ.get("DSNT_GPU_TESTS_ON", "cuda")
DRY_RUN = DEVICE == "cpu"
KERNELS = _extension.has_kernel("dsnt_fwd", "CPU" if DRY_RUN else "CUDA")
RUNS = KERNELS and (DRY_RUN or torch.cuda.is_available())
ON_GPU = RUNS and not DRY_RUN
needs_real_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (not the dry run)")

if _extension.extension_loaded():
    from dsnt_cuda import ops  # noqa: F401  (fake kernels and autograd of the ops)

    FWD, BWD = torch.ops.dsnt_cuda.dsnt_fwd, torch.ops.dsnt_cuda.dsnt_bwd

NORMS = reference.NORMALIZATIONS
REGS = reference.REGULARIZERS
# Each size class's shapes run on the dry run too (forcing a class is a no-op for the CPU
# kernels); other parameter lists are thinned there, whose point is the test code.
CLASSES = CUDA_SIZE_CLASSES
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def needs_gpu(test):
    """Marked `cuda`; skipped without a GPU and the CUDA kernels (or, dry run, the CPU kernels)."""
    return pytest.mark.cuda(pytest.mark.skipif(not RUNS, reason="needs a CUDA GPU and the CUDA build")(test))


def case_on_device(*args, **kwargs):
    return make_case(*args, **kwargs).to(DEVICE)


def check(case, what="", **needs):
    return check_against_reference(FWD, BWD, case.to(DEVICE), what, **needs)


# ----------------------------------------------------------------------------------------------
# A CUDA build, GPU or not


def test_cuda_kernels_registered_in_cuda_build():
    if not BUILD.get("extension"):
        pytest.skip(f"extension not built: {BUILD.get('error')}")
    if not BUILD.get("with_cuda"):
        pytest.skip("CPU-only build of dsnt_cuda._C")
    for op in ("dsnt_fwd", "dsnt_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dsnt_cuda::{op}", "CUDA"), op
    assert "90" in str(BUILD.get("cuda_architectures", "")), BUILD


# Maps on both sides of each class boundary of float32 logits (the planner's model of an H200:
# 132 SMs, 16-CTA clusters); each pair is (spatial shape, class below, class above).
BOUNDARIES = [
    (((1024,), (1025,)), "warp", "block"),
    (((32, 32), (33, 32)), "warp", "block"),
    (((8, 8, 16), (9, 8, 16)), "warp", "block"),
    (((8192,), (8193,)), "block", "cluster"),
    (((64, 128), (65, 128)), "block", "cluster"),
    (((512, 512), (513, 512)), "cluster", "streamed"),
]


def test_boundary_maps_straddle_the_class_boundaries():
    """The launch planner puts the maps of BOUNDARIES where this file assumes (its C entry in the
    built library, dsnt_cuda_launch_plan_json, as make cuda-report asks it)."""
    if not BUILD.get("with_cuda"):
        pytest.skip("CPU-only build of dsnt_cuda._C")
    planner = ctypes.CDLL(_extension._C.__file__).dsnt_cuda_launch_plan_json
    planner.restype = ctypes.c_char_p
    no_registers = (ctypes.c_int * 6)()  # the planner's model assumes 64 a kernel
    for (below, above), cls_below, cls_above in BOUNDARIES:
        for spatial, cls in ((below, cls_below), (above, cls_above)):
            sizes = (ctypes.c_int64 * 3)(*spatial)
            text = planner(ctypes.c_int64(2), ctypes.c_int64(3), len(spatial), sizes, 4, 0, no_registers,
                           132, 16)
            plan = json.loads(text.decode())
            assert plan["class"] == cls, (spatial, plan)


# ----------------------------------------------------------------------------------------------
# Parity with the float64 reference


@needs_gpu
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("cls", CLASSES)
def test_every_normalization_and_regularizer(size_class, cls, norm, reg):
    size_class(cls)
    # sigma_t 4 px: the var regularizer of a small map far from sigma_t is ill-conditioned in any
    # float32 code (tests/test_cuda_emulated.py).
    case = make_case(CUDA_CLASS_SHAPE[cls], norm, reg, coord_loss="euclidean", mask=True, sigma_t=4.0,
                     seed=NORMS.index(norm) + 7 * REGS.index(reg))
    check(case, f"{cls} {norm} {reg}")
    pixels = make_case(CUDA_CLASS_SHAPE[cls], norm, reg, normalized_coordinates=False, sigma_t=4.0, seed=1)
    check(pixels, f"{cls} {norm} {reg} pixel grid")


# odd sizes, one-pixel axes, 1-3-D; every dtype (auto class)
SHAPES = [(2, 3, 1), (2, 3, 37), (3, 2, 7, 13), (2, 2, 5, 1), (1, 2, 5, 6, 7), (2, 3, 16, 16)]
SHAPES_LARGE = [(1, 2, 16, 16, 16), (1, 2, 70, 70), (1, 1, 300, 301)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES if not DRY_RUN else (torch.float16,), ids=str)
@pytest.mark.parametrize("shape", SHAPES + (SHAPES_LARGE if not DRY_RUN else []), ids=str)
def test_dtypes_and_shapes(shape, dtype):
    for k, (norm, reg, loss) in enumerate((("softmax", "js", "euclidean"), ("relu", "kl", "l1"),
                                           ("none", "kl", "none"), ("sigmoid", "var", "mse"))):
        check(make_case(shape, norm, reg, dtype=dtype, coord_loss=loss, mask=k % 2 == 1, sigma_t=3.0, seed=k),
              f"{norm} {reg}")


def boundary_params():
    """Each map of BOUNDARIES with the batch sized so the case stays cheap; the cluster / streamed
    boundary only on a GPU (with the portable 8-CTA clusters' boundary, 256 x 512, too)."""
    maps = [m for pair, _, cls in BOUNDARIES if not (DRY_RUN and cls == "streamed") for m in pair]
    return maps + ([(256, 512), (257, 512)] if not DRY_RUN else [])


@needs_gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16) if not DRY_RUN else (torch.float32,),
                         ids=str)
@pytest.mark.parametrize("spatial", boundary_params(), ids=str)
def test_maps_on_both_sides_of_class_boundaries(spatial, dtype):
    # The target-mean gradient of JS / KL carries a factor S / (2 sigma_t^2), which costs any
    # float32 code ~S / sigma_t^2 ulps: sigma_t grows with the longest axis (6 px at least).
    shape = (2, 3, *spatial)
    sigma_t = max(6.0, max(spatial) / 128)
    for k, (norm, reg) in enumerate((("softmax", "js"), ("abs", "var"), ("sigmoid", "kl"))):
        check(make_case(shape, norm, reg, dtype=dtype, coord_loss="l1", mask=True, sigma_t=sigma_t, seed=k),
              f"{norm} {reg}")


@needs_gpu
@needs_real_gpu
@pytest.mark.parametrize("norm, reg",
                         [("softmax", "js"), ("relu", "kl"), ("none", "none"), ("sigmoid", "var")])
@pytest.mark.parametrize("shape", [(1, 2, 64, 64, 64), (1, 1, 300000), (1, 1, 2, 200000)], ids=str)
def test_large_streamed_maps(shape, norm, reg):
    # 262144-300000 elements per map: every on-chip threshold and the target tables exceeded.
    check(make_case(shape, norm, reg, coord_loss="euclidean", sigma_t=8.0, seed=3), f"{norm} {reg}")


@needs_gpu
@pytest.mark.parametrize("kind", ["scalar", "keypoint", "map"])
@pytest.mark.parametrize("cls", CLASSES)
def test_per_map_beta_and_sigma_t(size_class, cls, kind):
    size_class(cls)
    for dtype in (torch.float32, torch.float64):
        case = make_case(CUDA_CLASS_SHAPE[cls], "softmax", "js", dtype=dtype, beta_kind=kind, sigma_kind=kind,
                         coord_loss="euclidean", mask=True, seed=5)
        _, grads = check(case, f"{kind} {dtype}")
        assert grads[2].shape == case.beta_map.shape and grads[2].abs().max() > 0


@needs_gpu
@pytest.mark.parametrize("coord_loss", ["euclidean", "l1", "mse"])
@pytest.mark.parametrize("cls", CLASSES)
def test_loss_epilogue(size_class, cls, coord_loss):
    size_class(cls)
    # many maps over many CTAs: the last CTA to finish reduces the loss
    batch = (4, 17) if cls == "warp" else CUDA_CLASS_SHAPE[cls][:2]
    for mask, reg_weight in ((False, 0.7), (True, 0.3), (True, 0.0)):
        case = make_case((*batch, *CUDA_CLASS_SHAPE[cls][2:]), "softmax", "kl", coord_loss=coord_loss,
                         mask=mask, reg_weight=reg_weight, beta_kind="keypoint", seed=6)
        outs, _ = check(case, f"{coord_loss} mask={mask} reg_weight={reg_weight}")
        assert outs[4].shape == () and outs[3].shape == batch


@needs_gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16) if not DRY_RUN
                         else (torch.bfloat16,), ids=str)
@pytest.mark.parametrize("cls", CLASSES)
def test_standard_loss_kernels(size_class, cls, dtype):
    """softmax + JS with no target / beta / variance gradient: the standard-loss kernels (2-D maps
    whose rows fit a tile, or the streamed class)."""
    size_class(cls)
    upstream = [u for u in UPSTREAM if u != "grad_variance"]
    for k, loss in enumerate(("euclidean", "none")):
        case = make_case(CUDA_CLASS_SHAPE[cls], "softmax", "js", dtype=dtype, coord_loss=loss, mask=k == 0,
                         beta=1.7, upstream=upstream, seed=7 + k)
        check(case, loss, needs_target_grad=False, needs_beta_grad=False)


# ----------------------------------------------------------------------------------------------
# Layouts, empty and large batches, non-finite maps


def channels_last(z):
    return z.contiguous(memory_format=torch.channels_last if z.dim() == 4 else torch.channels_last_3d)


def misaligned(z):
    """The same values from a base one element past a 16-byte boundary (the scalar-load path)."""
    buffer = torch.empty(z.numel() + 1, dtype=z.dtype, device=z.device)
    buffer[1:] = z.flatten()
    return buffer[1:].view(z.shape)


LAYOUTS = {
    "channels-last": channels_last,
    "transposed": lambda z: z.transpose(-1, -2).contiguous().transpose(-1, -2),
    "sliced": lambda z: torch.stack([z, torch.zeros_like(z)], dim=-1)[..., 0],
    "maps-one-apart": lambda z: torch.cat([z.flatten(2), z.flatten(2)[..., :1]], -1)[..., :-1].view(z.shape),
    "misaligned": misaligned,
}


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cls", CLASSES)
def test_strided_and_misaligned_logits(size_class, cls, layout):
    size_class(cls)
    for shape in (CUDA_CLASS_SHAPE[cls], (2, 3, 6, 8, 12)):
        for dtype in (torch.float32, torch.float16):
            case = case_on_device(shape, "softmax", "js", dtype=dtype, coord_loss="euclidean", seed=8)
            z = LAYOUTS[layout](case.logits)
            assert torch.equal(z, case.logits) and z.is_contiguous() == (layout == "misaligned")
            assert layout != "misaligned" or z.data_ptr() % 16 != 0
            check(replace(case, logits=z), layout)


@needs_gpu
@pytest.mark.parametrize("shape", [(0, 3, 16, 16), (2, 0, 8), (0, 0, 4, 4, 4), (0, 2, 9000)], ids=str)
def test_empty_batch(shape):
    case = case_on_device(shape, "softmax", "js", coord_loss="euclidean", mask=True, beta_kind="keypoint",
                          seed=2)
    outs, grads = run_ops(FWD, BWD, case)
    n = len(shape) - 2
    assert outs[0].shape == (*shape[:2], n) and outs[5].shape == (*shape[:2], 4 + n)
    assert outs[4].shape == () and outs[4].item() == 0  # average_loss of nothing
    assert grads[0].shape == shape and grads[1].shape == (*shape[:2], n) and grads[2].shape == (shape[1],)
    assert (grads[2] == 0).all()


@needs_gpu
@pytest.mark.parametrize("shape", [(70000, 1, 4, 4)] + ([(1, 70001, 16, 16), (66000, 1, 24, 24)]
                                                          if not DRY_RUN else []), ids=str)
def test_more_maps_than_a_grid_dimension(shape):
    # > 65535 maps (a grid y / z limit) and more than one pass of a persistent grid
    check(make_case(shape, "softmax", "js", coord_loss="mse", beta_kind="map", seed=9))


NON_FINITE = {"nan": (float("nan"), slice(5, 6)), "all-minus-inf": (float("-inf"), slice(None)),
              "minus-inf-band": (float("-inf"), slice(0, 100)), "zero-sum-relu": (-1.0, slice(None))}


@needs_gpu
@pytest.mark.parametrize("kind", NON_FINITE)
@pytest.mark.parametrize("cls", CLASSES)
def test_non_finite_and_zero_sum_maps_stay_in_their_map(size_class, cls, kind):
    size_class(cls)
    value, where = NON_FINITE[kind]
    norm = "relu" if kind == "zero-sum-relu" else "softmax"
    case = case_on_device(CUDA_CLASS_SHAPE[cls], norm, "kl", coord_loss="euclidean", seed=10)
    z = case.logits.clone()
    z.view(z.shape[0] * z.shape[1], -1)[1, where] = value
    outs, grads = check(replace(case, logits=z), kind)
    for t in (outs[0], outs[1], outs[2], grads[0]):  # only map 1 may be non-finite
        per_map = t.reshape(z.shape[0] * z.shape[1], -1)
        assert per_map[torch.arange(per_map.shape[0], device=t.device) != 1].isfinite().all()


# ----------------------------------------------------------------------------------------------
# gradcheck, opcheck


@needs_gpu
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("cls", CLASSES)
def test_gradcheck_logits_target_beta(size_class, cls, norm):
    size_class(cls)
    shapes = {"warp": [(1, 2, 4, 5), (2, 1, 3, 2, 2), (1, 2, 6)], "block": [(1, 2, 9, 40)],
              "cluster": [(1, 1, 7, 70)], "streamed": [(1, 1, 5, 70)]}[cls]
    for k, shape in enumerate(shapes):
        reg, loss = (("js", "euclidean"), ("kl", "l1"), ("var", "mse"))[k % 3]
        case = case_on_device(shape, norm, reg, dtype=torch.float64, coord_loss=loss, beta_kind="map",
                              sigma_kind="keypoint", mask=True, sigma_t=0.8, seed=21)
        leaves = [gradcheck_logits(case).clone().requires_grad_(True),
                  case.target.clone().requires_grad_(True), case.beta_map.clone().requires_grad_(True)]

        def f(x, t, b, case=case):
            outs = FWD(x, t, case.mask, b, case.sigma_t_map, *case.options())[:5]
            return tuple(o for o in outs if o.numel())

        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=shape[-1] > 8), (
            shape)


def opcheck_cases():
    """A case of each class (auto), both accumulation dtypes, per-map and float beta / sigma_t."""
    for k, (norm, reg, shape, loss, kind) in enumerate([
        ("softmax", "js", (2, 3, 5, 4), "euclidean", "map"),
        ("relu", "kl", (1, 2, 40, 41), "none", "keypoint"),
        ("none", "var", (1, 2, 70, 130), "mse", "scalar"),
        ("sigmoid", "none", (2, 2, 7), "l1", "float"),
    ]):
        for dtype in (torch.float32, torch.float64):
            yield case_on_device(shape, norm, reg, dtype=dtype, coord_loss=loss, beta_kind=kind,
                                 sigma_kind=kind, mask=k % 2 == 0, seed=30 + k)


@needs_gpu
@pytest.mark.parametrize("op", ["dsnt_fwd", "dsnt_bwd"])
def test_opcheck(op):
    for i, case in enumerate(opcheck_cases()):
        if op == "dsnt_fwd":
            b = case.beta_map.clone().requires_grad_(True) if case.beta_map is not None else None
            torch.library.opcheck(FWD.default, (case.logits.clone().requires_grad_(True),
                                                case.target.clone().requires_grad_(True), case.mask, b,
                                                case.sigma_t_map, *case.options()))
            torch.library.opcheck(FWD.default, case.fwd_args())
            continue
        coords, variance, _, _, _, stats = FWD(*case.fwd_args())
        grads = [None if (i % 3 == 1 and name == "grad_coords") else case.upstream[name] for name in UPSTREAM]
        torch.library.opcheck(BWD.default, (*grads, case.logits, case.target, case.mask, case.beta_map,
                                            case.sigma_t_map, coords, variance, stats, *case.options(),
                                            i % 2 == 0, case.beta_map is not None))


# ----------------------------------------------------------------------------------------------
# Garbage, the CPU kernels, two devices


def poison_allocator():
    """Fill the CUDA caching allocator's free blocks with NaN: an output element a kernel fails
    to write, or scratch it reads before writing, comes back as garbage (no-op on the dry run)."""
    if DEVICE != "cuda":
        return
    torch.cuda.synchronize()
    sizes = (1 << 22, 1 << 16, 4096, 512, 64, 16) * 4
    blocks = [torch.full((n,), float("nan"), device=DEVICE) for n in sizes]
    del blocks


@needs_gpu
@pytest.mark.parametrize("cls", CLASSES)
def test_results_do_not_depend_on_garbage(size_class, cls):
    """Run 1: every torch.empty NaN-filled (deterministic mode's fill_uninitialized_memory); run 2:
    after NaN blocks were freed into the allocator. Both match the reference and each other."""
    import torch.utils.deterministic as det

    size_class(cls)
    for norm, reg in (("softmax", "js"), ("relu", "var"), ("none", "kl")):
        case = case_on_device(CUDA_CLASS_SHAPE[cls], norm, reg, coord_loss="euclidean", mask=True,
                              beta_kind="map", seed=11)
        old_mode, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = True
        try:
            first = check(case, f"{norm} {reg} NaN-filled empty")
        finally:
            torch.use_deterministic_algorithms(old_mode)
            det.fill_uninitialized_memory = old_fill
        poison_allocator()
        second = check(case, f"{norm} {reg} NaN blocks in the allocator")
        for a, b in zip((*first[0], *first[1]), (*second[0], *second[1])):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@needs_gpu
@needs_real_gpu
@pytest.mark.skipif(not _extension.has_kernel("dsnt_fwd", "CPU"), reason="CPU kernels not built")
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("cls", CLASSES)
def test_cuda_matches_cpu_kernels(size_class, cls, dtype):
    size_class(cls)
    acc = reference.accumulation_dtype(dtype)
    for norm in NORMS:
        for reg in REGS:
            case = make_case(CUDA_CLASS_SHAPE[cls], norm, reg, dtype=dtype, coord_loss="l1",
                             beta_kind="keypoint", sigma_kind="map", mask=True, sigma_t=4.0, seed=12)
            on_gpu, on_cpu = run_ops(FWD, BWD, case.to("cuda")), run_ops(FWD, BWD, case)
            names = ("coords", "variance", "reg_losses", "coord_losses", "loss", "stats",
                     "grad_logits", "grad_target", "grad_beta_map")
            for name, a, b in zip(names, (*on_gpu[0], *on_gpu[1]), (*on_cpu[0], *on_cpu[1])):
                assert_close(a, b, None, f"{norm} {reg} {name}", floor_dtype=acc,
                             map_dims=case.logits.dim() - 2 if name == "grad_logits" else 0)


def elsewhere(t):
    return t.to("cpu" if t.is_cuda else "cuda")


@needs_gpu
@needs_real_gpu
@pytest.mark.parametrize("what",
                         ["logits", "target", "mask", "beta_map", "sigma_t_map", "grad_coords", "stats"])
def test_tensors_on_two_devices_raise(what):
    case = case_on_device((2, 3, 8, 8), "softmax", "js", coord_loss="euclidean", mask=True, beta_kind="map",
                          sigma_kind="map", seed=13)
    outs = FWD(*case.fwd_args())
    args = {"grad_coords": case.upstream["grad_coords"], "stats": outs[5]}
    if what in ("grad_coords", "stats"):
        args[what] = elsewhere(args[what])
    else:
        case = replace(case, **{what: elsewhere(getattr(case, what))})
    named = "target" if what == "logits" else what  # the first argument checked against the logits
    with pytest.raises((ValueError, RuntimeError), match=rf"{named} is on|same device"):
        if what in ("grad_coords", "stats"):
            BWD(args["grad_coords"], None, None, None, None, case.logits, case.target, case.mask,
                case.beta_map, case.sigma_t_map, outs[0], outs[1], args["stats"], *case.options(), True, True)
        else:
            FWD(*case.fwd_args())
        torch.cuda.synchronize()

