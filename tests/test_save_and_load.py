"""The Bayesian adapter on disk: save_bayesian_adapter, load_bayesian_weights (export.py's formats are elsewhere)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from tiny_models import assert_same_numerics, bayesian_unet, run_unet, tiny_unet, unet_config, unet_inputs

import bayes_adapter
from bayes_adapter import BayesLoraConfig, load_bayesian_weights, save_bayesian_adapter


@pytest.mark.parametrize("wrap", ["peft", "add_adapter"])
def test_saved_adapter_loads_back_into_a_model_holding_it(tmp_path, wrap):
    model = bayesian_unet(wrap)
    folder = save_bayesian_adapter(model, tmp_path / "adapter")
    fresh = get_peft_model(tiny_unet(), unet_config()) if wrap == "peft" else tiny_unet()
    if wrap == "add_adapter":
        fresh.add_adapter(unet_config())
    load_bayesian_weights(fresh, folder)
    expected, got = get_peft_model_state_dict(model), get_peft_model_state_dict(fresh)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # The mean is a reduction over tensors read from a file: equal to float32 rounding, not bit for bit.
    assert bayes_adapter.posterior_std_stats(fresh) == pytest.approx(
        bayes_adapter.posterior_std_stats(model), rel=1e-6
    )
    # The folder is PEFT's own layout.
    restored = PeftModel.from_pretrained(tiny_unet(), str(folder)).eval()
    fresh.eval()
    assert_same_numerics(run_unet(restored, unet_inputs()), run_unet(fresh, unet_inputs()))  # weights from files


def test_save_refuses_an_existing_folder_unless_asked(tmp_path):
    model = bayesian_unet()
    save_bayesian_adapter(model, tmp_path / "a")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_bayesian_adapter(model, tmp_path / "a")
    save_bayesian_adapter(model, tmp_path / "a", overwrite=True)


def test_load_refuses_other_targets_before_changing_anything(tmp_path):
    folder = save_bayesian_adapter(bayesian_unet(), tmp_path / "adapter")
    other = tiny_unet()
    other.add_adapter(BayesLoraConfig(target_modules=["to_q"], r=4, bayesian_factors="AB"))
    before = {k: v.clone() for k, v in get_peft_model_state_dict(other).items()}
    with pytest.raises(
        ValueError, match=r"does not match adapter 'default' of the UNet2DConditionModel: missing \[\]"
    ):
        load_bayesian_weights(other, folder)
    assert all(torch.equal(v, get_peft_model_state_dict(other)[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="adapter_name='nope' is not a Bayesian adapter"):
        load_bayesian_weights(other, folder, adapter_name="nope")


def test_cast_adapter_params_casts_frozen_posteriors_too():
    unet = tiny_unet().to(torch.bfloat16)
    unet.add_adapter(BayesLoraConfig(target_modules=["to_q"], train_posterior_std=False))
    unet.to(torch.bfloat16)
    bayes_adapter.cast_adapter_params(unet, torch.float32)
    adapter = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    assert any("posterior" in n and not p.requires_grad for n, p in adapter.items())
    assert all(p.dtype == torch.float32 for p in adapter.values())
    assert all(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if "lora_" not in n)


def test_a_saved_adapter_is_checked_against_its_own_config(tmp_path):
    import json

    folder = save_bayesian_adapter(bayesian_unet(), tmp_path / "adapter")
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(r=8, rank_pattern={})  # the tensors are rank 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter: .*lora_A.weight has rank 4 .* gives '.*' rank 8"):
        bayes_adapter.export_lora(folder, tmp_path / "out")
    config.update(r="4")
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"has r='4'; expected > 0"):
        bayes_adapter.export_lora(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_component_contradicting_the_recorded_base_model_is_refused(tmp_path):
    folder = tmp_path / "adapter"
    get_peft_model(tiny_unet(), unet_config()).save_pretrained(str(folder))
    with pytest.raises(ValueError, match="component='text_encoder' contradicts .* is a 'unet'"):
        bayes_adapter.export_lora(folder, tmp_path / "out", component="text_encoder")
    assert not (tmp_path / "out").exists()
    # An add_adapter model records no base class in PEFT's save; ours records it, in memory and in what it saves.
    unet = bayesian_unet()
    with pytest.raises(ValueError, match="contradicts the UNet2DConditionModel in memory: its base_model_class"):
        bayes_adapter.export_lora(unet, tmp_path / "out", component="text_encoder")
    saved = save_bayesian_adapter(unet, tmp_path / "saved")
    with pytest.raises(ValueError, match="component='text_encoder' contradicts the adapter in"):
        bayes_adapter.export_lora(saved, tmp_path / "out", component="text_encoder")
    assert not (tmp_path / "out").exists()


def test_weights_saved_under_another_parametrisation_are_refused(tmp_path):
    folder = save_bayesian_adapter(bayesian_unet(), tmp_path / "adapter")
    other = tiny_unet()
    other.add_adapter(unet_config(posterior_std_parametrisation="softplus"))
    with pytest.raises(ValueError, match="saved with posterior_std_parametrisation='exp_linear', but .* 'softplus'"):
        load_bayesian_weights(other, folder)
    other = tiny_unet()
    other.add_adapter(unet_config(posterior_std_init=0.02))
    with pytest.raises(ValueError, match="saved with posterior_std_init=0.01, but .* 0.02"):
        load_bayesian_weights(other, folder)
