"""The DreamBooth script's command line: every option, its help and its default (checked in `settings`)."""

from __future__ import annotations

import argparse

from .families import DDPMFamily


DEFAULT_UNET_TARGETS = DDPMFamily.default_targets
# Chosen by the lab's pre-registered rule (examples/corruption_stage/RESULTS.md, "0.2.0"); the README says why.
DEFAULT_KL_WEIGHT: float | str = 0.0
DEFAULT_TEXT_ENCODER_TARGETS = "q_proj,k_proj,v_proj,out_proj"
# --quantize_base: its choices and the bayes_adapter.quantization method each one names.
QUANTISATION_METHODS = {"nf4": "bnb_nf4", "int8": "torchao_int8"}
QUANTISATION_PACKAGES = {"nf4": "bitsandbytes", "int8": "torchao"}
DESCRIPTION = (
    "DreamBooth-style few-shot fine-tuning of Stable Diffusion (1.x, 2.x, XL, 3/3.5), Flux.1, Flux.2, Qwen-Image or "
    "Z-Image with Bayesian LoRA."
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


def build_parser() -> argparse.ArgumentParser:
    """The script's argument parser (argparse checks types and choices; `settings.check_settings` the rest)."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of a diffusers pipeline: Stable Diffusion 1.x/2.x, SDXL, SD3/3.5, Flux.1, Flux.2, "
        "Qwen-Image or Z-Image (told by its model_index.json).",
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
        "`pip install bayes-adapter[quant]`): nf4 = bitsandbytes 4-bit NormalFloat, int8 = torchao int8 weight-only. "
        "The quantised weights stay frozen, the adapter trains in fp32, and the export is the same plain LoRA, "
        "which loads into the unquantised pipeline. Off by default.",
    )

    data = parser.add_argument_group("data")
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
        "a DatasetDict's train split; images in --image_column) or in diffusers' imagefolder convention (a "
        "metadata.jsonl with one JSON object per image, its file_name and its caption); captions in "
        "--caption_column, images without one use --instance_prompt. Hub dataset ids are not downloaded.",
    )
    data.add_argument(
        "--image_column",
        type=str,
        default="image",
        help="The column of a save_to_disk dataset holding the images (with --dataset_name).",
    )
    data.add_argument(
        "--caption_column",
        type=str,
        default="text",
        help="The column (save_to_disk dataset) or metadata.jsonl key (imagefolder) of each image's caption (with "
        "--dataset_name).",
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
        help="Training resolution in pixels (divisible by 8, by 16 for Flux); use 1024 for SDXL, SD3 and Flux.",
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
        help="DoRA: the low-rank direction Bayesian, the magnitude vector deterministic (BayesLoraConfig(use_dora=True); "
        "the weight norm of the sampled weight while training, of the mean at export). Needs --estimator weight and "
        "Linear targets; the export is a DoRA LoRA that diffusers' load_lora_weights loads; no kohya file.",
    )
    bayes.add_argument(
        "--sample_at_inference",
        action="store_true",
        help="Record sample_at_inference=True in the saved Bayesian adapter (the export is the mean).",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="bayes-lora-dreambooth", help="Where everything is written.")
    train.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace a previous run in --output_dir: delete its checkpoints, exported LoRA, Bayesian adapters, "
        "samples/, monitor.jsonl and logs before training (other files stay). Without it (or "
        "--resume_from_checkpoint), a folder holding a previous run is refused.",
    )
    train.add_argument(
        "--seed", type=int, default=None, help="Seed for reproducible training; default: none (not reproducible)."
    )
    train.add_argument(
        "--train_text_encoder", action="store_true", help="Add a Bayesian adapter to the text encoder(s)."
    )
    train.add_argument("--train_batch_size", type=int, default=1, help="Instance images per device per step.")
    train.add_argument(
        "--num_train_epochs",
        type=int,
        default=1,
        help="Passes over the instance images (when --max_train_steps is unset).",
    )
    train.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Optimizer steps; overrides the epochs; default: --num_train_epochs epochs.",
    )
    train.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Batches whose gradients are summed per optimizer step.",
    )
    train.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass: less memory, slower steps.",
    )
    train.add_argument(
        "--learning_rate", type=float, default=1e-4, help="Learning rate of the LoRA means (AdamW or Prodigy)."
    )
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
    train.add_argument(
        "--lr_warmup_steps", type=int, default=0, help="Steps of linear warm-up of the learning-rate schedule."
    )
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
        help="The guidance given to a guidance-distilled Flux (Flux.1-dev, Flux.2-dev) while training.",
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
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's beta2.")
    train.add_argument(
        "--adam_weight_decay", type=float, default=1e-2, help="AdamW's weight decay of the means (none on the stds)."
    )
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradients are clipped to this global norm.")
    train.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Data-loading processes (0: in the main process)."
    )
    train.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides accelerate's config (default: accelerate's, else no); the adapters stay in fp32.",
    )
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 on Ampere GPUs.")

    out = parser.add_argument_group("checkpoints, validation, logging")
    out.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save an accelerate checkpoint every N steps."
    )
    out.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints; default: keep all.",
    )
    out.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Resume from a checkpoint-N folder of --output_dir, or 'latest'; default: start a new run.",
    )
    out.add_argument(
        "--validation_prompt",
        type=str,
        action="append",
        default=None,
        help="Prompt of the validation images; repeat the flag for several prompts. Default: none (no validation).",
    )
    out.add_argument(
        "--validation_prompts_file",
        type=str,
        default=None,
        help="A UTF-8 text file of validation prompts, one a line (blank lines skipped), as kohya's and ai-toolkit's "
        "sample-prompt files; added after any --validation_prompt. Default: none.",
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
    out.add_argument(
        "--eval_lpips",
        action="store_true",
        help="Log LPIPS (AlexNet, v0.1; bayes_adapter.lpips) at each validation: the mean pairwise LPIPS between the "
        "images of a prompt (diversity) and the mean LPIPS from each image to its nearest instance image. Reads local "
        "files only (see --eval_lpips_backbone, --eval_lpips_linear_weights).",
    )
    out.add_argument(
        "--eval_lpips_backbone",
        type=str,
        default=None,
        help="AlexNet's ImageNet weights for --eval_lpips (torchvision's alexnet-owt-7be5be79.pth); default: torch's "
        "hub cache copy.",
    )
    out.add_argument(
        "--eval_lpips_linear_weights",
        type=str,
        default=None,
        help="LPIPS v0.1 linear weights for --eval_lpips (lpips/weights/v0.1/alex.pth); default: the installed lpips "
        "package's file (`pip install --no-deps lpips`).",
    )
    out.add_argument(
        "--validation_inference_steps", type=int, default=25, help="Denoising steps of each validation image."
    )
    out.add_argument(
        "--monitor_steps",
        type=int,
        default=None,
        help="Every N steps, measure --monitor_images samples of the instance prompt and append a record to "
        "<output_dir>/monitor.jsonl, which `bayes-adapter stage` judges for the corruption stage (default: "
        "--checkpointing_steps, so that every record has a checkpoint to go back to; 0 turns it off).",
    )
    out.add_argument(
        "--monitor_images",
        type=int,
        default=4,
        help="Samples per monitor record, drawn with the fixed seeds 0, 1, ... (default: 4).",
    )
    out.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to --output_dir.")
    out.add_argument("--report_to", type=str, default="tensorboard", help="accelerate tracker(s), or 'none'.")
    out.add_argument("--push_to_hub", action="store_true", help="Upload the exported mean LoRA to the Hub.")
    out.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="Hub repository as 'user/name' (required with --push_to_hub; no default).",
    )
    out.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the cached login).")
    return parser
