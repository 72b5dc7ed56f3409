"""Export of bad input: a clear error before anything is written, and nothing left behind by a failure."""

from __future__ import annotations

import os

import pytest
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny_models import (
    bayesian_unet,
    tiny_unet,
    unet_config,
)

from bayes_adapter import BayesLoraConfig, export_lora
from bayes_adapter import export as export_module


def test_refuses_model_without_bayesian_adapter(tmp_path):
    with pytest.raises(ValueError, match="no PEFT adapter"):
        export_lora(tiny_unet(), tmp_path / "a")
    plain = tiny_unet()
    plain.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="no Bayesian LoRA adapter"):
        export_lora(plain, tmp_path / "b")
    plain_peft = get_peft_model(tiny_unet(), LoraConfig(r=2, target_modules=["to_q"]))
    plain_peft.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="peft_type 'LORA'"):
        export_lora(tmp_path / "plain", tmp_path / "c")
    with pytest.raises(ValueError, match=r"adapter_name='default'.*adapters found: \['plain'\]"):
        export_lora(tmp_path, tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        export_lora(tmp_path / "empty", tmp_path / "e")
    assert sorted(os.listdir(tmp_path)) == ["empty", "plain"]


def test_refuses_unknown_adapter_and_bad_arguments(tmp_path):
    model = bayesian_unet("peft")
    with pytest.raises(ValueError, match=r"adapter_name='nope'.*\['default'\]"):
        export_lora(model, tmp_path / "a", adapter_name="nope")
    with pytest.raises(ValueError, match="format must be one of"):
        export_lora(model, tmp_path / "a", format="ckpt")
    with pytest.raises(ValueError, match="component must be one of"):
        export_lora(model, tmp_path / "a", component="vae")
    with pytest.raises(ValueError, match="source must be a model"):
        export_lora([1], tmp_path / "a")
    with pytest.raises(ValueError, match="pipeline_cls must be a diffusers pipeline class"):
        export_lora({"unet": model}, tmp_path / "a")
    model.save_pretrained(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="is the source folder"):
        export_lora(tmp_path / "saved", tmp_path / "saved", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_refuses_existing_output_unless_overwrite(tmp_path):
    model = bayesian_unet()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_lora(model, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    export_lora(model, tmp_path / "out", overwrite=True)
    assert "keep.txt" not in os.listdir(tmp_path / "out")
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or backup folder left


def test_refuses_merged_adapter(tmp_path):
    model = bayesian_unet("peft")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged.*unmerge_adapter"):
        export_lora(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.unmerge_adapter()
    export_lora(model, tmp_path / "out")


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_export_leaves_nothing_that_looks_valid(tmp_path, monkeypatch, existing):
    model = bayesian_unet()
    if existing:
        export_lora(model, tmp_path / "out", format="peft")
    before = sorted(os.listdir(tmp_path / "out")) if existing else None

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the PEFT files were written

    monkeypatch.setattr(export_module, "_save_diffusers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_lora(model, tmp_path / "out", overwrite=existing)
    assert sorted(os.listdir(tmp_path)) == (["out"] if existing else [])
    if existing:
        assert sorted(os.listdir(tmp_path / "out")) == before


def test_sdxl_second_text_encoder_needs_its_component(tmp_path):
    from peft import inject_adapter_in_model
    from tiny_models import tiny_text_config
    from transformers import CLIPTextModelWithProjection

    encoder = CLIPTextModelWithProjection(tiny_text_config(projection_dim=8))
    inject_adapter_in_model(BayesLoraConfig(r=2, target_modules=["q_proj"]), encoder)
    with pytest.raises(ValueError, match="cannot tell which pipeline component a CLIPTextModelWithProjection is"):
        export_lora(encoder, tmp_path / "guess")
    assert not (tmp_path / "guess").exists()
    out = export_lora(encoder, tmp_path / "te2", component="text_encoder_2", format=["diffusers", "kohya"])
    assert all(key.startswith("text_encoder_2.") for key in load_file(str(out / "pytorch_lora_weights.safetensors")))
    assert all(key.startswith("lora_te2_") for key in load_file(str(out / "lora_kohya.safetensors")))


def test_unreadable_saved_adapter_is_a_clear_error(tmp_path):
    model = get_peft_model(tiny_unet(), unet_config())
    model.save_pretrained(str(tmp_path / "adapter"))
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors' is not a readable safetensors file"):
        export_lora(tmp_path / "adapter", tmp_path / "out")
    (tmp_path / "adapter" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        export_lora(tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_into_a_folder_holding_the_source_is_refused_and_deletes_nothing(tmp_path):
    run = tmp_path / "run"
    bayesian_unet("peft").save_pretrained(str(run / "bayesian_adapter" / "unet"))
    (run / "checkpoint-2").mkdir()
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="contains the source folder"):
        export_lora(run / "bayesian_adapter" / "unet", run, overwrite=True)
    with pytest.raises(TypeError, match="format must be one of"):
        export_lora(run / "bayesian_adapter" / "unet", tmp_path / "out", format=None)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
