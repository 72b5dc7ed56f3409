"""Measures of generated samples against the training images, for the stage judge (`bayes_adapter.stage`).

Pure torch. Two views of each sample:

- in pixels, its structural similarity (SSIM) to the nearest training image: local structure, so noise lowers it;
- in latent space (the pipeline's own VAE), the residual between the sample's latent and the nearest training latent:
  its energy (how far from a copy) and its whiteness (spectral flatness: white noise ~0.56, smooth drift ~0). The
  decoder blurs latent noise, so a noisy near-copy is seen here long before it is seen in pixels.

`measure_samples` turns them into the fields of one `monitor.jsonl` record. Images are float tensors ``(N, C, H, W)``
in ``[-1, 1]``; latents are ``(N, C, h, w)``.
"""

from __future__ import annotations

import torch

from ._images import check_images


__all__ = [
    "SSIM_WINDOW",
    "is_clean_copy",
    "latent_residuals",
    "measure_samples",
    "spectral_flatness",
    "ssim_matrix",
    "ssim_to_nearest",
    "structural_fidelity",
]

# scikit-image's structural_similarity defaults: a 7x7 uniform window, sample covariance, K1 0.01, K2 0.03.
SSIM_WINDOW = 7
_K1, _K2 = 0.01, 0.03
_DATA_RANGE = 2.0  # images in [-1, 1]


def _check_batch(name: str, x: torch.Tensor, min_side: int = 1) -> None:
    # Non-finite values are the judge's to report (a sample of NaNs is a broken run, not bad input).
    check_images(name, x, min_size=min_side, finite=False)


def _check_same_shape(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same (C, H, W), got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _local_mean(x: torch.Tensor) -> torch.Tensor:
    # Only the windows that lie inside the image: scikit-image pads, then crops those border pixels away.
    return torch.nn.functional.avg_pool2d(x, SSIM_WINDOW, stride=1)


def ssim_matrix(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """SSIM of every sample to every reference, as scikit-image's ``structural_similarity`` with its defaults.

    A 7x7 uniform window, sample covariance, ``data_range=2`` (images in ``[-1, 1]``), mean over the pixels whose
    window lies inside the image, then over channels. Computed in float64; agrees with scikit-image on float32
    images to float32 rounding.

    Args:
        samples (`torch.Tensor`): ``(N, C, H, W)`` images in ``[-1, 1]``, H and W >= 7.
        references (`torch.Tensor`): ``(M, C, H, W)`` images of the same shape.

    Returns:
        `torch.Tensor`: float64, ``(N, M)``.
    """
    _check_batch("samples", samples, SSIM_WINDOW)
    _check_batch("references", references, SSIM_WINDOW)
    _check_same_shape("samples", samples, "references", references)
    x = samples.detach().cpu().double()
    cov_norm = SSIM_WINDOW**2 / (SSIM_WINDOW**2 - 1)  # unbiased (sample) covariance, as scikit-image's default
    c1, c2 = (_K1 * _DATA_RANGE) ** 2, (_K2 * _DATA_RANGE) ** 2
    mx, mxx = _local_mean(x), _local_mean(x * x)
    vx = cov_norm * (mxx - mx * mx)
    columns = []
    for ref in references.detach().cpu().double():  # one reference at a time: memory grows with N, not N x M
        y = ref.unsqueeze(0)
        my, myy, mxy = _local_mean(y), _local_mean(y * y), _local_mean(x * y)
        vy = cov_norm * (myy - my * my)
        vxy = cov_norm * (mxy - mx * my)
        s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        columns.append(s.mean(dim=(2, 3)).mean(dim=1))
    return torch.stack(columns, dim=1)


def ssim_to_nearest(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per sample, the SSIM to the most similar reference image: float64 ``(N,)``."""
    return ssim_matrix(samples, references).max(dim=1).values


def structural_fidelity(samples: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over samples of the SSIM to the nearest (most similar) reference image."""
    return float(ssim_to_nearest(samples, references).mean())


def spectral_flatness(fields: torch.Tensor) -> torch.Tensor:
    """Spectral flatness of each field: how white it is.

    The geometric over the arithmetic mean of each channel's 2-D power spectrum, DC term left out, averaged over
    channels. About 0.56 for white Gaussian noise (the mean of log of an exponential variable is -0.577), near 0
    for smooth fields.

    Args:
        fields (`torch.Tensor`): ``(N, C, H, W)``.

    Returns:
        `torch.Tensor`: float32 ``(N,)`` in ``[0, 1]``.
    """
    _check_batch("fields", fields)
    power = torch.fft.fft2(fields.detach().cpu().double()).abs().pow(2).flatten(2)[:, :, 1:]  # index 0: DC term
    power = power.clamp_min(torch.finfo(torch.float64).tiny)
    flatness = power.log().mean(-1).exp() / power.mean(-1)
    return flatness.mean(1).float()


def latent_residuals(latents: torch.Tensor, train_latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """The residual of each sample latent to its nearest training latent (Euclidean).

    Args:
        latents (`torch.Tensor`): ``(N, C, h, w)`` latents of the samples.
        train_latents (`torch.Tensor`): ``(M, C, h, w)`` latents of the training images, same encoder.

    Returns:
        `dict`: ``energy`` (float32 ``(N,)``: mean squared residual over the variance of all the training latents'
        numbers; 0 for an exact copy, ~1 for a latent as far as the training latents' spread) and ``whiteness``
        (float32 ``(N,)``: the residual's `spectral_flatness`).
    """
    _check_batch("latents", latents)
    _check_batch("train_latents", train_latents)
    _check_same_shape("latents", latents, "train_latents", train_latents)
    latents, train_latents = latents.detach().cpu().double(), train_latents.detach().cpu().double()
    dist = torch.cdist(latents.flatten(1), train_latents.flatten(1))
    residual = latents - train_latents[dist.argmin(dim=1)]
    variance = train_latents.var(unbiased=False)
    if variance <= 0:
        raise ValueError("train_latents have zero variance; the residual energy is undefined")
    return {
        "energy": (residual.pow(2).flatten(1).mean(1) / variance).float(),
        "whiteness": spectral_flatness(residual),
    }


def is_clean_copy(
    fidelity: torch.Tensor,
    energy: torch.Tensor,
    *,
    fidelity_ceiling: float = 1.0,
    copy_margin: float = 0.03,
    copy_energy: float = 0.02,
) -> torch.Tensor:
    """Which samples are clean copies of a training image: SSIM to the nearest training image within `copy_margin`
    of the ceiling *and* latent residual energy below `copy_energy`.

    Both are needed: white latent noise of energy 0.09 on a copy still has its nearest latent right, yet looks
    grainy (SSIM 0.65 against a ceiling of 0.92 on the lab model).

    Args:
        fidelity (`torch.Tensor`): ``(N,)`` per-sample SSIM to the nearest training image (`ssim_to_nearest`).
        energy (`torch.Tensor`): ``(N,)`` per-sample latent residual energy (`latent_residuals`).
        fidelity_ceiling (`float`, defaults to 1.0): the SSIM of the VAE's own reconstruction of the training
            images, the most a sample can reach.
        copy_margin (`float`, defaults to 0.03): how far below the ceiling a copy may be.
        copy_energy (`float`, defaults to 0.02): the residual energy a copy stays below.

    Returns:
        `torch.Tensor`: bool ``(N,)``.
    """
    return (fidelity.double() >= fidelity_ceiling - copy_margin) & (energy.double() < copy_energy)


def measure_samples(
    samples: torch.Tensor,
    references: torch.Tensor,
    sample_latents: torch.Tensor,
    train_latents: torch.Tensor,
    *,
    fidelity_ceiling: float = 1.0,
    copy_margin: float = 0.03,
    copy_energy: float = 0.02,
) -> dict[str, float]:
    """The measured fields of one monitor record (`bayes_adapter.stage.MonitorRecord`).

    Args:
        samples (`torch.Tensor`): ``(N, C, H, W)`` generated images in ``[-1, 1]``.
        references (`torch.Tensor`): ``(M, C, H, W)`` training images in ``[-1, 1]``.
        sample_latents (`torch.Tensor`): the samples encoded by the pipeline's own VAE (its latent mean).
        train_latents (`torch.Tensor`): the training images encoded the same way.
        fidelity_ceiling (`float`, defaults to 1.0): the fidelity of the VAE's reconstruction of the training
            images (`structural_fidelity(decode(train_latents), references)`), for the copy test.
        copy_margin, copy_energy: the copy test's thresholds (`is_clean_copy`).

    Returns:
        `dict`: ``fidelity`` (mean over samples of the SSIM to the nearest training image), ``noise_energy`` and
        ``noise_whiteness`` (median over samples of the latent residual's energy and whiteness; the lower middle
        value for an even count, as `torch.median`, which the lab's numbers use) and ``copy_rate`` (fraction of
        samples that are clean copies).
    """
    if samples.shape[0] != sample_latents.shape[0]:
        raise ValueError(
            f"samples and sample_latents must hold as many items, got {samples.shape[0]} and {sample_latents.shape[0]}"
        )
    fidelity = ssim_to_nearest(samples, references)
    residual = latent_residuals(sample_latents, train_latents)
    copies = is_clean_copy(
        fidelity,
        residual["energy"],
        fidelity_ceiling=fidelity_ceiling,
        copy_margin=copy_margin,
        copy_energy=copy_energy,
    )
    return {
        "fidelity": float(fidelity.mean()),
        "noise_energy": float(residual["energy"].median()),
        "noise_whiteness": float(residual["whiteness"].median()),
        "copy_rate": float(copies.double().mean()),
    }
