"""The model families the DreamBooth script trains: SD 1.x/2.x, SDXL, SD3, Flux.1, Flux.2 ([dev] and
[klein]), Qwen-Image, Z-Image and SANA.

A family is told by the pipeline's `model_index.json` (`_class_name`), as diffusers' own loaders tell it. It fixes
which components are loaded (by the classes `model_index.json` names), which text encoders may carry a Bayesian
adapter (the CLIP ones; T5 stays frozen, as in diffusers' scripts), how prompts become conditioning, how latents
are noised (DDPM noise prediction, or flow matching for the DiTs) and what the denoiser is asked to predict.

Adding a family is adding one subclass of `DDPMFamily` or `FlowMatchingFamily` with a `name`: it registers itself.

One module per kind: `base` (the interface, the registry, the DDPM and flow-matching bases, shared helpers),
`precision` (the dtype of a precision name, methods run outside autocast), `stable_diffusion`, `flux`,
`qwen_image`, `z_image`, `sana`. A new family is one class in one of them (or a new module
imported below).
"""

from __future__ import annotations

from . import flux, qwen_image, sana, stable_diffusion, z_image  # noqa: F401  (each module registers its families)
from .base import (
    FAMILIES,
    DDPMFamily,
    FlowMatchingFamily,
    ModelFamily,
    NoisedLatents,
    PromptCache,
    family_of_class_name,
    load_component,
    read_model_index,
    to_latents,
)
from .flux import Flux, Flux2, Flux2Klein
from .precision import half_precision_dtype
from .qwen_image import QwenImage
from .sana import Sana
from .stable_diffusion import StableDiffusion, StableDiffusion3, StableDiffusionXL
from .z_image import ZImage


__all__ = [
    "FAMILIES",
    "DDPMFamily",
    "FlowMatchingFamily",
    "Flux",
    "Flux2",
    "Flux2Klein",
    "ModelFamily",
    "NoisedLatents",
    "PromptCache",
    "QwenImage",
    "Sana",
    "StableDiffusion",
    "StableDiffusion3",
    "StableDiffusionXL",
    "ZImage",
    "family_of_class_name",
    "half_precision_dtype",
    "load_component",
    "read_model_index",
    "to_latents",
]
