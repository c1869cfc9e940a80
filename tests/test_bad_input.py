"""Bad input gets a clear Python exception naming the problem, from every entry point."""

import pytest
import torch

import dsnt_cuda

from support import random_heatmaps, random_logits, random_targets

GOOD = random_logits((2, 3, 5, 5))
TARGET = random_targets(2, 3, 2)
HEATMAPS = random_heatmaps((2, 3, 5, 5))


@pytest.mark.parametrize(
    "logits, error, message",
    [
        (torch.randn(2, 5), ValueError, "1 to 3 spatial dims"),
        (torch.randn(1, 1, 2, 2, 2, 2), ValueError, "1 to 3 spatial dims"),
        (torch.randint(0, 5, (2, 3, 5, 5)), TypeError, "floating dtype"),
        (torch.randn(2, 3, 0, 5), ValueError, "empty spatial axis"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
    ids=["rank2", "rank6", "integer", "empty_axis", "list"],
)
def test_bad_logits(logits, error, message, cpu_backend):
    with pytest.raises(error, match=message):
        dsnt_cuda.fused_dsnt(logits, backend=cpu_backend)
    with pytest.raises(error, match=message):
        dsnt_cuda.dsnt_loss(logits, TARGET, backend=cpu_backend)
    with pytest.raises(error, match=message):
        dsnt_cuda.dsnt(logits)
    with pytest.raises(error, match=message):
        dsnt_cuda.DSNT()(logits)


@pytest.mark.parametrize(
    "target", [random_targets(2, 3, 3), random_targets(2, 2, 2), random_targets(3, 3, 2)[:2, :, :1]])
def test_mismatched_target(target, cpu_backend):
    with pytest.raises(ValueError, match="target must have shape"):
        dsnt_cuda.dsnt_loss(GOOD, target, backend=cpu_backend)
    with pytest.raises(ValueError, match="target must have shape"):
        dsnt_cuda.DSNTLoss(backend=cpu_backend)(GOOD, target)
    with pytest.raises(ValueError, match="mu_t must have shape"):
        dsnt_cuda.js_reg_losses(HEATMAPS, target, 1.0)


def test_integer_target():
    with pytest.raises(TypeError, match="target must have a floating dtype"):
        dsnt_cuda.dsnt_loss(GOOD, torch.zeros(2, 3, 2, dtype=torch.long))


def test_target_on_another_device():
    with pytest.raises(ValueError, match="target is on meta"):
        dsnt_cuda.dsnt_loss(GOOD, TARGET.to("meta"))


# ---- beta and sigma_t: floats or per-map tensors -------------------------------------------------


BAD_NUMBERS = [0.0, -1.0, float("nan"), float("inf"), 1e-300]


@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_bad_sigma_t_number(value, cpu_backend):
    with pytest.raises(ValueError, match="sigma_t must be finite and >= "):
        dsnt_cuda.dsnt_loss(GOOD, TARGET, sigma_t=value, backend=cpu_backend)
    with pytest.raises(ValueError, match="sigma_t must be finite and >= "):
        dsnt_cuda.variance_reg_losses(HEATMAPS, value)
    with pytest.raises(ValueError, match="sigma must be finite and >= "):
        dsnt_cuda.make_gauss(TARGET, [5, 5], value)
    with pytest.raises(ValueError, match="sigma_t must be finite and >= "):
        dsnt_cuda.DSNTLoss(sigma_t=value)


@pytest.mark.parametrize("value", BAD_NUMBERS[:4])
def test_bad_beta_number(value, cpu_backend):
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        dsnt_cuda.fused_dsnt(GOOD, beta=value, backend=cpu_backend)
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        dsnt_cuda.dsnt_loss(GOOD, TARGET, beta=value, backend=cpu_backend)
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        dsnt_cuda.DSNT(beta=value)


def test_sigma_t_below_the_dtype_minimum():
    """2^-40 px is the narrowest target in float32 accumulation, 2^-400 px in float64 (docs/ops.md)."""
    narrow = 2.0**-50
    dsnt_cuda.dsnt_loss(GOOD, TARGET, sigma_t=narrow)  # float64 logits: representable
    with pytest.raises(ValueError, match=r"sigma_t must be finite and >= 9\.09e-13 pixels \(torch\.float32"):
        dsnt_cuda.dsnt_loss(GOOD.float(), TARGET, sigma_t=narrow)
    with pytest.raises(ValueError, match=r"every sigma_t must be finite and >= 9\.09e-13"):
        dsnt_cuda.dsnt_loss(GOOD.half(), TARGET, sigma_t=torch.full((3,), narrow, dtype=torch.float64))


@pytest.mark.parametrize("name", ["beta", "sigma_t"])
@pytest.mark.parametrize(
    "value, error, message",
    [
        (torch.ones(3, 2), ValueError, r"broadcastable to \(B, L\) = \(2, 3\).*got \(3, 2\)"),
        (torch.ones(2), ValueError, r"broadcastable to \(B, L\)"),
        (torch.ones(1, 2, 3), ValueError, r"broadcastable to \(B, L\)"),
        (torch.tensor([1.0, float("nan"), 1.0]), ValueError, "every {name} must be finite"),
        (torch.tensor([1.0, float("inf"), 1.0]), ValueError, "every {name} must be finite"),
        (torch.tensor([[1.0], [0.0]]), ValueError, "every {name} must be finite"),
        (torch.tensor(-2.0), ValueError, "every {name} must be finite"),
        (torch.ones(3, dtype=torch.long), TypeError, "{name} must be a floating-point tensor"),
        (torch.ones(3, device="meta"), ValueError, "{name} is on meta but the heatmaps are on cpu"),
        ("1", TypeError, "{name} must be a real number or a tensor, got str"),
        (True, TypeError, "{name} must be a real number or a tensor, got bool"),
    ],
    ids=["shape_BL_swapped", "shape_2", "rank3", "nan", "inf", "zero", "negative", "long", "device",
         "str", "bool"],
)
def test_bad_per_map_argument(name, value, error, message, cpu_backend):
    with pytest.raises(error, match=message.format(name=name)):
        dsnt_cuda.dsnt_loss(GOOD, TARGET, backend=cpu_backend, **{name: value})
    if name == "beta":
        with pytest.raises(error, match=message.format(name=name)):
            dsnt_cuda.fused_dsnt(GOOD, beta=value, backend=cpu_backend)
    else:
        with pytest.raises(error, match=message.format(name=name)):
            dsnt_cuda.js_reg_losses(HEATMAPS, TARGET, value)


def test_sigma_t_takes_no_gradient():
    sigma_t = torch.full((3,), 1.5, dtype=torch.float64, requires_grad=True)
    for call in (lambda: dsnt_cuda.dsnt_loss(GOOD, TARGET, sigma_t=sigma_t),
                 lambda: dsnt_cuda.kl_reg_losses(HEATMAPS, TARGET, sigma_t),
                 lambda: dsnt_cuda.DSNTLoss(sigma_t=sigma_t)):
        with pytest.raises(ValueError, match="sigma_t takes no gradient"):
            call()


def test_mask_takes_no_gradient_and_must_fit():
    with pytest.raises(ValueError, match="mask takes no gradient"):
        dsnt_cuda.dsnt_loss(GOOD, TARGET, mask=torch.ones(2, 3, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, L\) = \(2, 3\)"):
        dsnt_cuda.dsnt_loss(GOOD, TARGET, mask=torch.ones(3, 2))
    with pytest.raises(TypeError, match="mask must be a floating-point or bool tensor"):
        dsnt_cuda.dsnt_loss(GOOD, TARGET, mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be the same size as losses"):
        dsnt_cuda.average_loss(torch.ones(2, 3), torch.ones(3))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"reg": "l2"}, ValueError, "unknown reg"),
        ({"coord_loss": "huber"}, ValueError, "unknown coord_loss"),
        ({"coord_loss": "none"}, ValueError, "unknown coord_loss"),
        ({"normalization": "softplus"}, ValueError, "unknown normalization"),
        ({"reg_weight": float("nan")}, ValueError, "reg_weight must be finite"),
        ({"reg_weight": "1"}, TypeError, "reg_weight must be a real number"),
    ],
)
def test_unknown_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        dsnt_cuda.dsnt_loss(GOOD, TARGET, **kwargs)


def test_mismatched_coordinate_losses():
    with pytest.raises(ValueError, match="same size"):
        dsnt_cuda.euclidean_losses(TARGET, TARGET[:, :2])


def test_wrong_number_of_value_vectors():
    with pytest.raises(ValueError, match="expected 2 value vectors"):
        dsnt_cuda.linear_expectation(GOOD, [torch.arange(5.0)])


def test_make_gauss_sigma_tensor_must_broadcast_to_the_points():
    with pytest.raises(ValueError, match=r"sigma of shape \(4,\) is not broadcastable"):
        dsnt_cuda.make_gauss(TARGET, [5, 5], torch.ones(4, dtype=torch.float64))
