"""One contract for the package's image arguments: `check_images(name, images, ...)` returns what it checked or raises
`ValueError` naming the argument, what was expected and what was given.

Two forms of images reach the package: tensors (the training monitor, the sample measures, LPIPS) and PIL images (the
evaluation metrics, the Hub card's validation images). `check_images` takes tensors, `check_pil_images` PIL images;
both take the same `name` and `min_count` and word their errors alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


__all__ = ["check_images", "check_pil_images"]


def _count(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def check_images(
    name: str,
    images: torch.Tensor,
    min_count: int = 1,
    channels: int | None = None,
    value_range: tuple[float, float] | None = None,
    min_size: int = 1,
    finite: bool = True,
) -> torch.Tensor:
    """Checks a batch of images as a tensor and returns it.

    Args:
        name: The argument, as messages name it.
        images: A floating-point tensor `(N, C, H, W)`.
        min_count: The least `N` accepted.
        channels: The `C` required, if any (3 for RGB).
        value_range: `(low, high)` the values must lie in (to float32 rounding), if any.
        min_size: The least height and width accepted.
        finite: Refuse NaN and infinite values.

    Raises:
        `ValueError`: naming `name`, the expectation and what was given.
    """
    layout = f"(N, {channels if channels is not None else 'C'}, H, W)"
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or not images.is_floating_point()
        or (channels is not None and images.shape[1] != channels)
    ):
        given = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a floating-point tensor of shape {layout}, got {given}")
    if images.shape[0] < min_count:
        raise ValueError(f"{name} must hold at least {_count(min_count)}, got {images.shape[0]}")
    if min(images.shape[-2:]) < min_size:
        raise ValueError(f"{name} must be at least {min_size} x {min_size} pixels, got {tuple(images.shape[-2:])}")
    if finite and not torch.isfinite(images).all():
        raise ValueError(f"{name} must hold finite values; it holds non-finite ones (NaN or inf)")
    if value_range is not None:
        low, high = value_range
        slack = 1e-3 * (high - low)
        if images.min() < low - slack or images.max() > high + slack:
            raise ValueError(
                f"{name} must hold finite values in [{low:g}, {high:g}], got [{float(images.min()):.4g}, "
                f"{float(images.max()):.4g}]"
            )
    return images


def check_pil_images(name: str, images: Any, min_count: int = 1, paths: bool = False) -> list[Any]:
    """Checks a list of PIL images (or, with `paths=True`, also image file paths) and returns it as a list.

    Args:
        name: The argument, as messages name it.
        images: A sequence of PIL images; with `paths`, a single image or path is taken as a list of one, and None as
            no images.
        min_count: The least number of images accepted.
        paths: Accept paths of existing files beside PIL images.

    Raises:
        `ValueError`: naming `name`, the expectation and what was given.
    """
    from PIL import Image

    expected = "image file paths or PIL images" if paths else "PIL images"
    if paths:
        if images is None:
            images = []
        elif isinstance(images, (str, os.PathLike, Image.Image)) or not isinstance(images, Sequence):
            images = [images]
    if isinstance(images, (str, Image.Image)) or not isinstance(images, Sequence):
        raise ValueError(f"{name} must be a list of {expected}, got {type(images).__name__}")
    images = list(images)
    if len(images) < min_count:
        raise ValueError(f"{name} must hold at least {_count(min_count)} ({expected}), got {len(images)}")
    for image in images:
        if paths and isinstance(image, (str, os.PathLike)):
            if not Path(image).is_file():
                raise ValueError(f"{name}: {str(image)!r} is not an image file")
        elif not isinstance(image, Image.Image):
            raise ValueError(f"{name} must hold {expected} only, got a {type(image).__name__}")
    return images
