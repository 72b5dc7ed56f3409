#!/usr/bin/env python
"""DreamBooth-style few-shot fine-tuning of Stable Diffusion (1.x, 2.x, XL, 3/3.5) or Flux.1 with Bayesian LoRA.

The structure follows diffusers' `examples/dreambooth/train_dreambooth_lora.py`: instance images and an instance
prompt, optional prior preservation with class images, accelerate for devices, processes, mixed precision,
checkpoints and trackers. The differences: the LoRA adapters are `bayes_adapter.BayesLoraConfig` adapters (a learnt
posterior standard deviation per Bayesian LoRA weight, sampled while training), the loss adds the weighted KL to the
prior, and the final output is the posterior *mean* as a plain LoRA that `pipe.load_lora_weights(output_dir)` loads
without this package. The whole Bayesian adapter (means and standard deviations) is kept next to it.

The model family is read from the pipeline's `model_index.json` (`_class_name`), not from a flag: SD 1.x/2.x and
SDXL UNets are trained by noise (or v) prediction, SD3 and Flux transformers by flow matching with the sigmas drawn by
`--weighting_scheme`, as diffusers' `train_dreambooth_lora_sd3.py` / `_flux.py` do (`examples/dreambooth_models.py`
holds what differs between the families).

Example (see examples/README.md for the paper's setting):

    accelerate launch examples/train_dreambooth_bayes_lora.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \
        --output_dir ./bayes-lora-dog --resolution 512 --rank 4 --learning_rate 1e-4 --max_train_steps 2400
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps


# The model families live beside this script (examples/dreambooth_models.py), also when it is imported by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dreambooth_models  # noqa: E402
from dreambooth_models import FAMILIES, ModelFamily  # noqa: E402


BAYES_ADAPTER_DIR = "bayesian_adapter"
DEFAULT_UNET_TARGETS = "to_k,to_q,to_v,to_out.0"
# Chosen by the lab's pre-registered rule (examples/corruption_stage/RESULTS.md, "0.2.0"); the README says why.
DEFAULT_KL_WEIGHT: float | str = 0.0
DEFAULT_TEXT_ENCODER_TARGETS = "q_proj,k_proj,v_proj,out_proj"


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


class ArgumentsError(ValueError):
    """Bad input found before any model loads; the command line reports it as `error: ...` (exit status 2)."""


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line; every check runs before any model is loaded.

    Args:
        input_args (`list[str]`, *optional*): The arguments; `sys.argv[1:]` by default.

    Raises:
        `ArgumentsError` (a `ValueError`): an argument is missing or wrong; the message names the argument, the value
        and what was expected.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of a diffusers pipeline: Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 or Flux.1 "
        "(told by its model_index.json).",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model.")
    model.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. 'fp16'.")
    model.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A separate VAE (e.g. an fp16-safe SDXL VAE); by default the pipeline's own.",
    )

    data = parser.add_argument_group("data")
    data.add_argument("--instance_data_dir", type=str, required=True, help="Folder of the instance (subject) images.")
    data.add_argument(
        "--instance_prompt", type=str, required=True, help="Prompt naming the instance, e.g. 'a photo of sks dog'."
    )
    data.add_argument("--with_prior_preservation", action="store_true", help="Add the prior-preservation loss.")
    data.add_argument(
        "--class_data_dir",
        type=str,
        default=None,
        help="Folder of class images; missing ones are generated with the base pipeline.",
    )
    data.add_argument("--class_prompt", type=str, default=None, help="Prompt of the class, e.g. 'a photo of dog'.")
    data.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    data.add_argument("--num_class_images", type=int, default=100, help="Class images wanted for prior preservation.")
    data.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    data.add_argument(
        "--num_class_inference_steps", type=int, default=50, help="Denoising steps when generating class images."
    )
    data.add_argument(
        "--prior_generation_precision",
        type=str,
        default=None,
        choices=["no", "fp32", "fp16", "bf16"],
        help="Precision of the class-image generation (default: fp16 on GPU, fp32 on CPU).",
    )
    data.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="Training resolution in pixels (divisible by 8, by 16 for Flux); use 1024 for SDXL, SD3 and Flux.",
    )
    data.add_argument("--center_crop", action="store_true", help="Centre-crop instead of random-crop.")
    data.add_argument("--random_flip", action="store_true", help="Flip training images horizontally at random.")
    data.add_argument(
        "--caption_extension",
        type=str,
        default=".txt",
        help="Per-image captions: a file `<image stem><extension>` beside an instance image (e.g. dog1.png + "
        "dog1.txt, as kohya and ai-toolkit read them) is that image's prompt; images without one use "
        "--instance_prompt. 'none' ignores caption files. Default: %(default)s.",
    )
    data.add_argument("--repeats", type=int, default=1, help="How many times each instance image is seen per epoch.")
    data.add_argument(
        "--caption_dropout",
        type=float,
        default=0.0,
        help="Probability of training an instance image with an empty prompt (helps classifier-free guidance).",
    )

    bayes = parser.add_argument_group("Bayesian LoRA (bayes_adapter.BayesLoraConfig)")
    bayes.add_argument("--rank", type=int, default=4, help="LoRA rank r.")
    bayes.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank).")
    bayes.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout.")
    bayes.add_argument(
        "--unet_target_modules",
        type=str,
        default=DEFAULT_UNET_TARGETS,
        help="Comma-separated UNet module names to adapt (SD 1.x/2.x, SDXL).",
    )
    bayes.add_argument(
        "--transformer_target_modules",
        "--lora_layers",
        dest="transformer_target_modules",
        type=str,
        default=None,
        help="Comma-separated transformer module names to adapt (SD3, Flux); default: those of diffusers' DreamBooth "
        "LoRA scripts (SD3: the attention projections; Flux: attention and feed-forward).",
    )
    bayes.add_argument(
        "--text_encoder_target_modules",
        type=str,
        default=DEFAULT_TEXT_ENCODER_TARGETS,
        help="Comma-separated text-encoder module names to adapt (with --train_text_encoder: the CLIP encoders "
        "only; T5 stays frozen).",
    )
    bayes.add_argument(
        "--bayesian_factors",
        type=str,
        default="B",
        choices=["A", "B", "AB"],
        help="Which LoRA factors carry a posterior: B (the paper's), A (BLoB's) or AB.",
    )
    bayes.add_argument(
        "--embedding_bayesian_factors",
        type=str,
        default=None,
        choices=["A", "B", "AB"],
        help="The factors of nn.Embedding targets (if --*_target_modules name any); default: the factor in "
        "--bayesian_factors' role (PEFT initialises an embedding's A to zero, so B -> A).",
    )
    bayes.add_argument("--posterior_std_init", type=float, default=0.01, help="Initial posterior std (paper: 0.01).")
    bayes.add_argument("--prior_std", type=float, default=0.01, help="Std of the zero-mean Gaussian prior.")
    bayes.add_argument(
        "--estimator",
        type=str,
        default="weight",
        choices=["weight", "local", "flipout"],
        help="Posterior sampling while training: one weight sample per forward (the paper's), local "
        "reparameterisation, or flipout.",
    )
    bayes.add_argument(
        "--kl_weight",
        type=kl_weight_arg,
        default=DEFAULT_KL_WEIGHT,
        help=(
            "Weight of KL(q||p) in the loss: a number, or 'elbo' for bayes_adapter.elbo_kl_weight(latent shape, "
            "scheduler timesteps) = 2 / (D * T), which makes loss + KL / images a negative ELBO per image "
            "(1.2e-7 for SD 1.5 at 512 px, 3.1e-8 for SDXL at 1024). 0 reproduces the paper's released runs. "
            f"Default: {DEFAULT_KL_WEIGHT} (see the README)."
        ),
    )
    bayes.add_argument(
        "--kl_scaling",
        type=str,
        default="per_image",
        choices=["per_image", "none"],
        help="per_image: the loss adds kl_weight * KL / number of instance images (Bayes by "
        "Backprop); none: kl_weight * KL.",
    )
    bayes.add_argument(
        "--posterior_std_parametrisation",
        type=str,
        default="exp_linear",
        choices=["exp_linear", "softplus"],
        help="How the posterior std is stored: exp_linear (exponential below --posterior_std_init, linear above; "
        "learns at LoRA learning rates) or softplus (0.1.0's; barely moves at fine-tuning learning rates).",
    )
    bayes.add_argument(
        "--fixed_posterior_std",
        action="store_true",
        help="Freeze the posterior std at --posterior_std_init (fixed weight noise, a control).",
    )
    bayes.add_argument(
        "--sample_at_inference",
        action="store_true",
        help="Record sample_at_inference=True in the saved Bayesian adapter (the export is the mean).",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="bayes-lora-dreambooth", help="Where everything is written.")
    train.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")
    train.add_argument(
        "--train_text_encoder", action="store_true", help="Add a Bayesian adapter to the text encoder(s)."
    )
    train.add_argument("--train_batch_size", type=int, default=1, help="Instance images per device per step.")
    train.add_argument("--num_train_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides the epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument(
        "--posterior_std_learning_rate",
        type=float,
        default=None,
        help=(
            "Learning rate of the posterior stds' free parameters (default: --learning_rate, no weight decay). With "
            "exp_linear, Adam moves the std by about this / --posterior_std_init relative per step near its start "
            "(1%% at 1e-4 and 0.01) and by at most about this per step upwards, as the paper's code. Multiplied like "
            "--learning_rate with --scale_lr."
        ),
    )
    train.add_argument(
        "--scale_lr",
        action="store_true",
        help=(
            "Multiply --learning_rate (and --posterior_std_learning_rate when given) by accumulation steps x batch "
            "size x processes."
        ),
    )
    train.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="diffusers' learning-rate schedule (diffusers.optimization.get_scheduler).",
    )
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    train.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    train.add_argument(
        "--text_encoder_lr",
        type=float,
        default=None,
        help="Learning rate of the text encoders' adapter means (with --train_text_encoder; default: --learning_rate).",
    )
    train.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting (Hang et al. 2023) with this gamma, e.g. 5.0; off by default.",
    )
    train.add_argument(
        "--noise_offset", type=float, default=0.0, help="Offset noise scale (e.g. 0.05: darker and brighter images)."
    )
    flow = parser.add_argument_group("flow matching (SD3, Flux), as diffusers' scripts")
    flow.add_argument(
        "--weighting_scheme",
        type=str,
        default=None,
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
        help="How sigmas are drawn and the loss weighted (diffusers.training_utils."
        "compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3); default: logit_normal for SD3, "
        "none (uniform) for Flux, as diffusers' scripts.",
    )
    flow.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal scheme.")
    flow.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit_normal scheme.")
    flow.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme.")
    flow.add_argument(
        "--guidance_scale",
        type=float,
        default=3.5,
        help="The guidance given to a guidance-distilled Flux (Flux.1-dev) while training.",
    )
    flow.add_argument(
        "--precondition_outputs",
        type=int,
        default=None,
        choices=[0, 1],
        help="SD3 only, as diffusers' SD3 scripts (default 1): 1 preconditions the output as in EDM (the loss compares "
        "the predicted clean latents, noisy - sigma * output, with the latents); 0 compares the output with noise - "
        "latents.",
    )
    flow.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 tokens of a prompt (default: 512 for Flux, 77 for SD3, as diffusers' scripts).",
    )
    train.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode the instance and class images with the VAE once, before training (the centre crop, and its "
        "mirror image with --random_flip), instead of at every step.",
    )
    train.add_argument(
        "--optimizer",
        type=str,
        default="adamw",
        choices=["adamw", "prodigy"],
        help="adamw (torch's), or prodigy (the prodigyopt package, if installed: it is not a dependency).",
    )
    train.add_argument(
        "--use_8bit_adam",
        action="store_true",
        help="bitsandbytes' 8-bit AdamW (if installed; it is not a dependency, and needs a CUDA GPU).",
    )
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--dataloader_num_workers", type=int, default=0)
    train.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides accelerate's config; the adapters stay in fp32.",
    )
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 on Ampere GPUs.")

    out = parser.add_argument_group("checkpoints, validation, logging")
    out.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save an accelerate checkpoint every N steps."
    )
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    out.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help="A checkpoint-N folder in --output_dir, or 'latest'."
    )
    out.add_argument(
        "--validation_prompt",
        type=str,
        action="append",
        default=None,
        help="Prompt of the validation images; repeat the flag for several prompts.",
    )
    out.add_argument("--num_validation_images", type=int, default=4, help="Validation images per prompt.")
    out.add_argument("--validation_steps", type=int, default=100, help="Generate validation images every N steps.")
    out.add_argument(
        "--output_kohya_format",
        action="store_true",
        help="Also write lora_kohya.safetensors (the lora_unet_* / lora_te_* layout ComfyUI and A1111 load) beside "
        "pytorch_lora_weights.safetensors (SD 1.x/2.x and SDXL).",
    )
    out.add_argument(
        "--eval_clip_model",
        type=str,
        default=None,
        help="CLIP model (Hub id or local folder, e.g. openai/clip-vit-large-patch14) for CLIP-I / CLIP-T at each "
        "validation (bayes_adapter.evaluation); off by default.",
    )
    out.add_argument(
        "--eval_dino_model",
        type=str,
        default=None,
        help="DINO ViT (Hub id or local folder, e.g. facebook/dino-vits16) for DINO and DINO diversity at each "
        "validation; off by default.",
    )
    out.add_argument("--validation_inference_steps", type=int, default=25)
    out.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to --output_dir.")
    out.add_argument("--report_to", type=str, default="tensorboard", help="accelerate tracker(s), or 'none'.")
    out.add_argument("--push_to_hub", action="store_true", help="Upload the exported mean LoRA to the Hub.")
    out.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository as 'user/name' (required with --push_to_hub)."
    )
    out.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the cached login).")

    args = parser.parse_args(input_args)
    try:
        validate_args(args)
    except ArgumentsError:
        raise
    except ValueError as error:
        raise ArgumentsError(str(error)) from None
    return args


def _caption_suffix(args: argparse.Namespace) -> str | None:
    extension = getattr(args, "caption_extension", None)
    return None if not extension or extension.lower() == "none" else extension


def _list_images(folder: Path, argument: str, caption_suffix: str | None = None) -> list[Path]:
    """Every non-hidden file of `folder` but caption files (`caption_suffix`, .txt, .caption), each checked to open."""
    suffixes = tuple(filter(None, (caption_suffix, ".txt", ".caption")))
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(suffixes)
    )
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as error:  # PIL raises several types for unreadable files
            raise ValueError(
                f"{argument}: {str(path)!r} is not a readable image ({type(error).__name__}: {error}); expected only "
                "image files (PNG, JPEG, ...) in the folder."
            ) from None
    return files


def instance_captions(images: list[Path], args: argparse.Namespace) -> list[str]:
    """Each instance image's prompt: its caption file's text, or `--instance_prompt` where it has none."""
    suffix = _caption_suffix(args)
    prompts = []
    for image in images:
        caption = image.with_name(image.stem + suffix) if suffix else None
        if caption is not None and caption.is_file():
            try:
                text = caption.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"--caption_extension: {str(caption)!r} is not UTF-8 text") from None
            if not text:
                raise ValueError(f"--caption_extension: {str(caption)!r} is empty; write the caption or delete it")
            prompts.append(text)
        else:
            prompts.append(args.instance_prompt)
    return prompts


def _check_number(args: argparse.Namespace, name: str, minimum: float, integer: bool = True) -> None:
    value = getattr(args, name)
    if value is not None and not (math.isfinite(value) and value >= minimum):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"--{name}={value!r} is invalid; expected {kind} >= {minimum}.")


def validate_args(args: argparse.Namespace) -> None:
    """Checks the arguments that argparse cannot; raises `ValueError` naming the argument. Loads no model."""
    instance_dir = Path(args.instance_data_dir)
    if not instance_dir.is_dir():
        raise ValueError(
            f"--instance_data_dir={args.instance_data_dir!r} is not an existing folder; expected a "
            "folder of instance images."
        )
    instance_images = _list_images(instance_dir, "--instance_data_dir", _caption_suffix(args))
    if not instance_images:
        raise ValueError(f"--instance_data_dir={args.instance_data_dir!r} is empty; expected at least one image.")
    if not args.instance_prompt.strip():
        raise ValueError(
            "--instance_prompt is empty; expected a prompt naming the instance, e.g. 'a photo of sks dog'."
        )
    if args.resolution <= 0 or args.resolution % 8:
        raise ValueError(
            f"--resolution={args.resolution} is invalid; expected a positive multiple of 8 (the VAE "
            "downsamples by 8), e.g. 512 or 1024."
        )
    if args.with_prior_preservation:
        if not args.class_data_dir:
            raise ValueError(
                "--with_prior_preservation needs --class_data_dir (a folder; missing class images are "
                "generated there)."
            )
        if not args.class_prompt or not args.class_prompt.strip():
            raise ValueError(
                f"--with_prior_preservation needs --class_prompt, got {args.class_prompt!r}; expected "
                "a prompt of the class, e.g. 'a photo of dog'."
            )
        class_dir = Path(args.class_data_dir)
        if class_dir.exists() and not class_dir.is_dir():
            raise ValueError(f"--class_data_dir={args.class_data_dir!r} exists but is not a folder.")
        if class_dir.is_dir():
            _list_images(class_dir, "--class_data_dir")
    elif args.class_data_dir or args.class_prompt:
        logging.getLogger(__name__).warning(
            "--class_data_dir/--class_prompt are ignored without --with_prior_preservation."
        )
    for name in (
        "rank",
        "train_batch_size",
        "num_train_epochs",
        "max_train_steps",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "num_validation_images",
        "validation_inference_steps",
        "num_class_images",
        "sample_batch_size",
        "num_class_inference_steps",
        "lora_alpha",
        "repeats",
        "lr_num_cycles",
        "max_sequence_length",
    ):
        _check_number(args, name, 1)
    for name in ("logit_mean", "guidance_scale", "mode_scale"):
        _check_number(args, name, -math.inf, integer=False)
    if not (math.isfinite(args.logit_std) and args.logit_std > 0):
        raise ValueError(f"--logit_std={args.logit_std!r} is invalid; expected a finite number > 0.")
    for name in ("text_encoder_lr", "snr_gamma"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name}={value!r} is invalid; expected a finite number > 0.")
    import importlib.util

    for flag, module, wanted in (
        ("--optimizer prodigy", "prodigyopt", args.optimizer == "prodigy"),
        ("--use_8bit_adam", "bitsandbytes", args.use_8bit_adam),
    ):
        if wanted and importlib.util.find_spec(module) is None:
            raise ValueError(
                f"{flag} needs the {module} package, which is not installed (it is not a dependency of bayes-adapter); "
                f"pip install it with the constraints file so that it cannot pull another torch, or drop {flag}."
            )
    if args.optimizer == "prodigy" and args.use_8bit_adam:
        raise ValueError("--use_8bit_adam applies to AdamW only; drop it with --optimizer prodigy.")
    if not 0 <= args.caption_dropout < 1:
        raise ValueError(f"--caption_dropout={args.caption_dropout!r} is invalid; expected a number in [0, 1).")
    instance_captions(instance_images, args)
    for name in ("lr_warmup_steps", "dataloader_num_workers"):
        _check_number(args, name, 0)
    for name in ("learning_rate", "prior_loss_weight", "max_grad_norm", "lora_dropout", "noise_offset", "lr_power"):
        _check_number(args, name, 0, integer=False)
    if args.posterior_std_learning_rate is not None and not (
        math.isfinite(args.posterior_std_learning_rate) and args.posterior_std_learning_rate > 0
    ):
        raise ValueError(
            f"--posterior_std_learning_rate={args.posterior_std_learning_rate!r} is invalid; expected a finite number "
            "> 0."
        )
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora_dropout={args.lora_dropout!r} is invalid; expected a number in [0, 1).")
    if args.resume_from_checkpoint not in (None, "latest"):
        resume = Path(args.output_dir, Path(args.resume_from_checkpoint).name)
        if not resume.name.startswith("checkpoint-") or not resume.is_dir():
            raise ValueError(
                f"--resume_from_checkpoint={args.resume_from_checkpoint!r} is not a checkpoint-N folder "
                f"of --output_dir={args.output_dir!r}; expected one of those or 'latest'."
            )
    if args.push_to_hub:
        from huggingface_hub import constants
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.hub_model_id or "")
        except HFValidationError:
            raise ValueError(
                f"--push_to_hub needs --hub_model_id as 'user/name', got {args.hub_model_id!r}."
            ) from None
        if constants.is_offline_mode():
            raise ValueError(
                "--push_to_hub cannot upload in offline mode (HF_HUB_OFFLINE=1); unset it, or drop "
                "--push_to_hub and upload the output folder later."
            )
    # The metric models are loaded here (on CPU), so that a wrong path is reported before any training model loads.
    from bayes_adapter import evaluation

    args.evaluators = (
        evaluation.load_clip(args.eval_clip_model) if args.eval_clip_model else None,
        evaluation.load_dino(args.eval_dino_model) if args.eval_dino_model else None,
    )
    # The Bayesian settings are checked by BayesLoraConfig itself (no model needed); name the flags in the error.
    try:
        lora_config(args, args.unet_target_modules, kl_weight=0.0 if args.kl_weight == "elbo" else args.kl_weight)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Invalid Bayesian LoRA arguments (--rank, --lora_alpha, --posterior_std_init, --prior_std, "
            f"--kl_weight, ...): {error}"
        ) from None
    # A local pipeline's family is checked now; a Hub id's when main() has read its model_index.json, still before
    # any model loads.
    if Path(args.pretrained_model_name_or_path).is_dir():
        resolve_family(args)


def resolve_family(args: argparse.Namespace) -> tuple[ModelFamily, dict]:
    """The model family of `--pretrained_model_name_or_path`, with the checks that depend on it; reads no weights.

    Fills in the family's defaults (`--weighting_scheme`, `--max_sequence_length`).

    Returns:
        `(family, model_index)`: the family and the pipeline's `model_index.json`.

    Raises:
        `ArgumentsError`: the pipeline is of no family the script trains, or an argument does not apply to it.
    """
    path = args.pretrained_model_name_or_path
    try:
        model_index = dreambooth_models.read_model_index(path, args.revision)
    except Exception as error:  # diffusers raises OSError, EnvironmentError or hub errors
        raise ArgumentsError(
            f"--pretrained_model_name_or_path={path!r}: cannot read its model_index.json ({type(error).__name__}: "
            f"{error}); expected a diffusers pipeline folder or Hub id."
        ) from None
    class_name = str(model_index.get("_class_name"))
    family = dreambooth_models.family_of_class_name(class_name)
    if family is None:
        supported = ", ".join(f.pipeline_class for f in FAMILIES.values())
        raise ArgumentsError(
            f"--pretrained_model_name_or_path={path!r} is a {class_name}, which this script does not train; "
            f"expected one of {supported} (or their image-to-image variants)."
        )
    if args.resolution % family.resolution_multiple:
        raise ArgumentsError(
            f"--resolution={args.resolution} is invalid for {family.label}; expected a multiple of "
            f"{family.resolution_multiple}."
        )
    ddpm_only = {
        "--snr_gamma": args.snr_gamma is not None,
        "--noise_offset": bool(args.noise_offset),
        "--kl_weight elbo": args.kl_weight == "elbo",  # 2 / (D * T) is derived for DDPM's T-step ELBO
    }
    flow_only = {
        "--weighting_scheme": args.weighting_scheme is not None,
        "--max_sequence_length": args.max_sequence_length is not None,
    }
    wrong = [flag for flag, given in (flow_only if not family.flow_matching else ddpm_only).items() if given]
    if wrong:
        kind = "flow-matching models (SD3, Flux)" if not family.flow_matching else "DDPM models (SD 1.x/2.x, SDXL)"
        raise ArgumentsError(
            f"{', '.join(wrong)} applies to {kind} only; {path!r} is {family.label}. Drop it"
            + (" (give --kl_weight a number)." if "--kl_weight elbo" in wrong else ".")
        )
    if args.precondition_outputs is not None and family.name != "sd3":
        raise ArgumentsError(
            f"--precondition_outputs applies to SD3 only (as in diffusers' scripts); {path!r} is {family.label}. "
            "Drop it."
        )
    if args.output_kohya_format and family.denoiser != "unet":
        raise ArgumentsError(
            f"--output_kohya_format writes the UNet kohya layout (SD 1.x/2.x, SDXL); {family.label} has none here. "
            "Drop it; the diffusers file pytorch_lora_weights.safetensors is written in any case."
        )
    if family.flow_matching:
        args.weighting_scheme = args.weighting_scheme or family.default_weighting_scheme
        args.max_sequence_length = args.max_sequence_length or family.default_max_sequence_length
    if family.name == "sd3" and args.precondition_outputs is None:
        args.precondition_outputs = 1
    return family, model_index


def denoiser_targets(args: argparse.Namespace, family: ModelFamily) -> str:
    """The denoiser's comma-separated LoRA targets: `--unet_target_modules`, or the transformer's."""
    if family.denoiser == "unet":
        return args.unet_target_modules
    return args.transformer_target_modules or family.default_targets


def kl_weight_arg(value: str) -> float | str:
    """`--kl_weight`: 'elbo' or a number (checked with the other Bayesian settings)."""
    if value.strip().lower() == "elbo":
        return "elbo"
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'elbo', got {value!r}") from None


def elbo_kl_weight_for(args: argparse.Namespace, vae_config, scheduler_config) -> float:
    """`bayes_adapter.elbo_kl_weight` for the training latents: `--resolution` through the VAE, the scheduler's T."""
    from bayes_adapter import elbo_kl_weight

    side = args.resolution // 2 ** (len(vae_config.block_out_channels) - 1)
    return elbo_kl_weight((vae_config.latent_channels, side, side), scheduler_config.num_train_timesteps)


def lora_config(args: argparse.Namespace, target_modules: str, kl_weight: float):
    """The `BayesLoraConfig` the arguments describe, for the given comma-separated target modules."""
    from bayes_adapter import BayesLoraConfig

    return BayesLoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha or args.rank,
        lora_dropout=args.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=[name.strip() for name in target_modules.split(",") if name.strip()],
        bayesian_factors=args.bayesian_factors,
        embedding_bayesian_factors=args.embedding_bayesian_factors,
        posterior_std_init=args.posterior_std_init,
        prior_std=args.prior_std,
        estimator=args.estimator,
        kl_weight=kl_weight,
        posterior_std_parametrisation=args.posterior_std_parametrisation,
        train_posterior_std=not args.fixed_posterior_std,
        sample_at_inference=args.sample_at_inference,
    )


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def load_image(path: Path, size: int, center_crop: bool = True, flip: bool = False):
    """Opens, resizes (shorter side to `size`) and crops an image.

    Returns:
        `(pixels, time_ids)`: a `(3, size, size)` float tensor in [-1, 1], and SDXL's micro-conditioning (original
        height and width, crop top and left, target height and width).
    """
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    original = (image.height, image.width)
    scale = size / min(image.size)
    image = image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BILINEAR
    )
    if center_crop:
        top, left = (image.height - size) // 2, (image.width - size) // 2
    else:
        top, left = random.randint(0, image.height - size), random.randint(0, image.width - size)
    image = image.crop((left, top, left + size, top + size))
    if flip and random.random() < 0.5:
        image = ImageOps.mirror(image)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, torch.tensor([*original, top, left, size, size], dtype=torch.float32)


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images with their prompt, and (with prior preservation) class images with theirs."""

    def __init__(
        self,
        instance_images,
        instance_prompt,
        size,
        class_images=(),
        class_prompt=None,
        center_crop=False,
        random_flip=False,
        repeats=1,
        caption_dropout=0.0,
        latent_cache=None,
    ):
        self.instance_images, self.class_images = list(instance_images) * repeats, list(class_images)
        self.latent_cache = latent_cache  # {(image, mirrored): (mean, std, time_ids)} from `cache_latents`
        # One prompt for every instance image, or one per image (captions).
        prompts = [instance_prompt] * len(instance_images) if isinstance(instance_prompt, str) else instance_prompt
        self.instance_prompts, self.class_prompt = list(prompts) * repeats, class_prompt
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip
        self.caption_dropout = caption_dropout

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def __getitem__(self, index: int) -> dict:
        example = {}
        i = index % len(self.instance_images)
        prompt = "" if self.caption_dropout and random.random() < self.caption_dropout else self.instance_prompts[i]
        sources = [("instance", self.instance_images[i], prompt)]
        if self.class_images:
            sources.append(("class", self.class_images[index % len(self.class_images)], self.class_prompt))
        for kind, image, prompt in sources:
            if self.latent_cache is not None:
                mean, std, time_ids = self.latent_cache[(image, self.random_flip and random.random() < 0.5)]
                example[f"{kind}_latents"] = mean + std * torch.randn_like(mean)  # a sample of the VAE posterior
            else:
                pixels, time_ids = load_image(image, self.size, self.center_crop, self.random_flip)
                example[f"{kind}_pixels"] = pixels
            example.update({f"{kind}_time_ids": time_ids, f"{kind}_prompt": prompt})
        return example


def collate(examples: list[dict], with_prior_preservation: bool) -> dict:
    """Stacks a batch; with prior preservation the class half follows the instance half."""
    kinds = ["instance", "class"] if with_prior_preservation else ["instance"]
    images = "latents" if "instance_latents" in examples[0] else "pixels"
    return {
        images: torch.stack([e[f"{k}_{images}"] for k in kinds for e in examples]),
        "time_ids": torch.stack([e[f"{k}_time_ids"] for k in kinds for e in examples]),
        "prompts": [e[f"{k}_prompt"] for k in kinds for e in examples],
    }


def cache_latents(vae, images: list[Path], size: int, random_flip: bool, device, dtype) -> dict:
    """`--cache_latents`: each image's VAE posterior (mean and std) at the centre crop, and mirrored with `--random_flip`.

    Returns:
        `dict`: `{(image, mirrored): (mean, std, time_ids)}`, on the CPU.
    """
    from tqdm.auto import tqdm

    cache = {}
    with torch.no_grad():
        for image in tqdm(dict.fromkeys(images), desc="Caching latents"):
            pixels, time_ids = load_image(image, size, center_crop=True)
            for mirrored in (False, True) if random_flip else (False,):
                view = pixels.flip(-1) if mirrored else pixels
                posterior = vae.encode(view[None].to(device, dtype)).latent_dist
                cache[(image, mirrored)] = (posterior.mean[0].cpu(), posterior.std[0].cpu(), time_ids)
    return cache


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading the Bayesian adapters
# ----------------------------------------------------------------------------------------------------------------


def save_bayes_adapters(output_dir: str | Path, models: dict) -> None:
    """The whole Bayesian adapter (means and posterior) of each component, atomically: `<output_dir>/<name>/`."""
    import bayes_adapter

    for name, model in models.items():
        bayes_adapter.save_bayesian_adapter(model, Path(output_dir, name), component=name, overwrite=True)


def load_bayes_adapters(input_dir: str | Path, models: dict) -> None:
    """Restores what `save_bayes_adapters` wrote into models that already hold the same Bayesian adapter."""
    import bayes_adapter

    for name, model in models.items():
        if not Path(input_dir, name).is_dir():
            raise ValueError(f"Checkpoint {str(input_dir)!r} has no adapter for {name!r}.")
        bayes_adapter.load_bayesian_weights(model, Path(input_dir, name), component=name)
        bayes_adapter.cast_adapter_params(model, torch.float32)


def export_mean_lora(output_dir: str | Path, models: dict, pipeline_cls, kohya: bool = False) -> None:
    """The posterior mean as a plain LoRA that loads without bayes_adapter: `bayes_adapter.export_components`.

    `<output_dir>/pytorch_lora_weights.safetensors` (every trained component, for `pipe.load_lora_weights`) and
    `<output_dir>/export/<component>/` (PEFT's and diffusers' formats and a summary of the posterior).
    """
    from bayes_adapter.export import export_components

    export_components(models, output_dir, pipeline_cls, kohya=kohya)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def generate_class_images(args, accelerator, pipeline_cls) -> None:
    """Fills `--class_data_dir` up to `--num_class_images` images with the base pipeline (main process only)."""
    class_dir = Path(args.class_data_dir)
    if accelerator.is_main_process:
        class_dir.mkdir(parents=True, exist_ok=True)
        existing = len([p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith(".")])
        missing = args.num_class_images - existing
        if missing > 0:
            precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
            pipeline = pipeline_cls.from_pretrained(
                args.pretrained_model_name_or_path, dtype=dtype, revision=args.revision, variant=args.variant
            )
            pipeline.set_progress_bar_config(disable=True)
            pipeline.to(accelerator.device)
            for start in range(0, missing, args.sample_batch_size):
                count = min(args.sample_batch_size, missing - start)
                images = pipeline(
                    [args.class_prompt] * count,
                    num_inference_steps=args.num_class_inference_steps,
                    height=args.resolution,
                    width=args.resolution,
                ).images
                for offset, image in enumerate(images):
                    digest = hashlib.sha1(image.tobytes()).hexdigest()
                    image.save(class_dir / f"{existing + start + offset}-{digest}.jpg")
            del pipeline
    accelerator.wait_for_everyone()


def _generate(args, accelerator, pipeline, prompt: str) -> np.ndarray:
    """`--num_validation_images` images of `prompt`, `(N, H, W, 3)` floats in [0, 1]."""
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(accelerator.device)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
    extra = {}
    if getattr(args, "max_sequence_length", None) is not None:  # the DiTs' T5 prompt length, as in training
        extra["max_sequence_length"] = args.max_sequence_length
    with torch.no_grad(), torch.autocast(accelerator.device.type, enabled=accelerator.mixed_precision != "no"):
        images = pipeline(
            [prompt] * args.num_validation_images,
            generator=generator,
            num_inference_steps=args.validation_inference_steps,
            height=args.resolution,
            width=args.resolution,
            output_type="np",
            **extra,
        ).images
    return np.clip(np.asarray(images, dtype=np.float32), 0, 1)


def _to_pil(images: np.ndarray) -> list:
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]


def log_images(accelerator, tag: str, images: np.ndarray, step: int, caption: str) -> None:
    """Logs images to every tracker that takes them (`log_images`: TensorBoard, W&B, ClearML, ...)."""
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):
            continue
        if tracker.name == "tensorboard":
            tracker.log_images({tag: images}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=caption) for image in _to_pil(images)]}, step=step)
        else:
            tracker.log_images({tag: _to_pil(images)}, step)


def log_validation(args, accelerator, pipeline, trained: list, reference, step: int, tag: str):
    """Generates `--num_validation_images` per validation prompt with the adapters' mean (eval mode) and logs them.

    Images go to every tracker that takes them (`<tag>` for one prompt, `<tag>/<i>` for prompt i of several). Also
    logs `bayes_adapter.training_monitor.corruption_report` of all the images against the instance images (`reference`, in
    [-1, 1]): `<tag>/monitor_corruption` (high-frequency energy of the samples over the references'; > 0 means
    noisier samples, the corruption stage), `fidelity`, `diversity`, `copy_rate`, `nn_distance`; with
    `--eval_clip_model` / `--eval_dino_model`, the paper's `<tag>/clip_i`, `clip_t`, `dino` and `dino_diversity`
    (`bayes_adapter.evaluation`; averaged over the prompts).

    Returns:
        `np.ndarray`: every image, prompt after prompt.
    """
    for model in trained:
        model.eval()
    from bayes_adapter.training_monitor import corruption_report

    prompts = args.validation_prompt
    clip, dino = getattr(args, "evaluators", (None, None))
    per_prompt, scores = [], []
    real = [
        Image.fromarray(((r.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()) for r in reference
    ]
    for i, prompt in enumerate(prompts):
        images = _generate(args, accelerator, pipeline, prompt)
        per_prompt.append(images)
        log_images(accelerator, tag if len(prompts) == 1 else f"{tag}/{i}", images, step, prompt)
        if clip is not None or dino is not None:
            from bayes_adapter.evaluation import evaluate

            scores.append(evaluate(_to_pil(images), real, prompt, clip, dino))
    images = np.concatenate(per_prompt)
    samples = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    metrics = {f"{tag}/monitor_{k}": v for k, v in corruption_report(samples, reference).items()}
    for key in scores[0] if scores else ():
        if not key.startswith("num_"):
            metrics[f"{tag}/{key}"] = float(np.mean([score[key] for score in scores]))
    accelerator.log(metrics, step=step)
    for model in trained:
        model.train()
    del pipeline
    return images


def denoising_loss(args, noise_scheduler, model_pred, target, timesteps, weighting=None) -> torch.Tensor:
    """The instance loss, plus `--prior_loss_weight` x the class half's with prior preservation.

    DDPM models: the MSE (Min-SNR weighted with `--snr_gamma`); flow matching: the MSE weighted per sigma.
    """

    def one(pred, target, timesteps, weighting, instance: bool) -> torch.Tensor:
        if weighting is not None:
            return (weighting.float() * (pred.float() - target.float()) ** 2).flatten(1).mean(1).mean()
        if instance:
            return instance_loss(args, noise_scheduler, pred, target, timesteps)
        return F.mse_loss(pred.float(), target.float())

    if not args.with_prior_preservation:
        return one(model_pred, target, timesteps, weighting, True)
    halves = [t.chunk(2) if t is not None else (None, None) for t in (model_pred, target, timesteps, weighting)]
    instance = one(*(half[0] for half in halves), True)
    return instance + args.prior_loss_weight * one(*(half[1] for half in halves), False)


def instance_loss(args, noise_scheduler, model_pred, target, timesteps) -> torch.Tensor:
    """The denoising MSE, with Min-SNR weighting when `--snr_gamma` is set (diffusers' `compute_snr`)."""
    if args.snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, args.snr_gamma))
    weights = weights / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
    per_example = F.mse_loss(model_pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_example * weights).mean()


def log_std_histograms(accelerator, wrapped: dict, step: int) -> None:
    """A histogram of every component's posterior stds, for TensorBoard (other trackers get the scalars only)."""
    import bayes_adapter

    if not accelerator.is_main_process or not any(t.name == "tensorboard" for t in accelerator.trackers):
        return
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    for name, model in wrapped.items():
        stds = bayes_adapter.posterior_stds(accelerator.unwrap_model(model))
        if stds.numel():
            writer.add_histogram(f"posterior_std/{name}", stds, step)


def main(args: argparse.Namespace) -> dict:
    """Trains, checkpoints, validates and exports; see the module docstring.

    Returns:
        `dict`: `global_step`, the model `family` name, the trained (unwrapped) denoiser as `unet` or `transformer`,
        and `text_encoders` (the trained ones; empty unless `--train_text_encoder`), for callers that embed the script.
    """
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler
    from peft import inject_adapter_in_model
    from tqdm.auto import tqdm

    import bayes_adapter

    # The family's checks run before the Accelerator or any model (a Hub id's model_index.json is read here).
    family, model_index = resolve_family(args)
    logger = get_logger(__name__)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    for evaluator in getattr(args, "evaluators", ()):
        if evaluator is not None:  # loaded on CPU by validate_args
            evaluator.model.to(accelerator.device)
            evaluator.device = accelerator.device
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.seed is not None:
        set_seed(args.seed, device_specific=True)  # distinct noise per process; the data sharding is synchronised
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # Models, each loaded with the class model_index.json records for it.
    path, load = args.pretrained_model_name_or_path, {"revision": args.revision}
    pipeline_cls = getattr(diffusers, family.pipeline_class)
    denoiser = dreambooth_models.load_component(path, model_index, family.denoiser, variant=args.variant, **load)
    if args.with_prior_preservation:
        generate_class_images(args, accelerator, pipeline_cls)
    encoder_names = list(family.text_encoders)
    tokenizers = [
        dreambooth_models.load_component(path, model_index, family.tokenizer_of(n), **load) for n in encoder_names
    ]
    text_encoders = [
        dreambooth_models.load_component(path, model_index, name, variant=args.variant, **load)
        for name in encoder_names
    ]
    if args.pretrained_vae_model_name_or_path:
        vae = diffusers.AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    else:
        vae = dreambooth_models.load_component(path, model_index, "vae", variant=args.variant, **load)
    scheduler_cls = FlowMatchEulerDiscreteScheduler if family.flow_matching else DDPMScheduler
    noise_scheduler = scheduler_cls.from_pretrained(path, subfolder="scheduler", **load)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # SDXL's own VAE overflows in fp16 (force_upcast): keep it in fp32 unless a separate (fp16-safe) VAE is given.
    upcast = getattr(vae.config, "force_upcast", False) and not args.pretrained_vae_model_name_or_path
    vae_dtype = torch.float32 if family.name == "sdxl" and upcast else weight_dtype
    vae.requires_grad_(False).to(accelerator.device, dtype=vae_dtype)
    for model in [denoiser, *text_encoders]:
        model.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)

    # Bayesian LoRA adapters; their parameters are trained in fp32 whatever the mixed precision.
    kl_weight = args.kl_weight
    if kl_weight == "elbo":
        kl_weight = elbo_kl_weight_for(args, vae.config, noise_scheduler.config)
        logger.info(f"--kl_weight elbo: {kl_weight:.3g} (2 / (D * T))")
    denoiser.add_adapter(lora_config(args, denoiser_targets(args, family), kl_weight))
    trained = {family.denoiser: denoiser}
    if args.train_text_encoder:
        for name, text_encoder in zip(encoder_names, text_encoders):
            if name in family.trainable_text_encoders:  # the CLIP encoders; T5 stays frozen
                config = lora_config(args, args.text_encoder_target_modules, kl_weight)
                inject_adapter_in_model(config, text_encoder, adapter_name="default")
                trained[name] = text_encoder
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for name in trained:
            if name != family.denoiser:
                trained[name].gradient_checkpointing_enable()
    # cast_training_params only upcasts trainable parameters: the frozen posterior rho (--fixed_posterior_std) too.
    for model in trained.values():
        bayes_adapter.cast_adapter_params(model, torch.float32)

    def unwrap(model):
        model = accelerator.unwrap_model(model)
        return model._orig_mod if hasattr(model, "_orig_mod") else model

    # Checkpoints hold the whole Bayesian adapters (means and posterior std), not the frozen base weights.
    def save_model_hook(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            by_id = {id(model): name for name, model in trained.items()}
            components = {by_id[id(unwrap(m))]: unwrap(m) for m in models}
            save_bayes_adapters(checkpoint_dir, components)
            # Every checkpoint is also a LoRA: pipe.load_lora_weights("out/checkpoint-N") loads its mean.
            bayes_adapter.export.export_components(components, checkpoint_dir, pipeline_cls, per_component=False)
        while weights:
            weights.pop()  # keep accelerate from saving the full models

    def load_model_hook(models, checkpoint_dir):
        by_id = {id(model): name for name, model in trained.items()}
        loaded = {}
        while models:
            model = unwrap(models.pop())
            loaded[by_id[id(model)]] = model
        load_bayes_adapters(checkpoint_dir, loaded)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # Data, checked again here for embedders that skip parse_args.
    instance_images = _list_images(Path(args.instance_data_dir), "--instance_data_dir", _caption_suffix(args))
    class_images = []
    if args.with_prior_preservation:
        class_images = _list_images(Path(args.class_data_dir), "--class_data_dir")[: args.num_class_images]
    captions = instance_captions(instance_images, args)
    latent_cache = None
    if args.cache_latents:
        if not args.center_crop:
            logger.info("--cache_latents: the images are cached at their centre crop (no random crops).")
        latent_cache = cache_latents(
            vae, instance_images + class_images, args.resolution, args.random_flip, accelerator.device, vae_dtype
        )
    dataset = DreamBoothDataset(
        instance_images,
        captions,
        args.resolution,
        class_images,
        args.class_prompt,
        args.center_crop,
        args.random_flip,
        repeats=args.repeats,
        caption_dropout=args.caption_dropout,
        latent_cache=latent_cache,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        collate_fn=lambda examples: collate(examples, args.with_prior_preservation),
    )
    reference = torch.stack([load_image(path, args.resolution)[0] for path in instance_images])
    kl_examples = len(instance_images) if args.kl_scaling == "per_image" else 1
    # Frozen text encoders: every prompt the run can see is encoded once (diffusers' precomputed embeddings).
    prompt_cache = None
    if not args.train_text_encoder:
        prompts = [*captions, *([args.class_prompt] if args.with_prior_preservation else [])]
        prompt_cache = dreambooth_models.PromptCache(
            family,
            text_encoders,
            tokenizers,
            prompts + ([""] if args.caption_dropout else []),
            accelerator.device,
            args.max_sequence_length,
        )

    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate *= factor
        if args.posterior_std_learning_rate is not None:
            args.posterior_std_learning_rate *= factor
    parameters = [p for model in trained.values() for p in model.parameters() if p.requires_grad]
    groups = []
    for name, model in trained.items():
        for group in bayes_adapter.param_groups(model, posterior_std_lr=args.posterior_std_learning_rate):
            if name != family.denoiser and args.text_encoder_lr is not None and "lr" not in group:
                group["lr"] = args.text_encoder_lr  # the means (and stds without their own lr) of the text encoders
            groups.append(group)
    optimizer_cls = torch.optim.AdamW
    if args.optimizer == "prodigy":
        import prodigyopt

        optimizer_cls = prodigyopt.Prodigy
    elif args.use_8bit_adam:
        import bitsandbytes

        optimizer_cls = bitsandbytes.optim.AdamW8bit
    optimizer = optimizer_cls(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    steps_per_epoch = math.ceil(
        math.ceil(len(dataloader) / accelerator.num_processes) / args.gradient_accumulation_steps
    )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    prepared = accelerator.prepare(*trained.values(), optimizer, dataloader, lr_scheduler)
    wrapped = dict(zip(trained, prepared[: len(trained)]))
    optimizer, dataloader, lr_scheduler = prepared[len(trained) :]
    denoiser_train = wrapped[family.denoiser]
    train_encoders = [wrapped.get(name, encoder) for name, encoder in zip(encoder_names, text_encoders)]
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    guidance = None  # Flux.1-dev is guidance-distilled: it is told a guidance scale
    if family.name == "flux" and unwrap(denoiser_train).config.guidance_embeds:
        guidance = args.guidance_scale

    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("dreambooth-bayes-lora", config=config)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Training: {len(instance_images)} instance images, {len(class_images)} class images, "
        f"{family.label}, batch {total_batch} (per device {args.train_batch_size}), {args.max_train_steps} steps *****"
    )
    global_step, first_epoch = 0, 0
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint == "latest":
            found = sorted(
                (p for p in output_dir.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1])
            )
            checkpoint = found[-1] if found else None
        else:
            checkpoint = output_dir / Path(args.resume_from_checkpoint).name
        if checkpoint is None:
            accelerator.print(f"No checkpoint in {str(output_dir)!r}: starting a new training run.")
        else:
            accelerator.print(f"Resuming from checkpoint {checkpoint}")
            accelerator.load_state(str(checkpoint))
            global_step = int(checkpoint.name.split("-")[1])
            first_epoch = global_step // steps_per_epoch

    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    components = {
        family.denoiser: unwrap(denoiser_train),
        "vae": vae,
        **{name: unwrap(e) for name, e in zip(encoder_names, train_encoders)},
        **{family.tokenizer_of(name): t for name, t in zip(encoder_names, tokenizers)},
    }
    for _epoch in range(first_epoch, num_epochs):
        for model in wrapped.values():
            model.train()
        for batch in dataloader:
            with accelerator.accumulate(*wrapped.values()):
                if "latents" in batch:
                    sample = batch["latents"].to(accelerator.device, dtype=vae_dtype)
                else:
                    sample = vae.encode(batch["pixels"].to(accelerator.device, dtype=vae_dtype)).latent_dist.sample()
                latents = dreambooth_models.to_latents(vae, sample).to(weight_dtype)
                noise = torch.randn_like(latents)
                if prompt_cache is not None:
                    cond = prompt_cache(batch["prompts"])
                else:
                    cond = dreambooth_models.encode_prompts(
                        family,
                        train_encoders,
                        tokenizers,
                        batch["prompts"],
                        accelerator.device,
                        args.max_sequence_length,
                    )
                weighting = sigmas = None
                if family.flow_matching:
                    noisy, timesteps, sigmas, weighting = dreambooth_models.flow_matching_inputs(
                        args, noise_scheduler, latents, noise
                    )
                    target = noise - latents
                else:
                    if args.noise_offset:
                        offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
                        noise = noise + args.noise_offset * offset.to(noise.dtype)
                    timesteps = torch.randint(
                        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
                    ).long()
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                    if noise_scheduler.config.prediction_type == "v_prediction":
                        target = noise_scheduler.get_velocity(latents, noise, timesteps)
                    else:
                        target = noise
                model_pred = dreambooth_models.predict(
                    family, denoiser_train, noisy, timesteps, cond, batch["time_ids"], guidance
                )
                if family.name == "sd3" and args.precondition_outputs:  # EDM preconditioning: predict the latents
                    model_pred = model_pred * (-sigmas) + noisy
                    target = latents
                loss = denoising_loss(args, noise_scheduler, model_pred, target, timesteps, weighting)
                kl_term = sum(bayes_adapter.kl_loss(unwrap(m), kl_examples) for m in wrapped.values())
                accelerator.backward(loss + kl_term)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
                    save_checkpoint(args, accelerator, output_dir, global_step, logger)
                if accelerator.is_main_process and args.validation_prompt and global_step % args.validation_steps == 0:
                    # Validation leaves the training's random stream as it was (a resumed run then matches).
                    with torch.random.fork_rng(
                        devices=[accelerator.device] if accelerator.device.type == "cuda" else []
                    ):
                        pipeline = pipeline_cls.from_pretrained(path, **load, variant=args.variant, **components)
                        log_validation(
                            args, accelerator, pipeline, list(wrapped.values()), reference, global_step, "validation"
                        )
                with torch.no_grad():
                    kl = sum(bayes_adapter.kl_divergence(unwrap(m)) for m in wrapped.values())
                    logs = {
                        "loss": loss.detach().item(),
                        "kl": float(kl),
                        "kl_loss": float(kl_term),
                        "lr": lr_scheduler.get_last_lr()[0],
                    }
                    for name, model in wrapped.items():
                        stats = bayes_adapter.posterior_std_stats(unwrap(model))
                        logs.update(
                            {
                                f"sigma_{key}" if name == family.denoiser else f"sigma_{name}_{key}": value
                                for key, value in stats.items()
                                if key != "count"
                            }
                        )
                progress_bar.set_postfix(loss=logs["loss"], sigma=logs["sigma_mean"])
                accelerator.log(logs, step=global_step)
                if global_step == 1 or global_step % args.validation_steps == 0:
                    log_std_histograms(accelerator, wrapped, global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    final = {name: unwrap(model) for name, model in wrapped.items()}
    if accelerator.is_main_process:
        for model in final.values():
            model.eval()
        save_bayes_adapters(output_dir / BAYES_ADAPTER_DIR, final)
        export_mean_lora(output_dir, final, pipeline_cls, kohya=args.output_kohya_format)
        logger.info(f"Exported the mean LoRA to {output_dir} and the Bayesian adapters to {BAYES_ADAPTER_DIR}/")
        images = None
        if args.validation_prompt:  # the exported file, loaded the way users will load it
            pipeline = pipeline_cls.from_pretrained(
                path, revision=args.revision, variant=args.variant, dtype=weight_dtype
            )
            pipeline.load_lora_weights(str(output_dir))
            images = log_validation(args, accelerator, pipeline, [], reference, global_step, "test")
        if args.push_to_hub:
            push_to_hub(args, output_dir, final, images, pipeline_cls)
    accelerator.end_training()
    return {
        "global_step": global_step,
        "family": family.name,
        family.denoiser: final[family.denoiser],
        "text_encoders": [final[name] for name in encoder_names if name in final],
    }


def save_checkpoint(args, accelerator, output_dir: Path, global_step: int, logger) -> None:
    """`accelerator.save_state` to `checkpoint-<step>`, first removing the oldest beyond `--checkpoints_total_limit`."""
    if args.checkpoints_total_limit is not None:
        checkpoints = sorted(
            (p for p in output_dir.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1])
        )
        for old in checkpoints[: max(0, len(checkpoints) - args.checkpoints_total_limit + 1)]:
            logger.info(f"Removing checkpoint {old} (--checkpoints_total_limit={args.checkpoints_total_limit})")
            shutil.rmtree(old)
    path = output_dir / f"checkpoint-{global_step}"
    accelerator.save_state(str(path))
    logger.info(f"Saved state to {path}")


def push_to_hub(args, output_dir: Path, final: dict, images: np.ndarray | None, pipeline_cls=None) -> None:
    """Uploads the mean LoRA (never the checkpoints) to `--hub_model_id` with `bayes_adapter.push_to_hub`.

    A UNet-only adapter is pushed as one component; with text-encoder adapters, the mapping of every trained
    component (all in one diffusers file, `pipeline_cls.save_lora_weights`). The card holds the Bayesian settings and
    the last validation images.
    """
    import bayes_adapter

    pil_images = [
        Image.fromarray((image * 255).round().astype(np.uint8)) for image in (images if images is not None else [])
    ]
    common = dict(
        token=args.hub_token,
        base_model=args.pretrained_model_name_or_path,
        instance_prompt=args.instance_prompt,
        validation_images=pil_images or None,
    )
    if len(final) == 1:  # the denoiser alone
        ((component, model),) = final.items()
        bayes_adapter.push_to_hub(model, args.hub_model_id, component=component, **common)
    else:
        bayes_adapter.push_to_hub(final, args.hub_model_id, pipeline_cls=pipeline_cls, **common)


def run_command(argv: list[str] | None = None) -> int:
    """The command line: bad input is reported as `error: ...` with exit status 2, without a traceback."""
    try:
        main(parse_args(argv))
    except ArgumentsError as error:  # from the checks main() runs before any model loads
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_command())
