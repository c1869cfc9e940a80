"""The CUDA kernels (csrc/cuda/) run on the CPU under the host emulation of the CUDA thread model
(tests/cuda_emulation/), against the float64 reference (tests/support.py).

Every size class (warp, block, cluster, streamed forward; warp, block, split backward), forced
with DSNT_CUDA_FORCE_CLASS on maps small enough for the emulator, forward and backward, 1-3-D
maps, every logits dtype, both grids, each normalization and regularizer, every coordinate loss
with and without a mask, beta / sigma_t as floats and as per-map tensors (with the beta
gradient, and gradcheck in float64 w.r.t. logits, target and beta), None upstream gradients,
the uniform fallback, NaN and -inf maps, strided (channels-last, transposed) and misaligned
logits, empty batches; with NaN-filled outputs,
poisoned shared memory and several blocks (a cluster's together) at once. A subset also runs
under ThreadSanitizer and AddressSanitizer + UBSan (tests/test_cuda_emulated_sanitized.py). This
checks logic, indexing and synchronization; it cannot see what only a GPU shows (memory model,
timing, fast math): tests/test_ops_cuda.py does that on a GPU. Needs a C++ compiler and ninja;
skips otherwise.

The op contract (docs/ops.md) enters only through tests/support.py's run_ops / make_case.
"""

import math
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import support

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cuda_emulation"))
import emulate  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(emulate.CXX) is None or shutil.which(emulate.ninja()) is None,
                                reason="needs a C++ compiler and ninja")


@pytest.fixture(scope="module")
def emu():
    # A sanitized run (tests/test_cuda_emulated_sanitized.py) names its prebuilt library.
    library = os.environ.get("DSNT_EMU_LIBRARY") or emulate.build("ops-plain")[0]
    ops = emulate.load_ops(library)
    if not hasattr(emu, "autograd"):  # the package's one autograd registration, once a process
        from dsnt_cuda.ops import register_op_pair

        register_op_pair("dsnt_emu::dsnt_fwd", "dsnt_emu::dsnt_bwd")
        emu.autograd = True
    return ops


def check(emu, case, what=""):
    return support.check_against_reference(emu.dsnt_fwd, emu.dsnt_bwd, case, what)


CLASSES = support.CUDA_SIZE_CLASSES
CLASS_SHAPE = support.CUDA_CLASS_SHAPE
NORMALIZATIONS = ["softmax", "relu", "sigmoid", "abs", "none"]
REGULARIZERS = ["js", "kl", "var", "none"]


def classes():
    return [pytest.param(c, id=c) for c in CLASSES]


@pytest.mark.parametrize("reg", REGULARIZERS)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_every_normalization_and_regularizer(emu, normalization, reg):
    # sigma_t 4 px: a var regularizer on a 16-px map far from sigma_t is ill-conditioned in any
    # float32 code (nu (u - ubar)^2 and nu Var in the thousands, their difference in the tens).
    case = support.make_case((2, 3, 16, 16), normalization, reg, coord_loss="euclidean", mask=True,
                             sigma_t=4.0)
    check(emu, case, f"{normalization}-{reg}")


STANDARD = [("softmax", "js"), ("relu", "kl"), ("sigmoid", "var"), ("none", "kl"), ("abs", "none")]


@pytest.mark.parametrize("normalization, reg", STANDARD, ids=[f"{n}-{r}" for n, r in STANDARD])
@pytest.mark.parametrize("cls", classes())
def test_size_classes(emu, size_class, cls, normalization, reg):
    size_class(cls)
    case = support.make_case(CLASS_SHAPE[cls], normalization, reg, coord_loss="euclidean", mask=True,
                             sigma_t=4.0)
    check(emu, case, cls)


@pytest.mark.parametrize("shape",
                         [(2, 3, 37), (1, 1, 9001), (1, 2, 6, 7, 8), (1, 2, 16, 16, 16), (1, 1, 3, 300)],
                         ids=str)
@pytest.mark.parametrize("cls", [None, "cluster", "streamed"], ids=["auto", "cluster", "streamed"])
def test_1d_and_3d_maps(emu, size_class, shape, cls):
    if cls == "cluster" and math.prod(shape[2:]) > 4096:
        pytest.skip("too many threads for the emulator in the cluster class")
    size_class(cls)
    # sigma_t 6 px: the target-mean gradient of a 1-px target on a 9000-px axis carries a factor
    # S / (2 sigma_t^2) = 4500, which costs any float32 code (the plain reference too) ~1e-4.
    check(emu, support.make_case(shape, "softmax", "js", coord_loss="l1", sigma_t=6.0), str(shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalization, reg", [("softmax", "js"), ("sigmoid", "kl")],
                         ids=["softmax-js", "sigmoid-kl"])
@pytest.mark.parametrize("shape", [(1, 1, 2100, 4), (1, 2, 5, 300, 8)], ids=str)
def test_streamed_over_several_tiles(emu, size_class, shape, normalization, reg, dtype):
    """Maps of more rows than one tile of the streamed forward holds (512 threads of 16 elements:
    2048 rows of 4, 1024 of 8): the prefetch of the next tile, the running max rescaled between
    tiles, and each thread's walk over its rows from tile to tile, y wrapping into z at rows
    that no tile boundary meets (300 rows of 5 planes, 256 or 128 rows a tile), a last tile
    that only some threads reach. Softmax + JS runs the standard-loss kernel (float32,
    bfloat16). Also with rows padded in memory (each y plane 3 rows longer than the map): z then
    does not follow y in the layout, and a y that wraps must step the offset by the z stride."""
    size_class("streamed")
    case = support.make_case(shape, normalization, reg, dtype=dtype, coord_loss="euclidean", mask=True,
                             sigma_t=6.0)
    check(emu, case, f"{shape}-{normalization}-{reg}-{dtype}")
    padded = torch.full((*shape[:-2], shape[-2] + 3, shape[-1]), float("nan"), dtype=case.logits.dtype)
    padded[..., : shape[-2], :] = case.logits
    rows_apart = padded[..., : shape[-2], :]
    assert rows_apart.stride(-3) != shape[-2] * shape[-1]
    check(emu, replace(case, logits=rows_apart), f"{shape}-{normalization}-{reg}-{dtype} padded rows")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", classes())
def test_dtypes(emu, size_class, cls, dtype):
    size_class(cls)
    case = support.make_case(CLASS_SHAPE[cls], "softmax", "js", dtype=dtype, coord_loss="mse", mask=True)
    check(emu, case, str(dtype))


@pytest.mark.parametrize("cls", classes())
def test_pixel_grid(emu, size_class, cls):
    size_class(cls)
    for normalization, reg in (("softmax", "kl"), ("none", "js")):
        case = support.make_case(CLASS_SHAPE[cls], normalization, reg, normalized_coordinates=False)
        check(emu, case, "pixel")


@pytest.mark.parametrize("kind", ["scalar", "keypoint", "map"])
@pytest.mark.parametrize("cls", classes())
def test_per_map_beta_and_sigma(emu, size_class, cls, kind):
    size_class(cls)
    case = support.make_case(CLASS_SHAPE[cls], "softmax", "js", beta_kind=kind, sigma_kind=kind,
                             coord_loss="euclidean", mask=True)
    check(emu, case, kind)


@pytest.mark.parametrize("kind", ["scalar", "keypoint", "map"])
@pytest.mark.parametrize("cls", [pytest.param(c, id=c) for c in ("warp", "block")])
def test_gradcheck_logits_target_beta(emu, size_class, cls, kind):
    """Finite differences (float64) of the emulated kernels through the autograd of the op pair,
    w.r.t. the logits, the target and beta as one value, one per keypoint or one per map."""
    size_class(cls)
    case = support.make_case((2, 3, 5, 6), "softmax", "js", dtype=torch.float64, beta_kind=kind,
                             sigma_kind="keypoint", coord_loss="euclidean", mask=True, sigma_t=0.8, seed=5)
    leaves = [support.gradcheck_logits(case).clone().requires_grad_(True),
              case.target.clone().requires_grad_(True), case.beta_map.clone().requires_grad_(True)]

    def outputs(z, t, b):
        outs = emu.dsnt_fwd(z, t, case.mask, b, case.sigma_t_map, *case.options())[:5]
        return tuple(o for o in outs if o.numel() > 0)

    assert torch.autograd.gradcheck(outputs, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("coord_loss", ["euclidean", "l1", "mse"])
@pytest.mark.parametrize("mask", [False, True])
def test_loss_epilogue(emu, coord_loss, mask):
    # 18 maps over 3 CTAs of the warp class: the last CTA to finish reduces the loss
    case = support.make_case((2, 9, 16, 16), "softmax", "js", coord_loss=coord_loss, mask=mask,
                             reg_weight=0.3)
    outs, _ = check(emu, case, coord_loss)
    assert outs[4].shape == () and outs[3].shape == (2, 9)


def test_loss_is_deterministic(emu, size_class):
    size_class("block")
    case = support.make_case((3, 7, 20, 20), "softmax", "js", coord_loss="euclidean", mask=True)
    losses = {emu.dsnt_fwd(*case.fwd_args())[4].item() for _ in range(4)}
    assert len(losses) == 1, losses


UPSTREAM_SUBSETS = {"coords": ("grad_coords",), "variance": ("grad_variance",), "reg": ("grad_reg_losses",),
                    "loss": ("grad_loss",), "none": ()}


@pytest.mark.parametrize("subset", UPSTREAM_SUBSETS, ids=lambda k: f"only-{k}")
@pytest.mark.parametrize("cls", classes())
def test_none_upstream_gradients(emu, size_class, cls, subset):
    size_class(cls)
    case = support.make_case(CLASS_SHAPE[cls], "softmax", "js", coord_loss="euclidean", mask=True,
                             sigma_t=4.0, upstream=UPSTREAM_SUBSETS[subset])
    check(emu, case, subset)


@pytest.mark.parametrize("cls", classes())
def test_gradients_not_wanted(emu, size_class, cls):
    size_class(cls)
    case = support.make_case(CLASS_SHAPE[cls], "softmax", "kl", beta_kind="map", coord_loss="euclidean")
    _, grads = support.run_ops(emu.dsnt_fwd, emu.dsnt_bwd, case, needs_target_grad=False,
                               needs_beta_grad=False)
    assert (grads[1] == 0).all() and (grads[2] == 0).all()
    exact = support.reference_backward(case)
    support.assert_close(grads[0], exact[0], support.reference_backward(case, None)[0], "grad_logits")


@pytest.mark.parametrize("cls", classes())
@pytest.mark.parametrize("normalization", ["relu", "abs"])
def test_uniform_fallback_of_zero_sum_maps(emu, size_class, cls, normalization):
    size_class(cls)
    case = support.make_case(CLASS_SHAPE[cls], normalization, "js", coord_loss="euclidean")
    z = case.logits.clone()
    flat = z.view(z.shape[0] * z.shape[1], -1)
    flat[0] = -flat[0].abs() if normalization == "relu" else 0.0  # map 0 sums to 0 once rectified
    _, grads = check(emu, replace(case, logits=z), normalization)
    assert (grads[0].view(flat.shape)[0] == 0).all()


# A NaN anywhere makes its map NaN; an all -inf softmax map is 0 / 0 = NaN; a band of -inf is fine.
NON_FINITE = {"nan": (math.nan, slice(5, 6)), "all-minus-inf": (-math.inf, slice(None)),
              "minus-inf-band": (-math.inf, slice(0, 100))}


@pytest.mark.parametrize("kind", NON_FINITE)
@pytest.mark.parametrize("cls", classes())
def test_non_finite_maps(emu, size_class, cls, kind):
    size_class(cls)
    value, where = NON_FINITE[kind]
    case = support.make_case(CLASS_SHAPE[cls], "softmax", "kl", coord_loss="euclidean")
    z = case.logits.clone()
    z.view(z.shape[0] * z.shape[1], -1)[1, where] = value
    outs, grads = check(emu, replace(case, logits=z), kind)
    finite = [o.view(z.shape[0] * z.shape[1], -1) for o in (outs[0], outs[1], outs[2], grads[0])]
    for t in finite:  # only map 1 may be non-finite
        assert t[torch.arange(t.shape[0]) != 1].isfinite().all()


@pytest.mark.parametrize("cls", classes())
def test_strided_logits_without_a_copy(emu, size_class, cls):
    size_class(cls)
    case = support.make_case(CLASS_SHAPE[cls], "softmax", "js", coord_loss="euclidean")
    z = case.logits
    channels_last = z.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # L the fastest dim
    assert channels_last.stride(1) == 1
    check(emu, replace(case, logits=channels_last), "channels-last")
    transposed = z.transpose(-1, -2).contiguous().transpose(-1, -2)
    check(emu, replace(case, logits=transposed), "transposed")


def test_misaligned_base_takes_the_scalar_path(emu):
    case = support.make_case((1, 2, 64, 48), "softmax", "js", coord_loss="euclidean")
    buffer = torch.empty(case.logits.numel() + 1)
    buffer[1:] = case.logits.flatten()
    check(emu, replace(case, logits=buffer[1:].view(case.logits.shape)), "misaligned")


def test_channels_last_3d_and_maps_of_several_alignments(emu):
    case = support.make_case((2, 3, 6, 8, 12), "relu", "kl")
    vol = case.logits.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)
    check(emu, replace(case, logits=vol), "channels-last 3-D")
    # maps 1 element apart: every other map misaligned, each read its own way
    wide = torch.randn(2, 3, 16 * 16 + 1, dtype=torch.float64, generator=support.generator(5)).float()
    z = wide[..., :256].view(2, 3, 16, 16)
    check(emu, replace(support.make_case((2, 3, 16, 16), "softmax", "js"), logits=z), "strided maps")


@pytest.mark.parametrize("shape", [(0, 3, 16, 16), (2, 0, 8), (0, 2, 9000)], ids=str)
def test_empty_batch(emu, shape):
    case = support.make_case(shape, "softmax", "js", coord_loss="euclidean")
    outs, grads = support.run_ops(emu.dsnt_fwd, emu.dsnt_bwd, case)
    assert outs[0].shape == (*shape[:2], len(shape) - 2) and grads[0].shape == shape
    assert outs[4].item() == 0.0


def test_kl_with_the_target_outside_the_map(emu):
    case = support.make_case((2, 3, 64, 64), "softmax", "kl", coord_loss="euclidean")
    target = case.target.clone()
    target[..., 0] = 1.35
    check(emu, replace(case, target=target), "target outside")


@pytest.mark.parametrize("shape, peak", [((1, 1, 8192), (3,)), ((1, 1, 300, 400), (397, 2))], ids=str)
def test_variance_of_a_peak_at_the_edge_of_a_long_axis(emu, shape, peak):
    # Forward only: the backward rebuilds the mean from the saved float32 coordinate, one ulp of
    # which is 1.2e-4 px near the edge of an 8192-px axis (every backend alike).
    case = replace(support.make_case(shape, "softmax", "var"),
                   logits=support.peaked_logits(shape, peak, width=0.8))
    outs = emu.dsnt_fwd(*case.fwd_args())
    exact, base = support.reference_forward(case), support.reference_forward(case, None)
    for name, a, e, b in zip(support.FWD_OUTPUTS[:3], outs, exact, base):
        support.assert_close(a, e, b, name, torch.float32)
