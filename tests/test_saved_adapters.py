"""Adapters saved by earlier versions load, evaluate and export exactly as they were saved (tests/fixtures)."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import ADAPTER_V0_1_0, ADAPTER_V0_2_0, assert_same_numerics, tiny_unet

import bayes_adapter
from bayes_adapter import BayesLoraLayer, export_lora, kl_loss


def test_adapter_saved_by_v0_2_0_loads_unbounded_with_its_outputs_stds_and_kl():
    """0.2.0 had no std bound: its config has no `posterior_std_max`, and must load with None, not the new default.
    Its stds go up to ~20 x std_init, so the default bound (10 x) would change them and the KL."""
    reference = load_file(str(ADAPTER_V0_2_0 / "reference_v0_2_0.safetensors"))
    assert "posterior_std_max" not in json.loads((ADAPTER_V0_2_0 / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(tiny_unet(), str(ADAPTER_V0_2_0))
    config = model.peft_config["default"]
    assert (config.posterior_std_max, config.posterior_std_parametrisation) == (None, "exp_linear")
    model.eval()
    with torch.no_grad():
        output = model(reference["x"], torch.tensor([10]), reference["enc"]).sample
        assert_same_numerics(output, reference["eval_output"])
        layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, BayesLoraLayer)}
        stds = [reference[f"posterior_std.{name}.{f}"] for name in layers for f in "AB"]
        assert max(std.max().item() for std in stds) > 10 * config.posterior_std_init
        for name, layer in layers.items():
            for factor in "AB":
                std, log_std = layer.posterior_std_and_log_std("default", factor)
                assert_same_numerics(std, reference[f"posterior_std.{name}.{factor}"], msg=name)
                assert_same_numerics(log_std, reference[f"posterior_log_std.{name}.{factor}"], msg=name)
        assert_same_numerics(bayes_adapter.kl_divergence(model), reference["kl_divergence"])
        assert_same_numerics(kl_loss(model, num_examples=3), reference["kl_loss"])
        assert bayes_adapter.posterior_std_stats(model)["near_bound_fraction"] == 0.0


def _safetensors(path):
    with safe_open(str(path), "pt") as file:
        return file.metadata(), {key: file.get_tensor(key) for key in file.keys()}


def test_adapter_saved_by_v0_2_0_exports_as_0_2_0_exported_it(tmp_path):
    saved = ADAPTER_V0_2_0 / "export_v0_2_0"
    out = export_lora(ADAPTER_V0_2_0, tmp_path / "export", format=("peft", "diffusers", "kohya"))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in saved.iterdir())
    for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        (metadata, tensors), (saved_metadata, saved_tensors) = _safetensors(out / name), _safetensors(saved / name)
        assert metadata == saved_metadata, name
        assert tensors.keys() == saved_tensors.keys(), name
        for key, tensor in tensors.items():
            assert torch.equal(tensor, saved_tensors[key]), (name, key)  # copies of stored tensors: every bit
    config, saved_config = (json.loads((folder / "adapter_config.json").read_text()) for folder in (out, saved))
    for c in (config, saved_config):  # PEFT writes target_modules from a set: in hash order
        c.update(peft_version=None, target_modules=sorted(c["target_modules"]))
    assert config == saved_config
    summary, saved_summary = (json.loads((folder / "bayes_lora_export.json").read_text()) for folder in (out, saved))
    # What later versions add: the bound (None: unbounded) and the fraction of stds near it (none).
    assert summary["bayesian"].pop("posterior_std_max") is None
    assert summary["posterior_std"].pop("near_bound_fraction") == 0.0
    stats, saved_stats = summary.pop("posterior_std"), saved_summary.pop("posterior_std")
    assert stats == pytest.approx(saved_stats, rel=1e-6)
    summary.pop("exported_by"), saved_summary.pop("exported_by")
    assert summary == saved_summary


def test_adapter_saved_by_v0_1_0_loads_and_exports_unbounded(tmp_path):
    model = PeftModel.from_pretrained(tiny_unet(), str(ADAPTER_V0_1_0))
    assert model.peft_config["default"].posterior_std_max is None
    reference = load_file(str(ADAPTER_V0_1_0 / "reference_v0_1_0.safetensors"))
    summary = json.loads((export_lora(ADAPTER_V0_1_0, tmp_path / "out") / "bayes_lora_export.json").read_text())
    assert summary["bayesian"]["posterior_std_max"] is None
    stds = torch.cat([v.flatten() for k, v in reference.items() if k.startswith("posterior_std.")])
    assert summary["posterior_std"]["max"] == pytest.approx(stds.max().item(), rel=1e-6)
    assert summary["posterior_std"]["near_bound_fraction"] == 0.0
