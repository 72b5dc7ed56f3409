"""The paper's evaluation metrics with real models: CLIP-I, CLIP-T, DINO, DINO diversity and LPIPS.

Subject fidelity is the mean cosine similarity over all (reference, generated) pairs of image embeddings: CLIP-I with
CLIP's image embedding (the paper and DreamBooth use `openai/clip-vit-large-patch14`), DINO with the CLS token of
`facebook/dino-vits16`. Prompt fidelity, CLIP-T, is the mean cosine between the prompt's CLIP text embedding and each
generated image's. Diversity is the mean `1 - cosine` over pairs of generated images in DINO space (0 for copies of
one image), and the paper's figure, the mean pairwise LPIPS between generated images (`bayes_adapter.lpips`, AlexNet,
v0.1), with the mean LPIPS from each generated image to its nearest reference beside it (0 for copies).

Models are loaded with `from_pretrained(name_or_path)`: a Hub id, or a local folder for machines without the Hub.
Everything runs on the given device, in eval mode, under `torch.no_grad`, in batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ._images import check_pil_images
from .lpips import AlexNetLPIPS, lpips_diversity, lpips_to_reference


__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "IMAGE_SUFFIXES",
    "LPIPS_IMAGE_SIZE",
    "FeatureModel",
    "clip_i",
    "clip_t",
    "dino",
    "dino_diversity",
    "evaluate",
    "load_clip",
    "load_dino",
    "load_images",
    "lpips_pixels",
    "mean_pairwise_cosine",
]

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# LPIPS compares images of one size: all are resized to this, so any sizes mix and the cost does not grow with them.
LPIPS_IMAGE_SIZE = 256


@dataclass
class FeatureModel:
    """A loaded model with its processor and the device it runs on."""

    model: Any
    processor: Any
    device: torch.device
    name: str


# How messages name a transformers `model_type`.
_MODEL_KINDS = {"clip": "CLIP", "vit": "ViT/DINO", "dinov2": "DINOv2", "siglip": "SigLIP"}


def _looks_local(name: str) -> bool:
    """Whether a model name can only be a local path (a Hub id is `name` or `owner/name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("/", ".", "~")) or "\\" in name or (os.sep != "/" and os.sep in name):
        return True
    if "/" in name and Path(name.split("/")[0]).is_dir():  # e.g. models/clip beside an existing models/ folder
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _check_local_model(kind: str, name: str, model_types: tuple[str, ...], example: str) -> None:
    """Fails at once, without the Hub, for a local path that is no folder or holds a model of another kind."""
    if not name or name == "None":
        return  # `_load` reports it
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_local(name):
            raise ValueError(f"{kind} model {name!r}: no such folder; expected a folder written by save_pretrained")
        return  # a Hub id
    if not path.is_dir():
        raise ValueError(f"{kind} model {name!r} is a file; expected a folder written by save_pretrained")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{kind} model {name!r}: the folder has no config.json; expected one written by save_pretrained"
        )
    import json

    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in model_types:
        found = _MODEL_KINDS.get(model_type, repr(model_type))
        architectures = ", ".join(config.get("architectures") or [])
        raise ValueError(
            f"{kind} model {name!r}: this folder holds a {found} model{f' ({architectures})' if architectures else ''}, "
            f"not {kind}; expected a {kind} model such as {example}"
        )


def _load(kind: str, name_or_path: str, device: str | torch.device, load_model, load_processor) -> FeatureModel:
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"{kind} model must be a Hub id or a local folder, got {name_or_path!r}")
    folder = Path(str(name_or_path)).expanduser()
    local = folder.is_dir()
    source = str(folder) if local else str(name_or_path)
    try:
        model = load_model(source)
        processor = load_processor(source)
    except (OSError, ValueError) as error:
        if local:
            raise ValueError(
                f"cannot load the {kind} model from the folder {str(name_or_path)!r} ({type(error).__name__}: "
                f"{error}); expected a folder written by save_pretrained"
            ) from None
        raise ValueError(
            f"cannot load the {kind} model {str(name_or_path)!r} ({type(error).__name__}: {error}). Offline or "
            f"without the Hub, pass a local folder: download it once on a machine that has the Hub with "
            f"`hf download {name_or_path}` (or `save_pretrained`), then give its path."
        ) from None
    device = torch.device(device)
    return FeatureModel(model.to(device).eval(), processor, device, str(name_or_path))


def load_clip(name_or_path: str = DEFAULT_CLIP_MODEL, device: str | torch.device = "cpu") -> FeatureModel:
    """Loads a CLIP model (`CLIPModel`) and its processor (`CLIPProcessor`) for CLIP-I and CLIP-T.

    Args:
        name_or_path: A Hub id or a local folder written by `save_pretrained`.
        device: Where the model runs.
    """
    from transformers import CLIPModel, CLIPProcessor

    _check_local_model("CLIP", str(name_or_path), ("clip",), DEFAULT_CLIP_MODEL)
    return _load("CLIP", name_or_path, device, CLIPModel.from_pretrained, CLIPProcessor.from_pretrained)


def load_dino(name_or_path: str = DEFAULT_DINO_MODEL, device: str | torch.device = "cpu") -> FeatureModel:
    """Loads a DINO ViT (`ViTModel`, CLS token) and its image processor for the DINO score.

    Args:
        name_or_path: A Hub id or a local folder written by `save_pretrained`.
        device: Where the model runs.
    """
    from transformers import AutoImageProcessor, ViTModel

    def load_model(path: str):
        return ViTModel.from_pretrained(path, add_pooling_layer=False)

    _check_local_model("DINO", str(name_or_path), ("vit",), DEFAULT_DINO_MODEL)
    return _load("DINO", name_or_path, device, load_model, AutoImageProcessor.from_pretrained)


def load_images(folder: str | os.PathLike, argument: str = "folder") -> list[Image.Image]:
    """The images of a folder (sorted by name, RGB), with a clear error for a missing, empty or unreadable one."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{argument}={str(folder)!r} is not an existing folder")
    # Hidden files (.DS_Store, macOS' ._name.jpg resource forks) are skipped; Thumbs.db & co. have no image suffix.
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise ValueError(f"{argument}={str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{argument}: {str(file)!r} is not a readable image ({error})") from None
    return images


def _check_images(name: str, images: Sequence[Image.Image]) -> list[Image.Image]:
    return [image.convert("RGB") for image in check_pil_images(name, images)]


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


@torch.no_grad()
def _embed_images(features: FeatureModel, images: Sequence[Image.Image], batch_size: int, clip: bool) -> torch.Tensor:
    _check_batch_size(batch_size)
    out = []
    for start in range(0, len(images), batch_size):
        pixels = features.processor(images=list(images[start : start + batch_size]), return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(features.device, features.model.dtype)
        if clip:
            embedding = features.model.get_image_features(pixel_values=pixel_values)
            embedding = getattr(embedding, "pooler_output", embedding)  # transformers 5 may return a model output
        else:
            embedding = features.model(pixel_values=pixel_values).last_hidden_state[:, 0]
        out.append(embedding.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def _embed_text(features: FeatureModel, prompts: Sequence[str]) -> torch.Tensor:
    tokens = features.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
    tokens = {k: v.to(features.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
    embedding = features.model.get_text_features(**tokens)
    return getattr(embedding, "pooler_output", embedding).float().cpu()


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean cosine similarity over all pairs (row of `a`, row of `b`), in float64.

    Args:
        a: `(n, d)` embeddings.
        b: `(m, d)` embeddings.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"expected (n, d) and (m, d) embeddings, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return float((a @ b.T).mean())


def clip_i(
    generated: Sequence[Image.Image], reference: Sequence[Image.Image], clip: FeatureModel, batch_size: int = 8
) -> float:
    """CLIP-I: mean CLIP image-embedding cosine over all (reference, generated) pairs (1 for copies)."""
    generated, reference = _check_images("generated", generated), _check_images("reference", reference)
    return mean_pairwise_cosine(
        _embed_images(clip, reference, batch_size, clip=True), _embed_images(clip, generated, batch_size, clip=True)
    )


def clip_t(generated: Sequence[Image.Image], prompt: str, clip: FeatureModel, batch_size: int = 8) -> float:
    """CLIP-T: mean cosine between the prompt's CLIP text embedding and each generated image's, in [-1, 1]."""
    generated = _check_images("generated", generated)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    return mean_pairwise_cosine(_embed_text(clip, [prompt]), _embed_images(clip, generated, batch_size, clip=True))


def dino(
    generated: Sequence[Image.Image], reference: Sequence[Image.Image], dino_model: FeatureModel, batch_size: int = 8
) -> float:
    """DINO: mean cosine of the ViT CLS tokens over all (reference, generated) pairs (1 for copies)."""
    generated, reference = _check_images("generated", generated), _check_images("reference", reference)
    return mean_pairwise_cosine(
        _embed_images(dino_model, reference, batch_size, clip=False),
        _embed_images(dino_model, generated, batch_size, clip=False),
    )


def dino_diversity(generated: Sequence[Image.Image], dino_model: FeatureModel, batch_size: int = 8) -> float:
    """Mean `1 - cosine` of the DINO CLS tokens over the pairs of distinct generated images (0 for copies)."""
    generated = _check_images("generated", generated)
    if len(generated) < 2:
        raise ValueError(f"dino_diversity needs at least 2 generated images, got {len(generated)}")
    embeddings = torch.nn.functional.normalize(_embed_images(dino_model, generated, batch_size, clip=False).double())
    similarity = embeddings @ embeddings.T
    n = len(generated)
    off_diagonal = (similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))
    return float(1 - off_diagonal)


def lpips_pixels(images: Sequence[Image.Image], size: int = LPIPS_IMAGE_SIZE) -> torch.Tensor:
    """Images as LPIPS takes them: the shorter side resized to `size` (bicubic), centre-cropped to `size` x `size`,
    `(N, 3, size, size)` in `[-1, 1]`."""
    pixels = []
    for image in _check_images("images", images):
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        left, top = (width - size) // 2, (height - size) // 2
        resized = image.resize((width, height), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
        pixels.append(torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1))
    return torch.stack(pixels) / 127.5 - 1


def evaluate(
    generated: Sequence[Image.Image],
    reference: Sequence[Image.Image],
    prompt: str,
    clip: FeatureModel | None = None,
    dino_model: FeatureModel | None = None,
    batch_size: int = 8,
    lpips_model: AlexNetLPIPS | None = None,
) -> dict[str, float | int]:
    """Every metric whose model is given, plus the image counts: `clip_i`, `clip_t`, `dino`, `dino_diversity`,
    `lpips_diversity`, `lpips_to_reference`.

    Args:
        generated: The generated images.
        reference: The subject's real images.
        prompt: The prompt the images were generated from (for CLIP-T).
        clip: From `load_clip`; skips CLIP-I and CLIP-T when None.
        dino_model: From `load_dino`; skips DINO and the diversity when None.
        batch_size: Images per forward pass.
        lpips_model: From `bayes_adapter.lpips.load_lpips`; skips the LPIPS metrics when None. The images are first
            resized and centre-cropped to `LPIPS_IMAGE_SIZE` (`lpips_pixels`).
    """
    generated, reference = _check_images("generated", generated), _check_images("reference", reference)
    if clip is None and dino_model is None and lpips_model is None:
        raise ValueError("evaluate needs at least one model: CLIP, DINO or LPIPS")
    result: dict[str, float | int] = {"num_generated": len(generated), "num_reference": len(reference)}
    if clip is not None:
        result["clip_i"] = clip_i(generated, reference, clip, batch_size)
        result["clip_t"] = clip_t(generated, prompt, clip, batch_size)
    if dino_model is not None:
        result["dino"] = dino(generated, reference, dino_model, batch_size)
        if len(generated) >= 2:
            result["dino_diversity"] = dino_diversity(generated, dino_model, batch_size)
    if lpips_model is not None:
        generated_pixels = lpips_pixels(generated)
        if len(generated) >= 2:
            result["lpips_diversity"] = lpips_diversity(generated_pixels, lpips_model, batch_size)
        result["lpips_to_reference"] = lpips_to_reference(
            generated_pixels, lpips_pixels(reference), lpips_model, batch_size
        )
    if any(isinstance(v, float) and not math.isfinite(v) for v in result.values()):
        raise RuntimeError(f"a metric is not finite: {result}")
    return result
