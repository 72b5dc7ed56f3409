"""The layer matrix: every module type x Bayesian factors x estimator."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from tiny_models import assert_same_numerics
from torch import nn
from torch.distributions import Normal, kl_divergence
from transformers.pytorch_utils import Conv1D

import bayes_adapter
from bayes_adapter import BayesLoraConfig, BayesLoraLayer


class Wrapper(nn.Module):
    def __init__(self, target: nn.Module):
        super().__init__()
        self.target = target

    def forward(self, x):
        return self.target(x)


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 7)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 4, 4, 4)),
    "embedding": (lambda: nn.Embedding(10, 6), lambda: torch.randint(0, 10, (3, 5))),
    "conv1d_transformers": (lambda: Conv1D(5, 6), lambda: torch.randn(3, 4, 6)),
}
FACTORS = ["A", "B", "AB"]
ESTIMATORS = ["weight", "local", "flipout"]
matrix = pytest.mark.parametrize("layer_type", list(LAYERS))
factors = pytest.mark.parametrize("bayesian_factors", FACTORS)
estimators = pytest.mark.parametrize("estimator", ESTIMATORS)


def make_base(layer_type):
    torch.manual_seed(0)
    make_layer, make_input = LAYERS[layer_type]
    return Wrapper(make_layer()), make_input()


def bayes_model(layer_type, **config):
    # init_lora_weights=False leaves B random (not zero), so that both factors influence the output.
    base, x = make_base(layer_type)
    config = {"target_modules": ["target"], "r": 2, "lora_alpha": 3, "init_lora_weights": False, **config}
    if layer_type == "embedding" and "bayesian_factors" in config:  # the very factors named, not their roles
        config.setdefault("embedding_bayesian_factors", config["bayesian_factors"])
    return get_peft_model(base, BayesLoraConfig(**config)), x


def bayes_layer(model) -> BayesLoraLayer:
    return model.base_model.model.target


@matrix
def test_each_module_type_gets_a_bayesian_lora_layer(layer_type):
    model, _ = bayes_model(layer_type)
    layer = bayes_layer(model)
    assert isinstance(layer, BayesLoraLayer) and isinstance(layer, LoraLayer)
    assert set(layer.bayes_settings) == {"default"}
    assert repr(layer).startswith(f"bayes_lora.{type(layer).__name__}(")


@matrix
@factors
@estimators
def test_train_mode_samples_eval_mode_is_deterministic(layer_type, bayesian_factors, estimator):
    model, x = bayes_model(layer_type, bayesian_factors=bayesian_factors, estimator=estimator)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@matrix
@factors
@estimators
def test_eval_output_is_bit_identical_to_plain_lora(layer_type, bayesian_factors, estimator):
    model, x = bayes_model(layer_type, bayesian_factors=bayesian_factors, estimator=estimator, lora_dropout=0.3)
    base, _ = make_base(layer_type)
    plain = get_peft_model(base, LoraConfig(target_modules=["target"], r=2, lora_alpha=3, lora_dropout=0.3))
    means = {k: v for k, v in model.state_dict().items() if "posterior" not in k}
    plain.load_state_dict(means, strict=True)
    model.eval()
    plain.eval()
    assert torch.equal(model(x), plain(x))


@matrix
@factors
@estimators
def test_gradients_reach_means_and_posterior_stds(layer_type, bayesian_factors, estimator):
    model, x = bayes_model(layer_type, bayesian_factors=bayesian_factors, estimator=estimator)
    model.train()
    (model(x) ** 2).sum().backward()
    layer = bayes_layer(model)
    for factor in bayesian_factors:
        rho = getattr(layer, f"lora_posterior_rho_{factor}")["default"]
        assert rho.requires_grad and rho.grad is not None and rho.grad.abs().sum() > 0
        assert layer.factor_mean(factor, "default").grad.abs().sum() > 0


@matrix
@factors
def test_kl_matches_torch_distributions(layer_type, bayesian_factors):
    model, _ = bayes_model(layer_type, bayesian_factors=bayesian_factors, prior_std=0.7, posterior_std_init=0.05)
    layer = bayes_layer(model)
    expected = 0.0
    for factor in bayesian_factors:
        mean = layer.factor_mean(factor, "default")
        std = layer.posterior_std("default", factor)
        expected = expected + kl_divergence(Normal(mean, std), Normal(torch.zeros_like(mean), 0.7)).sum()
    kl = bayes_adapter.kl_divergence(model)
    assert kl.dim() == 0
    torch.testing.assert_close(kl, expected)
    kl.backward()
    rho = getattr(layer, f"lora_posterior_rho_{bayesian_factors[-1]}")["default"]
    assert rho.grad.abs().sum() > 0


@matrix
@factors
def test_save_load_round_trip_is_exact(layer_type, bayesian_factors, tmp_path):
    model, x = bayes_model(layer_type, bayesian_factors=bayesian_factors, estimator="flipout")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "posterior" in name:
                param.uniform_(-6, -3)
    model.save_pretrained(tmp_path)
    base, _ = make_base(layer_type)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    expected = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    actual = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert expected.keys() == actual.keys()
    assert any("posterior" in k for k in actual)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert bayes_layer(loaded).bayes_settings["default"].estimator == "flipout"
    model.eval()
    loaded.eval()
    assert_same_numerics(model(x), loaded(x))  # the loaded weights crossed a file


@matrix
@factors
def test_merge_equals_eval_output(layer_type, bayesian_factors):
    model, x = bayes_model(layer_type, bayesian_factors=bayesian_factors)
    model.eval()
    expected = model(x).detach()
    model.base_model.merge_adapter()
    model.train()  # merged: no sampling even in train mode
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.base_model.unmerge_adapter()
    model.eval()
    torch.testing.assert_close(model(x), expected)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x), expected)


@matrix
def test_disabled_adapter_returns_the_base_output(layer_type):
    model, x = bayes_model(layer_type)
    base, _ = make_base(layer_type)
    model.train()
    with model.disable_adapter():
        assert torch.equal(model(x), base(x))


@matrix
def test_sample_at_inference_keeps_sampling_in_eval(layer_type):
    model, x = bayes_model(layer_type, sample_at_inference=True)
    model.eval()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_sample_the_posterior_predictive_variance(estimator):
    """Per example and output element, all three estimators have the posterior's output variance."""
    torch.manual_seed(0)
    model, _ = bayes_model("linear", bayesian_factors="B", estimator=estimator, posterior_std_init=0.3)
    layer = bayes_layer(model)
    x = torch.randn(1, 6).expand(2, 6)
    model.train()
    with torch.no_grad():
        # "weight" shares one sample per forward, so the draws come from many forwards, one row of each.
        draws = torch.cat([model(x)[:1] for _ in range(3000)])
        hidden = layer.lora_A["default"](x[:1])
        scaling = layer.scaling["default"]
        expected_var = (hidden**2) @ (layer.posterior_std("default", "B") ** 2).T * scaling**2
    model.eval()
    with torch.no_grad():
        expected_mean = model(x[:1])
    torch.testing.assert_close(draws.mean(0, keepdim=True), expected_mean, atol=0.05, rtol=0)
    torch.testing.assert_close(draws.var(0, keepdim=True), expected_var, rtol=0.1, atol=0)


def test_weight_estimator_shares_one_sample_across_the_batch_local_does_not():
    # Two equal inputs in one batch: rows of one gemm agree to float32 rounding (~1e-7), not always bit for bit,
    # while the weight noise (std 0.3) separates the rows of per-example estimators by far more.
    for estimator, shared in (("weight", True), ("local", False), ("flipout", False)):
        model, _ = bayes_model("linear", estimator=estimator, posterior_std_init=0.3)
        x = torch.randn(1, 6).expand(2, 6)
        model.train()
        out = model(x)
        if shared:
            assert_same_numerics(out[0], out[1], msg=estimator)
        else:
            assert (out[0] - out[1]).abs().max() > 1e-3, estimator


def test_fixed_posterior_std_is_not_trained():
    model, x = bayes_model("linear", train_posterior_std=False, posterior_std_init=0.2)
    rho = bayes_layer(model).lora_posterior_rho_B["default"]
    assert not rho.requires_grad
    assert all("posterior" not in n for n, p in model.named_parameters() if p.requires_grad)
    model.train()
    assert not torch.equal(model(x), model(x))


def test_second_adapter_set_adapter_and_delete_adapter():
    model, x = bayes_model("linear")
    model.add_adapter("other", BayesLoraConfig(target_modules=["target"], r=3, bayesian_factors="AB"))
    layer = bayes_layer(model)
    assert set(layer.lora_posterior_rho_B) == {"default", "other"} and set(layer.lora_posterior_rho_A) == {"other"}
    model.eval()
    out_default = model(x)
    model.set_adapter("other")
    assert layer.active_adapters == ["other"]
    assert layer.lora_posterior_rho_A["other"].requires_grad
    assert not layer.lora_posterior_rho_B["default"].requires_grad
    assert not torch.equal(model(x), out_default)
    model.delete_adapter("other")
    assert set(layer.lora_posterior_rho_B) == {"default"} and set(layer.lora_posterior_rho_A) == set()
    assert set(layer.bayes_settings) == {"default"}
    model.set_adapter("default")
    assert torch.equal(model(x), out_default)


def test_kl_only_counts_active_adapters_and_named_ones():
    model, _ = bayes_model("linear", bayesian_factors="AB", prior_std=0.5)
    model.add_adapter("other", BayesLoraConfig(target_modules=["target"], r=3, prior_std=0.5, init_lora_weights=False))
    layer = bayes_layer(model)
    default_kl = layer.kl_divergence("default")
    torch.testing.assert_close(bayes_adapter.kl_divergence(model), default_kl)
    torch.testing.assert_close(
        bayes_adapter.kl_divergence(model, ["default", "other"]), default_kl + layer.kl_divergence("other")
    )
    with pytest.raises(ValueError, match=r"adapter_names=\['nope'\] are not Bayesian adapters"):
        bayes_adapter.kl_divergence(model, ["nope"])


def test_kl_is_a_zero_tensor_when_nothing_is_bayesian():
    base, _ = make_base("linear")
    kl = bayes_adapter.kl_divergence(get_peft_model(base, LoraConfig(target_modules=["target"])))
    assert isinstance(kl, torch.Tensor) and kl.dim() == 0 and kl.item() == 0.0
