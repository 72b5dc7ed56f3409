"""Which pipeline component an adapter belongs to ("unet", "transformer", "text_encoder", "text_encoder_2").

It sets the diffusers key prefix of an export. Told by the caller, or inferred from the model class, the saved
config's `auto_mapping.base_model_class`, or the adapted modules' top-level names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")

# Top-level module names that tell a saved adapter's component when its config does not say.
_UNET_ROOTS = {"down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding"}
_TRANSFORMER_ROOTS = {
    "transformer_blocks",
    "single_transformer_blocks",
    "pos_embed",
    "context_embedder",
    "time_text_embed",
    "x_embedder",
    "norm_out",
    "proj_out",
}


def component_of_model(base: nn.Module) -> str:
    name = type(base).__name__
    module = type(base).__module__
    if module.startswith("diffusers"):
        return "unet" if "UNet" in name else "transformer"
    if module.startswith("transformers") and name == "CLIPTextModel":
        # SDXL's second encoder (CLIPTextModelWithProjection), T5 and others are ambiguous: the caller must say.
        return "text_encoder"
    raise ValueError(
        f"component: cannot tell which pipeline component a {name} is; pass component= one of {COMPONENTS}"
    )


def component_of_base_class(config: dict[str, Any]) -> str | None:
    """The component the saved config's `auto_mapping.base_model_class` names, or None if it names none."""
    base_class = (config.get("auto_mapping") or {}).get("base_model_class") or ""
    if "UNet" in base_class:
        return "unet"
    if "Transformer" in base_class:
        return "transformer"
    if base_class == "CLIPTextModel":
        return "text_encoder"
    return None


def component_of_folder(config: dict[str, Any], state_dict: dict[str, torch.Tensor], folder: Path) -> str:
    recorded = component_of_base_class(config)
    if recorded is not None:
        return recorded
    base_class = (config.get("auto_mapping") or {}).get("base_model_class") or ""
    roots = {key.split(".", 1)[0] for key in state_dict}
    if not base_class and roots and roots <= _UNET_ROOTS:
        return "unet"
    if not base_class and roots and roots <= _TRANSFORMER_ROOTS:
        return "transformer"
    raise ValueError(
        f"component: cannot tell which pipeline component the adapter in {str(folder)!r} belongs to (top-level "
        f"modules {sorted(roots)}); pass component= one of {COMPONENTS}"
    )
