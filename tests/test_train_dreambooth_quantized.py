"""The DreamBooth script's `--quantize_base {nf4,int8}` (Bayesian LoRA over a quantised denoiser) and `--use_dora`, on
the tiny SD3 pipeline."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_models import dreambooth_args

import bayes_adapter
from bayes_adapter.bnb import BayesLinear4bit
from bayes_adapter.torchao import BayesTorchaoLinear
from examples.dreambooth import training
from examples.dreambooth.settings import ArgumentsError, parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

T5_TOKENS = ["--max_sequence_length", "32"]  # the tiny T5 tokenizer's length


def pipeline_image(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(
            "a photo of sks dog",
            num_inference_steps=2,
            height=32,
            width=32,
            max_sequence_length=32,
            generator=generator,
            output_type="pt",
        ).images


@pytest.mark.parametrize("choice, layer_cls", [("nf4", BayesLinear4bit), ("int8", BayesTorchaoLinear)])
def test_quantize_base_trains_and_the_export_loads_into_the_unquantised_pipeline(
    tiny_sd3, tmp_path, instance_dir, choice, layer_cls
):
    out = tmp_path / "out"
    validation = ["--validation_prompt", "a photo of sks dog", "--validation_steps", "2"]
    validation += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--quantize_base", choice, *T5_TOKENS, *validation]
    result = training.main(parse_args(dreambooth_args(tiny_sd3, instance_dir, out, *extra)))
    transformer = result["transformer"]
    layers = list(bayes_adapter.bayes_layers(transformer))
    assert layers and all(type(layer) is layer_cls for layer in layers)
    assert bayes_adapter.posterior_std_stats(transformer)["max"] > 0.01  # the stds trained

    pipe = DiffusionPipeline.from_pretrained(str(tiny_sd3))
    pipe.set_progress_bar_config(disable=True)
    before = pipeline_image(pipe)
    pipe.load_lora_weights(str(out))
    assert (pipeline_image(pipe) - before).abs().max() > 1e-3


def test_quantize_base_without_its_package_is_refused_before_any_work(tiny_sd3, tmp_path, instance_dir, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    with pytest.raises(
        ArgumentsError, match=r"--quantize_base int8 needs the torchao package, which is not installed"
    ):
        parse_args(dreambooth_args(tiny_sd3, instance_dir, tmp_path / "out", "--quantize_base", "int8"))
    assert not (tmp_path / "out").exists()


def test_use_dora_trains_and_its_export_loads_into_the_vanilla_pipeline(tiny_sd3, tmp_path, instance_dir):
    out = tmp_path / "out"
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--use_dora", *T5_TOKENS]
    result = training.main(parse_args(dreambooth_args(tiny_sd3, instance_dir, out, *extra)))
    layer = result["transformer"].transformer_blocks[0].attn.to_q
    assert layer.lora_magnitude_vector and layer.is_bayesian("default")
    pipe = DiffusionPipeline.from_pretrained(str(tiny_sd3))
    pipe.set_progress_bar_config(disable=True)
    before = pipeline_image(pipe)
    pipe.load_lora_weights(str(out))
    assert pipe.transformer.transformer_blocks[0].attn.to_q.lora_magnitude_vector
    assert (pipeline_image(pipe) - before).abs().max() > 1e-3


def test_use_dora_with_a_kohya_file_or_the_local_estimator_is_refused(tiny_sd, tmp_path, instance_dir):
    argv = dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", "--use_dora")
    with pytest.raises(ArgumentsError, match="--output_kohya_format cannot carry a DoRA adapter"):
        parse_args([*argv, "--output_kohya_format"])
    with pytest.raises(ArgumentsError, match="use_dora=True needs --estimator='weight', got --estimator='local'"):
        parse_args([*argv, "--estimator", "local"])
