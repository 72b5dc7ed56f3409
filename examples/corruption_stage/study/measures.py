"""Lab v2's measures (PLAN_V2.md, steps 2 and 3): structural fidelity (SSIM to the nearest training image), and the
latent residual of each sample to its nearest training latent, by energy and whiteness (spectral flatness).

v1's fidelity proxy (feature cosine) rewards noise in the subject's colours (`../shared` probes); SSIM compares local
structure, so noise lowers it. Latent residuals measure corruption where the denoiser works, before the decoder
smooths it.
"""

from __future__ import annotations

import functools

import torch
from PIL import Image

# One implementation for the lab and the DreamBooth script's monitor: the package's (pure torch; its SSIM is
# scikit-image's structural_similarity with the defaults the lab used, to float32 rounding).
from bayes_adapter.sample_measures import (  # noqa: F401  (re-exported: the lab's modules import them from here)
    latent_residuals,
    spectral_flatness,
    ssim_matrix,
    structural_fidelity,
)


@functools.lru_cache(maxsize=2)
def load_paper_models(clip_model: str | None, dino_model: str | None) -> tuple:
    """The paper's feature models, each loaded once per process (``bayes_adapter.evaluation``; None skips one)."""
    from bayes_adapter import evaluation

    clip = evaluation.load_clip(clip_model) if clip_model else None
    dino = evaluation.load_dino(dino_model) if dino_model else None
    return clip, dino


def paper_metrics(
    samples: torch.Tensor, references: torch.Tensor, prompt: str, clip_model: str | None, dino_model: str | None
) -> dict[str, float]:
    """CLIP-I, CLIP-T, DINO and DINO diversity of images in [-1, 1] against the training images, with the real
    models given by name or path (issue 16, item 7); the metrics whose model is not given are left out."""
    from bayes_adapter import evaluation

    def pil(images: torch.Tensor) -> list[Image.Image]:
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]

    clip, dino = load_paper_models(clip_model, dino_model)
    scores = evaluation.evaluate(pil(samples), pil(references), prompt, clip=clip, dino_model=dino)
    return {k: float(v) for k, v in scores.items() if not k.startswith("num_")}
