"""The fused API (`fused_dsnt`, `dsnt_loss`) and backend selection, on every backend that runs
on CPU tensors here, against dsntnn's composed recipe and the float64 reference."""

import dsntnn
import pytest
import torch
from conftest import random_logits, random_targets

import dsnt_cuda
from dsnt_cuda import reference


def dsntnn_standard_loss(logits, target, mask=None):
    heatmaps = dsntnn.flat_softmax(logits)
    coords = dsntnn.dsnt(heatmaps)
    losses = dsntnn.euclidean_losses(coords, target) + dsntnn.js_reg_losses(heatmaps, target, sigma_t=1.0)
    return dsntnn.average_loss(losses, mask)


@pytest.mark.parametrize("shape", [(2, 3, 6, 5), (1, 2, 3, 4, 5), (3, 2, 11)], ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_dsnt_loss_defaults_equal_dsntnn_recipe(cpu_backend, shape, masked):
    logits = random_logits(shape, seed=1).requires_grad_(True)
    target = random_targets(shape[0], shape[1], len(shape) - 2, seed=2).requires_grad_(True)
    mask = (torch.arange(shape[0] * shape[1]).view(shape[:2]) % 3 != 0).double() if masked else None
    result = dsnt_cuda.dsnt_loss(logits, target, mask=mask, backend=cpu_backend)
    grads = torch.autograd.grad(result.loss, (logits, target))
    expected = dsntnn_standard_loss(logits, target, mask)
    expected_grads = torch.autograd.grad(expected, (logits, target))
    torch.testing.assert_close(result.loss, expected, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert result.coords.shape == target.shape and result.coord_losses.shape == shape[:2]


@pytest.mark.parametrize("reg", ["js", "kl", "var", None])
@pytest.mark.parametrize("coord_loss", ["euclidean", "l1", "mse"])
@pytest.mark.parametrize("normalization", ["softmax", "sigmoid"])
def test_dsnt_loss_options_match_reference(cpu_backend, reg, coord_loss, normalization):
    logits = random_logits((2, 3, 7, 6), seed=3)
    target = random_targets(2, 3, 2, seed=4)
    result = dsnt_cuda.dsnt_loss(logits, target, reg=reg, sigma_t=1.5, reg_weight=0.7, coord_loss=coord_loss,
                                 normalization=normalization, beta=1.7, backend=cpu_backend)
    loss, coords, coord_losses, reg_losses = reference.dsnt_loss(
        logits, target, None, reg or "none", 1.5, 0.7, coord_loss, normalization, 1.7)
    for a, b in zip(result, (loss, coords, coord_losses, reg_losses)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if reg is None:
        assert torch.equal(result.reg_losses, torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("normalization", reference.NORMALIZATIONS)
@pytest.mark.parametrize("normalized_coordinates", [True, False])
def test_fused_dsnt_matches_reference(cpu_backend, normalization, normalized_coordinates):
    logits = random_logits((2, 3, 4, 5, 6), seed=5)
    coords, var = dsnt_cuda.fused_dsnt(logits, normalization=normalization, beta=0.8,
                                       normalized_coordinates=normalized_coordinates, return_variance=True,
                                       backend=cpu_backend)
    p = reference.normalize(logits, normalization, 0.8)
    torch.testing.assert_close(coords, reference.coordinates(p, normalized_coordinates), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(var, reference.variance(p), rtol=1e-9, atol=1e-12)
    only_coords = dsnt_cuda.fused_dsnt(logits, normalization=normalization, beta=0.8,
                                       normalized_coordinates=normalized_coordinates, backend=cpu_backend)
    torch.testing.assert_close(only_coords, coords)


def test_half_inputs_give_float32_coordinates_and_losses(cpu_backend):
    for dtype in (torch.float16, torch.bfloat16):
        logits = random_logits((2, 3, 8, 8), dtype=dtype, seed=6).requires_grad_(True)
        result = dsnt_cuda.dsnt_loss(logits, random_targets(2, 3, 2, seed=7), backend=cpu_backend)
        assert result.coords.dtype == result.loss.dtype == torch.float32
        result.loss.backward()
        assert logits.grad.dtype == dtype
        assert dsnt_cuda.fused_dsnt(logits, backend=cpu_backend).dtype == torch.float32


def test_empty_batch(cpu_backend):
    logits = random_logits((0, 3, 5, 5), seed=8).requires_grad_(True)
    target = random_targets(0, 3, 2)
    result = dsnt_cuda.dsnt_loss(logits, target, backend=cpu_backend)
    assert result.coords.shape == (0, 3, 2) and result.loss.item() == 0.0
    result.loss.backward()
    assert logits.grad.shape == logits.shape


# ---- backend selection ------------------------------------------------------------------------


def test_backend_default_context_and_override():
    assert dsnt_cuda.get_backend() == "auto"
    with dsnt_cuda.use_backend("reference"):
        assert dsnt_cuda.get_backend() == "reference"
        with dsnt_cuda.use_backend("auto"):
            assert dsnt_cuda.get_backend() == "auto"
        assert dsnt_cuda.get_backend() == "reference"
    assert dsnt_cuda.get_backend() == "auto"
    dsnt_cuda.set_backend("reference")
    try:
        assert dsnt_cuda.get_backend() == "reference"
    finally:
        dsnt_cuda.set_backend("auto")


def test_backend_in_force_is_the_one_that_runs(monkeypatch):
    calls = []
    original = reference.dsnt_core
    monkeypatch.setattr(reference, "dsnt_core", lambda *a: calls.append(1) or original(*a))
    logits = random_logits((1, 2, 4, 4))
    with dsnt_cuda.use_backend("reference"):
        dsnt_cuda.fused_dsnt(logits)
        dsnt_cuda.dsnt(torch.softmax(logits.flatten(2), -1).view_as(logits))
    assert len(calls) == 2
    dsnt_cuda.fused_dsnt(logits, backend="reference")
    assert len(calls) == 3


@pytest.mark.parametrize("name", ["gpu", "", None, 3])
def test_unknown_backend_is_refused(name):
    with pytest.raises(ValueError, match="unknown backend"):
        dsnt_cuda.set_backend(name)
    with pytest.raises(ValueError, match="unknown backend"):
        dsnt_cuda.fused_dsnt(random_logits((1, 1, 3, 3)), backend=name or "bogus")


def test_unavailable_backend_raises_a_clear_error():
    logits = random_logits((1, 1, 3, 3))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            dsnt_cuda.fused_dsnt(logits, backend="cuda")
    if not dsnt_cuda.backends.triton_interpreter_enabled():
        with pytest.raises(RuntimeError, match="backend 'triton' is not available: .*CUDA tensors"):
            dsnt_cuda.fused_dsnt(logits, backend="triton")
    if "cpu" not in dsnt_cuda.available_backends("cpu"):
        with pytest.raises(RuntimeError, match="backend 'cpu' is not available"):
            dsnt_cuda.fused_dsnt(logits, backend="cpu")
    assert "reference" in dsnt_cuda.available_backends() and "auto" in dsnt_cuda.available_backends()


def test_build_info_reports_the_build():
    info = dsnt_cuda.build_info()
    assert isinstance(info["extension"], bool)
    if info["extension"]:
        assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
        if info["with_cuda"]:
            assert "90" in info["cuda_architectures"] and info["cuda_version"]


def test_compiled_with_symbolic_float_options_matches_eager_and_still_checks(cpu_backend):
    """torch.compile(dynamic=True) makes float arguments symbolic: no graph break, no stale graph."""
    fn = torch.compile(lambda x, b: dsnt_cuda.fused_dsnt(x, beta=b, backend=cpu_backend),
                       dynamic=True, fullgraph=True)
    logits = random_logits((2, 3, 6, 5), seed=12)
    for beta in (1.5, 2.5):
        expected = dsnt_cuda.fused_dsnt(logits, beta=beta, backend="reference")
        torch.testing.assert_close(fn(logits, beta), expected, rtol=1e-9, atol=1e-12)
    if cpu_backend == "cpu":  # the op checks what the compiled Python boundary could not
        with pytest.raises((ValueError, RuntimeError), match="beta must be finite and > 0"):
            fn(logits, -1.0)
