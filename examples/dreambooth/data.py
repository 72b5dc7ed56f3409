"""The DreamBooth data: instance and class images loaded, cropped and batched (where the instance images and their
prompts come from: `sources.py`)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .families import half_precision_dtype
from .sources import DatasetImage, data_files, open_image


def load_image(path: Path | DatasetImage, size: int | tuple[int, int], center_crop: bool = True, flip: bool = False):
    """Opens, resizes (to cover `size`) and crops an image.

    Args:
        size: A square side, or a bucket's `(height, width)`; the image is scaled to cover it and only the excess
            (along one side) is cropped.

    Returns:
        `(pixels, time_ids)`: a `(3, height, width)` float tensor in [-1, 1], and SDXL's micro-conditioning (original
        height and width, crop top and left, target height and width).
    """
    height, width = (size, size) if isinstance(size, int) else size
    image = ImageOps.exif_transpose(open_image(path)).convert("RGB")
    original = (image.height, image.width)
    scale = max(width / image.width, height / image.height)
    image = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BILINEAR
    )
    if center_crop:
        top, left = (image.height - height) // 2, (image.width - width) // 2
    else:
        top, left = random.randint(0, image.height - height), random.randint(0, image.width - width)
    image = image.crop((left, top, left + width, top + height))
    if flip and random.random() < 0.5:
        image = ImageOps.mirror(image)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, torch.tensor([*original, top, left, height, width], dtype=torch.float32)


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

    def size_of(self, image: Path) -> int | tuple[int, int]:
        """The square side, or with aspect-ratio buckets (`size` a `{image: (height, width)}` dict) its bucket."""
        return self.size[image] if isinstance(self.size, dict) else self.size

    def buckets(self) -> list[tuple[int, int]]:
        """The bucket of every index (aspect-ratio buckets only), for `buckets.BucketBatchSampler`."""
        return [self.size[image] for image in self.instance_images]

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
                pixels, time_ids = load_image(image, self.size_of(image), self.center_crop, self.random_flip)
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


def cache_latents(vae, images: list[Path], size, random_flip: bool, device, dtype, family) -> dict:
    """`--cache_latents`: each image's VAE posterior (mean and std) at the centre crop, and mirrored with `--random_flip`.

    `size` is a square side or, with aspect-ratio buckets, `{image: (height, width)}`. `family` (a `ModelFamily`)
    says how its VAE takes images (`vae_input`) and what its posterior is (`encode_images`).

    Returns:
        `dict`: `{(image, mirrored): (mean, std, time_ids)}`, on the CPU.
    """
    from tqdm.auto import tqdm

    cache = {}
    with torch.no_grad():
        for image in tqdm(dict.fromkeys(images), desc="Caching latents"):
            pixels, time_ids = load_image(image, size[image] if isinstance(size, dict) else size, center_crop=True)
            for mirrored in (False, True) if random_flip else (False,):
                view = pixels.flip(-1) if mirrored else pixels
                view = view[None].to(device, dtype)
                mean, std = family.encode_images(vae, family.vae_input(view))
                cache[(image, mirrored)] = (mean[0].cpu(), std[0].cpu(), time_ids)
    return cache


# ----------------------------------------------------------------------------------------------------------------
# Class images


def generate_class_images(settings, accelerator, pipeline_cls) -> None:
    """Fills `--class_data_dir` up to `--num_class_images` images with the base pipeline (main process only)."""
    class_dir = Path(settings.class_data_dir)
    if accelerator.is_main_process:
        class_dir.mkdir(parents=True, exist_ok=True)
        existing = len(data_files(class_dir))
        missing = settings.num_class_images - existing
        if missing > 0:
            precision = settings.prior_generation_precision or (
                "fp16" if accelerator.device.type == "cuda" else "fp32"
            )
            dtype = half_precision_dtype(precision) or torch.float32
            pipeline = pipeline_cls.from_pretrained(
                settings.pretrained_model_name_or_path,
                dtype=dtype,
                revision=settings.revision,
                variant=settings.variant,
            )
            settings.family.cast_for_generation(pipeline, dtype)  # e.g. SANA: Gemma-2 out of float16
            pipeline.set_progress_bar_config(disable=True)
            pipeline.to(accelerator.device)
            for start in range(0, missing, settings.sample_batch_size):
                count = min(settings.sample_batch_size, missing - start)
                images = pipeline(
                    prompt=[settings.class_prompt] * count,
                    num_inference_steps=settings.num_class_inference_steps,
                    height=settings.resolution,
                    width=settings.resolution,
                    **settings.family.pipeline_call_kwargs,
                ).images
                for offset, image in enumerate(images):
                    digest = hashlib.sha1(image.tobytes()).hexdigest()
                    image.save(class_dir / f"{existing + start + offset}-{digest}.jpg")
            del pipeline
    accelerator.wait_for_everyone()
