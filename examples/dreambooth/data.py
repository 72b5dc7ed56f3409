"""The DreamBooth data: instance (and class) images with their prompts, loaded, cropped and batched."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


logger = logging.getLogger(__name__)


def caption_suffix(settings) -> str | None:
    """`--caption_extension`, or None when caption files are ignored."""
    extension = settings.caption_extension
    return None if not extension or extension.lower() == "none" else extension


# Files that operating systems and file managers leave in folders (Windows, macOS, KDE, GNOME, Synology); kohya's and
# diffusers' loaders skip them too. Dotfiles (.DS_Store, ._dog.jpg, .directory, ...) are skipped as hidden files.
OS_FILES = frozenset({"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r", "@eadir"})


def is_os_file(path: Path) -> bool:
    """A hidden file or one an operating system leaves in folders (`Thumbs.db`, `desktop.ini`, ...)."""
    return path.name.startswith(".") or path.name.lower() in OS_FILES


def data_files(folder: Path) -> list[Path]:
    """The files of `folder` a user put there: hidden and operating-system files are skipped (logged at debug)."""
    files = []
    for path in sorted(folder.iterdir()):
        if is_os_file(path):
            logger.debug(f"Skipping {str(path)!r}: a hidden or operating-system file, not an image.")
        elif path.is_file():
            files.append(path)
    return files


def list_images(folder: Path, argument: str, caption_suffix: str | None = None) -> list[Path]:
    """Every file of `folder` but caption files (`caption_suffix`, .txt, .caption) and hidden or operating-system
    files (`is_os_file`), each checked to open as an image."""
    suffixes = tuple(filter(None, (caption_suffix, ".txt", ".caption")))
    files = [p for p in data_files(folder) if not p.name.endswith(suffixes)]
    for path in files:
        check_image(path, argument)
    return files


def check_image(path: Path, argument: str) -> None:
    """Raises `ValueError` naming `argument` if `path` is not a readable image."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises several types for unreadable files
        raise ValueError(
            f"{argument}: {str(path)!r} is not a readable image ({type(error).__name__}: {error}); expected only "
            "image files (PNG, JPEG, ...) in the folder."
        ) from None


IMAGEFOLDER_METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class DatasetImage:
    """One image of a `datasets` folder written by `save_to_disk`: where it is (hashable, so it keys the latent and
    bucket caches as a file path does). `open_image` decodes it."""

    folder: str
    split: str | None
    index: int
    column: str

    def __str__(self) -> str:
        return f"{self.folder}[{self.split + ', ' if self.split else ''}{self.index}]"


@functools.lru_cache(maxsize=4)
def _saved_dataset(folder: str, split: str | None):
    import datasets

    dataset = datasets.load_from_disk(folder)
    return dataset[split] if split else dataset


def open_image(source: Path | DatasetImage) -> Image.Image:
    """The image of a file or of a `datasets` row, as PIL opens it (not yet oriented or converted)."""
    if isinstance(source, DatasetImage):
        image = _saved_dataset(source.folder, source.split)[source.index][source.column]
        if not isinstance(image, Image.Image):
            raise ValueError(
                f"--image_column: {str(source)!r} holds a {type(image).__name__}, not an image; expected a column "
                "of datasets.Image() type."
            )
        return image
    return Image.open(source)


def imagefolder_images(folder: Path, caption_column: str, default_prompt: str) -> tuple[list[Path], list[str]]:
    """The images of a local imagefolder (diffusers' / datasets' convention): `metadata.jsonl`, one JSON object a
    line with the image's `file_name` (relative to the folder) and its caption in `caption_column`.

    Rows without the caption use `default_prompt` (`--instance_prompt`).

    Raises:
        `ValueError` naming `--dataset_name` / `--caption_column`, the file and line, and what was expected.
    """
    argument = f"--dataset_name={str(folder)!r}"
    if not folder.is_dir():
        raise ValueError(
            f"{argument} is not an existing folder; expected a local image folder with {IMAGEFOLDER_METADATA} "
            "(Hub datasets are not downloaded by this script: download one into a folder first)."
        )
    metadata = folder / IMAGEFOLDER_METADATA
    if not metadata.is_file():
        raise ValueError(
            f"{argument} has no {IMAGEFOLDER_METADATA} and is not a folder written by datasets' save_to_disk; expected "
            f'an imagefolder (images and a {IMAGEFOLDER_METADATA} of {{"file_name": ..., "{caption_column}": ...}} '
            "lines) or a saved dataset."
        )
    images, prompts, columns = [], [], set()
    root = folder.resolve()
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{argument}: {IMAGEFOLDER_METADATA} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not JSON ({error}); expected one JSON object a line.") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ValueError(f'{where} has no "file_name"; expected {{"file_name": "<image>", ...}}.')
        path = (folder / row["file_name"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise ValueError(f"{where}: file_name {row['file_name']!r} is not a file inside the folder.")
        check_image(path, where)
        columns.update(row)
        caption = row.get(caption_column)
        if caption is not None and (not isinstance(caption, str) or not caption.strip()):
            raise ValueError(f"{where}: --caption_column {caption_column!r} holds {caption!r}; expected a caption.")
        images.append(path)
        prompts.append(caption.strip() if caption is not None else default_prompt)
    if not images:
        raise ValueError(f"{argument}: {IMAGEFOLDER_METADATA} lists no image; expected one JSON object per image.")
    if caption_column not in columns:
        raise ValueError(
            f"--caption_column={caption_column!r} is in no row of {argument}'s {IMAGEFOLDER_METADATA}; its columns: "
            f"{sorted(columns)}."
        )
    return images, prompts


def saved_dataset_images(
    folder: Path, image_column: str, caption_column: str, default_prompt: str
) -> tuple[list[DatasetImage], list[str]]:
    """The rows of a dataset written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict`'s "train" split):
    each image in `image_column` (decoded and checked here), its caption in `caption_column` (None: `default_prompt`).

    Raises:
        `ValueError` naming `--dataset_name`, `--image_column` / `--caption_column` and the row.
    """
    argument = f"--dataset_name={str(folder)!r}"
    split = None
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if "train" not in splits:
            raise ValueError(f"{argument} is a DatasetDict without a 'train' split (it has {splits}).")
        split = "train"
    dataset = _saved_dataset(str(folder), split)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in dataset.column_names:
            raise ValueError(f"{flag}={column!r} is not a column of {argument}; its columns: {dataset.column_names}.")
    if not len(dataset):
        raise ValueError(f"{argument} has no rows; expected one row per image.")
    images, prompts = [], []
    for index, caption in enumerate(dataset[caption_column]):
        image = DatasetImage(str(folder), split, index, image_column)
        try:
            open_image(image).load()
        except ValueError:
            raise
        except Exception as error:  # PIL and datasets raise several types for undecodable data
            raise ValueError(
                f"{argument}: row {index}'s {image_column!r} is not a readable image ({error})."
            ) from None
        if caption is not None and (not isinstance(caption, str) or not caption.strip()):
            raise ValueError(f"{argument}: row {index}'s {caption_column!r} holds {caption!r}; expected a caption.")
        images.append(image)
        prompts.append(caption.strip() if caption is not None else default_prompt)
    return images, prompts


def instance_images_and_captions(settings) -> tuple[list[Path | DatasetImage], list[str]]:
    """The instance images and each one's prompt: from `--dataset_name` (a dataset saved by `save_to_disk`, or an
    imagefolder with `metadata.jsonl`), or from `--instance_data_dir` with caption files (`--caption_extension`)."""
    if settings.dataset_name:
        folder = Path(settings.dataset_name)
        if any((folder / name).is_file() for name in ("state.json", "dataset_dict.json")):
            return saved_dataset_images(
                folder, settings.image_column, settings.caption_column, settings.instance_prompt
            )
        return imagefolder_images(folder, settings.caption_column, settings.instance_prompt)
    images = list_images(Path(settings.instance_data_dir), "--instance_data_dir", caption_suffix(settings))
    return images, instance_captions(images, settings)


def instance_captions(images: list[Path], settings) -> list[str]:
    """Each instance image's prompt: its caption file's text, or `--instance_prompt` where it has none."""
    suffix = caption_suffix(settings)
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
            prompts.append(settings.instance_prompt)
    return prompts


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
# Saving and loading the Bayesian adapters


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
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
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
