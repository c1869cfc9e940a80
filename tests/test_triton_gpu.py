"""The Triton ops on a CUDA GPU: the float64 reference on benchmark-sized maps (every launch
plan), parity with the C++ ops, `opcheck`, torch.compile(fullgraph=True), NaN containment, a
second GPU. Skipped without a GPU (test_triton_interpreter.py covers the kernels' math on CPU).

Dry run: with TRITON_INTERPRET=1 and DSNT_GPU_TESTS_ON=cpu (`make test-triton` sets both) the
same tests run on CPU tensors in the interpreter, on small maps with the launch-plan thresholds
lowered to reach the same plans, "parity with the C++ ops" against the CPU kernels; what the
interpreter cannot do (torch.compile, opcheck's aot_dispatch on fake tensors) skips there.
"""

import os

import pytest
import torch

DEVICE = os.environ.get("DSNT_GPU_TESTS_ON", "cuda")
DRY_RUN = DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
needs_real_gpu = pytest.mark.skipif(DRY_RUN, reason="the interpreter cannot run kernels on fake tensors")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() or DRY_RUN), reason="needs a CUDA GPU"),
]

triton = pytest.importorskip("triton")

from dsnt_cuda import _extension, reference  # noqa: E402
from dsnt_cuda.triton import ops as tops  # noqa: E402

from support import assert_compiled_matches_eager, check_against_reference, make_case, run_ops  # noqa: E402

FWD = torch.ops.dsnt_cuda.dsnt_fwd_triton.default
BWD = torch.ops.dsnt_cuda.dsnt_bwd_triton.default
CXX_KEY = "CPU" if DEVICE == "cpu" else "CUDA"


@pytest.fixture(autouse=True)
def small_plans(monkeypatch):
    """Dry run: the thresholds scaled down with the maps, so each test takes the plan it would
    take on the GPU (single tile / looped / several backward programs per map)."""
    if DRY_RUN:
        for name, value in (("SINGLE_TILE_MAX", 64), ("SINGLE_TILE_MAX_FP64", 32), ("LOOP_TILE", 16),
                            ("COL_BLOCK_MAX", 8), ("CHUNK_TILES", 2), ("AXIS_BLOCK_MAX", 8)):
            monkeypatch.setattr(tops, name, value)


def sized(gpu, dry):
    return dry if DRY_RUN else gpu


SINGLE_2D = sized((4, 16, 64, 64), (2, 3, 6, 8))
LOOPED_2D = sized((2, 3, 130, 129), (1, 2, 10, 11))


def case_on_device(*args, **kwargs):
    return make_case(*args, **kwargs).to(DEVICE)


def check(case, what=""):
    return check_against_reference(tops.dsnt_fwd_triton, tops.dsnt_bwd_triton, case, what)


# The dry run takes each normalization and each regularizer once (its point is the test code).
MODES = [(n, r) for n in reference.NORMALIZATIONS for r in reference.REGULARIZERS] if not DRY_RUN else [
    (n, reference.REGULARIZERS[i % 4]) for i, n in enumerate(reference.NORMALIZATIONS)]


@pytest.mark.parametrize("normalization,reg", MODES)
@pytest.mark.parametrize("shape", [SINGLE_2D, LOOPED_2D], ids=["single", "looped"])
def test_reference_2d(shape, normalization, reg):
    loss = "euclidean" if reg != "var" else "none"
    check(case_on_device(shape, normalization, reg, seed=1, coord_loss=loss, mask=reg == "js",
                         beta_kind="map" if reg == "kl" else "float", normalized_coordinates=reg != "none"))


@pytest.mark.parametrize("shape", [sized((4, 5, 37), (2, 2, 7)), sized((2, 3, 20000), (1, 2, 40)),
                                   sized((2, 3, 8, 9, 10), (1, 2, 2, 3, 4)),
                                   sized((2, 2, 24, 24, 24), (1, 2, 3, 4, 5))],
                         ids=["1d", "1d-looped", "3d", "3d-looped"])
@pytest.mark.parametrize("reg", ["js", "var"])
def test_reference_1d_3d(shape, reg):
    check(case_on_device(shape, "softmax", reg, seed=2, coord_loss="mse", sigma_kind="keypoint"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [sized((4, 16, 64, 48), (2, 2, 5, 6)), LOOPED_2D], ids=["single", "looped"])
def test_dtypes(shape, dtype):
    check(case_on_device(shape, "softmax", "js", dtype=dtype, seed=3, coord_loss="euclidean", mask=True,
                         beta_kind="keypoint"))


def test_benchmark_batch_bf16():
    """pose2d in bfloat16, the training configuration."""
    check(case_on_device(sized((32, 16, 64, 64), (4, 4, 8, 8)), "softmax", "js", dtype=torch.bfloat16, seed=9,
                         coord_loss="euclidean", reg_weight=1.0))


@pytest.mark.skipif(not _extension.has_kernel("dsnt_fwd", CXX_KEY), reason="the C++ ops are not built")
@pytest.mark.parametrize("normalization,reg", [("softmax", "js"), ("relu", "kl"), ("none", "var"),
                                               ("sigmoid", "none")])
def test_parity_with_cpp_ops(normalization, reg):
    """The same outputs as the C++ kernels on the same device, to float32 rounding."""
    case = case_on_device(SINGLE_2D, normalization, reg, seed=5, coord_loss="euclidean", mask=True)
    ours_f, ours_b = run_ops(tops.dsnt_fwd_triton, tops.dsnt_bwd_triton, case)
    cpp_f, cpp_b = run_ops(torch.ops.dsnt_cuda.dsnt_fwd.default, torch.ops.dsnt_cuda.dsnt_bwd.default, case)
    for a, b in zip(ours_f + ours_b, cpp_f + cpp_b):
        scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)


@pytest.mark.parametrize("normalization,reg", [("softmax", "js"), ("relu", "var"), ("none", "kl")])
def test_opcheck(normalization, reg):
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        () if DRY_RUN else ("test_aot_dispatch_dynamic",))
    case = case_on_device((2, 3, 6, 7), normalization, reg, seed=6, coord_loss="l1", mask=True,
                          beta_kind="map")
    logits = case.logits.requires_grad_(True)
    torch.library.opcheck(FWD, (logits, case.target, case.mask, case.beta_map, None, *case.options()),
                          test_utils=utils)
    outs = tops.dsnt_fwd_triton(*case.fwd_args())
    up = case.upstream
    torch.library.opcheck(BWD, (up["grad_coords"], None, up["grad_reg_losses"], up["grad_coord_losses"],
                                up["grad_loss"], logits.detach(), case.target, case.mask, case.beta_map, None,
                                outs[0], outs[1], outs[5], *case.options(), True, True), test_utils=utils)


@needs_real_gpu
def test_torch_compile_fullgraph():
    """torch.compile traces through the triton_ops (their fakes, then the kernels): the same
    loss and gradients as eager."""
    case = case_on_device(SINGLE_2D, "softmax", "js", seed=7, coord_loss="euclidean", mask=True)

    def loss_fn(logits, target):
        return FWD(logits, target, case.mask, None, None, *case.options())[4]

    assert_compiled_matches_eager(loss_fn, case.logits, case.target)


def test_nan_map_contained_on_the_looped_path():
    case = case_on_device(LOOPED_2D, "softmax", "var", coord_loss="euclidean")
    case.logits[1 if case.logits.shape[0] > 1 else 0, 1, 5, 5] = float("nan")
    outs, grads = run_ops(tops.dsnt_fwd_triton, tops.dsnt_bwd_triton, case)
    bad = outs[0].isnan().any(-1)
    assert bad.sum() == 1 and outs[2].isnan().sum() == 1 and grads[0].isnan().any((-1, -2)).sum() == 1


@pytest.mark.skipif(DRY_RUN or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_second_gpu():
    """Kernels launch on the tensors' device, not the current one."""
    case = make_case((2, 3, 16, 16), "softmax", "js", seed=8, coord_loss="euclidean").to("cuda:1")
    with torch.cuda.device(0):
        check(case, "cuda:1")
