"""A corruption monitor for few-shot fine-tuning of diffusion models.

Metric functions that take generated samples and reference (training) images and return numbers that track the
"corruption stage" (samples that look like the training images plus noise) and its alternatives (copying, loss of
diversity). Pure torch, no model downloads: the feature space is a fixed, seeded random convolutional network,
which is built offline and identically on every machine (see :class:`RandomFeatureExtractor`).

All images are float tensors of shape ``(N, C, H, W)``, nominally in ``[-1, 1]``.

Typical use in a validation step::

    from bayes_adapter.training_monitor import corruption_report

    metrics = corruption_report(samples, train_images)
    for name, value in metrics.items():
        writer.add_scalar(f"monitor/{name}", value, step)
"""

from __future__ import annotations

import math

import torch

from ._images import check_images


__all__ = [
    "RandomFeatureExtractor",
    "copy_rate",
    "corruption_report",
    "corruption_score",
    "diversity",
    "feature_embedding",
    "fidelity",
    "high_frequency_energy",
    "implied_width",
    "nearest_reference_distance",
]


def _check_pair(samples: torch.Tensor, references: torch.Tensor) -> None:
    check_images("samples", samples)
    check_images("references", references)
    if samples.shape[1:] != references.shape[1:]:
        raise ValueError(
            f"samples and references must have the same (C, H, W), got {tuple(samples.shape[1:])} "
            f"and {tuple(references.shape[1:])}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Noise / corruption
# ----------------------------------------------------------------------------------------------------------------


def high_frequency_energy(images: torch.Tensor, cutoff: float = 0.5) -> torch.Tensor:
    """Per-image energy of the high spatial frequencies.

    The mean power (per pixel and channel) of the 2-D Fourier components whose radial frequency is above
    ``cutoff`` times the Nyquist frequency. Additive pixel noise raises it; blur lowers it. Each image is first
    multiplied by a 2-D Hann window (normalised to unit mean square) so that the jump between opposite borders,
    which a plain FFT sees as an edge, does not count as high-frequency content.

    Args:
        images (`torch.Tensor`): images of shape ``(N, C, H, W)``.
        cutoff (`float`, defaults to 0.5): the radial frequency, as a fraction of Nyquist, above which energy is
            counted; in ``(0, 1)``.

    Returns:
        `torch.Tensor`: shape ``(N,)``.
    """
    check_images("images", images)
    if not 0.0 < cutoff < 1.0:
        raise ValueError(f"cutoff must be in (0, 1), got {cutoff}")
    x = images.float()
    h, w = x.shape[-2:]
    win = torch.outer(torch.hann_window(h, periodic=False), torch.hann_window(w, periodic=False)).to(x)
    win = win / win.pow(2).mean().sqrt()
    x = (x - x.mean(dim=(-2, -1), keepdim=True)) * win
    spec = torch.fft.fft2(x, norm="ortho").abs() ** 2
    fy = torch.fft.fftfreq(h, device=x.device).abs() * 2  # 1.0 == Nyquist
    fx = torch.fft.fftfreq(w, device=x.device).abs() * 2
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    mask = (radius > cutoff).to(x.dtype)
    return (spec * mask).sum(dim=(-2, -1)).mean(dim=1) / (h * w)


def corruption_score(samples: torch.Tensor, references: torch.Tensor, cutoff: float = 0.5) -> torch.Tensor:
    """How much more high-frequency energy the samples carry than the reference images.

    ``log(mean HF energy of samples / mean HF energy of references)``: 0 when the samples are as sharp as the
    references, positive when they are noisier (the corruption stage), negative when smoother.

    Args:
        samples (`torch.Tensor`): generated images ``(N, C, H, W)``.
        references (`torch.Tensor`): training images ``(M, C, H, W)``.
        cutoff (`float`, defaults to 0.5): see :func:`high_frequency_energy`.

    Returns:
        `torch.Tensor`: a 0-dim tensor.
    """
    _check_pair(samples, references)
    e_s = high_frequency_energy(samples, cutoff).mean()
    e_r = high_frequency_energy(references, cutoff).mean()
    eps = torch.finfo(torch.float32).tiny
    return torch.log((e_s + eps) / (e_r + eps))


# ----------------------------------------------------------------------------------------------------------------
# A fixed feature space
# ----------------------------------------------------------------------------------------------------------------


class RandomFeatureExtractor(torch.nn.Module):
    """A fixed, seeded, random three-stage convolutional network used as an offline feature space.

    Random convolutional features are a known, training-free stand-in for perceptual features: they respond to
    colour, edges and texture statistics at several scales. Each stage contributes the spatial mean and standard
    deviation of every channel, and the last stage also a coarse 2x2 layout; the blocks are L2-normalised
    separately so that no scale dominates. The weights depend only on ``seed`` (drawn on the CPU), so two machines
    compute the same features.

    Args:
        in_channels (`int`, defaults to 3): image channels.
        widths (`tuple[int, ...]`, defaults to ``(32, 64, 128)``): channels of the three stages.
        seed (`int`, defaults to 0): the weights' seed.
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128), seed: int = 0):
        super().__init__()
        if in_channels <= 0:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        if len(widths) == 0 or any(w <= 0 for w in widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {widths}")
        g = torch.Generator().manual_seed(seed)
        self.convs = torch.nn.ModuleList()
        c = in_channels
        for w in widths:
            conv = torch.nn.Conv2d(c, w, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (c * 9)))
                conv.bias.zero_()
            self.convs.append(conv)
            c = w
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        blocks = []
        for i, conv in enumerate(self.convs):
            if i > 0:
                x = torch.nn.functional.avg_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x
            x = torch.relu(conv(x))
            blocks.append(x.mean(dim=(-2, -1)))
            blocks.append(x.std(dim=(-2, -1)))
        blocks.append(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))
        blocks = [torch.nn.functional.normalize(b, dim=1) for b in blocks]
        return torch.nn.functional.normalize(torch.cat(blocks, dim=1), dim=1)


_DEFAULT_EXTRACTORS: dict[int, RandomFeatureExtractor] = {}


def feature_embedding(images: torch.Tensor, extractor: torch.nn.Module | None = None) -> torch.Tensor:
    """Unit-norm feature vectors of ``images`` in a fixed feature space.

    Args:
        images (`torch.Tensor`): ``(N, C, H, W)``.
        extractor (`torch.nn.Module`, *optional*): maps images to ``(N, D)`` features; defaults to a
            :class:`RandomFeatureExtractor` with seed 0 for ``C`` channels.

    Returns:
        `torch.Tensor`: ``(N, D)``, rows of unit norm.
    """
    check_images("images", images)
    if extractor is None:
        c = images.shape[1]
        if c not in _DEFAULT_EXTRACTORS:
            _DEFAULT_EXTRACTORS[c] = RandomFeatureExtractor(in_channels=c)
        extractor = _DEFAULT_EXTRACTORS[c].to(images.device)
    with torch.no_grad():
        feats = extractor(images)
    return torch.nn.functional.normalize(feats.float().flatten(1), dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Fidelity, diversity, copying
# ----------------------------------------------------------------------------------------------------------------


def fidelity(
    samples: torch.Tensor, references: torch.Tensor, extractor: torch.nn.Module | None = None
) -> torch.Tensor:
    """Subject fidelity: mean cosine similarity between the features of every (sample, reference) pair.

    The DINO score of the DreamBooth literature, in the fixed feature space of :func:`feature_embedding`.

    Args:
        samples (`torch.Tensor`): generated images ``(N, C, H, W)``.
        references (`torch.Tensor`): training images ``(M, C, H, W)``.
        extractor (`torch.nn.Module`, *optional*): see :func:`feature_embedding`.

    Returns:
        `torch.Tensor`: a 0-dim tensor in ``[-1, 1]``; 1 for identical images.
    """
    _check_pair(samples, references)
    fs = feature_embedding(samples, extractor)
    fr = feature_embedding(references, extractor)
    return (fs @ fr.T).mean()


def _pairwise_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).float(), b.flatten(1).float()
    d2 = (a[:, None, :] - b[None, :, :]).pow(2).mean(-1)
    return d2.clamp_min(0).sqrt()


def diversity(samples: torch.Tensor, space: str = "feature", extractor: torch.nn.Module | None = None) -> torch.Tensor:
    """Mean pairwise distance between the samples (higher = more diverse; 0 when all samples are identical).

    Args:
        samples (`torch.Tensor`): generated images ``(N, C, H, W)``, N >= 2 (e.g. several seeds of one prompt).
        space (`str`, defaults to ``"feature"``): ``"feature"`` for the cosine distance ``1 - cos`` in the fixed
            feature space (an LPIPS-like measure), ``"pixel"`` for the root-mean-square pixel distance.
        extractor (`torch.nn.Module`, *optional*): see :func:`feature_embedding`.

    Returns:
        `torch.Tensor`: a 0-dim tensor.
    """
    check_images("samples", samples, min_count=2)
    n = samples.shape[0]
    if space == "feature":
        f = feature_embedding(samples, extractor)
        d = (1.0 - f @ f.T).clamp_min(0)
    elif space == "pixel":
        d = _pairwise_rms(samples, samples)
    else:
        raise ValueError(f"space must be 'feature' or 'pixel', got {space!r}")
    off = ~torch.eye(n, dtype=torch.bool, device=d.device)
    return d[off].mean()


def nearest_reference_distance(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each sample, the root-mean-square pixel distance to its nearest reference image.

    Args:
        samples (`torch.Tensor`): ``(N, C, H, W)``.
        references (`torch.Tensor`): ``(M, C, H, W)``.

    Returns:
        `torch.Tensor`: ``(N,)``.
    """
    _check_pair(samples, references)
    return _pairwise_rms(samples, references).min(dim=1).values


def copy_rate(samples: torch.Tensor, references: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Fraction of samples that are near-copies of a reference: nearest-reference RMS pixel distance below
    ``threshold`` (in the images' units; 0.1 is 5% of the [-1, 1] range).

    Args:
        samples (`torch.Tensor`): ``(N, C, H, W)``.
        references (`torch.Tensor`): ``(M, C, H, W)``.
        threshold (`float`, defaults to 0.1): a positive distance.

    Returns:
        `torch.Tensor`: a 0-dim tensor in ``[0, 1]``.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    d = nearest_reference_distance(samples, references)
    return (d < threshold).float().mean()


# ----------------------------------------------------------------------------------------------------------------
# The learned width around a training image
# ----------------------------------------------------------------------------------------------------------------


def implied_width(x0: torch.Tensor, x0_hat: torch.Tensor, noise: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The standard deviation of the Gaussian around the training data that a denoiser implies at one timestep.

    If the learned distribution near a training example ``x0`` were ``N(x0, s^2 I)``, the optimal denoiser at
    ``x_t = a x0 + b eps`` (``a = sqrt(alpha_bar)``, ``b = sqrt(1 - alpha_bar)``) would predict
    ``x0_hat = x0 + k b eps`` with ``k = a s^2 / (a^2 s^2 + b^2)``. This regresses ``x0_hat - x0`` on ``b eps`` to
    estimate ``k`` and solves for ``s``. A model that has memorised ``x0`` exactly gives ``s = 0``; the paper's
    corruption stage is a small but non-zero ``s`` (samples = training image + noise of width ``s``).

    Args:
        x0 (`torch.Tensor`): clean training examples (any shape, batch first).
        x0_hat (`torch.Tensor`): the model's prediction of ``x0`` from ``x_t``, same shape.
        noise (`torch.Tensor`): the ``eps`` used to make ``x_t``, same shape.
        alpha_bar (`float`): the cumulative signal fraction at that timestep, in ``(0, 1)``.

    Returns:
        `torch.Tensor`: a 0-dim tensor, ``s`` in the units of ``x0`` (``inf`` if the model ignores ``x0``).
    """
    if not 0.0 < float(alpha_bar) < 1.0:
        raise ValueError(f"alpha_bar must be in (0, 1), got {alpha_bar}")
    if x0.shape != x0_hat.shape or x0.shape != noise.shape:
        raise ValueError(
            f"x0, x0_hat and noise must have the same shape, got {tuple(x0.shape)}, {tuple(x0_hat.shape)}, "
            f"{tuple(noise.shape)}"
        )
    a = math.sqrt(float(alpha_bar))
    b = math.sqrt(1.0 - float(alpha_bar))
    r = (x0_hat - x0).flatten().double()
    e = (b * noise).flatten().double()
    k = (r @ e) / (e @ e)
    k = k.clamp_min(0.0)
    denom = a * (1.0 - k * a)
    if denom <= 0:
        return torch.tensor(float("inf"))
    return torch.sqrt(k * b**2 / denom).float()


# ----------------------------------------------------------------------------------------------------------------
# All at once
# ----------------------------------------------------------------------------------------------------------------


def corruption_report(
    samples: torch.Tensor,
    references: torch.Tensor,
    copy_threshold: float = 0.1,
    cutoff: float = 0.5,
    extractor: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Every monitor metric for one set of samples, as plain floats (ready for TensorBoard or JSON).

    Args:
        samples (`torch.Tensor`): generated images ``(N, C, H, W)``.
        references (`torch.Tensor`): training images ``(M, C, H, W)``.
        copy_threshold (`float`, defaults to 0.1): see :func:`copy_rate`.
        cutoff (`float`, defaults to 0.5): see :func:`high_frequency_energy`.
        extractor (`torch.nn.Module`, *optional*): see :func:`feature_embedding`.

    Returns:
        `dict[str, float]`: ``fidelity``, ``corruption``, ``diversity`` (feature space; NaN for one sample),
        ``copy_rate`` and ``nn_distance`` (mean nearest-reference RMS distance).
    """
    _check_pair(samples, references)
    return {
        "fidelity": float(fidelity(samples, references, extractor)),
        "corruption": float(corruption_score(samples, references, cutoff)),
        "diversity": float(diversity(samples, "feature", extractor)) if samples.shape[0] >= 2 else float("nan"),
        "copy_rate": float(copy_rate(samples, references, copy_threshold)),
        "nn_distance": float(nearest_reference_distance(samples, references).mean()),
    }
