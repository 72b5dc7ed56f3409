"""Aspect-ratio buckets (`--aspect_ratio_buckets`): each image trained at about `--resolution`^2 pixels in its own
aspect ratio, batches drawn within a bucket, as kohya's and SimpleTuner's trainers do."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import ImageOps

from .sources import open_image


# Wider or taller images are trained at this ratio (their excess cropped): beyond it a side gets too few latents.
MAX_ASPECT_RATIO = 4.0


def bucket_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The `(height, width)` of an image's bucket: its aspect ratio (clamped to `MAX_ASPECT_RATIO`), about
    `resolution`^2 pixels, each side a multiple of `multiple` (what the family's VAE and patching need)."""
    ratio = min(max(width / height, 1 / MAX_ASPECT_RATIO), MAX_ASPECT_RATIO)
    bucket_width = max(multiple, round(resolution * math.sqrt(ratio) / multiple) * multiple)
    bucket_height = max(multiple, round(resolution / math.sqrt(ratio) / multiple) * multiple)
    return bucket_height, bucket_width


def bucket_sizes(images: Sequence[Path], resolution: int, multiple: int) -> dict[Path, tuple[int, int]]:
    """Each image's bucket `(height, width)`, from its size after EXIF orientation."""
    sizes = {}
    for path in dict.fromkeys(images):
        width, height = ImageOps.exif_transpose(open_image(path)).size
        sizes[path] = bucket_size(width, height, resolution, multiple)
    return sizes


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices that share a bucket: shuffled within each bucket, the batches in random order.

    A bucket's last batch may be smaller than `batch_size`. The order comes from torch's global generator, so
    accelerate's `set_seed` makes it reproducible.
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int):
        self.batch_size = batch_size
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.groups.setdefault(bucket, []).append(index)

    def __len__(self) -> int:
        return sum(math.ceil(len(group) / self.batch_size) for group in self.groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        batches = []
        for group in self.groups.values():
            order = [group[i] for i in torch.randperm(len(group)).tolist()]
            batches += [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        for i in torch.randperm(len(batches)).tolist():
            yield batches[i]
