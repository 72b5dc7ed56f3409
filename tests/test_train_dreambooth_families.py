"""The DreamBooth trainer's structure: model families as classes, read-only settings, no sys.path edits; the dtypes
a family keeps its frozen components in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_models import dreambooth_args, tiny_sdxl_pipeline, tiny_vae

from examples.dreambooth import families
from examples.dreambooth.settings import Settings, parse_args


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "class_name, family",
    [
        ("StableDiffusionPipeline", "sd"),
        ("StableDiffusionImg2ImgPipeline", "sd"),
        ("StableDiffusionXLPipeline", "sdxl"),
        ("StableDiffusionXLImg2ImgPipeline", "sdxl"),
        ("StableDiffusion3Pipeline", "sd3"),
        ("FluxPipeline", "flux"),
        ("FluxImg2ImgPipeline", "flux"),
        ("Flux2Pipeline", "flux2"),
        ("Flux2KleinPipeline", "flux2klein"),
        ("Flux2KleinKVPipeline", None),
        ("QwenImagePipeline", "qwenimage"),
        ("QwenImageEditPipeline", None),
        ("ZImagePipeline", "zimage"),  # a Qwen3 text encoder and no guidance embedding: not trained here
        ("SanaPipeline", "sana"),
        ("SanaSprintPipeline", None),
        ("SanaPAGPipeline", None),
        ("KandinskyV22Pipeline", None),
    ],
)
def test_the_family_of_a_pipeline_class(class_name, family):
    found = families.family_of_class_name(class_name)
    assert (found.name if found else None) == family


def test_a_new_family_is_one_class():
    class Kandinsky(families.DDPMFamily):
        name = "kandinsky-test"
        label = "Kandinsky"
        pipeline_class = "KandinskyV22Pipeline"
        class_name_prefixes = ("KandinskyV22",)
        text_encoders = ()
        trainable_text_encoders = ()

    try:
        assert families.family_of_class_name("KandinskyV22Pipeline") is families.FAMILIES["kandinsky-test"]
        assert families.family_of_class_name("StableDiffusionPipeline").name == "sd"
    finally:
        del families.FAMILIES["kandinsky-test"]


def test_no_family_switches_and_no_sys_path_edits():
    trainer = [ROOT / "examples" / "train_dreambooth_bayes_lora.py", *(ROOT / "examples" / "dreambooth").rglob("*.py")]
    for path in trainer:
        assert not re.search(r"family\.name\s*(==|!=|in\b)", path.read_text()), path
    for path in [
        *trainer,
        *(ROOT / "benchmarks").glob("*.py"),
        *(ROOT / "examples" / "corruption_stage").glob("*.py"),
    ]:
        assert "sys.path.insert" not in path.read_text() and "sys.path.append" not in path.read_text(), path


def test_settings_are_read_only(tmp_path, instance_dir):
    settings = parse_args(dreambooth_args("no/such/model", instance_dir, tmp_path / "out", "--rank", "8"))
    with pytest.raises(AttributeError, match="read-only"):
        settings.rank = 2
    changed = settings.replace(rank=2)
    assert (settings.rank, changed.rank) == (8, 2)
    with pytest.raises(AttributeError, match="no setting 'rnak'"):
        settings.replace(rnak=2)
    assert settings.family is None  # a Hub id's family is resolved by main(), which reads its model_index.json
    assert "rank" in settings.tracker_config() and "evaluators" not in settings.tracker_config()
    assert Settings({"rank": 1}).rank == 1


def test_a_family_samples_latents_as_diffusers_latent_dist_sample():
    """The loop's draw of the VAE posterior (`sample_latents`, from the family's `encode_images`): for a VAE with a
    posterior, the same draw as diffusers' `latent_dist.sample()` from the same random state."""
    import torch
    from tiny_models import tiny_vae

    vae, pixels = tiny_vae(), torch.rand(2, 3, 32, 32) * 2 - 1
    family = families.FAMILIES["sd"]
    with torch.no_grad():
        torch.manual_seed(3)
        ours = family.sample_latents(vae, pixels)
        std = family.encode_images(vae, pixels)[1]
        torch.manual_seed(3)
        theirs = vae.encode(pixels).latent_dist.sample()
    assert bool((std > 0).all()) and torch.equal(ours, theirs)


def _decoded_dtype(vae) -> torch.dtype:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        return vae.decode(torch.randn(1, 4, 16, 16, dtype=torch.float16)).sample.dtype


def test_a_vae_kept_in_float32_encodes_and_decodes_in_float32_inside_float16_autocast():
    """SDXL's own VAE overflows in float16; kept in float32, it must not run in float16 under validation's autocast."""
    sdxl = families.FAMILIES["sdxl"]
    assert _decoded_dtype(tiny_vae(0)) == torch.float16  # the control: autocast runs a float32 VAE in float16
    vae = tiny_vae(0)
    assert vae.config.force_upcast and sdxl.cast_vae(vae, torch.float16, separate_vae=False) == torch.float32
    assert vae.dtype == torch.float32 and _decoded_dtype(vae) == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        pixels = torch.rand(1, 3, 32, 32, dtype=torch.float16)
        assert vae.encode(pixels).latent_dist.mean.dtype == torch.float32
    separate = tiny_vae(0)  # a separate (fp16-safe) VAE runs in the weights' dtype, autocast or not
    assert sdxl.cast_vae(separate, torch.float16, separate_vae=True) == separate.dtype == torch.float16
    assert not getattr(separate.decode, "runs_outside_autocast", False)


def test_a_pipeline_for_generation_gets_the_vae_dtype_training_uses():
    pipeline = tiny_sdxl_pipeline().to(dtype=torch.float16)
    families.FAMILIES["sdxl"].cast_for_generation(pipeline, torch.float16)
    assert pipeline.vae.dtype == torch.float32 and _decoded_dtype(pipeline.vae) == torch.float32
    plain = tiny_sdxl_pipeline().to(dtype=torch.float16)  # SD 1.x keeps every component in the weights' dtype
    families.FAMILIES["sd"].cast_for_generation(plain, torch.float16)
    assert plain.vae.dtype == torch.float16


def test_a_vae_kept_out_of_autocast_copies_and_pickles_as_itself():
    import copy
    import pickle

    vae = tiny_vae(0)
    families.FAMILIES["sdxl"].cast_vae(vae, torch.float16, separate_vae=False)
    latents = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        expected = vae.decode(latents).sample
        for twin in (copy.deepcopy(vae), pickle.loads(pickle.dumps(vae))):
            assert getattr(twin.decode, "runs_outside_autocast", False)
            torch.testing.assert_close(twin.decode(latents).sample, expected)
            for p in twin.parameters():  # the twin decodes with its own weights, not the original's
                p.mul_(0.5)
            assert not torch.allclose(twin.decode(latents).sample, expected)
            assert _decoded_dtype(twin) == torch.float32
