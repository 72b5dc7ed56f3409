"""Procedural, texture-rich 32x32 images: several object kinds on plain, gradient and textured backgrounds.

Everything is drawn with torch from a seeded ``torch.Generator``, so a dataset is a pure function of its seed.
Images are float tensors in [-1, 1], shape (3, H, W).

Pretraining sees the object kinds in ``KINDS`` with random colours and textures. The fine-tuning "subject" is an
object the base model never saw: a *cross* (a kind held out of pretraining) with one fixed two-colour checker
texture, shown at a few positions, sizes and backgrounds (a DreamBooth-style subject).
"""

from __future__ import annotations

import math

import torch


KINDS = ("circle", "square", "triangle", "diamond", "ring", "star")
SUBJECT_KIND = "cross"
# Condition tokens: one per pretraining kind, then the null token (classifier-free guidance) and the subject's
# rare token, which pretraining never uses (its embedding stays at its random initialisation, like "sks").
NULL_TOKEN = len(KINDS)
SUBJECT_TOKEN = len(KINDS) + 1
NUM_TOKENS = len(KINDS) + 2
# Lab v2 (PLAN_V2.md) adds two tokens after the condition sequence's START/END ids (models.py), so v1 models keep
# their vocabulary: the subject's class ("cross", pretrained on crosses of random appearance) and "photo" (the
# natural crops of the pretraining mix).
CLASS_TOKEN = NUM_TOKENS + 2
PHOTO_TOKEN = NUM_TOKENS + 3
V2_EXTRA_TOKENS = 2

_SS = 2  # supersampling factor for anti-aliased edges


def _rand(g: torch.Generator, lo: float = 0.0, hi: float = 1.0, n: int | None = None) -> float | torch.Tensor:
    x = torch.rand(n if n is not None else 1, generator=g) * (hi - lo) + lo
    return x if n is not None else float(x)


def _colour(g: torch.Generator) -> torch.Tensor:
    return torch.rand(3, generator=g) * 2 - 1


def _texture(g: torch.Generator, yy: torch.Tensor, xx: torch.Tensor, kind: str, c1, c2, period: float, angle: float):
    """A two-colour texture over the grid; returns (3, H, W)."""
    if kind == "solid":
        m = torch.zeros_like(xx)
    elif kind == "stripes":
        u = xx * math.cos(angle) + yy * math.sin(angle)
        m = (torch.sin(2 * math.pi * u / period) > 0).float()
    elif kind == "checker":
        m = ((torch.floor(xx / period) + torch.floor(yy / period)) % 2).float()
    elif kind == "dots":
        fx = torch.remainder(xx, period) - period / 2
        fy = torch.remainder(yy, period) - period / 2
        m = ((fx**2 + fy**2) < (period * 0.3) ** 2).float()
    elif kind == "waves":
        m = (torch.sin(2 * math.pi * xx / period + 2.0 * torch.sin(2 * math.pi * yy / (2 * period))) > 0).float()
    else:
        raise ValueError(f"texture must be one of solid/stripes/checker/dots/waves, got {kind!r}")
    return c1[:, None, None] * (1 - m) + c2[:, None, None] * m


TEXTURES = ("solid", "stripes", "checker", "dots", "waves")


def _shape_mask(kind: str, yy: torch.Tensor, xx: torch.Tensor, cy: float, cx: float, r: float, rot: float):
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(rot), math.sin(rot)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    if kind == "circle":
        return (u**2 + v**2) < r**2
    if kind == "square":
        return (u.abs() < r * 0.85) & (v.abs() < r * 0.85)
    if kind == "diamond":
        return (u.abs() + v.abs()) < r
    if kind == "ring":
        d2 = u**2 + v**2
        return (d2 < r**2) & (d2 > (0.55 * r) ** 2)
    if kind == "triangle":
        # equilateral triangle pointing "up" in the rotated frame
        return (v < r * 0.5) & (v > -r + math.sqrt(3) * u.abs() * 1.0 - r * 0.0 - 0.0 * r) & (v > -r)
    if kind == "star":
        ang = torch.atan2(v, u)
        rad = torch.sqrt(u**2 + v**2)
        edge = r * (0.55 + 0.45 * torch.cos(5 * ang).clamp(min=0) ** 0.6)
        return rad < edge
    if kind == "cross":
        w = 0.36 * r
        return ((u.abs() < w) & (v.abs() < r)) | ((v.abs() < w) & (u.abs() < r))
    raise ValueError(f"kind must be one of {KINDS + (SUBJECT_KIND,)}, got {kind!r}")


def _background(g: torch.Generator, yy: torch.Tensor, xx: torch.Tensor, size: float) -> torch.Tensor:
    style = int(torch.randint(3, (1,), generator=g))
    c1 = _colour(g)
    if style == 0:  # plain
        return c1[:, None, None].expand(3, *xx.shape).clone()
    if style == 1:  # linear gradient
        c2 = _colour(g)
        a = _rand(g, 0, 2 * math.pi)
        t = ((xx - size / 2) * math.cos(a) + (yy - size / 2) * math.sin(a)) / size + 0.5
        t = t.clamp(0, 1)
        return c1[:, None, None] * (1 - t) + c2[:, None, None] * t
    # low-contrast texture
    c2 = (c1 + 0.35 * _colour(g)).clamp(-1, 1)
    tex = TEXTURES[1 + int(torch.randint(len(TEXTURES) - 1, (1,), generator=g))]
    return _texture(g, yy, xx, tex, c1, c2, _rand(g, 3, 7), _rand(g, 0, math.pi))


def render(
    g: torch.Generator,
    kind: str,
    size: int = 32,
    texture: str | None = None,
    colours: tuple[torch.Tensor, torch.Tensor] | None = None,
    period: float | None = None,
    angle: float | None = None,
) -> torch.Tensor:
    """Draws one image of an object of ``kind``; unspecified appearance is drawn at random from ``g``."""
    n = size * _SS
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / _SS
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    img = _background(g, yy, xx, size)
    r = _rand(g, 0.22, 0.38) * size
    cy, cx = _rand(g, r * 0.8, size - r * 0.8), _rand(g, r * 0.8, size - r * 0.8)
    rot = _rand(g, 0, 2 * math.pi)
    if texture is None:
        texture = TEXTURES[int(torch.randint(len(TEXTURES), (1,), generator=g))]
    if colours is None:
        colours = (_colour(g), _colour(g))
    if period is None:
        period = _rand(g, 2.5, 5.0)
    if angle is None:
        angle = _rand(g, 0, math.pi)
    fg = _texture(g, yy, xx, texture, colours[0], colours[1], period, angle)
    mask = _shape_mask(kind, yy, xx, cy, cx, r, rot).float()
    img = img * (1 - mask) + fg * mask
    img = torch.nn.functional.avg_pool2d(img[None], _SS)[0]
    return img.clamp(-1, 1)


def make_pretraining_set(
    n: int, seed: int = 0, size: int = 32, with_class: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images of the pretraining kinds and their kind labels (condition tokens). ``with_class`` (lab
    v2) adds the subject's kind, the cross, in random colours and textures, labelled ``CLASS_TOKEN``."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    kinds = KINDS + (SUBJECT_KIND,) if with_class else KINDS
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(kinds), (n,), generator=g)
    images = torch.stack([render(g, kinds[int(k)], size) for k in labels])
    if with_class:
        labels[labels == len(KINDS)] = CLASS_TOKEN
    return images, labels


def make_v2_pretraining_set(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Lab v2's denoiser data: ``n // 2`` procedural images with the class (``make_pretraining_set(with_class=True)``)
    and ``n - n // 2`` natural crops labelled ``PHOTO_TOKEN``, with their condition tokens."""
    images, labels = make_pretraining_set(n // 2, seed=seed, size=size, with_class=True)
    crops = make_natural_crops(n - n // 2, seed=seed + 7, size=size)
    return torch.cat([images, crops]), torch.cat([labels, torch.full((len(crops),), PHOTO_TOKEN)])


SUBJECT_COLOURS = (torch.tensor([0.9, -0.6, -0.7]), torch.tensor([0.95, 0.85, -0.8]))  # red / yellow
SUBJECT_KINDS = KINDS + (SUBJECT_KIND,)


def _check_subject_kind(kind: str) -> None:
    if kind not in SUBJECT_KINDS:
        raise ValueError(f"subject_kind must be one of {SUBJECT_KINDS}, got {kind!r}")


def class_token(kind: str) -> int:
    """Lab v2's class token for a subject of ``kind``: the cross's ``CLASS_TOKEN``, or a pretraining kind's own
    token (PLAN_V2.md, sixth session: the subject's class may be a kind the base model already draws)."""
    _check_subject_kind(kind)
    return CLASS_TOKEN if kind == SUBJECT_KIND else KINDS.index(kind)


def v2_prompt(kind: str = SUBJECT_KIND) -> tuple[int, int]:
    """Lab v2's subject prompt: the rare token, then the class token of ``kind`` ("sks cross")."""
    return SUBJECT_TOKEN, class_token(kind)


def make_subject_set(n: int, seed: int = 1234, size: int = 32, kind: str = SUBJECT_KIND) -> torch.Tensor:
    """``n`` images of the subject: a red/yellow checkered ``kind`` (the held-out cross by default), varying pose and
    background."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    _check_subject_kind(kind)
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [render(g, kind, size, texture="checker", colours=SUBJECT_COLOURS, period=3.0) for _ in range(n)]
    )


# --- natural photographs (lab v2): crops of images that ship inside installed packages, no download ----------------

# Colour photographs bundled with scikit-image 0.26 (skimage/data/) and matplotlib (mpl-data/sample_data/).
NATURAL_SOURCES = {
    "skimage": (
        "astronaut.png",
        "brick.png",
        "chelsea.png",
        "coffee.png",
        "grass.png",
        "gravel.png",
        "hubble_deep_field.jpg",
        "motorcycle_left.png",
        "retina.jpg",
        "rocket.jpg",
        "camera.png",
        "moon.png",
    ),
    "matplotlib": ("sample_data/grace_hopper.jpg",),
}


def natural_image_files() -> list[str]:
    """Paths of the bundled photographs (`NATURAL_SOURCES`), read from the installed packages' folders."""
    import importlib.util
    import os

    folders = {"skimage": "data", "matplotlib": "mpl-data"}
    paths = []
    for package, names in NATURAL_SOURCES.items():
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ImportError(f"the lab's natural images need {package} installed (bash scripts/bootstrap.sh)")
        root = os.path.join(os.path.dirname(spec.origin), folders[package])
        paths += [os.path.join(root, name) for name in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"bundled images not found: {missing}")
    return paths


def make_natural_crops(n: int, seed: int = 0, size: int = 32, min_side: int = 32, max_side: int = 160) -> torch.Tensor:
    """`n` random square crops (side `min_side` to `max_side` px, resized to `size`, randomly mirrored) of the
    bundled photographs, as (n, 3, size, size) floats in [-1, 1]: natural high-frequency content."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    import numpy as np
    from PIL import Image

    photos = []
    for path in natural_image_files():
        with Image.open(path) as image:
            photos.append(image.convert("RGB"))
    g = torch.Generator().manual_seed(seed)
    crops = []
    for _ in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=g))]
        side = int(torch.randint(min_side, min(max_side, *photo.size) + 1, (1,), generator=g))
        left = int(torch.randint(photo.size[0] - side + 1, (1,), generator=g))
        top = int(torch.randint(photo.size[1] - side + 1, (1,), generator=g))
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        if float(torch.rand(1, generator=g)) < 0.5:
            pixels = pixels.flip(-1)
        crops.append(pixels)
    return torch.stack(crops).clamp(-1, 1)
