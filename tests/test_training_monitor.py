import importlib
import math
import sys
import warnings

import pytest
import torch

from bayes_adapter import training_monitor


torch.set_num_threads(1)


def _smooth_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Smooth images: random colour gradients with a soft disc, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        c1, c2, c3 = (torch.rand(3, 1, 1, generator=g) * 2 - 1 for _ in range(3))
        cy, cx, r = torch.rand(3, generator=g) * torch.tensor([0.5, 0.5, 0.2]) + torch.tensor([0.25, 0.25, 0.15])
        disc = torch.sigmoid((r - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()) * 40)
        img = c1 * (1 - xx) + c2 * xx
        out.append(img * (1 - disc) + c3 * disc)
    return torch.stack(out).clamp(-1, 1)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    k = k.expand(x.shape[1], 1, 3, 3)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])


@pytest.fixture
def refs() -> torch.Tensor:
    return _smooth_images(3, seed=0)


def _noisy(x: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    return x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


# --- high-frequency energy / corruption -------------------------------------------------------------------------


def test_high_frequency_energy_constant_is_zero_and_checkerboard_is_high():
    const = torch.full((1, 3, 16, 16), 0.3)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float() * 2 - 1
    checker = checker.expand(1, 3, 16, 16)
    assert training_monitor.high_frequency_energy(const).item() == pytest.approx(0.0, abs=1e-10)
    # a +-1 checkerboard puts all its power (1 per pixel) at the Nyquist corner (the window spreads a little of it)
    assert training_monitor.high_frequency_energy(checker).item() == pytest.approx(1.0, rel=0.05)


def test_noisy_copy_scores_noisier_than_clean_copy(refs):
    clean = training_monitor.corruption_score(refs, refs)
    light = training_monitor.corruption_score(_noisy(refs, 0.05), refs)
    heavy = training_monitor.corruption_score(_noisy(refs, 0.2), refs)
    assert clean.item() == pytest.approx(0.0, abs=1e-6)
    assert 0 < light.item() < heavy.item()


def test_blurred_copy_scores_below_zero(refs):
    assert training_monitor.corruption_score(_blur(refs), refs).item() < -0.5


def test_border_jump_is_not_high_frequency():
    # a horizontal ramp from -1 to 1: smooth inside, but a jump of 2 across the periodic border
    ramp = torch.linspace(-1, 1, 32).expand(1, 3, 32, 32)
    edge = torch.where(torch.arange(32) < 16, -1.0, 1.0).expand(1, 3, 32, 32)
    assert (
        training_monitor.high_frequency_energy(ramp).item()
        < 0.02 * training_monitor.high_frequency_energy(edge).item()
    )


def test_corruption_score_rejects_bad_cutoff_and_shapes(refs):
    with pytest.raises(ValueError, match="cutoff"):
        training_monitor.corruption_score(refs, refs, cutoff=1.5)
    with pytest.raises(ValueError, match="samples"):
        training_monitor.corruption_score(refs[0], refs)
    with pytest.raises(ValueError, match="same"):
        training_monitor.corruption_score(refs[:, :, :16], refs)
    with pytest.raises(ValueError, match="non-finite"):
        training_monitor.corruption_score(refs * float("nan"), refs)


# --- feature space / fidelity -----------------------------------------------------------------------------------


def test_feature_extractor_is_deterministic_and_seed_dependent(refs):
    a = training_monitor.RandomFeatureExtractor(seed=0)(refs)
    b = training_monitor.RandomFeatureExtractor(seed=0)(refs)
    c = training_monitor.RandomFeatureExtractor(seed=1)(refs)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.allclose(a.norm(dim=1), torch.ones(len(refs)), atol=1e-5)


def test_fidelity_orders_copy_noisy_copy_and_other_images(refs):
    copy = training_monitor.fidelity(refs[:1], refs[:1])
    noisy = training_monitor.fidelity(_noisy(refs[:1], 0.2), refs[:1])
    other = training_monitor.fidelity(_smooth_images(4, seed=7), refs[:1])
    assert copy.item() == pytest.approx(1.0, abs=1e-5)
    assert copy.item() > noisy.item()
    assert copy.item() > other.item()


def test_fidelity_averages_over_all_pairs(refs):
    f_all = training_monitor.fidelity(refs, refs).item()
    feats = training_monitor.feature_embedding(refs)
    assert f_all == pytest.approx((feats @ feats.T).mean().item(), abs=1e-6)
    assert f_all < 1.0  # off-diagonal pairs are different images


# --- diversity / copying ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["feature", "pixel"])
def test_identical_samples_have_zero_diversity(refs, space):
    same = refs[:1].repeat(5, 1, 1, 1)
    assert training_monitor.diversity(same, space=space).item() == pytest.approx(0.0, abs=1e-6)
    assert training_monitor.diversity(refs, space=space).item() > 0.01


def test_diversity_pixel_is_mean_pairwise_rms():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.5)
    assert training_monitor.diversity(torch.cat([a, b]), space="pixel").item() == pytest.approx(0.5)


def test_diversity_rejects_single_sample_and_bad_space(refs):
    with pytest.raises(ValueError, match="samples"):
        training_monitor.diversity(refs[:1])
    with pytest.raises(ValueError, match="space"):
        training_monitor.diversity(refs, space="lpips")


def test_nearest_reference_distance_and_copy_rate(refs):
    shifted = refs + 0.05  # every sample 0.05 RMS away from its own reference
    d = training_monitor.nearest_reference_distance(shifted, refs)
    assert torch.allclose(d, torch.full((3,), 0.05), atol=1e-6)
    assert training_monitor.copy_rate(refs, refs).item() == 1.0
    assert training_monitor.copy_rate(shifted, refs, threshold=0.1).item() == 1.0
    assert training_monitor.copy_rate(shifted, refs, threshold=0.01).item() == 0.0
    mixed = torch.cat([refs[:1], _smooth_images(3, seed=9)])
    assert training_monitor.copy_rate(mixed, refs, threshold=0.05).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="threshold"):
        training_monitor.copy_rate(refs, refs, threshold=0.0)


# --- implied width ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("alpha_bar", [0.999, 0.9, 0.3])
def test_implied_width_recovers_the_width_of_an_optimal_gaussian_denoiser(s, alpha_bar):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 4, 8, 8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a, b = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    k = a * s**2 / (a**2 * s**2 + b**2)
    x0_hat = x0 + k * b * eps  # E[y | x_t] for y ~ N(x0, s^2), x_t = a x0 + b eps
    assert training_monitor.implied_width(x0, x0_hat, eps, alpha_bar).item() == pytest.approx(s, rel=1e-3, abs=1e-5)


def test_implied_width_ignores_noise_uncorrelated_bias():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 4, 8, 8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    bias = 0.3 * torch.randn(x0.shape, generator=g)  # e.g. a pull toward other data, independent of eps
    w = training_monitor.implied_width(x0, x0 + bias, eps, 0.5).item()
    assert w < 0.05


def test_implied_width_validates_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="alpha_bar"):
        training_monitor.implied_width(x, x, x, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        training_monitor.implied_width(x, x, torch.zeros(2, 4), 0.5)


# --- report -----------------------------------------------------------------------------------------------------


def test_corruption_report_keys_and_values(refs):
    rep = training_monitor.corruption_report(_noisy(refs, 0.1), refs)
    assert set(rep) == {"fidelity", "corruption", "diversity", "copy_rate", "nn_distance"}
    assert all(isinstance(v, float) for v in rep.values())
    assert rep["corruption"] > 0
    assert rep["nn_distance"] == pytest.approx(0.1, rel=0.1)
    one = training_monitor.corruption_report(refs[:1], refs)
    assert math.isnan(one["diversity"])


def test_old_module_name_is_a_deprecated_alias():
    sys.modules.pop("bayes_adapter.monitor", None)
    with pytest.warns(FutureWarning, match="renamed bayes_adapter.training_monitor"):
        old = importlib.import_module("bayes_adapter.monitor")
    assert old is training_monitor
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning comes once, on the first import
        from bayes_adapter.monitor import corruption_report
    assert corruption_report is training_monitor.corruption_report
