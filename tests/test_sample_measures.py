"""The sample measures (bayes_adapter/sample_measures.py): SSIM as scikit-image's, spectral flatness, latent
residuals, the clean-copy test and the monitor record's fields."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from bayes_adapter import sample_measures
from bayes_adapter.sample_measures import (
    is_clean_copy,
    latent_residuals,
    measure_samples,
    spectral_flatness,
    ssim_matrix,
    structural_fidelity,
)


def _images(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(n, c, h + 4, w + 4, generator=g) * 2 - 1, 5, stride=1)
    return (smooth * 2 + 0.2 * torch.randn(n, c, h, w, generator=g)).clamp(-1, 1)


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 20, 13), (1, 7, 7), (4, 9, 11)])
def test_ssim_is_scikit_images_structural_similarity_with_its_defaults(shape):
    samples, references = _images(3, *shape, seed=0), _images(2, *shape, seed=1)
    references[0] = (samples[1] + 0.1 * torch.randn(shape)).clamp(-1, 1)  # one close pair
    expected = np.array(
        [
            [
                structural_similarity(
                    x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(), data_range=2.0, channel_axis=-1
                )
                for y in references
            ]
            for x in samples
        ]
    )
    got = ssim_matrix(samples, references)
    assert got.shape == (3, 2) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    assert got[1, 0] > 0.5 > got[0, 1]


def test_structural_fidelity_is_one_for_the_training_images_and_lower_with_noise():
    train = _images(3, 3, 16, 16, seed=2)
    assert ssim_matrix(train, train).diagonal().tolist() == pytest.approx([1.0] * 3)
    assert structural_fidelity(train.flip(0), train) == pytest.approx(1.0)  # nearest, not same index
    noisy = (train + 0.5 * torch.randn_like(train)).clamp(-1, 1)
    assert structural_fidelity(noisy, train) < 0.8


def test_ssim_refuses_images_smaller_than_its_window_or_of_other_shapes():
    with pytest.raises(ValueError, match="samples must be at least 7 x 7 pixels, got \\(6, 8\\)"):
        ssim_matrix(torch.zeros(1, 3, 6, 8), torch.zeros(1, 3, 6, 8))
    with pytest.raises(ValueError, match="samples and references must have the same \\(C, H, W\\)"):
        ssim_matrix(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="references must be a floating-point tensor of shape \\(N, C, H, W\\)"):
        ssim_matrix(torch.zeros(1, 3, 8, 8), torch.zeros(3, 8, 8))


def test_spectral_flatness_separates_white_noise_from_smooth_fields():
    g = torch.Generator().manual_seed(0)
    white = spectral_flatness(torch.randn(16, 4, 16, 16, generator=g))
    assert float(white.mean()) == pytest.approx(0.56, abs=0.03)
    smooth = torch.nn.functional.interpolate(torch.randn(16, 4, 4, 4, generator=g), size=16, mode="bilinear")
    assert float(spectral_flatness(smooth).max()) < 0.05


def test_latent_residuals_use_the_nearest_training_latent():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(3, 4, 8, 8, generator=g)
    noise = 0.3 * torch.randn(2, 4, 8, 8, generator=g)
    residual = latent_residuals(train[[2, 0]] + noise, train)
    expected = noise.double().pow(2).flatten(1).mean(1) / train.double().var(unbiased=False)
    torch.testing.assert_close(residual["energy"], expected.float())
    torch.testing.assert_close(residual["whiteness"], spectral_flatness(noise))
    with pytest.raises(ValueError, match="zero variance"):
        latent_residuals(train, torch.zeros(1, 4, 8, 8))


def test_a_clean_copy_needs_fidelity_near_the_ceiling_and_low_energy():
    fidelity = torch.tensor([0.91, 0.91, 0.85, 0.65])
    energy = torch.tensor([0.01, 0.03, 0.01, 0.09])
    assert is_clean_copy(fidelity, energy, fidelity_ceiling=0.92).tolist() == [True, False, False, False]
    assert is_clean_copy(fidelity, energy, fidelity_ceiling=0.92, copy_energy=0.1).tolist() == [
        True,
        True,
        False,
        False,
    ]


def test_measure_samples_returns_the_record_fields():
    train = _images(2, 3, 16, 16, seed=3)
    train_latents = torch.nn.functional.avg_pool2d(train, 2)  # a stand-in encoder: 3 x 8 x 8 latents
    samples = torch.cat([train, (train + 0.6 * torch.randn_like(train)).clamp(-1, 1)])
    sample_latents = torch.cat([train_latents, train_latents + 0.5 * torch.randn_like(train_latents)])
    measured = measure_samples(samples, train, sample_latents, train_latents)
    assert set(measured) == {"fidelity", "noise_energy", "noise_whiteness", "copy_rate"}
    assert all(isinstance(v, float) for v in measured.values())
    assert measured["copy_rate"] == 0.5  # the two exact copies, not the two noisy ones
    assert measured["fidelity"] == pytest.approx(structural_fidelity(samples, train))
    energies = latent_residuals(sample_latents, train_latents)["energy"]
    assert measured["noise_energy"] == float(energies.sort().values[1])  # lower middle of four, as torch.median
    assert measure_samples(samples, train, sample_latents, train_latents, fidelity_ceiling=0.5)["copy_rate"] == 0.5
    with pytest.raises(ValueError, match="samples and sample_latents must hold as many items, got 4 and 2"):
        measure_samples(samples, train, train_latents, train_latents)


def test_the_lab_measures_are_the_package_functions():
    from examples.corruption_stage.study import measures

    for name in ("ssim_matrix", "structural_fidelity", "spectral_flatness", "latent_residuals"):
        assert getattr(measures, name) is getattr(sample_measures, name)
