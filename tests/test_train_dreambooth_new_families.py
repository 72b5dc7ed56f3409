"""The DreamBooth script on the newer DiT families (Flux.2, Qwen-Image, Z-Image, SANA), on tiny pipelines saved to
disk: the run trains, and its LoRA loads into the family's vanilla pipeline with `load_lora_weights` and changes the
image."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_models import assert_same_numerics, dreambooth_args

import bayes_adapter
from examples.dreambooth import training
from examples.dreambooth.settings import ArgumentsError, parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def pipeline_image(pipe, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(
            prompt="a photo of sks dog",
            num_inference_steps=2,
            height=32,
            width=32,
            generator=generator,
            output_type="pt",
            **kwargs,
        ).images


def assert_lora_loads_into_the_vanilla_pipeline(pipeline_dir, lora_dir, transformer_output, trained, **image_kwargs):
    """The exported LoRA in `lora_dir` loads into the family's plain pipeline with `load_lora_weights`: no Bayesian
    layer, the transformer's output equals the trained adapter's eval output, and the image changes."""
    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    before = pipeline_image(pipe, **image_kwargs)
    pipe.load_lora_weights(str(lora_dir))
    assert not list(bayes_adapter.bayes_layers(pipe.transformer))
    with torch.no_grad():
        assert_same_numerics(transformer_output(pipe.transformer), trained)
    assert (pipeline_image(pipe, **image_kwargs) - before).abs().max() > 1e-3


def flux2_transformer_inputs() -> dict[str, torch.Tensor]:
    """Fixed inputs of the tiny Flux.2 transformer: 8x8 tokens of 16 channels, 5 text tokens."""
    generator = torch.Generator().manual_seed(0)
    grid = torch.cartesian_prod(torch.arange(1), torch.arange(8), torch.arange(8), torch.arange(1))
    return {
        "hidden_states": torch.randn(1, 64, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 5, 48, generator=generator),
        "timestep": torch.tensor([0.7]),
        "guidance": torch.tensor([3.5]),
        "img_ids": grid[None],
        "txt_ids": torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(5))[None],
    }


def test_flux2_trains_and_its_lora_loads_into_the_vanilla_pipeline(tiny_flux2, tmp_path, instance_dir):
    out = tmp_path / "out"
    validation = ["--validation_prompt", "a photo of sks dog", "--validation_steps", "2"]
    validation += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--cache_latents", *validation]
    result = training.main(parse_args(dreambooth_args(tiny_flux2, instance_dir, out, *extra)))
    assert result["family"] == "flux2" and result["global_step"] == 2
    transformer = result["transformer"].eval()
    assert bayes_adapter.posterior_std_stats(transformer)["count"] > 0
    for target in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_add_out"):
        assert isinstance(transformer.get_submodule(target), bayes_adapter.BayesLoraLayer), target
    assert isinstance(
        transformer.get_submodule("single_transformer_blocks.0.attn.to_qkv_mlp_proj"), bayes_adapter.BayesLoraLayer
    )
    output = lambda model: model(**flux2_transformer_inputs(), return_dict=False)[0]  # noqa: E731
    with torch.no_grad():
        trained = output(transformer)
    assert_lora_loads_into_the_vanilla_pipeline(tiny_flux2, out, output, trained)


def test_flux2_refuses_to_train_its_text_encoder(tiny_flux2, tmp_path, instance_dir):
    argv = dreambooth_args(tiny_flux2, instance_dir, tmp_path / "out", "--train_text_encoder")
    with pytest.raises(
        ArgumentsError, match="--train_text_encoder: Flux.2's text encoder \\(text_encoder\\) stays frozen"
    ):
        parse_args(argv)


def qwenimage_transformer_inputs() -> dict:
    """Fixed inputs of the tiny Qwen-Image transformer: 8x8 tokens of 16 channels, 5 text tokens."""
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 64, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=generator),
        "timestep": torch.tensor([0.7]),
        "img_shapes": [[(1, 8, 8)]],
    }


def test_qwenimage_trains_with_batch_2_and_its_lora_loads_into_the_vanilla_pipeline(
    tiny_qwenimage, tmp_path, instance_dir
):
    out = tmp_path / "out"
    # Two captions of different lengths in one batch: the cached prompt states are padded and masked.
    (instance_dir / "0.txt").write_text("a photo of sks dog", encoding="utf-8")
    (instance_dir / "1.txt").write_text("a photo of sks dog on a red sofa in the sun", encoding="utf-8")
    validation = ["--validation_prompt", "a photo of sks dog", "--validation_steps", "2"]
    validation += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--train_batch_size", "2", *validation]
    result = training.main(parse_args(dreambooth_args(tiny_qwenimage, instance_dir, out, *extra)))
    assert result["family"] == "qwenimage" and result["global_step"] == 2
    transformer = result["transformer"].eval()
    assert isinstance(transformer.get_submodule("transformer_blocks.0.attn.add_q_proj"), bayes_adapter.BayesLoraLayer)
    output = lambda model: model(**qwenimage_transformer_inputs(), return_dict=False)[0]  # noqa: E731
    with torch.no_grad():
        trained = output(transformer)
    assert_lora_loads_into_the_vanilla_pipeline(tiny_qwenimage, out, output, trained)


def zimage_transformer_output(transformer) -> torch.Tensor:
    """The tiny Z-Image transformer on fixed inputs: one 16x16 latent, 5 prompt tokens."""
    generator = torch.Generator().manual_seed(0)
    latent, text = torch.randn(4, 1, 16, 16, generator=generator), torch.randn(5, 16, generator=generator)
    with torch.no_grad():
        return transformer([latent], torch.tensor([0.3]), [text], return_dict=False)[0][0]


def test_zimage_trains_with_batch_2_and_its_lora_loads_into_the_vanilla_pipeline(tiny_zimage, tmp_path, instance_dir):
    out = tmp_path / "out"
    (instance_dir / "0.txt").write_text("a photo of sks dog", encoding="utf-8")
    (instance_dir / "1.txt").write_text("a photo of sks dog on a red sofa in the sun", encoding="utf-8")
    validation = ["--validation_prompt", "a photo of sks dog", "--validation_steps", "2"]
    validation += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--train_batch_size", "2", *validation]
    extra += ["--max_sequence_length", "64"]
    result = training.main(parse_args(dreambooth_args(tiny_zimage, instance_dir, out, *extra)))
    assert result["family"] == "zimage" and result["global_step"] == 2
    transformer = result["transformer"].eval()
    assert isinstance(transformer.get_submodule("layers.0.attention.to_q"), bayes_adapter.BayesLoraLayer)
    trained = zimage_transformer_output(transformer)
    assert_lora_loads_into_the_vanilla_pipeline(
        tiny_zimage, out, zimage_transformer_output, trained, max_sequence_length=64
    )


def sana_transformer_output(transformer) -> torch.Tensor:
    """The tiny SANA transformer on fixed inputs: one 16x16 latent, 5 prompt tokens."""
    generator = torch.Generator().manual_seed(0)
    latent, text = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 5, 16, generator=generator)
    with torch.no_grad():
        return transformer(latent, encoder_hidden_states=text, timestep=torch.tensor([500.0]), return_dict=False)[0]


def test_sana_trains_with_batch_2_and_its_lora_loads_into_the_vanilla_pipeline(tiny_sana, tmp_path, instance_dir):
    out = tmp_path / "out"
    (instance_dir / "0.txt").write_text("a photo of sks dog", encoding="utf-8")
    (instance_dir / "1.txt").write_text("a photo of sks dog on a red sofa in the sun", encoding="utf-8")
    validation = ["--validation_prompt", "a photo of sks dog", "--validation_steps", "2"]
    validation += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    validation += ["--monitor_steps", "2", "--monitor_images", "1"]
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--train_batch_size", "2", "--cache_latents"]
    result = training.main(parse_args(dreambooth_args(tiny_sana, instance_dir, out, *extra, *validation)))
    assert result["family"] == "sana" and result["global_step"] == 2
    assert (out / "monitor.jsonl").read_text(encoding="utf-8").count("\n") == 1
    transformer = result["transformer"].eval()
    for target in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_v"):
        assert isinstance(transformer.get_submodule(target), bayes_adapter.BayesLoraLayer), target
    trained = sana_transformer_output(transformer)
    assert_lora_loads_into_the_vanilla_pipeline(
        tiny_sana, out, sana_transformer_output, trained, use_resolution_binning=False
    )


def test_sana_prompts_are_conditioned_as_the_pipeline_conditions_them(tiny_sana):
    """The prompt with the pipeline's complex human instruction, the empty prompt (caption dropout) without it: what
    the transformer sees from `pipe(prompt)` with classifier-free guidance (the negative prompt first)."""
    from examples.dreambooth.families import Sana

    pipe = DiffusionPipeline.from_pretrained(str(tiny_sana))
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"])),
        with_kwargs=True,
    )
    pipeline_image(pipe, use_resolution_binning=False, guidance_scale=4.5)
    states, mask = seen[0]
    cond = Sana().encode_prompts([pipe.text_encoder], [pipe.tokenizer], ["", "a photo of sks dog"], "cpu")
    assert torch.equal(cond["mask"], mask)
    assert_same_numerics(cond["encoder_hidden_states"], states)
    without_instruction = pipe.encode_prompt("a photo of sks dog", do_classifier_free_guidance=False)[0]
    assert (without_instruction - states[1:]).abs().max() > 1e-3  # the instruction changes the prompt's states


def test_sana_passes_the_timestep_as_the_pipeline_passes_it(tiny_sana):
    """What the transformer receives as `timestep` inside `pipe(...)` at each scheduler timestep, `Sana().predict`
    passes at the same scheduler timestep: scaled by the transformer's `timestep_scale`, not divided by 1000. The
    scale is set to 0.25 here, so that leaving it out shows."""
    from examples.dreambooth.families import Sana

    pipe = DiffusionPipeline.from_pretrained(str(tiny_sana))
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.register_to_config(timestep_scale=0.25)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True
    )
    pipeline_image(pipe, use_resolution_binning=False, guidance_scale=1.0)  # no guidance: one call per step
    hook.remove()
    scheduler_timesteps = pipe.scheduler.timesteps
    assert len(seen) == len(scheduler_timesteps) == 2
    cond = Sana().encode_prompts([pipe.text_encoder], [pipe.tokenizer], ["a photo of sks dog"], "cpu")
    passed = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: passed.append(kwargs["timestep"].clone()), with_kwargs=True
    )
    noisy = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        for t in scheduler_timesteps:
            Sana().predict(pipe.transformer, noisy, t.expand(1), cond)
    for in_pipeline, in_training in zip(seen, passed, strict=True):
        torch.testing.assert_close(in_training, in_pipeline, rtol=0, atol=0)
    assert passed[0].item() == pytest.approx(0.25 * scheduler_timesteps[0].item())


def test_sana_validation_generates_at_the_training_resolution(tiny_sana, tmp_path, instance_dir):
    """SanaPipeline bins the asked size to its aspect-ratio table by default; validation turns that off."""
    from accelerate import Accelerator

    from examples.dreambooth.settings import resolve_model
    from examples.dreambooth.validation import generate

    settings = resolve_model(parse_args(dreambooth_args(tiny_sana, instance_dir, tmp_path / "out")))
    pipe = DiffusionPipeline.from_pretrained(str(tiny_sana))
    sizes = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    settings = settings.replace(validation_inference_steps=1, num_validation_images=1)
    images = generate(settings, Accelerator(cpu=True), pipe, "a photo of sks dog")
    assert images.shape == (1, 32, 32, 3) and sizes == [(16, 16)]  # 32 px over the autoencoder's factor 2


def test_sana_keeps_its_autoencoder_in_float32_and_gemma_out_of_float16(tiny_sana, tmp_path, instance_dir):
    """--mixed_precision fp16: the transformer in float16, the autoencoder in float32 and Gemma-2 in bfloat16, as
    diffusers' SANA script loads them; Gemma-2 also stays out of validation's float16 autocast."""
    from types import SimpleNamespace

    from examples.dreambooth.settings import resolve_model

    args = dreambooth_args(tiny_sana, instance_dir, tmp_path / "out", "--mixed_precision", "fp16")
    settings = resolve_model(parse_args(args))
    models = training.load_models(settings, SimpleNamespace(mixed_precision="fp16", device=torch.device("cpu")))
    assert models.denoiser.dtype == torch.float16
    assert models.vae.dtype == models.vae_dtype == torch.float32
    (encoder,) = models.text_encoders
    assert encoder.dtype == torch.bfloat16
    ids = models.tokenizers[0](["a photo of sks dog"], return_tensors="pt").input_ids
    with torch.autocast("cpu", dtype=torch.float16):
        assert encoder(ids)[0].dtype == torch.bfloat16


def test_sana_class_images_keep_the_autoencoder_in_float32_and_gemma_out_of_float16(tiny_sana, tmp_path, instance_dir):
    """--prior_generation_precision fp16 generates with the transformer in float16 but, as diffusers' SANA script,
    Gemma-2 in bfloat16 and the autoencoder in float32."""
    from accelerate import Accelerator
    from diffusers import SanaPipeline

    from examples.dreambooth.data import generate_class_images
    from examples.dreambooth.settings import resolve_model

    seen = []

    class RecordingSanaPipeline(SanaPipeline):
        def __call__(self, *args, **kwargs):
            seen.append((self.transformer.dtype, self.vae.dtype, self.text_encoder.dtype))
            return super().__call__(*args, **kwargs)

    class_dir = tmp_path / "class"
    extra = ["--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a dog"]
    extra += ["--num_class_images", "1", "--num_class_inference_steps", "1", "--prior_generation_precision", "fp16"]
    settings = resolve_model(parse_args(dreambooth_args(tiny_sana, instance_dir, tmp_path / "out", *extra)))
    generate_class_images(settings, Accelerator(cpu=True), RecordingSanaPipeline)
    assert seen == [(torch.float16, torch.float32, torch.bfloat16)]
    assert len(list(class_dir.iterdir())) == 1


def test_sana_trains_and_validates_under_fp16_mixed_precision(tiny_sana, tmp_path, instance_dir):
    """With Gemma-2 in float16 inside validation's autocast, validation failed here (CPU autocast refuses the
    pipeline's concatenation); in bfloat16, float16 autocast refuses to concatenate its prompt states, so SANA's
    validation samples outside autocast when Gemma-2 is in another dtype: the run trains, validates and validates
    its export."""
    validation = ["--validation_prompt", "a photo of sks dog", "--validation_steps", "2"]
    validation += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    args = dreambooth_args(tiny_sana, instance_dir, tmp_path / "out", "--max_train_steps", "2", *validation)
    result = training.main(parse_args([*args, "--mixed_precision", "fp16"]))
    assert result["global_step"] == 2 and result["transformer"].dtype == torch.float16
