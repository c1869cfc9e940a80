"""The Triton kernels compile for an H100 / H200 (sm_90) without a GPU, with no register spills.

The interpreter runs the kernels' Python and forgives what the compiler does not (types carried
through loops, float constants, scalar specialization of sizes equal to 1): here the launchers run
on meta tensors, their launches are recorded (scripts/sass_triton.py) and compiled as Triton's
JIT would specialize them, for a covering set of variants: every normalization, regularizer,
coordinate loss and dtype, 1-3-D, single-tile and looped plans (64 and 32 elements a thread),
the per-map tensors, with and without the target / beta gradients. About a minute (a few
seconds per kernel).
"""

import os
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles kernels: needs a process without TRITON_INTERPRET")
pytest.importorskip("triton.backends.nvidia")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import sass_triton  # noqa: E402

from dsnt_cuda.triton import ops  # noqa: E402

from support import make_case  # noqa: E402

VARIANTS = [  # shape, dtype, normalization, reg, coord_loss, beta_kind, sigma_kind, mask, input grads
    ((4, 16, 64, 64), torch.float32, "softmax", "js", "euclidean", "map", "keypoint", True, True),
    ((4, 16, 64, 48), torch.float32, "softmax", "js", "euclidean", "map", "float", False, False),
    ((2, 3, 64, 64, 64), torch.bfloat16, "softmax", "js", "mse", "float", "float", False, True),
    ((2, 3, 32, 48), torch.float64, "relu", "kl", "l1", "scalar", "float", True, True),
    ((2, 3, 20000), torch.float16, "sigmoid", "var", "none", "float", "map", False, True),
    ((2, 3, 100, 3000), torch.float32, "abs", "none", "none", "float", "float", False, True),
    ((2, 3, 8, 9, 10), torch.float32, "none", "js", "euclidean", "float", "float", False, True),
]


def launches(shape, dtype, normalization, reg, coord_loss, beta_kind, sigma_kind, mask, input_grads):
    case = make_case(shape[:2] + (1,) * (len(shape) - 2), normalization, reg, dtype=dtype,
                     coord_loss=coord_loss, beta_kind=beta_kind, sigma_kind=sigma_kind, mask=mask)
    case = case.to("meta")
    case.logits = torch.empty(shape, dtype=dtype, device="meta")
    outs = []
    recorded = sass_triton.recorded(lambda: outs.extend(ops.dsnt_fwd_triton(*case.fwd_args())))
    up = case.upstream
    recorded += sass_triton.recorded(lambda: ops.dsnt_bwd_triton(
        up["grad_coords"], up["grad_variance"], up["grad_reg_losses"], up["grad_coord_losses"],
        up["grad_loss"], case.logits, case.target, case.mask, case.beta_map, case.sigma_t_map,
        outs[0], outs[1], outs[5], *case.options(), input_grads, input_grads))
    return recorded


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[2]}-{v[3]}-{len(v[0]) - 2}d-{v[1]}")
def test_kernels_compile_for_sm90_without_spills(variant):
    for kernel, _grid, args, kwargs in launches(*variant):
        compiled = sass_triton.compile_launch(kernel, args, kwargs)
        registers, spills = sass_triton.ptxas_usage(compiled.asm["ptx"])
        assert spills == 0, f"{kernel.__name__} {variant}: {spills} bytes of spills ({registers} registers)"
