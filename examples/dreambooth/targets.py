"""The LoRA target names of `--unet_target_modules` / `--transformer_target_modules` / `--text_encoder_target_modules`,
checked against the model's layers before any weights load (each component is built empty, from its config).

A name matches as PEFT matches a list of target modules: a layer whose full name is the name or ends with `.<name>`.
Every name must match at least one layer that Bayesian LoRA adapts (Linear, Conv1d/2d/3d, Embedding, transformers'
Conv1D); an unknown name is reported with the closest valid names, never silently dropped.
"""

from __future__ import annotations

import difflib
import importlib

from torch import nn


def split_targets(targets: str) -> list[str]:
    """The names of a comma-separated target list."""
    return [name.strip() for name in targets.split(",") if name.strip()]


def empty_component(path: str, model_index: dict, name: str, revision: str | None = None) -> nn.Module:
    """Component `name` built from its config on the meta device: its layers, without reading any weights."""
    from accelerate import init_empty_weights

    library, class_name = model_index[name]
    cls = getattr(importlib.import_module(library), class_name)
    with init_empty_weights():
        if library == "diffusers":
            return cls.from_config(cls.load_config(path, subfolder=name, revision=revision))
        return cls(cls.config_class.from_pretrained(path, subfolder=name, revision=revision))


def adaptable_layer_names(model: nn.Module) -> list[str]:
    """The full names of the layers Bayesian LoRA can adapt."""
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, Conv1D)
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def _suffixes(layer_names: list[str]) -> list[str]:
    """Every dotted suffix of the layer names (`to_q`, `attn1.to_q`, ...): the names a target list may use."""
    found = dict.fromkeys(
        ".".join(parts[i:]) for parts in (name.split(".") for name in layer_names) for i in range(len(parts))
    )
    return [name for name in found if not name.split(".")[0].isdigit()]


def check_targets(flag: str, targets: str, layer_names: list[str], component: str) -> None:
    """Raises `ValueError` (one line) unless every name of `targets` matches a layer of `layer_names`.

    Args:
        flag: The command-line flag the names came from, e.g. `--unet_target_modules`.
        targets: Its comma-separated names.
        layer_names: `adaptable_layer_names` of the component.
        component: The component, as the message names it (e.g. "the UNet").
    """
    names = split_targets(targets)
    if not names:
        raise ValueError(f"{flag}={targets!r} names no module; expected comma-separated layer names, e.g. to_q,to_v.")
    valid = _suffixes(layer_names)
    for name in names:
        if not any(layer == name or layer.endswith("." + name) for layer in layer_names):
            close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
            hint = f"closest valid names: {', '.join(close)}" if close else f"e.g. {', '.join(valid[:5])}"
            raise ValueError(
                f"{flag}: {name!r} names no layer of {component} that LoRA can adapt (Linear, Conv, Embedding); "
                f"{hint}."
            )


def check_model_targets(settings) -> None:
    """Every LoRA target name against the layers of the denoiser and of the trained text encoders, built empty from
    their configs (no weights are read); raises `ValueError` naming the flag and the closest valid names."""
    family, path = settings.family, settings.pretrained_model_name_or_path
    components = [(family.denoiser, family.target_modules_flag, family.denoiser_targets(settings))]
    if settings.train_text_encoder:
        flag, text_targets = "--text_encoder_target_modules", settings.text_encoder_target_modules
        components += [(name, flag, text_targets) for name in family.trainable_text_encoders]
    for name, flag, target_list in components:
        model = empty_component(path, settings.model_index, name, settings.revision)
        layers = adaptable_layer_names(model)
        check_targets(flag, target_list, layers, f"the {name} of {family.label}")
