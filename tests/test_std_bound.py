"""The default bound on the posterior std (`posterior_std_max`), end to end: training, the KL, statistics, loading."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

import bayes_adapter
from bayes_adapter import BayesLoraConfig, BayesLoraLayer, posterior_std_stats, posterior_stds
from bayes_adapter.bayes import gaussian_kl, posterior_std


def tiny_bayes_model(**config) -> nn.Module:
    """A PeftModel over one Linear(6, 5), both factors Bayesian, prior std 10 unless `config` says otherwise."""
    torch.manual_seed(0)
    # init_lora_weights=False: B random too, so that both factors' noise reaches the output from the first step.
    config = {"target_modules": ["0"], "r": 2, "lora_alpha": 2, "init_lora_weights": False, **config}
    config = {"bayesian_factors": "AB", "prior_std": 10.0, **config}
    return get_peft_model(nn.Sequential(nn.Linear(6, 5)), BayesLoraConfig(**config))


def drive_stds_up(model: nn.Module, steps: int = 2000, lr: float = 1e-2) -> bool:
    """Adam on the stds alone (means frozen), for a loss that rewards a larger std: minus the squared noise of the
    output (through the estimator's sampling) plus the KL to a prior of std 10, whose `-log(std)` pushes every std up
    on every step (the noise term alone lets a std that once shrank stay small: its pull is proportional to it).
    Returns whether every gradient of every step was finite."""
    torch.manual_seed(1)
    x = torch.randn(8, 6)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_posterior_rho" in name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.eval()
    with torch.no_grad():
        mean_output = model(x)
    model.train()
    finite = True
    for _ in range(steps):
        loss = -(model(x) - mean_output).pow(2).mean() + bayes_adapter.kl_divergence(model)
        optimizer.zero_grad()
        loss.backward()
        finite = finite and all(bool(torch.isfinite(p.grad).all()) for p in params)
        optimizer.step()
    return finite


@pytest.mark.slow  # ~8 s each on a loaded 2-core machine
@pytest.mark.parametrize("parametrisation", ["exp_linear", "softplus"])
@pytest.mark.parametrize("estimator", ["weight", "local", "flipout"])
def test_two_thousand_adam_steps_at_lr_1e_2_keep_every_default_std_under_its_bound(parametrisation, estimator):
    model = tiny_bayes_model(posterior_std_parametrisation=parametrisation, estimator=estimator)
    bound = model.peft_config["default"].posterior_std_max
    assert bound == pytest.approx(10 * 0.01)  # the default
    assert drive_stds_up(model)
    stds = posterior_stds(model)
    assert stds.numel() == 2 * (6 + 5)
    # float32: the bound as float32 rounds it (the std never reaches it before rho is ~1e4 past the start).
    assert (stds <= torch.tensor(bound)).all() and (stds > bound / 2).all(), stds
    assert posterior_std_stats(model)["near_bound_fraction"] > 0.5
    # The bound fades the gradient but never cuts it: every std can still move (Adam's steps shrank with it).
    layer = next(m for m in model.modules() if isinstance(m, BayesLoraLayer))
    stds = [layer.posterior_std("default", f) for f in "AB"]
    slopes = torch.autograd.grad(sum(s.sum() for s in stds), [layer.posterior_rho("default", f) for f in "AB"])
    assert all((slope > 0).all() for slope in slopes)


def test_without_the_bound_the_same_steps_take_the_std_far_past_it():
    model = tiny_bayes_model(estimator="weight", posterior_std_max=None)
    assert drive_stds_up(model)
    assert posterior_stds(model).min().item() > 10 * 0.1
    assert posterior_std_stats(model)["near_bound_fraction"] == 0.0


def test_the_kl_and_the_samples_use_the_bounded_std():
    model = tiny_bayes_model(prior_std=0.05)
    layer = next(m for m in model.modules() if isinstance(m, BayesLoraLayer))
    with torch.no_grad():
        for factor in "AB":
            layer.posterior_rho("default", factor).copy_(
                torch.linspace(-0.02, 3.0, layer.posterior_rho("default", factor).numel()).reshape_as(
                    layer.posterior_rho("default", factor)
                )
            )
    stds = {f: layer.posterior_std("default", f) for f in "AB"}
    for f, std in stds.items():
        expected = posterior_std(layer.posterior_rho("default", f), "exp_linear", 0.01, 0.1)
        assert torch.equal(std, expected) and (std < 0.1 + 1e-8).all() and std.max() > 0.09
    expected_kl = sum(gaussian_kl(layer.factor_mean(f, "default"), stds[f], 0.05) for f in "AB")
    torch.testing.assert_close(bayes_adapter.kl_divergence(model), expected_kl)
    torch.testing.assert_close(layer.kl_divergence("default"), expected_kl)
    # The sampled output's spread is the bounded std's: weight samples of B around its mean.
    model.train()
    draws = torch.stack(
        [layer.sample_factor("B", "default", torch.eye(2), layer.bayes_settings["default"]) for _ in range(4000)]
    )
    torch.testing.assert_close(draws.std(0), stds["B"].T, rtol=0.08, atol=0)


def test_posterior_std_stats_reports_the_fraction_near_each_adapters_bound():
    model = tiny_bayes_model(posterior_std_max=0.2)
    layer = next(m for m in model.modules() if isinstance(m, BayesLoraLayer))
    with torch.no_grad():
        layer.posterior_rho("default", "A").fill_(100.0)  # std within 5% of 0.2: 12 of the 22
    stats = posterior_std_stats(model)
    assert stats["count"] == 22 and stats["near_bound_fraction"] == pytest.approx(12 / 22)
    assert 0.19 < stats["max"] <= torch.tensor(0.2).item()


def test_loading_weights_saved_with_another_bound_is_refused(tmp_path):
    saved = tiny_bayes_model(posterior_std_max=0.2)
    saved.save_pretrained(str(tmp_path))
    model = tiny_bayes_model()
    with pytest.raises(
        ValueError, match=r"was saved with posterior_std_max=0.2, but adapter 'default' of the model has 0.1"
    ):
        bayes_adapter.load_bayesian_weights(model, tmp_path, component="unet")
