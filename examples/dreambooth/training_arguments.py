"""The DreamBooth script's training, flow-matching and output options (`arguments.build_parser` adds them)."""

from __future__ import annotations


def add_training_arguments(train) -> None:
    """The optimisation: steps, batches, learning rates, optimizer, precision."""
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


def add_flow_matching_arguments(flow) -> None:
    """The flow-matching DiTs' sigma sampling and prompt length, as diffusers' scripts."""
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
        help="The guidance given to a guidance-distilled Flux (Flux.1-dev, Flux.2-dev) while training; Flux.2 [klein] "
        "has no guidance embedding and, as its pipeline, gets none.",
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


def add_output_arguments(out) -> None:
    """Checkpoints, validation, evaluation metrics, logging and the Hub."""
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
