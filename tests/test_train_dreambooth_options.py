"""The DreamBooth script's training options: fixed std, --scale_lr, --kl_weight elbo, Min-SNR, offsets, schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import (
    dreambooth_args,
    tensorboard_scalars,
    tiny_vae,
)

from examples.dreambooth import losses, training
from examples.dreambooth.settings import parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_fixed_posterior_std_rho_is_fp32_under_bf16(tmp_path, tiny_sd, instance_dir):
    args = parse_args(
        dreambooth_args(
            tiny_sd,
            instance_dir,
            tmp_path / "out",
            "--fixed_posterior_std",
            "--mixed_precision",
            "bf16",
            "--max_train_steps",
            "1",
            "--report_to",
            "none",
        )
    )
    unet = training.main(args)["unet"]
    assert unet.conv_in.weight.dtype == torch.bfloat16
    rho = {n: p for n, p in unet.named_parameters() if "lora_posterior_rho" in n}
    assert rho and all(not p.requires_grad for p in rho.values()), "the posterior std is not frozen"
    assert {p.dtype for p in rho.values()} == {torch.float32}
    assert {p.dtype for n, p in unet.named_parameters() if "lora_" in n} == {torch.float32}


def test_scale_lr_scales_both_learning_rates(tmp_path, tiny_sd, instance_dir, monkeypatch):
    groups = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            groups.extend({"lr": g["lr"], "size": len(g["params"])} for g in self.param_groups)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    extra = ["--scale_lr", "--train_batch_size", "2", "--gradient_accumulation_steps", "3", "--max_train_steps", "1"]
    extra += ["--learning_rate", "1e-4", "--posterior_std_learning_rate", "0.01", "--report_to", "none"]
    settings = parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", *extra))
    training.main(settings)
    assert settings.learning_rate == 1e-4, "main() changed the caller's settings"
    # One process: factor 3 x 2 x 1 = 6. The means' group, then the posterior stds' group.
    assert len(groups) == 2 and all(g["size"] > 0 for g in groups)
    assert groups[0]["lr"] == pytest.approx(6e-4) and groups[1]["lr"] == pytest.approx(0.06)


def test_kl_weight_elbo_is_computed_from_the_latents_and_the_scheduler(tmp_path, tiny_sd, instance_dir):
    from bayes_adapter import elbo_kl_weight

    assert (
        parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "o", "--kl_weight", "ELBO")).kl_weight == "elbo"
    )
    extra = ["--kl_weight", "elbo", "--max_train_steps", "1", "--report_to", "none"]
    result = training.main(parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", *extra)))
    # The tiny VAE halves the 32 px resolution once (two blocks) into 4 latent channels; DDPM's T is 1000.
    expected = elbo_kl_weight((4, 16, 16), 1000)
    assert result["unet"].peft_config["default"].kl_weight == pytest.approx(expected)
    saved = json.loads((tmp_path / "out" / "bayesian_adapter" / "unet" / "adapter_config.json").read_text())
    assert saved["kl_weight"] == pytest.approx(expected)
    assert saved["posterior_std_parametrisation"] == "exp_linear"


def test_snr_gamma_noise_offset_schedules_and_text_encoder_lr(tmp_path, tiny_sd, instance_dir, monkeypatch):
    import torch.optim

    seen = []
    adamw = torch.optim.AdamW

    def recording_adamw(groups, **kwargs):
        optimizer = adamw(groups, **kwargs)
        seen.append([group["lr"] for group in optimizer.param_groups])
        return optimizer

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    extra = ["--max_train_steps", "2", "--train_text_encoder", "--text_encoder_lr", "3e-5", "--snr_gamma", "5"]
    extra += ["--noise_offset", "0.05", "--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2"]
    extra += ["--posterior_std_learning_rate", "1e-3"]
    result = training.main(parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", *extra)))
    assert result["global_step"] == 2
    losses = tensorboard_scalars(tmp_path / "out" / "logs", "loss")
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    # UNet: means at --learning_rate, stds at their own; text encoder: means at --text_encoder_lr, stds at theirs.
    assert seen == [[1e-4, 1e-3, 3e-5, 1e-3]]
    with pytest.raises(ValueError, match=r"--snr_gamma=0.0 is invalid; expected a finite number > 0"):
        parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "o", "--snr_gamma", "0"))


def test_min_snr_weights_follow_the_formula():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    timesteps = torch.tensor([10, 900])
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = (torch.minimum(snr, torch.tensor(5.0)) / snr).mean()  # per-example MSE is 1
    assert losses.instance_loss(5.0, scheduler, pred, target, timesteps).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    assert losses.instance_loss(None, scheduler, pred, target, timesteps).item() == 1.0


@pytest.mark.parametrize(
    "mixed_precision, expected", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("no", None)]
)
def test_validation_samples_in_the_runs_mixed_precision(mixed_precision, expected):
    """The autocast dtype is the run's: on CUDA, autocast without one runs in float16 even for a bf16 run (on CPU
    the default is bfloat16, so the fp16 case fails without it)."""
    from types import SimpleNamespace

    import numpy as np

    from examples.dreambooth.validation import generate

    seen = []

    class RecordingPipeline:
        def set_progress_bar_config(self, **kwargs):
            pass

        def to(self, device):
            return self

        def __call__(self, **kwargs):
            enabled = torch.is_autocast_enabled("cpu")
            seen.append(torch.get_autocast_dtype("cpu") if enabled else None)
            return SimpleNamespace(images=np.zeros((1, 8, 8, 3), dtype=np.float32))

    settings = SimpleNamespace(
        seed=0,
        num_validation_images=1,
        family=SimpleNamespace(pipeline_call_kwargs={}, validation_autocast=lambda dtype: True),
        max_sequence_length=None,
        validation_inference_steps=1,
        resolution=8,
    )
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision=mixed_precision)
    assert generate(settings, accelerator, RecordingPipeline(), "a photo of sks dog").shape == (1, 8, 8, 3)
    assert seen == [expected]


def test_a_separate_vae_encodes_for_training_and_decodes_every_validation(
    tmp_path, tiny_sd, instance_dir, monkeypatch
):
    """--pretrained_vae_model_name_or_path (e.g. SDXL's fp16-safe VAE): the run's VAE, also in the final validation
    of the exported LoRA, which loads the base pipeline and is given the run's VAE as users pass it."""
    from examples.dreambooth import loop

    separate = tmp_path / "vae"
    tiny_vae(seed=7).save_pretrained(str(separate))
    expected = {k: v.clone() for k, v in tiny_vae(seed=7).state_dict().items()}
    seen = []
    log_validation = loop.log_validation

    def recording(settings, accelerator, pipeline, trained, reference, step, tag):
        state = pipeline.vae.state_dict()
        seen.append((tag, all(torch.equal(state[k].float(), v) for k, v in expected.items())))
        return log_validation(settings, accelerator, pipeline, trained, reference, step, tag)

    monkeypatch.setattr(loop, "log_validation", recording)
    validation = ["--validation_prompt", "a photo of sks dog", "--validation_steps", "2"]
    validation += ["--num_validation_images", "1", "--validation_inference_steps", "1"]
    argv = dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", "--max_train_steps", "2", *validation)
    result = training.main(parse_args([*argv, "--pretrained_vae_model_name_or_path", str(separate)]))
    assert result["global_step"] == 2
    assert seen == [("validation", True), ("test", True)]
