"""Bayesian LoRA over `Linear` layers whose weight is a torchao tensor subclass (e.g. int8 weight-only).

As PEFT's own `TorchaoLoraLinear`: the quantised weight stays frozen, the adapter takes the weight's floating dtype,
and `merge` works only when the model carries the torchao config that quantised it (diffusers' and transformers'
`TorchAoConfig` leave it on `model.hf_quantizer`), since merging dequantises, adds the mean update and quantises
again. A model quantised by hand with `torchao.quantize_` refuses to merge; the exported mean LoRA
(`bayes_adapter.export_lora`) loads into the unquantised model instead.

This module imports torchao; `BayesLoraModel` imports it only for a model whose weights are already torchao tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchao.utils import TorchAOBaseTensor

from . import _peft_compat
from .layer import BayesLoraLayer
from .variants import BayesDoraLinearVariant


_PeftTorchaoLinear = _peft_compat.torchao_lora_layer()


class BayesTorchaoLinear(BayesLoraLayer, _PeftTorchaoLinear):
    """Bayesian LoRA (and DoRA) for a `Linear` whose weight is a torchao tensor (int8 weight-only and the like)."""

    dora_variant = BayesDoraLinearVariant

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if self.get_apply_tensor_subclass is None:
            raise ValueError(
                f"Cannot merge into the torchao-quantised {type(self.get_base_layer().weight).__name__} weight: "
                "merging quantises the merged weight again, which needs the torchao config the model was loaded with "
                "(load it with diffusers' or transformers' TorchAoConfig, not torchao.quantize_). Or export the mean "
                "LoRA with bayes_adapter.export_lora and merge it into the unquantised model."
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)


def is_torchao_weight(weight: Any) -> bool:
    """Whether `weight` is a torchao-quantised tensor (which reports a float dtype, unlike bitsandbytes' weights)."""
    return isinstance(weight, TorchAOBaseTensor)


def torchao_layer_class(base_layer: nn.Module, module_name: str = "") -> type[BayesLoraLayer] | None:
    """`BayesTorchaoLinear` for an `nn.Linear` with a torchao weight, None for a layer without one.

    Raises:
        ValueError: for another module type holding a torchao weight (PEFT has no LoRA layer for it either).
    """
    weight = getattr(base_layer, "weight", None)
    if not (isinstance(weight, torch.Tensor) and is_torchao_weight(weight)):
        return None
    if not isinstance(base_layer, nn.Linear):
        raise ValueError(
            f"Module {module_name!r} is a {type(base_layer).__name__} with a torchao-quantised weight; Bayesian LoRA "
            "supports torchao weights on torch.nn.Linear only. Leave this module unquantised or untargeted."
        )
    return BayesTorchaoLinear
