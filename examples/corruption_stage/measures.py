"""Lab v2's measures (PLAN_V2.md, steps 2 and 3): structural fidelity (SSIM to the nearest training image), and the
latent residual of each sample to its nearest training latent, by energy and whiteness (spectral flatness).

v1's fidelity proxy (feature cosine) rewards noise in the subject's colours (`../shared` probes); SSIM compares local
structure, so noise lowers it. Latent residuals measure corruption where the denoiser works, before the decoder
smooths it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image
from skimage.metrics import structural_similarity


def ssim_matrix(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``(n_samples, n_references)`` SSIM of images in [-1, 1] (scikit-image, 7x7 window, per channel averaged)."""
    a = samples.detach().float().permute(0, 2, 3, 1).numpy()
    b = references.detach().float().permute(0, 2, 3, 1).numpy()
    out = np.array(
        [[structural_similarity(x, y, data_range=2.0, channel_axis=-1) for y in b] for x in a], dtype=np.float64
    )
    return torch.from_numpy(out)


def structural_fidelity(samples: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over samples of the SSIM to the nearest (most similar) reference image."""
    return float(ssim_matrix(samples, references).max(dim=1).values.mean())


def spectral_flatness(fields: torch.Tensor) -> torch.Tensor:
    """Per field ``(N, C, H, W)``: the geometric over the arithmetic mean of each channel's 2-D power spectrum, DC term
    left out, averaged over channels. About 0.56 for white Gaussian noise, near 0 for smooth fields."""
    power = torch.fft.fft2(fields.double()).abs().pow(2).flatten(2)[:, :, 1:]  # index 0 is the DC term
    power = power.clamp_min(torch.finfo(torch.float64).tiny)
    flatness = power.log().mean(-1).exp() / power.mean(-1)
    return flatness.mean(1).float()


def latent_residuals(latents: torch.Tensor, train_latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """For each sample latent, the residual to its nearest training latent (Euclidean): ``energy`` = mean squared
    residual / variance of the training latents' numbers, and ``whiteness`` = its spectral flatness."""
    dist = torch.cdist(latents.flatten(1).double(), train_latents.flatten(1).double())
    residual = latents - train_latents[dist.argmin(dim=1)]
    variance = train_latents.double().var(unbiased=False)
    return {
        "energy": (residual.double().pow(2).flatten(1).mean(1) / variance).float(),
        "whiteness": spectral_flatness(residual),
    }


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
