"""Export in the kohya layout (ComfyUI, A1111): keys, alphas, and what diffusers' own conversion loads."""

from __future__ import annotations

import os

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import (
    assert_same_numerics,
    bayesian_unet,
    randomise,
    run_unet,
    tiny_pipeline,
    tiny_text_encoder,
    unet_config,
    unet_inputs,
)

from bayes_adapter import BayesLoraConfig, export_lora


@pytest.mark.parametrize("alpha_pattern", [{}, {"to_v": 3}], ids=["uniform_alpha", "alpha_pattern"])
def test_kohya_format_round_trips_through_diffusers(tmp_path, alpha_pattern):
    pipe = tiny_pipeline()
    model = bayesian_unet("add_adapter", unet_config(alpha_pattern=alpha_pattern))
    reference = run_unet(model, unet_inputs())
    out = export_lora(model, tmp_path / "kohya", format="kohya")

    assert sorted(os.listdir(out)) == ["bayes_lora_export.json", "lora_kohya.safetensors"]
    weights = load_file(str(out / "lora_kohya.safetensors"))
    assert all(
        k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in weights
    )
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in weights

    pipe.load_lora_weights(str(out))  # diffusers' own kohya detection and conversion
    loaded = run_unet(pipe.unet, unet_inputs())
    if alpha_pattern:
        torch.testing.assert_close(loaded, reference, rtol=1e-5, atol=1e-5)
    else:
        assert_same_numerics(loaded, reference)


def test_kohya_text_encoder_layout(tmp_path):
    encoder = get_peft_model(
        tiny_text_encoder(), BayesLoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "fc1"])
    )
    randomise(encoder)
    out = export_lora(encoder, tmp_path / "te", format=["kohya", "diffusers"])
    weights = load_file(str(out / "lora_kohya.safetensors"))
    # The A1111 / ComfyUI names, with the `text_model.` level that transformers 5 dropped from CLIPTextModel.
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in weights
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in weights
    assert weights["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 6.0
    assert len(weights) == 2 * 3 * 3


@pytest.mark.xfail(
    strict=True,
    reason="diffusers 0.42 + transformers 5: the kohya text-encoder conversion leaves attention keys as "
    "`self_attn.to_q_lora.*`, which match no module (they load as UNEXPECTED; only the MLP loads)",
)
def test_kohya_text_encoder_through_diffusers(tmp_path):
    encoder = get_peft_model(tiny_text_encoder(), BayesLoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"]))
    randomise(encoder)
    encoder.eval()
    ids = torch.tensor([[0, 40, 41, 42, 2]])
    with torch.no_grad():
        reference = encoder(ids)[0]
    out = export_lora(encoder, tmp_path / "te", format="kohya")
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        assert_same_numerics(pipe.text_encoder(ids)[0], reference)
