"""The DreamBooth script's command line: every option, its help and its default (checked in `settings`)."""

from __future__ import annotations

import argparse
import re

from .families import DDPMFamily


DEFAULT_UNET_TARGETS = DDPMFamily.default_targets
# Chosen by the lab's pre-registered rule (examples/corruption_stage/RESULTS.md, "0.2.0"); the README says why.
DEFAULT_KL_WEIGHT: float | str = 0.0
DEFAULT_TEXT_ENCODER_TARGETS = "q_proj,k_proj,v_proj,out_proj"
# --quantize_base: its choices and the bayes_adapter.quantization method each one names.
QUANTISATION_METHODS = {"nf4": "bnb_nf4", "int8": "torchao_int8"}
QUANTISATION_PACKAGES = {"nf4": "bitsandbytes", "int8": "torchao"}
DESCRIPTION = (
    "DreamBooth-style few-shot fine-tuning of Stable Diffusion (1.x, 2.x, XL, 3/3.5), Flux.1, Flux.2 ([dev] or "
    "[klein]), Qwen-Image, Z-Image or SANA with Bayesian LoRA."
)


def kl_weight_arg(value: str) -> float | str:
    """`--kl_weight`: 'elbo' or a number (checked with the other Bayesian settings)."""
    if value.strip().lower() == "elbo":
        return "elbo"
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'elbo', got {value!r}") from None


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: `(default: X)`, `(off by default)` for a flag, `(required)`; a help
    text that already says its default (e.g. "default: the rank") is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (off by default)"
        return f"{text} (default: %(default)s)"


def posterior_std_max_arg(value: str) -> float | str | None:
    """`--posterior_std_max`: a number, 'none' (unbounded) or 'auto' (checked with the other Bayesian settings)."""
    word = value.strip().lower()
    if word in ("none", "auto"):
        return None if word == "none" else "auto"
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number > --posterior_std_init, 'auto' or 'none', got {value!r}"
        ) from None


# BayesLoraConfig's fields as this script's flags name them, for its error messages.
_CONFIG_FLAGS = {
    "train_posterior_std": "--fixed_posterior_std",
    **{
        field: f"--{field}"
        for field in (
            "lora_alpha",
            "lora_dropout",
            "bayesian_factors",
            "embedding_bayesian_factors",
            "posterior_std_init",
            "prior_std",
            "estimator",
            "kl_weight",
            "posterior_std_parametrisation",
            "posterior_std_max",
            "sample_at_inference",
        )
    },
}


def config_error_with_flags(message: str) -> str:
    """A BayesLoraConfig message with its field names replaced by the flags that set them."""
    pattern = r"(?<![\w.-])(" + "|".join(sorted(map(re.escape, _CONFIG_FLAGS), key=len, reverse=True)) + r")(?![\w])"
    return re.sub(pattern, lambda match: _CONFIG_FLAGS[match.group(1)], message)


def build_parser() -> argparse.ArgumentParser:
    """The script's argument parser (argparse checks types and choices; `settings.check_settings` the rest)."""
    from .training_arguments import add_flow_matching_arguments, add_output_arguments, add_training_arguments

    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    add_model_arguments(parser.add_argument_group("model"))
    add_data_arguments(parser.add_argument_group("data"))
    add_bayesian_arguments(parser.add_argument_group("Bayesian LoRA (bayes_adapter.BayesLoraConfig)"))
    add_training_arguments(parser.add_argument_group("training"))
    add_flow_matching_arguments(parser.add_argument_group("flow matching (SD3, Flux), as diffusers' scripts"))
    add_output_arguments(parser.add_argument_group("checkpoints, validation, logging"))
    return parser


def add_model_arguments(model) -> None:
    """The pipeline to fine-tune (and its quantisation)."""
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of a diffusers pipeline: Stable Diffusion 1.x/2.x, SDXL, SD3/3.5, Flux.1, "
        "Flux.2 [dev] or [klein], Qwen-Image, Z-Image or SANA (told by its model_index.json).",
    )
    model.add_argument(
        "--revision",
        type=str,
        default=None,
        help="Revision (branch, tag or commit) of the pretrained model; default: the main branch.",
    )
    model.add_argument(
        "--variant", type=str, default=None, help="Variant of the model files, e.g. 'fp16'; default: the plain files."
    )
    model.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A separate VAE (e.g. an fp16-safe SDXL VAE); by default the pipeline's own.",
    )
    model.add_argument(
        "--quantize_base",
        type=str,
        default=None,
        choices=sorted(QUANTISATION_METHODS),
        help="Quantise the denoiser's targeted Linear layers before adding the adapter (QLoRA-style; needs "
        '`pip install -e ".[quant]"` from the repository): nf4 = bitsandbytes 4-bit NormalFloat, int8 = torchao int8 weight-only. '
        "Quantised while loading through diffusers' BitsAndBytesConfig (nf4, CUDA only) or TorchAoConfig (int8, any "
        "device), otherwise right after loading. "
        "The quantised weights stay frozen, the adapter trains in fp32, and the export is the same plain LoRA, "
        "which loads into the unquantised pipeline. Off by default.",
    )


def add_data_arguments(data) -> None:
    """The instance and class images and their prompts."""
    data.add_argument(
        "--instance_data_dir",
        type=str,
        default=None,
        help="Folder of the instance (subject) images (or give --dataset_name).",
    )
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Instead of --instance_data_dir: a local folder, either written by datasets' save_to_disk (a Dataset, or "
        "a DatasetDict's train split) or in diffusers' imagefolder convention (a metadata.jsonl with one JSON object "
        "per image, its file_name and its caption); else what datasets.load_dataset loads, as in diffusers' scripts: "
        "a Hub dataset id (e.g. diffusers/dog-example, downloaded into the datasets cache) or a downloaded "
        "Hub dataset's folder, its train split. Images in --image_column, captions in --caption_column; images "
        "without one use --instance_prompt.",
    )
    data.add_argument(
        "--dataset_config_name",
        type=str,
        default=None,
        help="The config of a --dataset_name loaded by datasets.load_dataset (a Hub dataset with several).",
    )
    data.add_argument(
        "--image_column",
        type=str,
        default=None,
        help="The column holding the images (with a --dataset_name that is not an imagefolder; default: image).",
    )
    data.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="The column (a saved or Hub dataset) or metadata.jsonl key (imagefolder) of each image's caption (with "
        "--dataset_name). Default: 'text' where the dataset has it, else every image uses --instance_prompt (an "
        "images-only dataset); a column given here must exist.",
    )
    data.add_argument(
        "--instance_prompt", type=str, required=True, help="Prompt naming the instance, e.g. 'a photo of sks dog'."
    )
    data.add_argument("--with_prior_preservation", action="store_true", help="Add the prior-preservation loss.")
    data.add_argument(
        "--class_data_dir",
        type=str,
        default=None,
        help="Folder of class images; missing ones are generated with the base pipeline (required with "
        "--with_prior_preservation; no default).",
    )
    data.add_argument(
        "--class_prompt",
        type=str,
        default=None,
        help="Prompt of the class, e.g. 'a photo of dog' (required with --with_prior_preservation; no default).",
    )
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
        help="Training resolution in pixels (divisible by 8 for SD/SDXL/SD3, 16 for Flux, Flux.2, Qwen-Image and Z-Image, "
        "32 for SANA); use 1024 for SDXL, SD3 and Flux.",
    )
    data.add_argument(
        "--aspect_ratio_buckets",
        action="store_true",
        help="Train each instance image in its own aspect ratio at about --resolution^2 pixels (sides multiples of "
        "16, or 8 for SD/SDXL/SD3), resized to cover its bucket and only the excess cropped, instead of a square "
        "crop; each batch is drawn from one bucket, and --cache_latents caches each image at its bucket. Not with "
        "--with_prior_preservation. Off by default (then --resolution is the square side).",
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


def add_bayesian_arguments(bayes) -> None:
    """The Bayesian LoRA adapter (`bayes_adapter.BayesLoraConfig`'s fields and the KL)."""
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
        "LoRA scripts (SD3: the attention projections; Flux: attention and feed-forward; Flux.2: the attention "
        "projections of both block kinds).",
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
        "--posterior_std_max",
        type=posterior_std_max_arg,
        default="auto",
        help="Smooth upper bound of every posterior std: a number > --posterior_std_init, 'auto' (the default: 10 x "
        "--posterior_std_init) or 'none' (unbounded, as the paper and bayes-adapter <= 0.2.0). The std approaches it "
        "without reaching it; it keeps a large --learning_rate from growing the stds until samples turn to noise. "
        "Saved with the adapter; the logs' sigma_near_bound_fraction is the fraction of stds within 5%% of it.",
    )
    bayes.add_argument(
        "--fixed_posterior_std",
        action="store_true",
        help="Freeze the posterior std at --posterior_std_init (fixed weight noise, a control).",
    )
    bayes.add_argument(
        "--use_dora",
        action="store_true",
        help="DoRA: the low-rank direction Bayesian, the magnitude vector deterministic "
        "(BayesLoraConfig(use_dora=True); the weight norm of the sampled weight while training, of the mean at "
        "export). Needs --estimator weight and Linear targets; the export is a DoRA LoRA that diffusers' "
        "load_lora_weights loads; no kohya file.",
    )
    bayes.add_argument(
        "--sample_at_inference",
        action="store_true",
        help="Record sample_at_inference=True in the saved Bayesian adapter (the export is the mean).",
    )
