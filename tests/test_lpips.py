"""bayes_adapter.lpips, offline: a randomly initialised AlexNet and random linear weights saved to temporary files."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_random_lpips

from bayes_adapter import lpips


SIZE = 40  # above AlexNet's smallest input (31), small enough to keep the tests fast


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    return save_random_lpips(tmp_path_factory.mktemp("lpips"))


@pytest.fixture(scope="module")
def model(weight_files):
    return lpips.load_lpips(*weight_files)


def images(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def fake_lpips_package(root, with_weights: bool = True):
    """An installed-looking `lpips` package whose import would fail: the weights must be found without importing."""
    package = root / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('bayes_adapter must not import lpips')\n")
    if with_weights:
        ones = {f"lin{i}.model.1.weight": torch.ones(1, c, 1, 1) for i, c in enumerate(lpips._CHANNELS)}
        torch.save(ones, package / "weights" / "v0.1" / "alex.pth")
    return package


def test_identical_images_are_at_zero_different_ones_above_and_it_is_symmetric(model):
    x, y = images(3, seed=0), images(3, seed=1)
    with torch.no_grad():
        assert torch.equal(model(x, x), torch.zeros(3))
        forward, backward = model(x, y), model(y, x)
    assert (forward > 0).all()
    assert torch.equal(forward, backward)


def test_diversity_is_the_mean_over_distinct_pairs(model):
    x = images(4, seed=2)
    with torch.no_grad():
        pairs = [float(model(x[i : i + 1], x[j : j + 1])) for i in range(4) for j in range(i + 1, 4)]
    assert lpips.lpips_diversity(x, model) == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    assert lpips.lpips_diversity(x, model, batch_size=1) == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    assert lpips.lpips_diversity(x[:1].expand(3, -1, -1, -1), model) == 0.0


def test_to_reference_takes_each_images_nearest_reference(model):
    x, refs = images(2, seed=3), images(3, seed=4)
    with torch.no_grad():
        nearest = [min(float(model(x[i : i + 1], refs[j : j + 1])) for j in range(3)) for i in range(2)]
    assert lpips.lpips_to_reference(x, refs, model) == pytest.approx(sum(nearest) / 2, rel=1e-5)
    # Copies of references are at 0, whichever reference each copies.
    assert lpips.lpips_to_reference(refs[[2, 0]], refs, model) == 0.0
    # One copy and one other image: the mean of 0 and that image's nearest distance.
    mixed = torch.cat([refs[1:2], x[:1]])
    assert lpips.lpips_to_reference(mixed, refs, model) == pytest.approx(nearest[0] / 2, rel=1e-5)


def test_bad_images_are_refused_naming_the_argument(model):
    x = images(2, seed=5)
    with pytest.raises(
        ValueError, match=r"images must be a floating-point tensor of shape \(N, 3, H, W\).*got \(3, 40, 40\)"
    ):
        lpips.lpips_diversity(x[0], model)
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        lpips.lpips_diversity(x[:1], model)
    with pytest.raises(ValueError, match=r"at least 31 x 31 pixels, got \(16, 16\)"):
        lpips.lpips_diversity(images(2, seed=5, size=16), model)
    with pytest.raises(ValueError, match=r"finite values in \[-1, 1\]"):
        lpips.lpips_diversity((x + 1) * 127.5, model)
    with pytest.raises(ValueError, match="references must be a floating-point tensor"):
        lpips.lpips_to_reference(x, (x > 0).to(torch.uint8), model)
    with pytest.raises(ValueError, match=r"must have one size"):
        lpips.lpips_to_reference(x, images(1, seed=6, size=48), model)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        lpips.lpips_diversity(x, model, batch_size=0)


def test_default_files_are_the_hub_cache_and_the_installed_lpips_package(weight_files, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    backbone = tmp_path / "torch_home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert lpips.default_backbone_path() == backbone
    with pytest.raises(FileNotFoundError, match=f"found no file '{backbone}'.*--lpips-backbone PATH"):
        lpips.load_lpips()
    backbone.parent.mkdir(parents=True)
    backbone.write_bytes(open(weight_files[0], "rb").read())

    package = fake_lpips_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert lpips.find_linear_weights() == package / "weights" / "v0.1" / "alex.pth"
    model = lpips.load_lpips()
    assert all(torch.equal(w, torch.ones_like(w)) for w in model.linear)
    assert torch.equal(model.features[0].weight, torch.load(weight_files[0])["features.0.weight"])


def test_missing_linear_weights_name_what_was_looked_for(tmp_path, monkeypatch):
    fake_lpips_package(tmp_path / "site", with_weights=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(FileNotFoundError, match=r"lpips/weights/v0\.1/alex\.pth.*found none in .*site.*--no-deps"):
        lpips.find_linear_weights()


def test_files_that_do_not_fit_are_refused_naming_the_file(weight_files, tmp_path):
    wrong = {"features.0.weight": torch.zeros(64, 3, 5, 5)}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(
        ValueError, match=r"wrong\.pth.*missing features\.0\.bias, .*; features\.0\.weight has shape \(64, 3, 5, 5\)"
    ):
        lpips.load_lpips(tmp_path / "wrong.pth", weight_files[1])
    with pytest.raises(ValueError, match=r"LPIPS linear weights .*alexnet.*missing lin0\.model\.1\.weight"):
        lpips.load_lpips(weight_files[0], weight_files[0])
    # Pickled objects beyond tensors are never unpickled (weights_only).
    torch.save({"features.0.weight": torch.nn.Conv2d(3, 64, 11)}, tmp_path / "module.pth")
    with pytest.raises(ValueError, match=r"module\.pth' is not a torch state dict of tensors"):
        lpips.load_lpips(tmp_path / "module.pth", weight_files[1])
    with pytest.raises(FileNotFoundError, match="LPIPS linear weights: no file"):
        lpips.load_lpips(weight_files[0], tmp_path / "none.pth")
