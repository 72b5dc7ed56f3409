import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from bayes_adapter.bayes import (
    gaussian_kl,
    local_reparameterisation,
    posterior_std,
    random_signs,
    sample_weight,
    softplus_inverse,
)


@pytest.mark.parametrize("std", [1e-4, 0.01, 0.5, 3.0, 50.0])
def test_softplus_inverse_round_trips(std):
    assert posterior_std(torch.tensor(softplus_inverse(std), dtype=torch.float64)).item() == pytest.approx(std)


@pytest.mark.parametrize("std", [0.0, -1.0, math.nan])
def test_softplus_inverse_rejects_non_positive(std):
    with pytest.raises(ValueError, match="std must be > 0"):
        softplus_inverse(std)


def test_gaussian_kl_matches_torch_distributions():
    mean = torch.randn(7, 3, dtype=torch.float64)
    std = torch.rand(7, 3, dtype=torch.float64) + 0.05
    expected = kl_divergence(Normal(mean, std), Normal(torch.zeros_like(mean), 0.3)).sum()
    torch.testing.assert_close(gaussian_kl(mean, std, 0.3), expected)


def test_gaussian_kl_is_zero_at_the_prior_and_has_gradients():
    mean = torch.zeros(4, requires_grad=True)
    std = torch.full((4,), 0.2, requires_grad=True)
    kl = gaussian_kl(mean, std, 0.2)
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    (gaussian_kl(mean + 1, std * 2, 0.2)).backward()
    assert mean.grad.abs().sum() > 0 and std.grad.abs().sum() > 0


def test_sample_weight_has_the_posterior_moments():
    mean = torch.full((200_000,), 0.5)
    samples = sample_weight(mean, torch.full_like(mean, 0.1))
    assert samples.mean().item() == pytest.approx(0.5, abs=2e-3)
    assert samples.std().item() == pytest.approx(0.1, rel=2e-2)


def test_local_reparameterisation_matches_the_output_distribution_of_weight_sampling():
    x = torch.randn(1, 6, dtype=torch.float64)
    mean = torch.randn(3, 6, dtype=torch.float64)
    std = torch.rand(3, 6, dtype=torch.float64) * 0.5
    draws = torch.cat(
        [
            local_reparameterisation(lambda i, w: i @ w.T, x.expand(4000, 6), x.expand(4000, 6) ** 2, mean, std)
            for _ in range(5)
        ]
    )
    torch.testing.assert_close(draws.mean(0), (x @ mean.T)[0], atol=0.03, rtol=0)
    torch.testing.assert_close(draws.var(0), ((x**2) @ (std**2).T)[0], rtol=0.08, atol=0)


def test_random_signs_are_plus_or_minus_one():
    signs = random_signs((1000,), torch.empty(0))
    assert set(signs.unique().tolist()) == {-1.0, 1.0}


def test_local_reparameterisation_gradients_match_plain_autograd():
    x = torch.randn(5, 4, dtype=torch.float64)
    mean = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    std = (torch.rand(3, 4, dtype=torch.float64) + 0.1).requires_grad_()
    torch.manual_seed(7)
    out = local_reparameterisation(lambda i, w: i @ w.T, x, x * x, mean, std)
    out.pow(2).sum().backward()
    grads = (mean.grad.clone(), std.grad.clone())
    mean.grad = std.grad = None
    torch.manual_seed(7)
    out_mean = x @ mean.T
    out_std = torch.sqrt((x * x) @ (std * std).T + 1e-16)
    expected = out_mean + out_std * torch.randn_like(out_std)
    expected.pow(2).sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, (mean.grad, std.grad))


def test_std_summary():
    from bayes_adapter.bayes import std_summary

    summary = std_summary([torch.tensor([0.1, 0.3]), torch.tensor([[0.2]])])
    assert summary["count"] == 3
    assert summary["mean"] == pytest.approx(0.2) and summary["min"] == pytest.approx(0.1)
    assert summary["max"] == pytest.approx(0.3)
    empty = std_summary([])
    assert empty["count"] == 0 and math.isnan(empty["mean"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_local_reparameterisation_gradients_stay_finite_in_half_precision(dtype):
    # A zero input row gives a zero variance: the floor must not round away in half precision.
    x = torch.zeros(2, 4, dtype=dtype)
    x[1] = 1
    mean = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    std = (torch.rand(3, 4) * 0.1 + 0.01).to(dtype).requires_grad_()
    out = local_reparameterisation(lambda i, w: i @ w.T, x, x * x, mean, std)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert torch.isfinite(std.grad).all() and torch.isfinite(mean.grad).all()
    assert std.grad.abs().sum() > 0
