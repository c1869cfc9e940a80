"""Every export path on every backend this process runs, with nothing switched by the user:

- `torch.onnx.export` — the default exporter (torch 2.14: dynamo) and `dynamo=False` (TorchScript)
  — of a model that uses the drop-in functions, `fused_dsnt`, `dsnt_loss` and the modules, each
  with an explicit fused backend: while exporting, the one dispatch point computes through the
  reference (standard operators only), and onnxruntime reproduces the eager outputs;
- `torch.jit.trace`: the fused op is recorded (values and gradients of the traced graph equal
  eager's), except on "triton", which refuses with an error naming the alternatives.

torch.export keeps the fused op in the graph: it is not routed to the reference (tested below;
AOTInductor in the C++ tests).
Needs onnx, onnxscript (the dynamo exporter) and onnxruntime; skipped without. Each dynamo export
costs ~3-7 s on 2 cores, a TorchScript one < 1 s.
"""

import warnings

import pytest
import torch
from torch import nn

import dsnt_cuda

from support import CPU_BACKENDS, assert_close, random_targets

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx onnxscript onnxruntime)")
pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's dynamo exporter) is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

KEYPOINTS = 4


class EveryEntryPoint(nn.Module):
    """A conv head, then each public way to reach the fused op, all on `backend`."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, KEYPOINTS, 3, padding=1))
        self.dsnt = dsnt_cuda.DSNT(coordinates="align_corners", return_variance=True, learnable_beta=True,
                                   num_keypoints=KEYPOINTS, backend=backend)
        self.criterion = dsnt_cuda.DSNTLoss(reg="kl", sigma_t=torch.linspace(0.8, 1.6, KEYPOINTS),
                                            backend=backend)

    def forward(self, images, target):
        logits = self.body(images)
        with dsnt_cuda.use_backend(self.backend):  # the compat functions follow the default in force
            heatmaps = dsnt_cuda.flat_softmax(logits)
            compat = dsnt_cuda.average_loss(dsnt_cuda.euclidean_losses(dsnt_cuda.dsnt(heatmaps), target)
                                            + dsnt_cuda.js_reg_losses(heatmaps, target, 1.0))
        coords, variance = dsnt_cuda.fused_dsnt(logits, beta=1.5, return_variance=True, backend=self.backend)
        loss = dsnt_cuda.dsnt_loss(logits, target, beta=torch.full((KEYPOINTS,), 0.8), backend=self.backend)
        module_coords, module_variance = self.dsnt(logits)
        module_loss = self.criterion(logits, target)
        return (compat, coords, variance, loss.loss, loss.coord_losses, module_coords, module_variance,
                module_loss.loss, module_loss.reg_losses)


def _inputs(batch=2, height=10, width=9, seed=0):
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    return images, random_targets(batch, KEYPOINTS, 2, dtype=torch.float32, seed=seed + 1)


def _export(model, inputs, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' advice on opsets and tracing
        torch.onnx.export(model, inputs, path, input_names=["images", "target"], verbose=False, **kwargs)
    domains = {node.domain for node in onnx.load(path).graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard operators in the export: {domains}"
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _run(session, images, target):
    outputs = session.run(None, {"images": images.numpy(), "target": target.numpy()})
    return [torch.from_numpy(o) for o in outputs]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dynamo", [None, False], ids=["default", "torchscript"])
def test_onnx_export_of_every_entry_point(backend, dynamo, tmp_path):
    torch.manual_seed(0)
    model = EveryEntryPoint(backend).eval()
    images, target = _inputs()
    kwargs = {} if dynamo is None else {"dynamo": dynamo}
    session = _export(model, (images, target), str(tmp_path / "model.onnx"), **kwargs)
    with torch.no_grad():
        expected = model(images, target)
    for i, (got, want) in enumerate(zip(_run(session, images, target), expected, strict=True)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"output {i} ({backend})")


def test_onnx_export_with_dynamic_shapes(tmp_path):
    torch.manual_seed(0)
    model = EveryEntryPoint("auto").eval()
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    shapes = {"images": {0: batch, 2: height, 3: width}, "target": {0: batch}}
    session = _export(model, _inputs(), str(tmp_path / "model.onnx"), dynamo=True, dynamic_shapes=shapes)
    for images, target in (_inputs(3, 9, 21, seed=2), _inputs(1, 16, 12, seed=3)):
        with torch.no_grad():
            expected = model(images, target)
        for i, (got, want) in enumerate(zip(_run(session, images, target), expected, strict=True)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"output {i}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_jit_trace(backend):
    torch.manual_seed(0)
    model = EveryEntryPoint(backend)
    images, target = _inputs()
    if backend == "triton":
        with pytest.raises(RuntimeError, match=r"cannot record the Triton kernels.*backend='cuda'"):
            torch.jit.trace(model, (images, target), check_trace=False)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the shape checks, baked into the trace
        traced = torch.jit.trace(model, (images, target), check_trace=False)
    if backend != "reference":
        assert traced.graph.findAllNodes("dsnt_cuda::dsnt_fwd", recurse=True), "the fused op was not recorded"
    images, target = _inputs(seed=4)  # new values, same shapes
    for fn_outputs in zip(traced(images, target), model(images, target), strict=True):
        assert_close(*fn_outputs, None, f"traced output ({backend})")
    grads = [torch.autograd.grad(sum(o.sum() for o in fn(images, target)), model.parameters())
             for fn in (traced, model)]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not any(b != "reference" for b in CPU_BACKENDS), reason="no fused backend runs here")
def test_torch_export_keeps_the_fused_op():
    """Only ONNX export is routed to the reference: torch.export records the backend's op."""
    backend = next(b for b in CPU_BACKENDS if b != "reference")
    model = EveryEntryPoint(backend).eval()
    exported = torch.export.export(model, _inputs())
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("dsnt_cuda" in t for t in targets), sorted(targets)
