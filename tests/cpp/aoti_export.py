"""First half of the ctest `test_aoti`: export a small keypoint model that uses the fused ops,
AOT-compile it with AOTInductor (CPU) and save what the C++ half (tests/cpp/test_aoti.cpp) checks.

    python tests/cpp/aoti_export.py OUT_DIR

writes OUT_DIR/dsnt_model.pt2 (the AOTInductor package) and OUT_DIR/dsnt_io.pt (torch.save of a
dict the C++ side reads with torch::pickle_load):
    "cases":  [[inputs, eager outputs], ...], lists of tensors, shapes other than the export's;
    "ops":    [[name, overload, schema], ...] of every dsnt_cuda op the package calls.

The ops come from the `dsnt_cuda` package (its `_C` extension, built in place by `make build`):
export needs their fake kernels, which live in the package and follow its schemas; the C++ process
links libdsnt_cuda_ops instead. Each library defines TORCH_LIBRARY(dsnt_cuda), so the two never
meet in one process; "ops" lets the C++ side check both were built from the same schemas.
"""

import os
import sys
import time

import torch
from torch import nn
from torch.export import Dim

import dsnt_cuda
from dsnt_cuda.backends import backend_unavailable_reason


class Keypoints(nn.Module):
    """conv head -> coordinates + variance (fused_dsnt) and the masked DSNT loss (DSNTLoss)."""

    def __init__(self, keypoints=3):
        super().__init__()
        self.head = nn.Conv2d(1, keypoints, 3, padding=1)
        self.loss = dsnt_cuda.DSNTLoss(reg="js", sigma_t=1.5, beta=2.0)

    def forward(self, images, target, mask):
        logits = self.head(images)
        coords, variance = dsnt_cuda.fused_dsnt(logits, return_variance=True)
        result = self.loss(logits, target, mask=mask)
        return coords, variance, result.loss, result.reg_losses


def make_inputs(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, height, width, generator=g)
    target = torch.rand(batch, 3, 2, generator=g) * 1.6 - 0.8
    mask = (torch.rand(batch, 3, generator=g) > 0.3).float()
    return [images, target, mask]


def fail(message):
    print(f"aoti_export.py: {message}", file=sys.stderr)
    sys.exit(1)


def main(out_dir):
    # Without the C++ extension the API would route to the reference and export a decomposition:
    # the package would not call our op at all.
    reason = backend_unavailable_reason("cpu", torch.device("cpu"))
    if reason is not None:
        fail(f"the fused cpu backend is needed to export the op ({reason}); run `make build`")

    os.makedirs(out_dir, exist_ok=True)
    for name in ("dsnt_model.pt2", "dsnt_io.pt"):  # no stale package if this run fails
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    torch.manual_seed(0)
    model = Keypoints().eval()
    # Inductor compiles a dynamic size for values >= 2 (it specializes 0 and 1); the ctest runs
    # the package with AOTI_RUNTIME_CHECK_INPUTS=1, which enforces that.
    batch, height, width = Dim("batch", min=2), Dim("height", min=2), Dim("width", min=2)
    dynamic = {"images": {0: batch, 2: height, 3: width}, "target": {0: batch}, "mask": {0: batch}}

    start = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(model, tuple(make_inputs(2, 12, 10, seed=0)), dynamic_shapes=dynamic)
    ops = sorted({n.target for n in ep.graph.nodes
                  if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "dsnt_cuda"},
                 key=str)
    if not ops:
        fail(f"the exported graph calls no dsnt_cuda op:\n{ep.graph}")
    print(f"exported in {time.perf_counter() - start:.1f} s; dsnt_cuda ops: {[str(op) for op in ops]}")

    start = time.perf_counter()
    package = torch._inductor.aoti_compile_and_package(
        ep, package_path=os.path.join(out_dir, "dsnt_model.pt2"))
    print(f"AOTInductor package {package} in {time.perf_counter() - start:.1f} s")

    cases = []
    for seed, (b, h, w) in enumerate([(2, 12, 10), (3, 9, 14), (4, 16, 5)]):
        inputs = make_inputs(b, h, w, seed)
        with torch.no_grad():
            expected = list(model(*inputs))
        cases.append([inputs, expected])
    schemas = [[op._schema.name, op._schema.overload_name, str(op._schema)] for op in ops]
    torch.save({"cases": cases, "ops": schemas}, os.path.join(out_dir, "dsnt_io.pt"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: aoti_export.py OUT_DIR")
    main(sys.argv[1])
