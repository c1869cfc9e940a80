"""The Triton kernels on CPU tensors in Triton's interpreter, against the float64 reference.

Runs only in a process started with TRITON_INTERPRET=1 (`make test-triton` runs this file on its
own): the variable must be set before triton is first imported. The interpreter runs programs one
after another, ~1000x slower than a GPU, so shapes are few and small; the launch-plan thresholds
are lowered (fixture `looped`) to reach the looped forward, several programs per map in the
backward, column chunks and per-axis loops with small maps. Every output buffer is poisoned
with NaN, so an element a kernel forgets to write fails the comparison.
"""

import itertools
import os
import zlib

import pytest
import torch

pytestmark = [
    pytest.mark.triton_interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs TRITON_INTERPRET=1 set before triton is imported (its own process: "
                       "TRITON_INTERPRET=1 pytest tests/test_triton_interpreter.py)"),
]

triton = pytest.importorskip("triton")

from dsnt_cuda import ops as op_glue  # noqa: E402
from dsnt_cuda import reference  # noqa: E402
from dsnt_cuda.triton import ops as tops  # noqa: E402

from support import UPSTREAM, check_against_reference, make_case, run_ops  # noqa: E402

NORMS = reference.NORMALIZATIONS
REGS = reference.REGULARIZERS
FWD = torch.ops.dsnt_cuda.dsnt_fwd_triton.default
BWD = torch.ops.dsnt_cuda.dsnt_bwd_triton.default


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(tops, "_new_output", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))


@pytest.fixture
def looped(monkeypatch):
    """Small maps on the large-map paths: tiles of 16 elements, at most 8 columns wide, two tiles
    per backward program, per-axis loops of 4."""
    for name, value in (("SINGLE_TILE_MAX", 16), ("SINGLE_TILE_MAX_FP64", 16), ("LOOP_TILE", 16),
                        ("COL_BLOCK_MAX", 8), ("CHUNK_TILES", 2), ("AXIS_BLOCK_MAX", 4)):
        monkeypatch.setattr(tops, name, value)


def check(case, what=""):
    check_against_reference(tops.dsnt_fwd_triton, tops.dsnt_bwd_triton, case, what)


# Options rotated over the mode matrix, so that every one meets several modes.
KINDS = ("float", "scalar", "keypoint", "map")
LOSSES = ("euclidean", "l1", "mse", "none")


def rotated_case(shape, normalization, reg, index, dtype=torch.float64):
    # (beta 1.3 and sigma_t 1.1 are no float32 numbers: float64 kernels must see them exactly)
    seed = zlib.crc32(f"{normalization}{reg}".encode())
    return make_case(shape, normalization, reg, dtype=dtype, seed=seed, sigma_t=1.1,
                     coord_loss=LOSSES[index % 4], normalized_coordinates=index % 4 != 3 or reg == "var",
                     beta_kind=KINDS[index % 4], sigma_kind=KINDS[(index + 1) % 4], mask=index % 2 == 0)


# ---- every normalization x regularizer ---------------------------------------------------------


@pytest.mark.parametrize("normalization,reg", list(itertools.product(NORMS, REGS)))
def test_modes_single_tile(normalization, reg):
    index = NORMS.index(normalization) + REGS.index(reg)
    check(rotated_case((2, 2, 5, 7), normalization, reg, index), f"{normalization}/{reg}")


@pytest.mark.parametrize("normalization,reg", [("softmax", "js"), ("abs", "kl"), ("relu", "var"),
                                               ("sigmoid", "none"), ("none", "js"), ("softmax", "kl")])
def test_modes_looped(looped, normalization, reg):
    """Two passes over 6 tiles (10 columns: 2 column chunks), three backward programs per map."""
    index = NORMS.index(normalization) + 2 * REGS.index(reg)
    check(rotated_case((1, 2, 6, 10), normalization, reg, index), f"{normalization}/{reg}")


@pytest.mark.parametrize("path", ["single", "looped"])
@pytest.mark.parametrize("shape,normalization,reg", [
    ((2, 2, 11), "softmax", "js"), ((1, 3, 13), "sigmoid", "var"),
    ((1, 2, 3, 4, 5), "softmax", "kl"), ((2, 1, 4, 3, 5), "relu", "js"),
])
def test_1d_3d(request, path, shape, normalization, reg):
    if path == "looped":
        request.getfixturevalue("looped")
    check(rotated_case(shape, normalization, reg, len(shape)), f"{shape} {path}")


@pytest.mark.parametrize("path", ["single", "looped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision(request, path, dtype):
    """float32 accumulation; the tolerance is the reference's own error in that dtype."""
    if path == "looped":
        request.getfixturevalue("looped")
    case = make_case((2, 2, 6, 7), "softmax", "js", dtype=dtype, seed=11, coord_loss="euclidean", mask=True,
                     beta_kind="map")
    check(case, f"{dtype} {path}")


def test_missing_upstream_gradients():
    """None upstream gradients are zeros; each alone reaches the kernels."""
    for i, name in enumerate(UPSTREAM):
        case = make_case((1, 2, 4, 5), "softmax", "js", seed=i, coord_loss="mse", upstream=[name],
                         beta_kind="keypoint")
        check(case, f"only {name}")
    check(make_case((1, 2, 4, 5), "relu", "kl", upstream=[]), "no upstream")


# ---- maps that break careless kernels ----------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on the NaN maps, by design
@pytest.mark.parametrize("path", ["single", "looped"])
def test_special_maps(request, path):
    """A relu map that sums to 0 (uniform, zero gradient), a NaN map (NaN, and no other map),
    softmax maps with -inf logits (p = 0 there) or all -inf (NaN)."""
    if path == "looped":
        request.getfixturevalue("looped")
    case = make_case((1, 4, 5, 6), "relu", "js", coord_loss="euclidean", mask=True)
    z = case.logits.clone()
    z[0, 1] = -z[0, 1].abs()  # relu sums to 0
    z[0, 2, 1, 3] = float("nan")
    case.logits = z
    outs, grads = check_against_reference(tops.dsnt_fwd_triton, tops.dsnt_bwd_triton, case, "relu")
    assert outs[5][0, 1, 1] == 0  # stats slot 1, denom: 0 marks the uniform map
    assert (grads[0][0, 1] == 0).all() and grads[0][0, 2].isnan().any()
    assert outs[0][0, [0, 1, 3]].isfinite().all() and outs[4].isnan()

    case = make_case((1, 3, 5, 6), "softmax", "kl")
    z = case.logits.clone()
    z[0, 0, :2] = float("-inf")
    z[0, 1] = float("-inf")
    case.logits = z
    outs, grads = check_against_reference(tops.dsnt_fwd_triton, tops.dsnt_bwd_triton, case, "softmax")
    assert (grads[0][0, 0, :2] == 0).all() and outs[0][0, 1].isnan().all()


def test_nan_map_keeps_what_does_not_depend_on_it():
    """reg none keeps 0 losses; without grad_reg_losses the target gets no regularizer gradient."""
    case = make_case((1, 2, 4, 5), "softmax", "js", upstream=["grad_coords"])
    case.logits[0, 0, 1, 2] = float("nan")
    _, grads = run_ops(tops.dsnt_fwd_triton, tops.dsnt_bwd_triton, case)
    assert (grads[1] == 0).all()
    none_case = make_case((1, 2, 4, 5), "softmax", "none")
    none_case.logits[0, 0, 1, 2] = float("nan")
    assert (tops.dsnt_fwd_triton(*none_case.fwd_args())[2] == 0).all()


def test_strided_logits_and_empty_batch():
    case = make_case((2, 3, 5, 6), "softmax", "js", coord_loss="l1")
    case.logits = case.logits.transpose(2, 3).contiguous().transpose(2, 3)  # same values, strided
    assert not case.logits.is_contiguous()
    check(case, "strided")
    empty = make_case((0, 3, 4, 4), "softmax", "js", coord_loss="euclidean")
    outs, grads = run_ops(tops.dsnt_fwd_triton, tops.dsnt_bwd_triton, empty)
    assert [tuple(o.shape) for o in outs] == [(0, 3, 2), (0, 3, 2), (0, 3), (0, 3), (), (0, 3, 6)]
    assert outs[4] == 0 and grads[0].shape == (0, 3, 4, 4)


# ---- autograd, op registration -----------------------------------------------------------------


def test_registered_ops_against_the_reference():
    check_against_reference(FWD, BWD, rotated_case((1, 2, 4, 3), "softmax", "js", 1), "registered ops")


def test_gradcheck_through_autograd():
    """gradcheck in float64 of the registered forward, wrt logits, target and beta_map."""
    case = make_case((1, 2, 2, 3), "softmax", "js", dtype=torch.float64, coord_loss="euclidean", mask=True,
                     beta_kind="keypoint", scale=1.0)
    inputs = [t.clone().requires_grad_(True) for t in (case.logits, case.target, case.beta_map)]

    def fn(logits, target, beta_map):
        outs = FWD(logits, target, case.mask, beta_map, None, *case.options())
        return outs[:5]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


def test_opcheck():
    """Schema, fake kernels and autograd registration of both ops. (aot_dispatch would run the
    triton_op's launcher on fake tensors, which the interpreter cannot: GPU tests run it.)"""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    case = make_case((1, 2, 3, 4), "softmax", "js", coord_loss="euclidean", mask=True, beta_kind="keypoint")
    args = [case.logits.requires_grad_(True), case.target, case.mask, case.beta_map, None, *case.options()]
    torch.library.opcheck(FWD, tuple(args), test_utils=utils)
    outs = tops.dsnt_fwd_triton(*case.fwd_args())
    up = case.upstream
    torch.library.opcheck(BWD, (up["grad_coords"], None, up["grad_reg_losses"], None, up["grad_loss"],
                                case.logits.detach(), case.target, case.mask, case.beta_map, None,
                                outs[0], outs[1], outs[5], *case.options(), True, True), test_utils=utils)


def test_schemas_are_the_cpp_ops():
    assert str(FWD._schema) == "dsnt_cuda::dsnt_fwd_triton" + op_glue.FWD_SCHEMA
    assert str(BWD._schema) == "dsnt_cuda::dsnt_bwd_triton" + op_glue.BWD_SCHEMA
    if hasattr(torch.ops.dsnt_cuda, "dsnt_fwd"):
        cpp = torch.ops.dsnt_cuda.dsnt_fwd.default._schema
        assert str(cpp).split("(", 1)[1] == str(FWD._schema).split("(", 1)[1]


# ---- what the launchers refuse -----------------------------------------------------------------


def test_maps_above_the_int32_offsets_are_refused(monkeypatch):
    monkeypatch.setattr(tops, "MAX_MAP_SIZE", 16)
    case = make_case((1, 2, 4, 5), "softmax", "none")
    with pytest.raises(ValueError, match="at most 16 elements"):
        tops.dsnt_fwd_triton(*case.fwd_args())
    case.logits = case.logits[..., :4]  # 16: accepted
    tops.dsnt_fwd_triton(*case.fwd_args())


def test_backward_refuses_what_would_read_out_of_bounds():
    case = make_case((2, 3, 4, 5), "softmax", "js", coord_loss="euclidean", mask=True)
    coords, variance, _, _, _, stats = tops.dsnt_fwd_triton(*case.fwd_args())
    up = case.upstream

    def bwd(**changes):
        args = dict(grad_coords=up["grad_coords"], target=case.target, coords=coords, variance=variance,
                    stats=stats, mask=case.mask)
        args.update(changes)
        return tops.dsnt_bwd_triton(args["grad_coords"], None, None, None, up["grad_loss"], case.logits,
                                    args["target"], args["mask"], None, None, args["coords"],
                                    args["variance"], args["stats"], *case.options(), True, False)

    bwd()
    for name, bad in (("coords", coords[:1]), ("variance", variance[..., :1]), ("stats", stats[:, :, :5]),
                      ("target", case.target[:1]), ("grad_coords", up["grad_coords"][:, :2]),
                      ("mask", case.mask[:, :2])):
        with pytest.raises(ValueError, match=name):
            bwd(**{name: bad})
    for name in ("beta_map", "sigma_t_map"):  # read through (B, L) strides
        with pytest.raises(ValueError, match=name):
            per_map = (torch.ones(5) if n == name else None for n in ("beta_map", "sigma_t_map"))
            tops.dsnt_fwd_triton(*case.fwd_args()[:3], *per_map, *case.options())
