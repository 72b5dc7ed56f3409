import pytest
import torch
from peft import LoraConfig, PeftConfig
from peft.utils import PeftType

from bayes_adapter import BayesLoraConfig


def test_defaults_are_the_papers_setting():
    config = BayesLoraConfig()
    assert config.peft_type == PeftType.BAYES_LORA
    assert (config.bayesian_factors, config.posterior_std_init, config.prior_std) == ("B", 0.01, 0.01)
    assert (config.estimator, config.sample_at_inference, config.kl_weight) == ("weight", False, 0.0)
    assert isinstance(config, LoraConfig)


def test_lora_fields_keep_working():
    config = BayesLoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["to_q", "to_v"],
        exclude_modules=["skip"],
        rank_pattern={"to_q": 4},
        alpha_pattern={"to_q": 2},
        lora_dropout=0.1,
        modules_to_save=["head"],
        init_lora_weights="gaussian",
    )
    assert config.r == 8 and config.lora_alpha == 16 and config.rank_pattern == {"to_q": 4}
    assert config.target_modules == {"to_q", "to_v"}


def test_every_new_field_has_help():
    import dataclasses

    new_fields = {f.name for f in dataclasses.fields(BayesLoraConfig)} - {
        f.name for f in dataclasses.fields(LoraConfig)
    }
    assert new_fields >= {"bayesian_factors", "posterior_std_init", "prior_std", "estimator", "sample_at_inference"}
    for field in dataclasses.fields(BayesLoraConfig):
        if field.name in new_fields:
            assert field.metadata.get("help"), field.name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bayesian_factors": "C"}, r"bayesian_factors must be one of \('A', 'B', 'AB'\), got 'C'"),
        ({"bayesian_factors": "BA"}, "bayesian_factors must be one of"),
        ({"estimator": "mc"}, r"estimator must be one of \('weight', 'local', 'flipout'\), got 'mc'"),
        ({"posterior_std_init": 0.0}, "posterior_std_init must be a finite number > 0, got 0.0"),
        ({"posterior_std_init": -0.1}, "posterior_std_init must be a finite number > 0"),
        ({"posterior_std_init": float("inf")}, "posterior_std_init must be a finite number > 0"),
        ({"prior_std": "0.1"}, "prior_std must be a finite number > 0, got '0.1'"),
        ({"prior_std": True}, "prior_std must be a finite number > 0, got True"),
        ({"kl_weight": -1.0}, "kl_weight must be a finite number >= 0, got -1.0"),
        ({"kl_weight": float("nan")}, "kl_weight must be a finite number >= 0, got nan"),
        ({"kl_weight": float("inf")}, "kl_weight must be a finite number >= 0, got inf"),
        ({"sample_at_inference": "yes"}, "sample_at_inference must be True or False, got 'yes'"),
        ({"train_posterior_std": 1}, "train_posterior_std must be True or False, got 1"),
        ({"use_dora": True, "estimator": "flipout"}, "use_dora=True needs estimator='weight', got .*'flipout'"),
        ({"init_lora_weights": "mica"}, "init_lora_weights='mica' is a LoRA variant"),
        ({"target_parameters": ["weight"]}, "target_parameters=.* is not supported by BayesLoraConfig"),
        ({"posterior_std_max": 0.01}, r"posterior_std_max must be a finite number > posterior_std_init \(0.01\), "),
        ({"posterior_std_max": 0.005}, r"posterior_std_max must be .*, got 0.005"),
        ({"posterior_std_max": float("inf")}, r"posterior_std_max must be .*, got inf"),
        ({"posterior_std_max": float("nan")}, r"posterior_std_max must be .*, got nan"),
        ({"posterior_std_max": "none"}, r"posterior_std_max must be .* or None \(unbounded\), got 'none'"),
        ({"posterior_std_max": True}, r"posterior_std_max must be .*, got True"),
        ({"posterior_std_init": 0.2, "posterior_std_max": 0.1}, r"> posterior_std_init \(0.2\), .* got 0.1"),
    ],
)
def test_invalid_fields_raise_naming_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BayesLoraConfig(**kwargs)


def test_round_trips_through_peft_config(tmp_path):
    config = BayesLoraConfig(r=3, bayesian_factors="AB", estimator="flipout", prior_std=0.2, kl_weight=0.5)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is BayesLoraConfig
    assert loaded.peft_type == PeftType.BAYES_LORA
    assert (loaded.r, loaded.bayesian_factors, loaded.estimator, loaded.prior_std, loaded.kl_weight) == (
        3,
        "AB",
        "flipout",
        0.2,
        0.5,
    )


@pytest.mark.parametrize("name", ["posterior_std_init", "prior_std"])
@pytest.mark.parametrize("value", [1e-50, 1e-30, 1e-13])
def test_stds_that_float32_cannot_carry_are_refused(name, value):
    with pytest.raises(
        ValueError, match=rf"{name}={value!r} is too small for float32 .* smallest accepted value is 1e-12"
    ):
        BayesLoraConfig(target_modules=["to_q"], **{name: value})


def test_the_smallest_accepted_stds_give_a_finite_kl():
    from peft import get_peft_model
    from tiny_models import randomise, tiny_unet

    import bayes_adapter

    model = get_peft_model(
        tiny_unet(), BayesLoraConfig(target_modules=["to_q"], posterior_std_init=1e-12, prior_std=1e-12)
    )
    randomise(model)
    assert torch.isfinite(bayes_adapter.kl_divergence(model))


def test_the_std_bound_defaults_to_ten_times_the_initial_std_and_round_trips(tmp_path):
    assert BayesLoraConfig().posterior_std_max == pytest.approx(0.1)
    assert BayesLoraConfig(posterior_std_init=0.003).posterior_std_max == pytest.approx(0.03)
    assert BayesLoraConfig(posterior_std_max=None).posterior_std_max is None
    for value in (0.5, None):
        BayesLoraConfig(posterior_std_max=value).save_pretrained(tmp_path / str(value))
        loaded = BayesLoraConfig.from_pretrained(tmp_path / str(value))
        assert loaded.posterior_std_max == value


def test_a_config_saved_without_the_std_bound_loads_unbounded(tmp_path):
    import json

    BayesLoraConfig(target_modules=["to_q"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["posterior_std_max"] == pytest.approx(0.1)
    del saved["posterior_std_max"]
    path.write_text(json.dumps(saved))
    assert BayesLoraConfig.from_pretrained(tmp_path).posterior_std_max is None
