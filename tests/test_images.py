"""_images: one contract for image arguments, tensors and PIL images alike."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from bayes_adapter._images import check_images, check_pil_images


def test_tensor_images_are_returned_or_refused_naming_the_argument():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert check_images("samples", x, min_count=2, channels=3, value_range=(-1, 1), min_size=8) is x
    for bad, message in [
        (x[0], r"samples must be a floating-point tensor of shape \(N, C, H, W\), got \(3, 8, 8\)"),
        (x.to(torch.uint8), r"got \(2, 3, 8, 8\) torch.uint8"),
        ([x], "got list"),
        (x[:1].expand(0, 3, 8, 8), "samples must hold at least 1 image, got 0"),
        (torch.full_like(x, float("nan")), "non-finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_images("samples", bad)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\), got \(2, 3, 8, 8\)"):
        check_images("masks", x, channels=1)
    with pytest.raises(ValueError, match="at least 3 images, got 2"):
        check_images("samples", x, min_count=3)
    with pytest.raises(ValueError, match=r"at least 9 x 9 pixels, got \(8, 8\)"):
        check_images("samples", x, min_size=9)
    with pytest.raises(ValueError, match=r"finite values in \[0, 1\], got \[-"):
        check_images("samples", x, value_range=(0, 1))
    assert check_images("samples", torch.full_like(x, float("nan")), finite=False) is not None


def test_pil_images_and_paths(tmp_path):
    image = Image.new("RGB", (4, 4))
    image.save(tmp_path / "a.png")
    assert check_pil_images("generated", [image, image]) == [image, image]
    with pytest.raises(ValueError, match="generated must be a list of PIL images, got Image"):
        check_pil_images("generated", image)
    with pytest.raises(ValueError, match=r"generated must hold at least 1 image \(PIL images\), got 0"):
        check_pil_images("generated", [])
    with pytest.raises(ValueError, match="generated must hold PIL images only, got a str"):
        check_pil_images("generated", [image, "a.png"])
    # With paths: None is no image, one image or path a list of one; a path must be a file.
    assert check_pil_images("validation_images", None, min_count=0, paths=True) == []
    assert check_pil_images("validation_images", tmp_path / "a.png", min_count=0, paths=True) == [tmp_path / "a.png"]
    with pytest.raises(ValueError, match=r"validation_images: '.*b.png' is not an image file"):
        check_pil_images("validation_images", [image, str(tmp_path / "b.png")], paths=True)
