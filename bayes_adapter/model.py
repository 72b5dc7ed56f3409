"""`BayesLoraModel`, the PEFT tuner: which Bayesian LoRA layer each targeted module gets (functions over the layers of
a model are in `model_functions.py`)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import _peft_compat
from ._peft_compat import BaseTunerLayer, LoraLayer, PluginLoraModel
from .config import BayesLoraConfig
from .layer import BayesLoraLayer, bayes_layer_class
from .model_functions import bayes_layers, kl_divergence


def quantised_layer_class(base_layer: nn.Module, module_name: str = "") -> type[BayesLoraLayer] | None:
    """The Bayesian LoRA layer for a quantised base layer (bitsandbytes or torchao), None for any other layer.

    bitsandbytes and torchao are imported only if already loaded: a model holding their layers has loaded them.
    """
    if "bitsandbytes" in sys.modules:
        from .bnb import bnb_layer_class

        layer_cls = bnb_layer_class(base_layer)
        if layer_cls is not None:
            return layer_cls
    if "torchao" in sys.modules:
        from .torchao import torchao_layer_class

        return torchao_layer_class(base_layer, module_name)
    return None


class BayesLoraModel(PluginLoraModel):
    """The PEFT tuner for `BayesLoraConfig`: PEFT's `LoraModel`, creating Bayesian LoRA layers.

    Reached through PEFT's own entry points once `bayes_adapter` is imported: `get_peft_model(model, config)`,
    `inject_adapter_in_model`, diffusers' `model.add_adapter(config)`, `PeftModel.from_pretrained`.
    """

    prefix: str = "lora_"

    def check_target(self, target: nn.Module, module_name: str) -> None:
        if isinstance(target, LoraLayer) and not isinstance(target, BayesLoraLayer):
            raise ValueError(
                f"Module {module_name!r} already holds a plain LoRA adapter ({type(target).__name__}); a Bayesian "
                "adapter cannot be added to it. Add the Bayesian adapter first, or use a separate model."
            )

    def create_layer(self, lora_config: BayesLoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any):
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        target_name = kwargs.get("target_name", "")
        quantisation = [key for key, value in kwargs.items() if key.endswith("_quantization_config") and value]
        if quantisation:
            raise ValueError(
                f"Module {target_name!r}: {quantisation[0].removesuffix('_quantization_config')} quantised base "
                "models are not supported by Bayesian LoRA; supported quantisations: bitsandbytes (Linear4bit, "
                "Linear8bitLt) and torchao weight tensors. Or load the base model unquantised."
            )
        layer_cls = quantised_layer_class(base_layer, target_name)
        weight = getattr(base_layer, "weight", None)
        if layer_cls is None and isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point:
            raise ValueError(
                f"Module {target_name!r} has a {weight.dtype} weight (quantised?); Bayesian LoRA needs a floating "
                "point base layer, a bitsandbytes Linear4bit / Linear8bitLt or a torchao-quantised Linear."
            )
        custom = _peft_compat.registered_custom_modules(lora_config)
        if custom:
            raise ValueError(
                f"Custom LoRA layers registered with _register_custom_module ({sorted(t.__name__ for t in custom)}) "
                "are not supported by BayesLoraConfig: a Bayesian layer exists only for the built-in module types. "
                "Register them on a plain LoraConfig, or drop the registration."
            )
        layer_cls = layer_cls or bayes_layer_class(base_layer)
        if layer_cls is None:
            raise ValueError(
                f"Module {target_name!r} is a {type(base_layer).__name__}, which has no Bayesian LoRA layer. "
                "Supported: torch.nn.Linear, Embedding, Conv1d, Conv2d, Conv3d and transformers' Conv1D."
            )
        if isinstance(base_layer, Conv1D):
            if not lora_config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is False but the target module is `Conv1D`; setting it to True.", stacklevel=2
                )
                lora_config.fan_in_fan_out = True
            kwargs["is_target_conv_1d_layer"] = True
        elif isinstance(base_layer, nn.Linear) and lora_config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is True but the target module is `torch.nn.Linear`; setting it to False.")
            lora_config.fan_in_fan_out = False
        # Roles swapped by default (bayesian_factors='A' gives B here, on purpose as on Linear); an explicit 'B' is
        # the likely slip of someone applying Linear's reasoning to an embedding.
        if isinstance(base_layer, nn.Embedding) and lora_config.embedding_bayesian_factors == "B":
            warnings.warn(
                f"Module {target_name!r} is an Embedding, where PEFT initialises lora_A to zero (the reverse of "
                "Linear): with only B Bayesian its weight noise is multiplied by zero until A moves, and the std gets "
                "no gradient at first. Leave embedding_bayesian_factors at None (A, the zero-initialised factor, with "
                "bayesian_factors='B'), or set it to 'A' or 'AB'.",
                stacklevel=2,
            )
        layer = layer_cls(target, adapter_name, config=lora_config, **kwargs)
        # PEFT builds new layers in train mode: after `model.eval()`, a later add_adapter must not sample weights.
        return layer.train(base_layer.training)

    def after_mark_trainable(self, model: nn.Module) -> None:
        for layer in bayes_layers(model):
            layer.freeze_fixed_posterior_std()

    def kl_divergence(self, adapter_names: Iterable[str] | None = None) -> torch.Tensor:
        """See `bayes_adapter.kl_divergence`."""
        return kl_divergence(self.model, adapter_names)
