"""The fused API (`fused_dsnt`, `dsnt_loss`) and backend selection, on every backend this process
runs, against dsntnn's composed recipe and the float64 reference; each public call is one call
of the backend's forward op."""

import dsntnn
import pytest
import torch

import dsnt_cuda
from dsnt_cuda import backends, reference

from support import assert_all_close, assert_close, make_case, random_logits, random_targets, values_and_grads


def dsntnn_standard_loss(logits, target, mask=None):
    heatmaps = dsntnn.flat_softmax(logits)
    coords = dsntnn.dsnt(heatmaps)
    losses = dsntnn.euclidean_losses(coords, target) + dsntnn.js_reg_losses(heatmaps, target, sigma_t=1.0)
    return dsntnn.average_loss(losses, mask)


@pytest.mark.parametrize("shape", [(2, 3, 6, 5), (1, 2, 3, 4, 5), (3, 2, 11)], ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_dsnt_loss_defaults_equal_dsntnn_recipe(backend_device, shape, masked):
    backend, device = backend_device
    logits = random_logits(shape, seed=1, device=device)
    target = random_targets(shape[0], shape[1], len(shape) - 2, seed=2, device=device)
    mask = None
    if masked:
        mask = (torch.arange(shape[0] * shape[1], device=device).view(shape[:2]) % 3 != 0).double()
    ours = values_and_grads(lambda z, t: dsnt_cuda.dsnt_loss(z, t, mask=mask, backend=backend).loss,
                            logits, target)
    theirs = values_and_grads(lambda z, t: dsntnn_standard_loss(z, t, mask), logits, target)
    assert_all_close(ours[0] + ours[1], theirs[0] + theirs[1], "loss, d/dlogits, d/dtarget",
                     map_dims=(0, len(shape) - 2))


@pytest.mark.parametrize("reg", ["js", "kl", "var", None])
@pytest.mark.parametrize("coord_loss", ["euclidean", "l1", "mse"])
@pytest.mark.parametrize("normalization", ["softmax", "sigmoid"])
@pytest.mark.parametrize("kinds", [("float", "float"), ("keypoint", "map")], ids=["floats", "tensors"])
def test_dsnt_loss_options_match_reference(backend_device, reg, coord_loss, normalization, kinds):
    backend, device = backend_device
    case = make_case((2, 3, 7, 6), normalization, reg or "none", dtype=torch.float64, seed=3, mask=True,
                     coord_loss=coord_loss, beta_kind=kinds[0], sigma_kind=kinds[1]).to(device)

    def ours(z, t, beta):
        return tuple(dsnt_cuda.dsnt_loss(z, t, mask=case.mask, reg=reg, sigma_t=case.sigma_t_argument,
                                         reg_weight=case.reg_weight, coord_loss=coord_loss,
                                         normalization=normalization, beta=beta, backend=backend))

    def oracle(z, t, beta):
        beta_map = beta if isinstance(beta, torch.Tensor) else None
        options = (normalization, case.beta, True, reg or "none", case.sigma_t, coord_loss, case.reg_weight)
        coords, _, reg_losses, coord_losses, loss = reference.dsnt_fwd(
            z, t, case.mask, beta_map, case.sigma_t_map, *options)
        return loss, coords, coord_losses, reg_losses

    inputs = (case.logits, case.target, case.beta_argument)
    got, expected = values_and_grads(ours, *inputs), values_and_grads(oracle, *inputs)
    assert_all_close(got[0], expected[0], "loss, coords, coord_losses, reg_losses")
    assert_all_close(got[1], expected[1], "d/dlogits, d/dtarget, d/dbeta", map_dims=(2,))
    if reg is None:
        assert torch.equal(got[0][3].cpu(), torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("normalization", reference.NORMALIZATIONS)
@pytest.mark.parametrize("normalized_coordinates", [True, False])
def test_fused_dsnt_matches_reference(backend_device, normalization, normalized_coordinates):
    backend, device = backend_device
    logits = random_logits((2, 3, 4, 5, 6), seed=5, device=device)

    def ours(z):
        return dsnt_cuda.fused_dsnt(z, normalization=normalization, beta=0.8, return_variance=True,
                                    normalized_coordinates=normalized_coordinates, backend=backend)

    def oracle(z):
        p = reference.normalize(z, normalization, 0.8)
        return reference.coordinates(p, normalized_coordinates), reference.variance(p)

    got, expected = values_and_grads(ours, logits), values_and_grads(oracle, logits)
    assert_all_close(got[0] + got[1], expected[0] + expected[1], "coords, variance, d/dlogits",
                     map_dims=(0, 0, 3))
    only_coords = dsnt_cuda.fused_dsnt(logits, normalization=normalization, beta=0.8,
                                       normalized_coordinates=normalized_coordinates, backend=backend)
    assert torch.equal(only_coords, got[0][0])


def test_half_inputs_give_float32_coordinates_and_losses(backend_device):
    backend, device = backend_device
    for dtype in (torch.float16, torch.bfloat16):
        logits = random_logits((2, 3, 8, 8), dtype=dtype, seed=6, device=device).requires_grad_(True)
        result = dsnt_cuda.dsnt_loss(logits, random_targets(2, 3, 2, seed=7, device=device), backend=backend)
        assert result.coords.dtype == result.loss.dtype == result.coord_losses.dtype == torch.float32
        result.loss.backward()
        assert logits.grad.dtype == dtype
        assert dsnt_cuda.fused_dsnt(logits, backend=backend).dtype == torch.float32


def test_empty_batch(backend_device):
    backend, device = backend_device
    logits = random_logits((0, 3, 5, 5), seed=8, device=device).requires_grad_(True)
    result = dsnt_cuda.dsnt_loss(logits, random_targets(0, 3, 2, device=device), backend=backend)
    assert result.coords.shape == (0, 3, 2) and result.loss.item() == 0.0
    result.loss.backward()
    assert logits.grad.shape == logits.shape


# ---- one op call per public call --------------------------------------------------------------


@pytest.fixture
def op_calls(monkeypatch):
    """Records the arguments of every call of each backend's forward op."""
    calls = []
    for name in dsnt_cuda.available_backends("cpu"):
        if name in ("auto", "triton"):
            continue
        op = backends.forward_op(name)
        monkeypatch.setitem(backends._forward_ops, name,
                            lambda *args, op=op, name=name: calls.append((name, args)) or op(*args))
    return calls


def test_each_public_call_is_one_op_call(cpu_backend, op_calls):
    logits = random_logits((2, 3, 5, 6), seed=9)
    target = random_targets(2, 3, 2)
    heatmaps = dsnt_cuda.flat_softmax(logits)
    with dsnt_cuda.use_backend(cpu_backend):
        dsnt_cuda.dsnt_loss(logits, target, reg="kl", coord_loss="l1", sigma_t=1.5, beta=2.0)
        dsnt_cuda.fused_dsnt(logits, return_variance=True)
        dsnt_cuda.dsnt(heatmaps)
        dsnt_cuda.js_reg_losses(heatmaps, target, 1.0)
        dsnt_cuda.variance_reg_losses(heatmaps, 1.0)
    names = [name for name, _ in op_calls]
    assert names == [cpu_backend] * 5
    options = [args[5:] for _, args in op_calls]
    assert options[0] == ("softmax", 2.0, True, "kl", 1.5, "l1", 1.0)  # the loss inside the op
    assert [o[5] for o in options] == ["l1", "none", "none", "none", "none"]
    assert [o[0] for o in options[2:]] == ["none"] * 3  # compat transforms take heatmaps
    # A float beta / sigma_t stays a float: no per-map tensor is made.
    assert all(args[3] is None and args[4] is None for _, args in op_calls)


def test_tensor_beta_and_sigma_reach_the_op_as_per_map_tensors(cpu_backend, op_calls):
    logits, target = random_logits((2, 3, 5, 6), seed=10), random_targets(2, 3, 2)
    beta, sigma_t = torch.full((3,), 1.5, dtype=torch.float64), torch.full((2, 3), 2.0, dtype=torch.float64)
    dsnt_cuda.dsnt_loss(logits, target, beta=beta, sigma_t=sigma_t, backend=cpu_backend)
    (_, args), = op_calls
    assert args[3] is beta and args[4] is sigma_t


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


def test_backend_in_force_is_the_one_that_runs(op_calls):
    logits = random_logits((1, 2, 4, 4))
    with dsnt_cuda.use_backend("reference"):
        dsnt_cuda.fused_dsnt(logits)
        dsnt_cuda.dsnt(torch.softmax(logits.flatten(2), -1).view_as(logits))
    dsnt_cuda.fused_dsnt(logits, backend="reference")
    dsnt_cuda.fused_dsnt(logits)  # auto: the C++ kernels when built
    auto = "cpu" if "cpu" in dsnt_cuda.available_backends("cpu") else "reference"
    assert [name for name, _ in op_calls] == ["reference"] * 3 + [auto]


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
    if not backends.triton_interpreter_enabled():
        with pytest.raises(RuntimeError, match=r"backend 'triton' is not available: .*CUDA tensors"):
            dsnt_cuda.fused_dsnt(logits, backend="triton")
    if "cpu" not in dsnt_cuda.available_backends("cpu"):
        with pytest.raises(RuntimeError, match="backend 'cpu' is not available"):
            dsnt_cuda.fused_dsnt(logits, backend="cpu")
    assert "reference" in dsnt_cuda.available_backends() and "auto" in dsnt_cuda.available_backends()


def test_triton_needs_the_extension_for_its_autograd(monkeypatch):
    # The fused ops' one autograd registration is in the C++ extension (csrc/dsnt_autograd.cpp).
    from dsnt_cuda import _extension, ops

    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(backends, "_triton_installed", lambda: True)
    reason = backends.backend_unavailable_reason("triton")
    assert reason is not None and "autograd is in the C++ extension" in reason
    with pytest.raises(RuntimeError, match="is in the C\\+\\+ extension, which is not loaded"):
        ops.register_op_pair("dsnt_cuda::dsnt_fwd_triton", "dsnt_cuda::dsnt_bwd_triton")


def test_build_info_and_version():
    info = dsnt_cuda.build_info()
    assert isinstance(info["extension"], bool)
    if info["extension"]:
        assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
        if info["with_cuda"]:
            assert "90" in info["cuda_architectures"] and info["cuda_version"]
    from dsnt_cuda.version import __version__

    assert dsnt_cuda.__version__ == __version__ and __version__.count(".") == 2


def test_compiled_with_symbolic_float_options_matches_eager_and_still_checks(cpu_backend):
    """torch.compile(dynamic=True) makes float arguments symbolic: no graph break, no stale graph."""
    torch._dynamo.reset()
    fn = torch.compile(lambda x, b: dsnt_cuda.fused_dsnt(x, beta=b, backend=cpu_backend),
                       dynamic=True, fullgraph=True)
    logits = random_logits((2, 3, 6, 5), seed=12)
    for beta in (1.5, 2.5):
        expected = dsnt_cuda.fused_dsnt(logits, beta=beta, backend="reference")
        assert_close(fn(logits, beta), expected, None, f"beta {beta}")
    if cpu_backend == "cpu":  # the op checks what the compiled Python boundary could not
        with pytest.raises((ValueError, RuntimeError), match="beta must be finite"):
            fn(logits, -1.0)
