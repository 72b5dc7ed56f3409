"""The DreamBooth training loop and what ends a run: the saved Bayesian adapters, the exported mean LoRA, the push."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate.logging import get_logger

from .adapters import export_mean_lora, save_bayes_adapters, save_checkpoint, unwrap
from .losses import denoising_loss
from .outputs import BAYES_ADAPTER_DIR, DIFFUSERS_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME, MONITOR_FILE, SAMPLES_DIR
from .validation import log_std_histograms, log_validation, to_pil


if TYPE_CHECKING:
    from .settings import Settings
    from .training import Models, TrainingData, TrainingState

logger = get_logger(__name__)

# Warn (once) when more than this fraction of a model's posterior stds is within 5% of its bound.
NEAR_BOUND_WARNING_FRACTION = 0.1


def train(settings: Settings, accelerator, models: Models, data: TrainingData, state: TrainingState) -> None:
    """The loop: `max_train_steps` optimizer steps, with checkpoints, validation and logs on their schedules."""
    from tqdm.auto import tqdm

    progress_bar = tqdm(
        range(settings.max_train_steps),
        initial=state.global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    num_epochs = math.ceil(settings.max_train_steps / state.steps_per_epoch)
    for _epoch in range(state.first_epoch, num_epochs):
        for model in state.wrapped.values():
            model.train()
        for batch in data.dataloader:
            with accelerator.accumulate(*state.wrapped.values()):
                loss, kl_term = training_step(settings, accelerator, models, data, state, batch)
            if accelerator.sync_gradients:
                progress_bar.update(1)
                state.global_step += 1
                logs = after_step(settings, accelerator, models, data, state, loss, kl_term)
                progress_bar.set_postfix(loss=logs["loss"], sigma=logs["sigma_mean"])
            if state.global_step >= settings.max_train_steps:
                break
        if state.global_step >= settings.max_train_steps:
            break


def training_step(settings: Settings, accelerator, models: Models, data: TrainingData, state: TrainingState, batch):
    """One forward and backward of a batch (an optimizer step when the gradients synchronise).

    Returns:
        `(loss, kl_term)`: the denoising loss and the weighted KL that was added to it.
    """
    import bayes_adapter

    family, vae = settings.family, models.vae
    if "latents" in batch:
        sample = batch["latents"].to(accelerator.device, dtype=models.vae_dtype)
    else:
        pixels = family.vae_input(batch["pixels"].to(accelerator.device, dtype=models.vae_dtype))
        sample = family.sample_latents(vae, pixels)
    latents = family.to_latents(vae, sample).to(models.weight_dtype)
    noise = torch.randn_like(latents)
    if data.prompt_cache is not None:
        cond = data.prompt_cache(batch["prompts"])
    else:
        encoders = [state.wrapped.get(n, e) for n, e in zip(family.text_encoders, models.text_encoders)]
        cond = family.encode_prompts(
            encoders, models.tokenizers, batch["prompts"], accelerator.device, settings.max_sequence_length
        )
    noised = family.noised_latents(settings, models.noise_scheduler, latents, noise)
    denoiser = state.wrapped[family.denoiser]
    prediction = family.predict(
        denoiser, noised.noisy, noised.timesteps, cond, batch["time_ids"], state.guidance_scale
    )
    prediction, target = family.loss_inputs(settings, prediction, noised, latents)
    loss = denoising_loss(settings, models.noise_scheduler, prediction, target, noised.timesteps, noised.weighting)
    kl_term = sum(bayes_adapter.kl_loss(unwrap(accelerator, m), data.kl_examples) for m in state.wrapped.values())
    accelerator.backward(loss + kl_term)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(state.parameters, settings.max_grad_norm)
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad()
    return loss, kl_term


def after_step(settings: Settings, accelerator, models: Models, data, state: TrainingState, loss, kl_term) -> dict:
    """What follows an optimizer step: checkpoint, validation, scalars and histograms on their schedules.

    Returns:
        `dict`: the scalars logged at this step.
    """
    import bayes_adapter

    step = state.global_step
    if accelerator.is_main_process and step % settings.checkpointing_steps == 0:
        save_checkpoint(settings, accelerator, step)
    if accelerator.is_main_process and settings.validation_prompt and step % settings.validation_steps == 0:
        # Validation leaves the training's random stream as it was (a resumed run then matches).
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            pipeline = training_pipeline(settings, models, state)
            trained = list(state.wrapped.values())
            log_validation(settings, accelerator, pipeline, trained, data.reference, step, "validation")
    if state.monitor is not None:  # after the checkpoint: every record has one to go back to
        state.monitor.add_loss(loss.detach().item())
        state.monitor.maybe_record(
            step, lambda: training_pipeline(settings, models, state), list(state.wrapped.values())
        )
    with torch.no_grad():
        kl = sum(bayes_adapter.kl_divergence(unwrap(accelerator, m)) for m in state.wrapped.values())
        logs = {
            "loss": loss.detach().item(),
            "kl": float(kl),
            "kl_loss": float(kl_term),
            "lr": state.lr_scheduler.get_last_lr()[0],
        }
        for name, model in state.wrapped.items():
            stats = bayes_adapter.posterior_std_stats(unwrap(accelerator, model))
            prefix = "sigma_" if name == settings.family.denoiser else f"sigma_{name}_"
            logs.update({f"{prefix}{key}": value for key, value in stats.items() if key != "count"})
            warn_near_bound(settings, state, name, stats["near_bound_fraction"])
    accelerator.log(logs, step=step)
    if step == 1 or step % settings.validation_steps == 0:
        log_std_histograms(accelerator, state.wrapped, step)
    return logs


def warn_near_bound(settings: Settings, state: TrainingState, name: str, fraction: float) -> None:
    """Warns once per run when more than `NEAR_BOUND_WARNING_FRACTION` of a model's stds sit at their bound."""
    if state.warned_near_bound or not fraction > NEAR_BOUND_WARNING_FRACTION:
        return
    from bayes_adapter.config import DEFAULT_STD_MAX_FACTOR

    state.warned_near_bound = True
    bound = settings.posterior_std_max
    if bound == "auto":
        bound = f"auto = {DEFAULT_STD_MAX_FACTOR * settings.posterior_std_init:g}"
    logger.warning(
        f"step {state.global_step}: {fraction:.0%} of the {name}'s posterior stds are within 5% of their bound "
        f"(--posterior_std_max {bound}): the optimiser pushes them as far as the bound lets "
        "it. The bound keeps them from turning samples to noise, but a lower --learning_rate (or "
        "--posterior_std_learning_rate) keeps them inside it. Logged as sigma_near_bound_fraction; warned once."
    )


def training_pipeline(settings: Settings, models: Models, state: TrainingState):
    """A pipeline around the models being trained (their adapters included), for validation and the monitor."""
    return models.pipeline_cls.from_pretrained(
        settings.pretrained_model_name_or_path,
        revision=settings.revision,
        variant=settings.variant,
        **state.components,
    )


def save_and_export(settings: Settings, accelerator, models: Models, data: TrainingData, state: TrainingState) -> dict:
    """Saves the Bayesian adapters, exports the mean LoRA, validates the export as users load it, pushes."""
    accelerator.wait_for_everyone()
    output_dir, family = Path(settings.output_dir), settings.family
    final = {name: unwrap(accelerator, model) for name, model in state.wrapped.items()}
    if accelerator.is_main_process:
        for model in final.values():
            model.eval()
        save_bayes_adapters(output_dir / BAYES_ADAPTER_DIR, final)
        export_mean_lora(output_dir, final, models.pipeline_cls, kohya=settings.output_kohya_format)
        images = None
        if settings.validation_prompt:  # the exported file, loaded the way users will load it
            separate_vae = bool(settings.pretrained_vae_model_name_or_path)
            pipeline = models.pipeline_cls.from_pretrained(
                settings.pretrained_model_name_or_path,
                revision=settings.revision,
                variant=settings.variant,
                dtype=models.weight_dtype,
                # the VAE the run trained and validated with (e.g. SDXL's fp16-safe one), as users pass it
                **({"vae": models.vae} if separate_vae else {}),
            )
            family.cast_for_generation(pipeline, models.weight_dtype, separate_vae)
            pipeline.load_lora_weights(str(output_dir))
            images = log_validation(settings, accelerator, pipeline, [], data.reference, state.global_step, "test")
        stage_sentence = state.monitor.verdict_sentence() if state.monitor is not None else None
        monitor = state.monitor.path if stage_sentence is not None else None
        if settings.push_to_hub:
            push_to_hub(settings, final, images, models.pipeline_cls, monitor)
        accelerator.print(run_summary(settings, state.global_step, stage_sentence))
    accelerator.end_training()
    return {
        "global_step": state.global_step,
        "family": family.name,
        family.denoiser: final[family.denoiser],
        "text_encoders": [final[name] for name in family.text_encoders if name in final],
    }


def run_summary(settings: Settings, global_step: int, stage_sentence: str | None = None) -> str:
    """The end-of-training summary: where each output is, how to load the LoRA and, with the stage monitor's records,
    the judge's verdict (`stage_sentence`)."""
    out = Path(settings.output_dir)
    lines = [
        f"Trained {global_step} steps. In {str(out)!r}:",
        f"  {DIFFUSERS_WEIGHTS_NAME}: the mean LoRA; load it with pipe.load_lora_weights({str(out)!r})",
        f"  {BAYES_ADAPTER_DIR}/: the whole Bayesian adapters (means and posterior stds)",
    ]
    if settings.output_kohya_format:
        lines.append(f"  {KOHYA_WEIGHTS_NAME}: the same LoRA in the kohya layout (ComfyUI, A1111)")
    if settings.validation_prompt:
        lines.append(
            f"  {SAMPLES_DIR}/: the validation images (step_<step>_<i>.png; export_step_*: the exported LoRA)"
        )
    if settings.report_to != "none":
        lines.append(f"  {settings.logging_dir}/: the {settings.report_to} logs")
    lines.append("  checkpoint-<step>/: resume with --resume_from_checkpoint latest")
    if stage_sentence is not None:
        lines.append(
            f"  {MONITOR_FILE}: the stage monitor's records (bayes-adapter stage {str(out / MONITOR_FILE)!r})"
        )
        lines.append(f"Corruption stage: {stage_sentence}")
    return "\n".join(lines)


def push_to_hub(
    settings: Settings, final: dict, images: np.ndarray | None, pipeline_cls=None, monitor: Path | None = None
) -> None:
    """Uploads the mean LoRA (never the checkpoints) to `--hub_model_id` with `bayes_adapter.push_to_hub`.

    A denoiser-only adapter is pushed as one component; with text-encoder adapters, the mapping of every trained
    component (all in one diffusers file, `pipeline_cls.save_lora_weights`). The card holds the Bayesian settings,
    the last validation images and, with a `monitor.jsonl`, the corruption-stage verdict.
    """
    import bayes_adapter

    base_model = settings.pretrained_model_name_or_path
    if Path(base_model).exists():  # a local folder is no Hub id, which the card's base_model must be
        logger.warning(
            f"--pretrained_model_name_or_path {base_model!r} is a local folder: the card names no base model"
        )
        base_model = None
    common = dict(
        token=settings.hub_token,
        base_model=base_model,
        instance_prompt=settings.instance_prompt,
        validation_images=to_pil(images) if images is not None and len(images) else None,
        monitor=monitor,
    )
    if len(final) == 1:  # the denoiser alone
        ((component, model),) = final.items()
        bayes_adapter.push_to_hub(model, settings.hub_model_id, component=component, **common)
    else:
        bayes_adapter.push_to_hub(final, settings.hub_model_id, pipeline_cls=pipeline_cls, **common)
