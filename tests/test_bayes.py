import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from bayes_adapter.bayes import (
    bounded_std,
    elbo_kl_weight,
    gaussian_kl,
    initial_rho,
    local_reparameterisation,
    posterior_log_std,
    posterior_std,
    posterior_std_and_log_std,
    random_signs,
    sample_weight,
    softplus_inverse,
    std_summary,
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


@pytest.mark.parametrize("parametrisation", ["exp_linear", "softplus"])
@pytest.mark.parametrize("std_init", [1e-3, 0.01, 0.5])
def test_initial_rho_holds_the_initial_std(parametrisation, std_init):
    rho = torch.tensor(initial_rho(std_init, parametrisation), dtype=torch.float64)
    assert posterior_std(rho, parametrisation, std_init).item() == pytest.approx(std_init)
    assert posterior_log_std(rho, parametrisation, std_init).item() == pytest.approx(math.log(std_init))


def test_exp_linear_is_exponential_below_the_initial_std_and_linear_above():
    std_init = 0.01
    rho = torch.tensor([-0.1, -0.01, 0.0, 0.01, 0.5], dtype=torch.float64, requires_grad=True)
    std = posterior_std(rho, "exp_linear", std_init)
    expected = torch.where(rho > 0, std_init + rho, std_init * torch.exp(rho / std_init))
    torch.testing.assert_close(std, expected)
    # Near the start an Adam step of size lr in rho moves the std by lr / std_init relative.
    (grad,) = torch.autograd.grad(std[2], rho)
    assert grad[2].item() == pytest.approx(1.0)
    log_std = posterior_log_std(rho, "exp_linear", std_init)
    torch.testing.assert_close(log_std, std.log())


def test_exp_linear_kl_stays_finite_where_the_std_underflows():
    rho = torch.full((3,), -5.0, requires_grad=True)  # std = 0.01 * exp(-500): 0 in float32
    std = posterior_std(rho, "exp_linear", 0.01)
    assert (std == 0).all()
    log_std = posterior_log_std(rho, "exp_linear", 0.01)
    kl = gaussian_kl(torch.zeros(3), std, 0.01, log_std=log_std)
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(rho.grad).all()
    assert kl.item() == pytest.approx(3 * (500.0 - 0.5), rel=1e-6)  # -log(std / prior) - 1/2 per entry


def test_elbo_kl_weight():
    assert elbo_kl_weight((4, 64, 64), 1000) == pytest.approx(2 / (4 * 64 * 64 * 1000))
    assert elbo_kl_weight([16, 8, 8], 1) == pytest.approx(2 / 1024)


@pytest.mark.parametrize(
    "shape, steps, message",
    [
        ((), 1000, "latent_shape must be a non-empty sequence of positive ints, got ()"),
        ((4, 0, 8), 1000, r"latent_shape .* got \(4, 0, 8\)"),
        ((4, 8.0), 1000, r"latent_shape .* got \(4, 8.0\)"),
        ((4, 8, 8), 0, "num_train_timesteps must be a positive int, got 0"),
        ((4, 8, 8), True, "num_train_timesteps must be a positive int, got True"),
    ],
)
def test_elbo_kl_weight_rejects_bad_input(shape, steps, message):
    with pytest.raises(ValueError, match=message):
        elbo_kl_weight(shape, steps)


PARAMETRISATIONS = ["exp_linear", "softplus"]


@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
def test_bounded_std_starts_at_the_initial_std_and_is_unchanged_below_it(parametrisation):
    std_init, std_max = 0.01, 0.1
    rho0 = initial_rho(std_init, parametrisation)
    rho = rho0 + torch.tensor([-0.3, -0.05, -0.001, 0.0])
    bounded = posterior_std(rho, parametrisation, std_init, std_max)
    unbounded = posterior_std(rho, parametrisation, std_init)
    below = unbounded <= std_init
    assert below[:3].all()
    assert torch.equal(bounded[below], unbounded[below])
    if parametrisation == "exp_linear":
        assert (
            posterior_std(torch.zeros(()), parametrisation, std_init, std_max).item() == torch.tensor(std_init).item()
        )
    else:  # softplus(softplus_inverse(std_init)) is std_init to float32 rounding, bounded or not
        assert bounded[3].item() == pytest.approx(std_init, rel=1e-6)


@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounded_std_rises_towards_the_bound_and_keeps_its_gradient(parametrisation, dtype):
    std_init, std_max = 0.01, 0.1
    # softplus' slope at the start is sigmoid(rho) ~ std_init: its rho has to travel further.
    scale = 1 if parametrisation == "exp_linear" else 5
    excess = scale * torch.tensor([1e-6, 1e-3, 0.01, 0.1, 0.5, 1.0], dtype=dtype)
    rho = (initial_rho(std_init, parametrisation) + excess).requires_grad_()
    std = posterior_std(rho, parametrisation, std_init, std_max)
    (grad,) = torch.autograd.grad(std.sum(), rho)
    assert (std[1:] > std[:-1]).all() and (std > std_init).all() and (std < std_max).all()
    assert std[-1].item() > 0.9999 * std_max  # >= 11 headrooms (0.09) above the start
    assert torch.isfinite(grad).all() and (grad > 0).all()
    # Up to the bend the std grows as the unbounded one: slope 1 (exp_linear) or sigmoid(rho) (softplus).
    (unbounded_grad,) = torch.autograd.grad(posterior_std(rho, parametrisation, std_init).sum(), rho)
    assert grad[0].item() == pytest.approx(unbounded_grad[0].item(), rel=1e-4)


@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("std_init, std_max", [(0.01, 0.1), (0.003, 0.03), (0.02, 0.07), (1e-12, 1e-11)])
def test_bounded_std_never_passes_the_bound_even_after_rounding(parametrisation, dtype, std_init, std_max):
    # Far above the start the exponential underflows and the std is std_init + headroom, rounded: still <= std_max.
    rho = (initial_rho(std_init, parametrisation) + torch.tensor([1.0, 1e2, 1e4], dtype=dtype)).requires_grad_()
    std = posterior_std(rho, parametrisation, std_init, std_max)
    (grad,) = torch.autograd.grad(std.sum(), rho)
    assert (std <= torch.tensor(std_max, dtype=dtype)).all() and torch.isfinite(grad).all()
    assert std[-1].item() == pytest.approx(std_max, rel=1e-6)


def test_bounded_std_is_the_documented_curve_and_its_gradient_is_exact():
    std_init, std_max = 0.02, 0.3
    headroom = std_max - std_init
    std = torch.tensor([0.001, 0.02, 0.021, 0.1, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    expected = torch.where(std > std_init, std_init + headroom * (1 - torch.exp(-(std - std_init) / headroom)), std)
    torch.testing.assert_close(bounded_std(std, std_init, std_max), expected)
    assert torch.autograd.gradcheck(lambda s: bounded_std(s, std_init, std_max), (std,))
    # exp_linear's fused form is the same curve over its unbounded std.
    rho = torch.tensor([-0.01, 0.0, 0.001, 0.2, 2.0], dtype=torch.float64, requires_grad=True)
    unbounded = posterior_std(rho, "exp_linear", std_init)
    fused = posterior_std(rho, "exp_linear", std_init, std_max)
    torch.testing.assert_close(fused, bounded_std(unbounded, std_init, std_max))
    assert torch.autograd.gradcheck(lambda r: posterior_std(r, "exp_linear", std_init, std_max), (rho,))


@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
def test_bounded_log_std_is_the_log_of_the_bounded_std_and_stays_finite(parametrisation):
    std_init, std_max = 0.01, 0.1
    rho = initial_rho(std_init, parametrisation) + torch.tensor([-0.05, 0.0, 0.02, 0.5, 50.0])
    rho.requires_grad_()
    std, log_std = posterior_std_and_log_std(rho, parametrisation, std_init, std_max)
    torch.testing.assert_close(std, posterior_std(rho, parametrisation, std_init, std_max))
    torch.testing.assert_close(log_std, posterior_log_std(rho, parametrisation, std_init, std_max))
    torch.testing.assert_close(log_std, std.log())
    # Where the exp_linear std underflows to 0 the log stays exact and the KL finite, as without a bound.
    deep = torch.full((2,), -5.0, requires_grad=True)
    std, log_std = posterior_std_and_log_std(deep, "exp_linear", std_init, std_max)
    kl = gaussian_kl(torch.zeros(2), std, 0.01, log_std=log_std)
    kl.backward()
    assert (std == 0).all() and torch.isfinite(kl) and torch.isfinite(deep.grad).all()
    assert log_std[0].item() == pytest.approx(-5.0 / std_init + math.log(std_init))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bounded_std_in_half_precision_keeps_its_dtype_bound_and_gradient(dtype):
    rho = torch.tensor([-0.01, 0.0, 0.05, 5.0, 20.0], dtype=dtype, requires_grad=True)
    std = posterior_std(rho, "exp_linear", 0.01, 0.1)
    assert std.dtype == dtype and (std <= torch.tensor(0.1, dtype=dtype)).all()
    std.float().sum().backward()
    assert rho.grad.dtype == dtype and torch.isfinite(rho.grad).all()


@pytest.mark.parametrize("std_max", [0.01, 0.005, -1.0, math.nan])
def test_a_bound_not_above_the_initial_std_is_refused(std_max):
    with pytest.raises(
        ValueError, match=rf"posterior_std_max must be > posterior_std_init \(0.01\) or None, got {std_max!r}"
    ):
        posterior_std(torch.zeros(2), "exp_linear", 0.01, std_max)


def test_std_summary_counts_the_stds_near_their_bound():
    stds = [torch.tensor([0.094, 0.095, 0.0999]), torch.tensor([0.5, 0.01]), torch.tensor([0.19, 0.2])]
    summary = std_summary(stds, [0.1, None, 0.2])
    # 0.095 and 0.0999 of the first (>= 0.95 x 0.1), 0.19 and 0.2 of the third; the unbounded 0.5 is not near.
    assert summary["count"] == 7 and summary["near_bound_fraction"] == pytest.approx(4 / 7)
    assert std_summary(stds)["near_bound_fraction"] == 0.0
    assert math.isnan(std_summary([], [])["near_bound_fraction"])
