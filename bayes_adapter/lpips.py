"""LPIPS, the learned perceptual image distance (Zhang et al. 2018), AlexNet variant with the v0.1 linear weights, in
plain torch: neither torchvision nor the `lpips` package is imported.

Two weight files are read, both with `torch.load(weights_only=True)`:

- AlexNet's ImageNet weights, torchvision's `alexnet-owt-7be5be79.pth` (only its `features.*` tensors): by default
  the copy in torch's hub cache (`torch.hub.get_dir()/checkpoints/`, where torchvision and
  `torch.hub.load_state_dict_from_url` put it), or a file given by path. Nothing is downloaded here.
- The linear layers calibrated on human judgements, `lpips/weights/v0.1/alex.pth`, shipped inside the `lpips` wheel:
  found in the installed package's folder without importing it (`pip install --no-deps lpips` installs it without
  torchvision), or a file given by path.

Images are float tensors `(N, 3, H, W)` in `[-1, 1]`, at least 31 x 31 pixels (AlexNet's smallest input); the two
sides of a distance must have the same size. Identical images are at distance 0, and the distance is symmetric.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ._images import check_images


__all__ = [
    "ALEXNET_CHECKPOINT",
    "ALEXNET_URL",
    "AlexNetLPIPS",
    "default_backbone_path",
    "find_linear_weights",
    "load_lpips",
    "lpips_diversity",
    "lpips_to_reference",
]

ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_CHECKPOINT}"
LINEAR_WEIGHTS_IN_PACKAGE = Path("weights", "v0.1", "alex.pth")
MIN_IMAGE_SIZE = 31
# What LPIPS takes: RGB in [-1, 1], at least AlexNet's smallest input.
_LPIPS_IMAGES = {"channels": 3, "value_range": (-1.0, 1.0), "min_size": MIN_IMAGE_SIZE}
# The layers LPIPS compares: the outputs of AlexNet's five ReLUs (indices in torchvision's `features`).
_TAPS = (1, 4, 7, 9, 11)
_CHANNELS = (64, 192, 384, 256, 256)
# LPIPS v0.1 maps [-1, 1] images to ImageNet-normalised input with this shift and scale.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet `features` up to its last ReLU, with the same indices (so its state-dict keys fit)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
    )


class AlexNetLPIPS(nn.Module):
    """LPIPS with an AlexNet backbone: `model(x, y)` is the distance of each pair `(x[i], y[i])`, shape `(N,)`.

    Build it with `load_lpips`; a fresh instance holds random weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = alexnet_features()
        # LPIPS's "linear layers" are 1x1 convolutions without bias: one non-negative weight per channel.
        self.linear = nn.ParameterList([nn.Parameter(torch.zeros(c), requires_grad=False) for c in _CHANNELS])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five feature maps LPIPS compares, each unit-normalised over channels at every position."""
        h = (images.to(self.shift.device, self.shift.dtype) - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in _TAPS:
                taps.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def distance(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """The LPIPS distance between embeddings (from `embed`) that broadcast against each other, shape `(N,)`."""
        total = 0
        for fa, fb, weight in zip(a, b, self.linear):
            total = total + ((fa - fb).pow(2) * weight.view(1, -1, 1, 1)).sum(dim=1).mean(dim=(1, 2))
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(self.embed(x), self.embed(y))


def default_backbone_path() -> Path:
    """Where torch's hub cache keeps AlexNet's ImageNet weights (`$TORCH_HOME/hub/checkpoints/...`)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT


def find_linear_weights() -> Path:
    """The v0.1 AlexNet linear weights inside the installed `lpips` package, found without importing it."""
    spec = importlib.util.find_spec("lpips")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / LINEAR_WEIGHTS_IN_PACKAGE).is_file():
            return Path(folder) / LINEAR_WEIGHTS_IN_PACKAGE
    where = f"in {', '.join(map(str, folders))}" if folders else "(the lpips package is not installed)"
    raise FileNotFoundError(
        f"LPIPS needs its v0.1 linear weights, lpips/{LINEAR_WEIGHTS_IN_PACKAGE.as_posix()}, and found none {where}. "
        "Install the lpips wheel without its torchvision dependency (`pip install --no-deps lpips==0.1.4`), or pass "
        "the file's path (--lpips-linear-weights PATH)."
    )


def _load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(f"{what} {str(path)!r} is not a torch state dict of tensors ({error})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {str(path)!r} is not a torch state dict of tensors")
    return state


def _take(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], path: Path, what: str) -> dict:
    missing = [k for k in expected if k not in state]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, expected {tuple(s)}"
        for k, s in expected.items()
        if k in state and state[k].shape != s
    ]
    if problems:
        raise ValueError(f"{what} {str(path)!r} does not fit LPIPS's AlexNet: {'; '.join(problems)}")
    return {k: state[k].float() for k in expected}


def load_lpips(
    backbone: str | os.PathLike | None = None,
    linear_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> AlexNetLPIPS:
    """Builds LPIPS (AlexNet, v0.1) from local files; nothing is downloaded.

    Args:
        backbone: torchvision's AlexNet weights file; torch's hub cache copy (`default_backbone_path()`) by default.
        linear_weights: The v0.1 linear weights; the installed `lpips` package's file by default.
        device: Where the model runs.

    Raises:
        FileNotFoundError: A file is missing; the message names the file looked for and how to get it.
        ValueError: A file does not hold the expected tensors.
    """
    backbone_path = default_backbone_path() if backbone is None else Path(backbone)
    if not backbone_path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs AlexNet's ImageNet weights and found no file {str(backbone_path)!r}. On a machine with "
            f"internet, fetch it once into torch's hub cache with `python -c \"import torch; "
            f"torch.hub.load_state_dict_from_url('{ALEXNET_URL}')\"` (or download that URL), then copy it to "
            f"{str(default_backbone_path())!r} or pass its path (--lpips-backbone PATH)."
        )
    linear_path = find_linear_weights() if linear_weights is None else Path(linear_weights)
    if not linear_path.is_file():
        raise FileNotFoundError(f"LPIPS linear weights: no file {str(linear_path)!r}")

    model = AlexNetLPIPS()
    expected = {f"features.{k}": v.shape for k, v in model.features.state_dict().items()}
    features = _take(_load_tensors(backbone_path, "AlexNet weights"), expected, backbone_path, "AlexNet weights")
    model.features.load_state_dict({k.removeprefix("features."): v for k, v in features.items()})
    expected = {f"lin{i}.model.1.weight": torch.Size([1, c, 1, 1]) for i, c in enumerate(_CHANNELS)}
    linear = _take(_load_tensors(linear_path, "LPIPS linear weights"), expected, linear_path, "LPIPS linear weights")
    for parameter, weight in zip(model.linear, linear.values()):
        parameter.data.copy_(weight.flatten())
    return model.to(device)


@torch.no_grad()
def _embed(model: AlexNetLPIPS, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batches = [model.embed(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return [torch.cat(layer) for layer in zip(*batches)]


@torch.no_grad()
def _distances_to(model: AlexNetLPIPS, one: list[torch.Tensor], many: list[torch.Tensor], batch_size: int):
    """The distances from one embedded image to each of many, in batches, shape `(len(many),)`."""
    count = len(many[0])
    return torch.cat([model.distance(one, [f[i : i + batch_size] for f in many]) for i in range(0, count, batch_size)])


def lpips_diversity(images: torch.Tensor, model: AlexNetLPIPS | None = None, batch_size: int = 8) -> float:
    """Mean LPIPS over the pairs of distinct images (0 when all are copies of one; higher is more diverse).

    Args:
        images: `(N, 3, H, W)` in `[-1, 1]`, N >= 2.
        model: From `load_lpips`; `load_lpips()` (hub cache and installed `lpips` files) by default.
        batch_size: Images per forward pass.
    """
    images = check_images("images", images, min_count=2, **_LPIPS_IMAGES)
    model = load_lpips() if model is None else model
    embedded = _embed(model, images, batch_size)
    pairs = [
        _distances_to(model, [f[i : i + 1] for f in embedded], [f[i + 1 :] for f in embedded], batch_size)
        for i in range(len(images) - 1)
    ]
    return float(torch.cat(pairs).double().mean())


def lpips_to_reference(
    images: torch.Tensor, references: torch.Tensor, model: AlexNetLPIPS | None = None, batch_size: int = 8
) -> float:
    """Mean over the images of the LPIPS to the nearest reference (0 when every image copies a reference).

    Args:
        images: `(N, 3, H, W)` in `[-1, 1]`.
        references: `(M, 3, H, W)` in `[-1, 1]`, the same size as `images`.
        model: From `load_lpips`; `load_lpips()` (hub cache and installed `lpips` files) by default.
        batch_size: Images per forward pass.
    """
    images = check_images("images", images, **_LPIPS_IMAGES)
    references = check_images("references", references, **_LPIPS_IMAGES)
    if images.shape[-2:] != references.shape[-2:]:
        raise ValueError(
            f"images {tuple(images.shape[-2:])} and references {tuple(references.shape[-2:])} must have one size"
        )
    model = load_lpips() if model is None else model
    embedded, embedded_references = _embed(model, images, batch_size), _embed(model, references, batch_size)
    nearest = [
        _distances_to(model, [f[i : i + 1] for f in embedded], embedded_references, batch_size).min()
        for i in range(len(images))
    ]
    return float(torch.stack(nearest).double().mean())
