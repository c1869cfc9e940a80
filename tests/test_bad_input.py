"""Bad input gets a clear Python exception naming the problem, from every entry point."""

import pytest
import torch
from conftest import random_logits, random_targets

import dsnt_cuda

GOOD = random_logits((2, 3, 5, 5))
TARGET = random_targets(2, 3, 2)


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
        dsnt_cuda.dsnt(logits)


@pytest.mark.parametrize("target", [random_targets(2, 3, 3), random_targets(2, 2, 2), random_targets(3, 3, 2)[:2, :, :1]])
def test_mismatched_target(target, cpu_backend):
    with pytest.raises(ValueError, match="target must have shape"):
        dsnt_cuda.dsnt_loss(GOOD, target, backend=cpu_backend)
    with pytest.raises(ValueError, match="mu_t must have shape"):
        dsnt_cuda.js_reg_losses(torch.softmax(GOOD.flatten(2), -1).view_as(GOOD), target, 1.0)


def test_integer_target():
    with pytest.raises(TypeError, match="target must have a floating dtype"):
        dsnt_cuda.dsnt_loss(GOOD, torch.zeros(2, 3, 2, dtype=torch.long))


@pytest.mark.parametrize("sigma_t", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_sigma(sigma_t, cpu_backend):
    with pytest.raises(ValueError, match="sigma_t must be finite and > 0"):
        dsnt_cuda.dsnt_loss(GOOD, TARGET, sigma_t=sigma_t, backend=cpu_backend)
    with pytest.raises(ValueError, match="sigma_t must be finite and > 0"):
        dsnt_cuda.variance_reg_losses(GOOD, sigma_t)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        dsnt_cuda.make_gauss(TARGET, [5, 5], sigma_t)


def test_sigma_of_wrong_type():
    with pytest.raises(TypeError, match="sigma_t must be a real number"):
        dsnt_cuda.dsnt_loss(GOOD, TARGET, sigma_t="1")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reg": "l2"}, "unknown reg"),
        ({"coord_loss": "huber"}, "unknown coord_loss"),
        ({"normalization": "softplus"}, "unknown normalization"),
        ({"beta": 0.0}, "beta must be finite and > 0"),
        ({"beta": float("inf")}, "beta must be finite and > 0"),
    ],
)
def test_unknown_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dsnt_cuda.dsnt_loss(GOOD, TARGET, **kwargs)


def test_bad_mask():
    with pytest.raises(ValueError, match="mask must have shape"):
        dsnt_cuda.dsnt_loss(GOOD, TARGET, mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="mask must be the same size as losses"):
        dsnt_cuda.average_loss(torch.ones(2, 3), torch.ones(3))


def test_mismatched_coordinate_losses():
    with pytest.raises(ValueError, match="same size"):
        dsnt_cuda.euclidean_losses(TARGET, TARGET[:, :2])


def test_wrong_number_of_value_vectors():
    with pytest.raises(ValueError, match="expected 2 value vectors"):
        dsnt_cuda.linear_expectation(GOOD, [torch.arange(5.0)])
