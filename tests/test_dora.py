"""Bayesian DoRA (`use_dora=True`, `variants.BayesDoraLinearVariant`): the magnitude deterministic, the low-rank
direction Bayesian; the weight norm over the sampled weight in training and over the mean in eval, merge and export."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import assert_same_numerics, randomise
from tiny_t5_dit_models import T5_WIDTH, tiny_sd3_pipeline
from torch import nn

import bayes_adapter
from bayes_adapter import BayesLoraConfig, export_lora


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


def bayesian_dora_mlp(**overrides) -> nn.Module:
    """A small MLP with a Bayesian DoRA adapter: random means, spread-out stds, a magnitude off its initial value."""
    config = dict(r=2, lora_alpha=3, target_modules=["0", "2"], use_dora=True, bayesian_factors="AB")
    model = get_peft_model(small_mlp(), BayesLoraConfig(**{**config, **overrides}))
    randomise(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.5)
    return model


def test_eval_is_plain_peft_dora_with_the_same_weights():
    model = bayesian_dora_mlp().eval()
    plain = get_peft_model(small_mlp(), LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"], use_dora=True))
    state = {k: v for k, v in model.state_dict().items() if "posterior" not in k}
    assert not plain.load_state_dict(state, strict=False).unexpected_keys
    plain.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_training_normalises_the_sampled_weight():
    model = bayesian_dora_mlp().train()
    layer = model.base_model.model[0]
    x = torch.randn(5, 8)
    torch.manual_seed(3)
    output = layer(x)
    torch.manual_seed(3)  # the same draws, in the layer's order: A, then B
    A = layer.lora_A["default"].weight + layer.posterior_std("default", "A") * torch.randn(2, 8)
    B = layer.lora_B["default"].weight + layer.posterior_std("default", "B") * torch.randn(16, 2)
    base = layer.get_base_layer()
    direction = base.weight + layer.scaling["default"] * B @ A
    magnitude = layer.lora_magnitude_vector["default"].weight
    expected = x @ (magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)).T + base.bias
    assert_same_numerics(output.detach(), expected.detach())
    # Two draws differ: the direction is sampled.
    assert not torch.equal(layer(x), output)


def test_magnitude_is_deterministic_and_trains():
    model = bayesian_dora_mlp()
    layer = model.base_model.model[0]
    assert set(layer.posterior_param_names) == {"lora_posterior_rho_A", "lora_posterior_rho_B"}
    assert not any("magnitude" in name and "rho" in name for name, _ in model.named_parameters())
    magnitude = layer.lora_magnitude_vector["default"].weight
    assert magnitude.requires_grad
    groups = bayes_adapter.param_groups(model)
    assert any(p is magnitude for p in groups[0]["params"])
    model.train()
    (model(torch.randn(4, 8)).pow(2).mean() + bayes_adapter.kl_loss(model, 4)).backward()
    assert magnitude.grad.abs().sum() > 0
    assert layer.posterior_rho("default", "B").grad.abs().sum() > 0


def test_merge_gives_the_eval_output():
    model = bayesian_dora_mlp().eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = model(x)
        merged = model.merge_and_unload()
        assert_same_numerics(merged(x), expected)


def test_export_is_a_plain_dora_adapter_that_peft_and_diffusers_load(tmp_path):
    pipe = tiny_sd3_pipeline()
    transformer = pipe.transformer
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    transformer.add_adapter(BayesLoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    randomise(transformer)
    inputs = {
        "hidden_states": torch.randn(1, 4, 16, 16),
        "encoder_hidden_states": torch.randn(1, 6, T5_WIDTH),
        "pooled_projections": torch.randn(1, 16),
        "timestep": torch.tensor([500.0]),
    }
    transformer.eval()
    with torch.no_grad():
        reference = transformer(**inputs).sample
    out = export_lora(transformer, tmp_path / "export", component="transformer")
    # PEFT: a LORA config with use_dora, the magnitudes beside the factors.
    config = LoraConfig.from_pretrained(str(out))
    assert config.peft_type == "LORA" and config.use_dora
    vanilla = tiny_sd3_pipeline()
    with torch.no_grad():
        before = vanilla.transformer(**inputs).sample
    peft_model = PeftModel.from_pretrained(tiny_sd3_pipeline().transformer, str(out)).eval()
    with torch.no_grad():
        assert_same_numerics(peft_model(**inputs).sample, reference)
    # diffusers: load_lora_weights reads use_dora from the metadata and loads the magnitudes.
    vanilla.load_lora_weights(str(out))
    layer = vanilla.transformer.transformer_blocks[0].attn.to_q
    assert layer.lora_magnitude_vector and not list(bayes_adapter.bayes_layers(vanilla.transformer))
    with torch.no_grad():
        after = vanilla.transformer(**inputs).sample
    assert_same_numerics(after, reference)
    assert (after - before).abs().max() > 1e-3


def test_dora_refusals_name_the_reason(tmp_path):
    with pytest.raises(ValueError, match="use_dora=True needs estimator='weight', got estimator='local'"):
        BayesLoraConfig(use_dora=True, estimator="local")
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="Bayesian DoRA is not available on Conv2d layers"):
        get_peft_model(model, BayesLoraConfig(target_modules=["0"], use_dora=True))
    with pytest.raises(ValueError, match="format='kohya' cannot carry a DoRA adapter"):
        export_lora(bayesian_dora_mlp(), tmp_path / "kohya", component="unet", format="kohya")
    assert not (tmp_path / "kohya").exists()
