"""The DreamBooth script on the DiTs (Flux.1, SD3: flow matching), on tiny pipelines saved to disk (no Hub)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import DREAMBOOTH_SCRIPT, assert_same_numerics, dreambooth_args, reset_accelerate_state

import bayes_adapter
from examples.dreambooth import training
from examples.dreambooth.settings import parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

T5_TOKENS = ["--max_sequence_length", "32"]  # the tiny T5 tokenizer's length (Flux's default is 512)


def transformer_inputs(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed inputs of the tiny Flux or SD3 transformer, as keyword arguments (16x16 latents, 6 text tokens)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(1, 6, 32, generator=generator)
    if family == "flux":
        return {
            "hidden_states": torch.randn(1, 64, 16, generator=generator),  # 8x8 tokens of 2x2x4 packed latents
            "encoder_hidden_states": text,
            "pooled_projections": torch.randn(1, 8, generator=generator),
            "timestep": torch.tensor([0.7]),
            "img_ids": torch.rand(64, 3, generator=generator) * 8,
            "txt_ids": torch.zeros(6, 3),
        }
    return {
        "hidden_states": torch.randn(1, 4, 16, 16, generator=generator),
        "encoder_hidden_states": text,
        "pooled_projections": torch.randn(1, 16, generator=generator),
        "timestep": torch.tensor([700.0]),
    }


# Loads the exports into vanilla diffusers, in a process where bayes_adapter cannot be imported.
VANILLA = textwrap.dedent(
    """
    import sys

    sys.modules["bayes_adapter"] = None
    try:
        import bayes_adapter  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("bayes_adapter was importable in the child process")
    import torch

    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file

    pipe_dir, inputs_path, out_path, *lora_dirs = sys.argv[1:]
    inputs = load_file(inputs_path)
    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)

    def run(name):
        with torch.no_grad():
            out[f"{name}/transformer"] = pipe.transformer(**inputs, return_dict=False)[0]
            image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, max_sequence_length=32,
                         generator=torch.Generator().manual_seed(0), output_type="pt").images
            out[f"{name}/image"] = image

    out = {}
    run("base")
    for i, lora_dir in enumerate(lora_dirs):
        pipe.load_lora_weights(lora_dir)
        run(f"lora{i}")
        pipe.unload_lora_weights()
    save_file({k: v.contiguous() for k, v in out.items()}, out_path)
    """
)


@pytest.mark.parametrize(
    "family, extra",
    [
        ("flux", []),  # frozen text encoders: the conditioning is computed once per prompt
        # both CLIPs Bayesian, T5 frozen; diffusers' default EDM preconditioning of SD3's output
        ("sd3", ["--train_text_encoder", "--weighting_scheme", "mode"]),
    ],
)
def test_dit_train_resume_and_export(request, tmp_path, instance_dir, family, extra):
    """4 steps with checkpoints at 2 and 4; resumed from checkpoint-2, the run ends where the full one did; the
    final LoRA and checkpoint-4 load in vanilla diffusers and give the trained transformer's eval output."""
    from peft import get_peft_model_state_dict

    model = request.getfixturevalue(f"tiny_{family}")
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--kl_weight", "1.0", *T5_TOKENS, *extra]
    out = tmp_path / "full"
    validation = ["--validation_prompt", "a photo of sks dog", "--validation_prompt", "a sks dog in snow"]
    validation += ["--validation_steps", "4", "--num_validation_images", "1", "--validation_inference_steps", "2"]
    result = training.main(parse_args(dreambooth_args(model, instance_dir, out, *common, *validation)))
    assert result["global_step"] == 4 and result["family"] == family
    transformer = result["transformer"]
    final = {k: v.clone() for k, v in get_peft_model_state_dict(transformer).items()}
    assert any("lora_posterior_rho_B" in key for key in final)
    unmoved = [key for key in final if ".lora_B." in key and not final[key].abs().sum() > 0]
    # SD3's last block discards the text tokens' attention output: its add_q_proj gets no gradient, in diffusers too.
    assert unmoved == (["transformer_blocks.1.attn.add_q_proj.lora_B.weight"] if family == "sd3" else []), unmoved
    defaults = ["attn.to_q", "attn.add_k_proj", "attn.to_add_out"] + (["ff_context.net.2"] if family == "flux" else [])
    for target in defaults:  # diffusers' default targets, the joint attention's text side included
        assert any(f".{target}.lora_A" in key for key in final), target

    trained_encoders = {"flux": set(), "sd3": {"text_encoder", "text_encoder_2"}}[family]
    components = {"transformer"} | trained_encoders
    for step in (2, 4):
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert files == components | {
            "optimizer.bin",
            "scheduler.bin",
            "random_states_0.pkl",
            "pytorch_lora_weights.safetensors",
        }
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert {key.split(".")[0] for key in keys} == components, "diffusers' keys: transformer., text_encoder(_2)."
    assert len(result["text_encoders"]) == len(trained_encoders)
    for encoder in result["text_encoders"]:
        assert bayes_adapter.posterior_std_stats(encoder)["count"] > 0

    # Validation: one image per prompt, a tag per prompt, the monitor over both.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags().get("images", [])) | set(accumulator.Tags().get("scalars", []))
    assert {"validation/0", "validation/1", "validation/monitor_corruption", "kl", "loss"} <= tags

    # Resume from checkpoint-2 in a fresh folder: steps 3 and 4 again, the same adapter at the end.
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed_out / "checkpoint-2")
    reset_accelerate_state()
    resumed = training.main(
        parse_args(dreambooth_args(model, instance_dir, resumed_out, *common, "--resume_from_checkpoint", "latest"))
    )
    assert resumed["global_step"] == 4
    state = get_peft_model_state_dict(resumed["transformer"])
    for key, value in final.items():
        assert_same_numerics(state[key], value, msg=f"{key} differs after resuming")

    # Vanilla diffusers loads the final LoRA and checkpoint-4 (the same adapter) and gets the trained eval output.
    inputs = transformer_inputs(family)
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    transformer.eval()
    with torch.no_grad():
        expected = transformer(**inputs, return_dict=False)[0]
    child = [sys.executable, "-c", VANILLA, str(model), str(tmp_path / "inputs.safetensors"), str(tmp_path / "o.st")]
    subprocess.run([*child, str(out), str(out / "checkpoint-4")], check=True, timeout=300)
    got = load_file(str(tmp_path / "o.st"))
    for name in ("lora0", "lora1"):
        assert_same_numerics(got[f"{name}/transformer"], expected, msg=name)
        assert not torch.allclose(got[f"{name}/image"], got["base/image"]), "the LoRA does not change the image"
    assert not torch.allclose(got["base/transformer"], expected, atol=1e-6), "the adapter does not change the output"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_command_line_on_a_saved_dit_pipeline(request, tmp_path, instance_dir, family):
    """The issue's acceptance command, as a user runs it (a process of its own, every default), then the file it
    writes loaded by vanilla diffusers."""
    model, out = request.getfixturevalue(f"tiny_{family}"), tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance_dir)]
    argv += ["--instance_prompt", "a photo of sks dog", "--resolution", "32", "--max_train_steps", "3"]
    script = str(DREAMBOOTH_SCRIPT)
    subprocess.run([sys.executable, script, *argv, "--output_dir", str(out)], check=True, timeout=300)
    save_file(transformer_inputs(family), str(tmp_path / "inputs.safetensors"))
    child = [sys.executable, "-c", VANILLA, str(model), str(tmp_path / "inputs.safetensors"), str(tmp_path / "o.st")]
    subprocess.run([*child, str(out)], check=True, timeout=300)
    got = load_file(str(tmp_path / "o.st"))
    assert not torch.allclose(got["lora0/image"], got["base/image"]), "the LoRA does not change the image"


def test_flux_trains_its_clip_text_encoder_only(tmp_path, tiny_flux, instance_dir, monkeypatch):
    """--train_text_encoder on Flux: a Bayesian adapter on CLIP (text_encoder), none on T5 (text_encoder_2); with
    bf16, gradient checkpointing and prior preservation (class images generated by the Flux pipeline);
    --push_to_hub hands both components and FluxPipeline to the library."""
    from diffusers import FluxPipeline
    from huggingface_hub import constants

    pushed = []
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(bayes_adapter, "push_to_hub", lambda *args, **kwargs: pushed.append((args, kwargs)))
    out = tmp_path / "out"
    extra = ["--max_train_steps", "2", "--train_text_encoder", "--guidance_scale", "1.0", *T5_TOKENS]
    extra += ["--mixed_precision", "bf16", "--gradient_checkpointing", "--push_to_hub", "--hub_model_id", "me/flux"]
    extra += [
        "--with_prior_preservation",
        "--class_prompt",
        "a photo of dog",
        "--class_data_dir",
        str(tmp_path / "cls"),
    ]
    extra += ["--num_class_images", "2", "--sample_batch_size", "2"]
    result = training.main(parse_args(dreambooth_args(tiny_flux, instance_dir, out, *extra)))
    assert result["transformer"].is_gradient_checkpointing
    assert len(list((tmp_path / "cls").glob("*.jpg"))) == 2
    assert len(result["text_encoders"]) == 1
    assert bayes_adapter.posterior_std_stats(result["text_encoders"][0])["count"] > 0
    assert sorted(p.name for p in (out / "bayesian_adapter").iterdir()) == ["text_encoder", "transformer"]
    prefixes = {key.split(".")[0] for key in load_file(str(out / "pytorch_lora_weights.safetensors"))}
    assert prefixes == {"transformer", "text_encoder"}
    ((components, repo_id), kwargs) = pushed[0]
    assert set(components) == {"transformer", "text_encoder"} and repo_id == "me/flux"
    # a local folder is no Hub id: the Hub would refuse it as the card's base_model
    assert kwargs["pipeline_cls"] is FluxPipeline and kwargs["base_model"] is None


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_cache_latents_encodes_each_image_once(request, tmp_path, instance_dir, monkeypatch, family):
    from diffusers import AutoencoderKL

    model = request.getfixturevalue(f"tiny_{family}")
    calls = []
    real_encode = AutoencoderKL.encode
    monkeypatch.setattr(
        AutoencoderKL, "encode", lambda self, x, *a, **k: calls.append(len(x)) or real_encode(self, x, *a, **k)
    )
    # --monitor_steps 0: the stage monitor encodes the instance images once more, for its own reference latents.
    extra = ["--max_train_steps", "3", "--cache_latents", "--monitor_steps", "0"]
    extra += T5_TOKENS if family == "flux" else []
    result = training.main(parse_args(dreambooth_args(model, instance_dir, tmp_path / "out", *extra)))
    assert result["global_step"] == 3
    assert calls == [1, 1], "each of the two instance images is encoded once, before training"


def _error_of(capsys, argv) -> str:
    """The error the command line prints for `argv`: exit status 2, no traceback, nothing written."""
    capsys.readouterr()
    try:
        status = training.run_command(argv)
    except SystemExit as exit:  # argparse's parser.error, for what parse_args checks
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not Path(argv[argv.index("--output_dir") + 1]).exists()
    return err


@pytest.mark.parametrize(
    "family, extra, message",
    [
        ("flux", ["--resolution", "24"], "--resolution=24 is invalid for Flux.1; expected a multiple of 16"),
        ("flux", ["--snr_gamma", "5"], "--snr_gamma"),
        ("sd3", ["--noise_offset", "0.1"], "--noise_offset"),
        ("sd3", ["--output_kohya_format"], "--output_kohya_format"),
        ("sd", ["--weighting_scheme", "logit_normal"], "--weighting_scheme"),
        ("sd", ["--max_sequence_length", "77"], "--max_sequence_length"),
        ("flux", ["--precondition_outputs", "1"], "--precondition_outputs applies to SD3 only"),
    ],
)
def test_family_specific_flags_are_refused_clearly(request, tmp_path, instance_dir, capsys, family, extra, message):
    model = request.getfixturevalue(f"tiny_{family}")
    err = _error_of(capsys, dreambooth_args(model, instance_dir, tmp_path / "out", *extra))
    assert f"error: {message}" in err, err


def test_a_pipeline_the_script_does_not_train_is_named(tmp_path, instance_dir, capsys):
    model = tmp_path / "kandinsky"
    model.mkdir()
    (model / "model_index.json").write_text(
        json.dumps({"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    err = _error_of(capsys, dreambooth_args(model, instance_dir, tmp_path / "out", "--max_train_steps", "1"))
    assert "KandinskyV22Pipeline" in err and "StableDiffusionPipeline" in err and "FluxPipeline" in err, err


def test_sd3_preconditions_its_output_by_default_as_diffusers(tmp_path, tiny_sd3, instance_dir):
    """diffusers' SD3 scripts default to --precondition_outputs 1 (the loss on noisy - sigma * output vs the
    latents); 0 is the plain flow-matching target. Same seed, one step: the two give different adapters."""
    from peft import get_peft_model_state_dict

    args = parse_args(dreambooth_args(tiny_sd3, instance_dir, tmp_path / "a", *T5_TOKENS))
    assert args.precondition_outputs == 1
    states = []
    for flag, out in (("1", "a"), ("0", "b")):
        extra = ["--max_train_steps", "1", "--precondition_outputs", flag, *T5_TOKENS]
        reset_accelerate_state()
        result = training.main(parse_args(dreambooth_args(tiny_sd3, instance_dir, tmp_path / out, *extra)))
        states.append(get_peft_model_state_dict(result["transformer"]))
    moved = [key for key in states[0] if ".lora_B." in key and not torch.equal(states[0][key], states[1][key])]
    assert moved, "the preconditioning does not change the training"


@pytest.mark.parametrize("family, extra", [("flux", []), ("sd3", ["--train_text_encoder"])])
def test_a_t5_tokenizer_without_a_usable_model_max_length(tmp_path, instance_dir, family, extra):
    """A T5 tokenizer saved without a length has transformers' VERY_LARGE_INTEGER as model_max_length: only the CLIP
    tokenizers pad to their model_max_length; T5 is tokenised to --max_sequence_length (frozen encoders, whose
    prompts are encoded once, and trained ones, encoded at each step)."""
    from tiny_t5_dit_models import tiny_flux_pipeline, tiny_sd3_pipeline
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    pipe = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}[family]()
    t5_tokenizer = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer_3
    t5_tokenizer.model_max_length = VERY_LARGE_INTEGER
    model = tmp_path / "model"
    pipe.save_pretrained(str(model))
    with pytest.raises((OverflowError, MemoryError, ValueError)):  # what padding to that length does
        t5_tokenizer(["a dog"], padding="max_length", max_length=t5_tokenizer.model_max_length, truncation=True)
    out = tmp_path / "out"
    extra = ["--max_train_steps", "1", *T5_TOKENS, *extra, "--validation_prompt", "a photo of sks dog"]
    extra += ["--validation_steps", "1", "--num_validation_images", "1", "--validation_inference_steps", "1"]
    result = training.main(parse_args(dreambooth_args(model, instance_dir, out, *extra)))
    assert result["global_step"] == 1
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "samples" / "step_000001_0.png").is_file()
