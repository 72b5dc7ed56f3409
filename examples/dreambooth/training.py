"""The DreamBooth training run, step by step: setup, models, data, optimizer, the loop, and the final save and export.

`main(settings)` runs them in order; `run_command(argv)` is the command line (bad input: `error: ...`, exit 2).
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.logging import get_logger

from . import data as dreambooth_data
from . import families, sources
from .adapters import (
    add_adapters,
    elbo_kl_weight_for,
    register_checkpoint_hooks,
    resume_checkpoint,
    unwrap,
)
from .buckets import BucketBatchSampler, bucket_sizes
from .loop import save_and_export, train
from .outputs import remove_previous_run
from .quantized_base import load_denoiser, plan_quantisation
from .settings import ArgumentsError, Settings, parse_args, resolve_model
from .stage_monitor import StageMonitor


logger = get_logger(__name__)


@dataclass
class Models:
    """The pipeline's components loaded for training, and the dtypes they run in."""

    pipeline_cls: type
    denoiser: torch.nn.Module
    text_encoders: list
    tokenizers: list
    vae: torch.nn.Module
    noise_scheduler: object
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype


@dataclass
class TrainingData:
    """What the loop reads: the batches, the reference images of the monitor, the cached prompt conditioning."""

    instance_images: list[Path]
    class_images: list[Path]
    dataloader: torch.utils.data.DataLoader
    reference: torch.Tensor  # the instance images at their centre crop, in [-1, 1]
    prompt_cache: families.PromptCache | None  # None when the text encoders train
    kl_examples: int  # the KL's divisor: the number of instance images with --kl_scaling per_image, else 1


@dataclass
class TrainingState:
    """The prepared (accelerate-wrapped) models, optimizer and schedule of a run."""

    wrapped: dict  # the trained components by name, as accelerate wraps them
    parameters: list
    optimizer: object
    lr_scheduler: object
    steps_per_epoch: int
    guidance_scale: float | None
    global_step: int = 0
    first_epoch: int = 0
    warned_near_bound: bool = False  # the warning that many posterior stds sit at --posterior_std_max, given once
    components: dict = field(default_factory=dict)  # every pipeline component, for validation pipelines
    monitor: StageMonitor | None = None  # writes monitor.jsonl; None with --monitor_steps 0


def main(settings: Settings) -> dict:
    """Trains, checkpoints, validates and exports; see the script's docstring.

    Returns:
        `dict`: `global_step`, the model `family` name, the trained (unwrapped) denoiser as `unet` or `transformer`,
        and `text_encoders` (the trained ones; empty unless `--train_text_encoder`), for callers that embed the script.
    """
    # The family's checks run before the Accelerator or any model (a Hub id's model_index.json is read here).
    settings = resolve_model(settings)
    accelerator = setup(settings)
    models = load_models(settings, accelerator)
    trained = add_adapters(settings, models.denoiser, models.text_encoders, kl_weight_of(settings, models))
    register_checkpoint_hooks(accelerator, trained, models.pipeline_cls)
    data = load_data(settings, accelerator, models)
    settings, state = prepare_training(settings, accelerator, models, data, trained)
    train(settings, accelerator, models, data, state)
    return save_and_export(settings, accelerator, models, data, state)


def setup(settings: Settings):
    """The Accelerator, logging, seeds; the evaluators moved to its device."""
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    output_dir = Path(settings.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        mixed_precision=settings.mixed_precision,
        log_with=None if settings.report_to == "none" else settings.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / settings.logging_dir)
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if settings.overwrite_output_dir:
        if accelerator.is_main_process:
            removed = remove_previous_run(settings)
            if removed:
                names = ", ".join(path.name for path in removed)
                logger.info(f"--overwrite_output_dir: removed the previous run's {names} from {str(output_dir)!r}")
        accelerator.wait_for_everyone()
    for evaluator in settings.evaluators:
        if evaluator is not None:  # loaded on CPU by check_settings
            evaluator.model.to(accelerator.device)
            evaluator.device = accelerator.device
    if settings.lpips_model is not None:
        settings.lpips_model.to(accelerator.device)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if settings.seed is not None:
        set_seed(settings.seed, device_specific=True)  # distinct noise per process; the data sharding is synchronised
    if settings.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def load_models(settings: Settings, accelerator) -> Models:
    """Every component, each loaded with the class model_index.json records for it, frozen, on the device (the
    denoiser quantised with `--quantize_base`).

    With prior preservation, the missing class images are generated first (with the base pipeline).
    """
    import diffusers

    family, model_index = settings.family, settings.model_index
    path, load = settings.pretrained_model_name_or_path, {"revision": settings.revision}
    pipeline_cls = getattr(diffusers, family.pipeline_class)
    weight_dtype = families.half_precision_dtype(accelerator.mixed_precision) or torch.float32
    # Where --quantize_base quantises, decided on the empty denoiser before the class images take their time.
    quantisation = plan_quantisation(settings, accelerator.device.type, weight_dtype)
    if settings.with_prior_preservation:
        dreambooth_data.generate_class_images(settings, accelerator, pipeline_cls)
    denoiser = load_denoiser(settings, accelerator.device, weight_dtype, quantisation)
    tokenizers = [
        families.load_component(path, model_index, family.tokenizer_of(name), **load) for name in family.text_encoders
    ]
    text_encoders = [
        families.load_component(path, model_index, name, variant=settings.variant, **load)
        for name in family.text_encoders
    ]
    if settings.pretrained_vae_model_name_or_path:
        vae = diffusers.AutoencoderKL.from_pretrained(settings.pretrained_vae_model_name_or_path)
    else:
        vae = families.load_component(path, model_index, "vae", variant=settings.variant, **load)
    noise_scheduler = family.noise_scheduler_class().from_pretrained(path, subfolder="scheduler", **load)

    vae.requires_grad_(False).to(accelerator.device)
    vae_dtype = family.cast_vae(vae, weight_dtype, separate_vae=bool(settings.pretrained_vae_model_name_or_path))
    for model in text_encoders:
        model.requires_grad_(False).to(accelerator.device)
        family.cast_text_encoder(model, weight_dtype)
    return Models(pipeline_cls, denoiser, text_encoders, tokenizers, vae, noise_scheduler, weight_dtype, vae_dtype)


def kl_weight_of(settings: Settings, models: Models) -> float:
    """`--kl_weight`, with 'elbo' computed from the latents and the scheduler."""
    if settings.kl_weight != "elbo":
        return settings.kl_weight
    kl_weight = elbo_kl_weight_for(settings, models.vae.config, models.noise_scheduler.config)
    logger.info(f"--kl_weight elbo: {kl_weight:.3g} (2 / (D * T))")
    return kl_weight


def load_data(settings: Settings, accelerator, models: Models) -> TrainingData:
    """The images (checked again here for embedders that skip parse_args), latents and prompts, and the loader."""
    instance_images, captions = sources.instance_images_and_captions(settings)
    class_images = []
    if settings.with_prior_preservation:
        class_images = sources.list_images(Path(settings.class_data_dir), "--class_data_dir")
        class_images = class_images[: settings.num_class_images]
    size = settings.resolution
    if settings.aspect_ratio_buckets:
        size = bucket_sizes(instance_images, settings.resolution, settings.family.resolution_multiple)
        counts = Counter(size.values())
        logger.info(f"--aspect_ratio_buckets: {dict(counts)} images per (height, width) bucket")
    latent_cache = None
    if settings.cache_latents:
        if not settings.center_crop:
            logger.info("--cache_latents: the images are cached at their centre crop (no random crops).")
        latent_cache = dreambooth_data.cache_latents(
            models.vae,
            instance_images + class_images,
            size,
            settings.random_flip,
            accelerator.device,
            models.vae_dtype,
            settings.family,
        )
    dataset = dreambooth_data.DreamBoothDataset(
        instance_images,
        captions,
        size,
        class_images,
        settings.class_prompt,
        settings.center_crop,
        settings.random_flip,
        repeats=settings.repeats,
        caption_dropout=settings.caption_dropout,
        latent_cache=latent_cache,
    )
    with_prior = settings.with_prior_preservation
    collate = lambda examples: dreambooth_data.collate(examples, with_prior)  # noqa: E731
    if settings.aspect_ratio_buckets:  # each batch from one bucket, so that its images stack
        sampler = BucketBatchSampler(dataset.buckets(), settings.train_batch_size)
        batching = {"batch_sampler": sampler}
    else:
        batching = {"batch_size": settings.train_batch_size, "shuffle": True}
    dataloader = torch.utils.data.DataLoader(
        dataset, num_workers=settings.dataloader_num_workers, collate_fn=collate, **batching
    )
    reference = torch.stack([dreambooth_data.load_image(path, settings.resolution)[0] for path in instance_images])
    # Frozen text encoders: every prompt the run can see is encoded once (diffusers' precomputed embeddings).
    prompt_cache = None
    if not settings.train_text_encoder:
        prompts = [*captions, *([settings.class_prompt] if with_prior else [])]
        prompt_cache = families.PromptCache(
            settings.family,
            models.text_encoders,
            models.tokenizers,
            prompts + ([""] if settings.caption_dropout else []),
            accelerator.device,
            settings.max_sequence_length,
        )
    kl_examples = len(instance_images) if settings.kl_scaling == "per_image" else 1
    return TrainingData(instance_images, class_images, dataloader, reference, prompt_cache, kl_examples)


def prepare_training(settings: Settings, accelerator, models: Models, data: TrainingData, trained: dict):
    """The optimizer and learning-rate schedule, everything prepared by accelerate, and the resumed step.

    Returns:
        `(settings, state)`: the settings with the learning rates (`--scale_lr`) and `max_train_steps` resolved, and
        the run's `TrainingState`.
    """
    from diffusers.optimization import get_scheduler

    import bayes_adapter

    learning_rate, std_learning_rate = settings.learning_rate, settings.posterior_std_learning_rate
    if settings.scale_lr:
        factor = settings.gradient_accumulation_steps * settings.train_batch_size * accelerator.num_processes
        learning_rate *= factor
        std_learning_rate = std_learning_rate * factor if std_learning_rate is not None else None
    denoiser_name = settings.family.denoiser
    parameters = [p for model in trained.values() for p in model.parameters() if p.requires_grad]
    groups = []
    for name, model in trained.items():
        for group in bayes_adapter.param_groups(model, posterior_std_lr=std_learning_rate):
            if name != denoiser_name and settings.text_encoder_lr is not None and "lr" not in group:
                group["lr"] = settings.text_encoder_lr  # the means (and stds without their own lr) of the encoders
            groups.append(group)
    optimizer = optimizer_class(settings)(
        groups,
        lr=learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay,
        eps=settings.adam_epsilon,
    )
    steps_per_epoch = math.ceil(
        math.ceil(len(data.dataloader) / accelerator.num_processes) / settings.gradient_accumulation_steps
    )
    max_train_steps = settings.max_train_steps
    if max_train_steps is None:
        max_train_steps = settings.num_train_epochs * steps_per_epoch
    settings = settings.replace(
        learning_rate=learning_rate, posterior_std_learning_rate=std_learning_rate, max_train_steps=max_train_steps
    )
    lr_scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=settings.lr_num_cycles,
        power=settings.lr_power,
    )

    prepared = accelerator.prepare(*trained.values(), optimizer, data.dataloader, lr_scheduler)
    wrapped = dict(zip(trained, prepared[: len(trained)]))
    optimizer, data.dataloader, lr_scheduler = prepared[len(trained) :]
    state = TrainingState(
        wrapped,
        parameters,
        optimizer,
        lr_scheduler,
        steps_per_epoch=math.ceil(len(data.dataloader) / settings.gradient_accumulation_steps),
        guidance_scale=settings.family.guidance_scale(unwrap(accelerator, wrapped[denoiser_name]), settings),
    )
    family = settings.family
    state.components = {
        denoiser_name: unwrap(accelerator, wrapped[denoiser_name]),
        "vae": models.vae,
        **{n: unwrap(accelerator, wrapped.get(n, e)) for n, e in zip(family.text_encoders, models.text_encoders)},
        **{family.tokenizer_of(n): t for n, t in zip(family.text_encoders, models.tokenizers)},
    }
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-bayes-lora", config=settings.tracker_config())
    total_batch = settings.train_batch_size * accelerator.num_processes * settings.gradient_accumulation_steps
    logger.info(
        f"***** Training: {len(data.instance_images)} instance images, {len(data.class_images)} class images, "
        f"{family.label}, batch {total_batch} (per device {settings.train_batch_size}), {max_train_steps} steps *****"
    )
    if settings.resume_from_checkpoint:
        checkpoint = resume_checkpoint(settings)
        if checkpoint is None:
            accelerator.print(f"No checkpoint in {settings.output_dir!r}: starting a new training run.")
        else:
            accelerator.print(f"Resuming from checkpoint {checkpoint}")
            try:
                accelerator.load_state(str(checkpoint))
            except ValueError as error:  # load_bayes_adapters: the checkpoint's adapter is not this run's
                raise ArgumentsError(
                    f"--resume_from_checkpoint: {checkpoint.name} holds another adapter than these settings build "
                    f"({error}); resume with the settings it was trained with (--rank, --*_target_modules, "
                    "--bayesian_factors, ...), or start a new run with --overwrite_output_dir."
                ) from None
            state.global_step = int(checkpoint.name.split("-")[1])
            state.first_epoch = state.global_step // state.steps_per_epoch
    if settings.monitor_steps:
        state.monitor = StageMonitor(
            settings, accelerator, models.vae, models.vae_dtype, data.reference, resumed_step=state.global_step
        )
    return settings, state


def optimizer_class(settings: Settings) -> type:
    """torch's AdamW, prodigyopt's Prodigy (`--optimizer prodigy`) or bitsandbytes' AdamW8bit (`--use_8bit_adam`)."""
    if settings.optimizer == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy
    if settings.use_8bit_adam:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit
    return torch.optim.AdamW


def run_command(argv: list[str] | None = None) -> int:
    """The command line: bad input is reported as `error: ...` with exit status 2, without a traceback."""
    program = Path(sys.argv[0]).name
    try:
        main(parse_args(argv))
    except ArgumentsError as error:  # from the checks main() runs before any training step
        print(f"{program}: error: {error}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as error:
        print(
            f"{program}: failed: out of memory ({str(error).splitlines()[0]}). Lower --train_batch_size or "
            "--resolution, or add --gradient_checkpointing, --mixed_precision bf16, --cache_latents or "
            "--quantize_base nf4; --resume_from_checkpoint latest continues from the last checkpoint.",
            file=sys.stderr,
        )
        return 1
    return 0
