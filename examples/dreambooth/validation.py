"""Validation of a DreamBooth run: sample images, the corruption monitor and the paper's metrics, to the trackers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .families import half_precision_dtype
from .outputs import save_samples


def generate(settings, accelerator, pipeline, prompt: str, seeds: Sequence[int] | None = None) -> np.ndarray:
    """Images of `prompt`, `(N, H, W, 3)` floats in [0, 1]: `--num_validation_images` from one generator seeded with
    `--seed`, or with `seeds` one image per seed, each from its own generator (the same image for the same weights,
    whatever the number of images)."""
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(accelerator.device)
    if seeds is None:
        generator = torch.Generator(device=accelerator.device).manual_seed(settings.seed or 0)
        num_images = settings.num_validation_images
    else:
        generator = [torch.Generator(device=accelerator.device).manual_seed(seed) for seed in seeds]
        num_images = len(generator)
    extra = dict(settings.family.pipeline_call_kwargs)
    if settings.max_sequence_length is not None:  # the DiTs' T5 prompt length, as in training
        extra["max_sequence_length"] = settings.max_sequence_length
    # the run's precision: without a dtype, CUDA autocast would run a bf16 run's validation in float16
    dtype = half_precision_dtype(accelerator.mixed_precision)
    if dtype is not None and not settings.family.validation_autocast(dtype):
        dtype = None
    with torch.no_grad(), torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype is not None):
        images = pipeline(
            prompt=[prompt] * num_images,  # a keyword: Flux.2's first argument is an image
            generator=generator,
            num_inference_steps=settings.validation_inference_steps,
            height=settings.resolution,
            width=settings.resolution,
            output_type="np",
            **extra,
        ).images
    return np.clip(np.asarray(images, dtype=np.float32), 0, 1)


def to_pil(images: np.ndarray) -> list:
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

            tracker.log({tag: [wandb.Image(image, caption=caption) for image in to_pil(images)]}, step=step)
        else:
            tracker.log_images({tag: to_pil(images)}, step)


def log_validation(settings, accelerator, pipeline, trained: list, reference, step: int, tag: str):
    """Generates `--num_validation_images` per validation prompt with the adapters' mean (eval mode) and logs them.

    Images go to every tracker that takes them (`<tag>` for one prompt, `<tag>/<i>` for prompt i of several). Also
    logs `bayes_adapter.training_monitor.corruption_report` of all the images against the instance images (`reference`, in
    [-1, 1]): `<tag>/monitor_corruption` (high-frequency energy of the samples over the references'; > 0 means
    noisier samples, the corruption stage), `fidelity`, `diversity`, `copy_rate`, `nn_distance`; with
    `--eval_clip_model` / `--eval_dino_model`, the paper's `<tag>/clip_i`, `clip_t`, `dino` and `dino_diversity`,
    and with `--eval_lpips`, `<tag>/lpips_diversity` and `lpips_to_reference` (`bayes_adapter.evaluation`; averaged
    over the prompts).

    The images are also written as `<output_dir>/samples/step_<step:06d>_<i>.png` (`export_step_...` for the "test"
    of the exported LoRA), `i` counting prompt after prompt.

    Returns:
        `np.ndarray`: every image, prompt after prompt.
    """
    for model in trained:
        model.eval()
    from bayes_adapter.training_monitor import corruption_report

    prompts = settings.validation_prompt
    clip, dino = settings.evaluators
    per_prompt, scores = [], []
    real = [
        Image.fromarray(((r.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()) for r in reference
    ]
    for i, prompt in enumerate(prompts):
        images = generate(settings, accelerator, pipeline, prompt)
        per_prompt.append(images)
        log_images(accelerator, tag if len(prompts) == 1 else f"{tag}/{i}", images, step, prompt)
        if clip is not None or dino is not None or settings.lpips_model is not None:
            from bayes_adapter.evaluation import evaluate

            scores.append(evaluate(to_pil(images), real, prompt, clip, dino, lpips_model=settings.lpips_model))
    images = np.concatenate(per_prompt)
    if accelerator.is_main_process:
        prefix = {"validation": "step", "test": "export_step"}.get(tag, f"{tag}_step")
        save_samples(settings.output_dir, to_pil(images), step, prefix)
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
