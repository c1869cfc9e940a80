"""ONNX export of a model ending in `DSNT`: while `torch.onnx.export` runs, the module routes to the
pure-PyTorch reference (standard operators only), and onnxruntime reproduces the coordinates.

Needs the optional packages onnx, onnxscript (torch's exporter) and onnxruntime; skipped without.
"""

import pytest
import torch
from conftest import CPU_BACKENDS
from torch import nn

from dsnt_cuda import DSNT

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx onnxscript onnxruntime)")
pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's dynamo exporter) is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


class Keypoints(nn.Module):
    def __init__(self, dsnt):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1))
        self.dsnt = dsnt

    def forward(self, images):
        return self.dsnt(self.body(images))


def _export_and_run(model, example, inputs, tmp_path, dynamic=False):
    path = str(tmp_path / "model.onnx")
    kwargs = {}
    if dynamic:
        batch, height, width = (
            torch.export.Dim("batch"),
            torch.export.Dim("height"),
            torch.export.Dim("width"),
        )
        kwargs["dynamic_shapes"] = {"images": {0: batch, 2: height, 3: width}}
    torch.onnx.export(model, (example,), path, dynamo=True, input_names=["images"], verbose=False, **kwargs)
    graph = onnx.load(path).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard operators in the export: {domains}"
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return [session.run(None, {"images": x.numpy()}) for x in inputs]


# Each export costs ~2-4 s: every backend once, every convention once.
CASES = [
    (backend, ("align_corners", "pixel", "normalized")[i % 3])
    for i, backend in enumerate([None, *CPU_BACKENDS])
]


@pytest.mark.parametrize("backend, coordinates", CASES)
def test_onnx_export_reproduces_coordinates(backend, coordinates, tmp_path):
    torch.manual_seed(0)
    model = Keypoints(DSNT(beta=2.0, coordinates=coordinates, backend=backend)).eval()
    x = torch.randn(2, 3, 16, 12)
    (outputs,) = _export_and_run(model, x, [x], tmp_path)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(outputs[0]), expected, rtol=1e-4, atol=1e-5)


def test_onnx_export_with_variance_and_dynamic_shapes(tmp_path):
    torch.manual_seed(0)
    model = Keypoints(DSNT(return_variance=True)).eval()
    inputs = [torch.randn(2, 3, 16, 12), torch.randn(3, 3, 9, 21)]
    results = _export_and_run(model, inputs[0], inputs, tmp_path, dynamic=True)
    for x, (coords, variance) in zip(inputs, results):
        with torch.no_grad():
            expected_coords, expected_var = model(x)
        torch.testing.assert_close(torch.from_numpy(coords), expected_coords, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(variance), expected_var, rtol=1e-4, atol=1e-4)
