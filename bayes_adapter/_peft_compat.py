"""Every touch of PEFT's private internals lives here, so that a PEFT upgrade breaks one file.

What is private and used:
- `PeftType` is a closed enum: a plugin adds its member at import time.
- `peft.mapping.PEFT_TYPE_TO_*_MAPPING`: written directly when re-registering (after `importlib.reload`), because
  `register_peft_method` refuses a second registration.
- `peft.tuners.lora.layer`: `Conv1d` and `LoraVariant` are not exported by `peft.tuners.lora`; the LoRA variant
  protocol (`lora_variants`, `lora_variant`, `init/forward/merge_*`), `Embedding._embed` and
  `Embedding._get_embed_scale`.
- `LoraModel._create_and_replace`, `_create_new_module` and `_mark_only_adapters_as_trainable`, overridden by
  `PluginLoraModel`, which turns them into public hooks.
- `peft.utils.other.get_pattern_key`: how PEFT matches a module to a `rank_pattern` / `alpha_pattern` key.
- The `is_lora_variant` / `lora_variants` metadata on `LoraConfig` fields, to refuse variants we cannot combine with.
- `peft.tuners.lora.variants.DoraLinearVariant`, PEFT's DoRA hook for Linear layers, which Bayesian DoRA subclasses
  (its `lora_magnitude_vector[adapter]` layer is called with stand-ins for the factors holding sampled weights).
- `peft.tuners.lora.bnb.Linear8bitLt` / `Linear4bit` and `peft.tuners.lora.torchao.TorchaoLoraLinear`, PEFT's LoRA
  layers over quantised bases, which the Bayesian quantised layers subclass (imported only when a quantised base is
  met, so that importing bayes_adapter never imports bitsandbytes or torchao).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import peft
import torch
from packaging.version import Version
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.lora import LoraConfig, LoraModel
from peft.tuners.lora.layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer, LoraVariant
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType, register_peft_method
from peft.utils.other import get_pattern_key


__all__ = [
    "BaseTunerLayer",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "DoraLinearVariant",
    "Embedding",
    "Linear",
    "LoraLayer",
    "LoraVariant",
    "PluginLoraModel",
    "PEFT_TESTED_RANGE",
    "bnb_lora_layers",
    "check_peft_version",
    "embed",
    "embed_scale",
    "enabled_lora_variants",
    "get_pattern_key",
    "peft_type_member",
    "register",
    "torchao_lora_layer",
]

# One policy with setup.cfg's `peft` requirement (the same range; README, "Install"): pip keeps a PEFT outside it
# out, and this check covers one that gets in anyway (`--no-deps`, a later upgrade): older refused, newer warned.
PEFT_MIN_VERSION = "0.21.2"
PEFT_MAX_VERSION_EXCLUSIVE = "0.22"
PEFT_TESTED_RANGE = f">={PEFT_MIN_VERSION},<{PEFT_MAX_VERSION_EXCLUSIVE}"


def check_peft_version(version: str | None = None) -> None:
    """Refuses a PEFT older than the tested range and warns about a newer one.

    Args:
        version: The version to check; the installed PEFT's by default.
    """
    version = peft.__version__ if version is None else version
    if Version(version) < Version(PEFT_MIN_VERSION):
        raise ImportError(
            f"bayes_adapter needs peft{PEFT_TESTED_RANGE} (the range it is tested with), found peft=={version}. "
            f'Upgrade with: pip install "peft{PEFT_TESTED_RANGE}"'
        )
    if Version(version) >= Version(PEFT_MAX_VERSION_EXCLUSIVE):
        warnings.warn(
            f"bayes_adapter is tested with peft{PEFT_TESTED_RANGE}, found peft=={version}; it touches PEFT internals "
            "that may have changed. Its requirement admits a newer PEFT only once the test suite has passed on it.",
            UserWarning,
            stacklevel=2,
        )


def peft_type_member(name: str) -> PeftType:
    """Returns the `PeftType` member `name`, adding it to the closed enum the first time."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    setattr(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register(name: str, config_cls: type, model_cls: type, prefix: str) -> PeftType:
    """Registers a PEFT method idempotently; a second call (e.g. after a reload) points PEFT at the new classes.

    Args:
        name: Lower-case method name; its upper-case form becomes the `PeftType` member.
        config_cls: The config class.
        model_cls: The tuner (model) class.
        prefix: The parameter-name prefix of the method's adapter weights.
    """
    peft_type = peft_type_member(name.upper())
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(peft_type, None)
    else:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type


def enabled_lora_variants(config: LoraConfig) -> dict[str, Any]:
    """The LoRA variants (DoRA, aLoRA, MiCA init, ...) a config switches on, as `{field name: value}`."""
    enabled = {}
    for field in dataclasses.fields(LoraConfig):
        value = getattr(config, field.name)
        if field.metadata.get("is_lora_variant") and value:
            enabled[field.name] = value
        elif field.name == "init_lora_weights" and value in field.metadata.get("lora_variants", ()):
            enabled[field.name] = value
    return enabled


def registered_custom_modules(config: LoraConfig) -> dict:
    """The custom LoRA layers registered with the private `config._register_custom_module` (empty if none)."""
    return dict(getattr(config, "_custom_modules", None) or {})


def bnb_lora_layers() -> tuple[type[LoraLayer], type[LoraLayer]]:
    """PEFT's LoRA layers over bitsandbytes' `Linear8bitLt` and `Linear4bit` (imports bitsandbytes)."""
    from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt

    return Linear8bitLt, Linear4bit


def torchao_lora_layer() -> type[LoraLayer]:
    """PEFT's LoRA layer over a `Linear` whose weight is a torchao tensor subclass (imports torchao)."""
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    return TorchaoLoraLinear


def embed(layer: Embedding, indices: torch.Tensor, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """Looks `indices` up in `weight` the way the LoRA embedding layer does (padding, max norm, TP hooks)."""
    return layer._embed(
        indices, weight, input_fn=layer.input_fns.get(adapter_name), output_fn=layer.output_fns.get(adapter_name)
    )


def embed_scale(layer: Embedding) -> torch.Tensor | None:
    """The scale some embeddings (e.g. Gemma's) apply in their forward, which LoRA's output must match."""
    return layer._get_embed_scale()


class PluginLoraModel(LoraModel):
    """`LoraModel` with the private steps a plugin must change turned into public hooks.

    Subclasses implement `check_target`, `create_layer` and `after_mark_trainable`.
    """

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        self.check_target(target, current_key)
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)

    def _create_new_module(self, lora_config, adapter_name, target, **kwargs):
        # PEFT declares this a staticmethod but calls it through `self`, so an instance method can reach the hooks.
        kwargs.pop("parameter_name", None)
        kwargs.pop("device_map", None)
        return self.create_layer(lora_config, adapter_name, target, **kwargs)

    def _mark_only_adapters_as_trainable(self, model: torch.nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self.after_mark_trainable(model)

    def check_target(self, target: torch.nn.Module, module_name: str) -> None:
        """Raises if `target` (the module about to receive an adapter) cannot take one."""

    def create_layer(self, config: LoraConfig, adapter_name: str, target: torch.nn.Module, **kwargs: Any):
        """Returns the LoRA layer wrapping `target` for a new adapter."""
        raise NotImplementedError

    def after_mark_trainable(self, model: torch.nn.Module) -> None:
        """Adjusts `requires_grad` after PEFT marked the adapters trainable."""
