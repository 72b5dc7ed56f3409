"""The DreamBooth script on Flux.2 [klein] (`Flux2KleinPipeline`: Flux.2's transformer and VAE, a Qwen3 text encoder,
no guidance embedding), on a tiny pipeline saved to disk: the family is told by model_index.json, training conditions
the transformer as the pipeline does, and a run's LoRA loads into the vanilla pipeline and changes the image."""

from __future__ import annotations

import contextlib
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from tiny_models import assert_same_numerics, dreambooth_args

import bayes_adapter
from examples.dreambooth import families, training
from examples.dreambooth.settings import ArgumentsError, parse_args, resolve_model


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

PROMPT = "a photo of sks dog"


def klein_pipeline(path):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def klein_image(pipe, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(
            prompt=PROMPT, num_inference_steps=2, height=32, width=32, generator=generator, output_type="pt", **kwargs
        ).images


@contextlib.contextmanager
def transformer_calls(pipe):
    """The keyword arguments of every call of `pipe.transformer` inside the block."""
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, a, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


def test_the_family_is_read_from_model_index(tiny_flux2_klein, tmp_path, instance_dir):
    settings = resolve_model(parse_args(dreambooth_args(tiny_flux2_klein, instance_dir, tmp_path / "out")))
    assert settings.model_index["_class_name"] == "Flux2KleinPipeline"
    assert isinstance(settings.family, families.Flux2Klein) and settings.family.name == "flux2klein"
    assert settings.family.pipeline_class == "Flux2KleinPipeline"
    assert settings.max_sequence_length == 512  # the pipeline's default prompt length


def test_training_prompt_states_equal_the_pipelines_encode_prompt(tiny_flux2_klein, tmp_path, instance_dir):
    """The prompt states the run caches, from the components as the run loads them, equal
    `Flux2KleinPipeline.encode_prompt` for the same prompts (the empty one is --caption_dropout's)."""
    settings = resolve_model(parse_args(dreambooth_args(tiny_flux2_klein, instance_dir, tmp_path / "out")))
    models = training.load_models(settings, SimpleNamespace(mixed_precision="no", device=torch.device("cpu")))
    prompts = [PROMPT, "a photo of sks dog on a red sofa in the sun", ""]
    cache = families.PromptCache(
        settings.family, models.text_encoders, models.tokenizers, prompts, "cpu", settings.max_sequence_length
    )
    cond = cache(prompts)
    assert set(cond) == {"encoder_hidden_states"}
    pipe = klein_pipeline(tiny_flux2_klein)
    with torch.no_grad():
        states, text_ids = pipe.encode_prompt(prompts, device="cpu")
    assert states.shape == (3, 512, 3 * 16)  # 512 tokens, the Qwen3 states of layers 9, 18 and 27 side by side
    assert_same_numerics(cond["encoder_hidden_states"], states)
    assert (states[0] - states[1]).abs().max() > 1e-3  # the prompt reaches the states
    # The tokens follow the chat template with the assistant's turn and an empty thinking block, as Qwen3 is asked.
    without_thinking_turn = pipe.tokenizer(
        f"[USER]{PROMPT}", return_tensors="pt", padding="max_length", max_length=512
    )
    with torch.no_grad():
        hidden = pipe.text_encoder(**without_thinking_turn, output_hidden_states=True).hidden_states
    assert (torch.cat([hidden[k] for k in (9, 18, 27)], dim=-1) - states[:1]).abs().max() > 1e-3


def test_the_transformer_is_called_as_the_pipeline_calls_it(tiny_flux2_klein):
    """Inside `pipe(prompt)` with classifier-free guidance (a base klein, guidance 4): the prompt's and the empty
    prompt's states, text and image ids, timestep / 1000 and no guidance. `Flux2Klein` passes the same at the same
    scheduler timestep, whatever --guidance_scale says."""
    family = families.Flux2Klein()
    pipe = klein_pipeline(tiny_flux2_klein)
    with transformer_calls(pipe) as seen:
        klein_image(pipe, guidance_scale=4.0)
    assert len(seen) == 4  # (prompt, empty prompt) at each of the 2 steps
    guidance = family.guidance_scale(pipe.transformer, SimpleNamespace(guidance_scale=3.5))
    assert guidance is None and all(call["guidance"] is None for call in seen)
    with torch.no_grad():
        cond, empty = (
            family.encode_prompts([pipe.text_encoder], [pipe.tokenizer], [p], "cpu", 512) for p in (PROMPT, "")
        )
    noisy = torch.randn(1, 16, 8, 8)
    with torch.no_grad(), transformer_calls(pipe) as passed:
        for t in pipe.scheduler.timesteps:
            for states in (cond, empty):
                family.predict(pipe.transformer, noisy, t.expand(1), states, guidance_scale=guidance)
    for in_pipeline, in_training in zip(seen, passed, strict=True):
        for key in ("encoder_hidden_states", "txt_ids", "img_ids", "timestep"):
            assert torch.equal(in_training[key], in_pipeline[key]), key
        assert in_training["guidance"] is None


def test_klein_refuses_to_train_its_text_encoder(tiny_flux2_klein, tmp_path, instance_dir):
    argv = dreambooth_args(tiny_flux2_klein, instance_dir, tmp_path / "out", "--train_text_encoder")
    with pytest.raises(
        ArgumentsError, match=r"--train_text_encoder: Flux.2 \[klein\]'s text encoder \(text_encoder\) stays frozen"
    ):
        parse_args(argv)


def klein_transformer_output(transformer) -> torch.Tensor:
    """The tiny klein transformer on fixed inputs: 8x8 tokens of 16 channels, 5 text tokens, no guidance."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 64, 16, generator=generator),
            encoder_hidden_states=torch.randn(1, 5, 48, generator=generator),
            timestep=torch.tensor([0.7]),
            img_ids=torch.cartesian_prod(torch.arange(1), torch.arange(8), torch.arange(8), torch.arange(1))[None],
            txt_ids=torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(5))[None],
            return_dict=False,
        )[0]


def test_klein_trains_validates_and_its_lora_loads_into_the_vanilla_pipeline(tiny_flux2_klein, tmp_path, instance_dir):
    out = tmp_path / "out"
    validation = ["--validation_prompt", PROMPT, "--validation_steps", "2"]
    validation += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--cache_latents", *validation]
    result = training.main(parse_args(dreambooth_args(tiny_flux2_klein, instance_dir, out, *extra)))
    assert result["family"] == "flux2klein" and result["global_step"] == 2
    assert (out / "samples" / "step_000002_0.png").is_file()  # validation during training
    assert (out / "samples" / "export_step_000002_0.png").is_file()  # and of the exported LoRA
    transformer = result["transformer"].eval()
    assert bayes_adapter.posterior_std_stats(transformer)["count"] > 0
    for target in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_add_out"):
        assert isinstance(transformer.get_submodule(target), bayes_adapter.BayesLoraLayer), target
    fused = transformer.get_submodule("single_transformer_blocks.0.attn.to_qkv_mlp_proj")
    assert isinstance(fused, bayes_adapter.BayesLoraLayer)
    trained = klein_transformer_output(transformer)

    pipe = klein_pipeline(tiny_flux2_klein)  # the plain pipeline, as users load it
    before = klein_image(pipe)
    pipe.load_lora_weights(str(out))
    assert not list(bayes_adapter.bayes_layers(pipe.transformer))
    assert_same_numerics(klein_transformer_output(pipe.transformer), trained)
    assert (klein_image(pipe) - before).abs().max() > 1e-3


def test_a_step_distilled_klein_trains_and_validates(tiny_flux2_klein, tmp_path, instance_dir):
    """`is_distilled` in model_index.json only changes how the pipeline guides (no classifier-free guidance): the same
    family trains it, and validation and the export's test generate with it."""
    distilled = tmp_path / "klein-distilled"
    shutil.copytree(tiny_flux2_klein, distilled)
    index = json.loads((distilled / "model_index.json").read_text(encoding="utf-8"))
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}), encoding="utf-8")
    assert klein_pipeline(distilled).config.is_distilled
    out = tmp_path / "out"
    validation = ["--validation_prompt", PROMPT, "--validation_steps", "1"]
    validation += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    result = training.main(
        parse_args(dreambooth_args(distilled, instance_dir, out, "--max_train_steps", "1", *validation))
    )
    assert result["family"] == "flux2klein" and result["global_step"] == 1
    assert sorted(path.name for path in (out / "samples").iterdir()) == [
        "export_step_000001_0.png",
        "step_000001_0.png",
    ]
