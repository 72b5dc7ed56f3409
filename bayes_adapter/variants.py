"""PEFT LoRA-variant hooks for Bayesian adapters: PEFT calls them for a Bayesian adapter's forward and merges, so it
keeps handling disabled, merged and mixed-batch adapters itself. The layers they act on are in `layer.py`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _peft_compat
from ._peft_compat import LoraVariant
from .config import BayesLoraConfig


if TYPE_CHECKING:
    from .layer import BayesLoraLayer


class BayesLoraVariant(LoraVariant):
    """The LoRA-variant hook PEFT calls for a Bayesian adapter: sampling forward, merges of the mean."""

    @staticmethod
    def init(module: BayesLoraLayer, adapter_name: str, config: BayesLoraConfig, **kwargs: Any) -> None:
        module.init_posterior(adapter_name, config)

    @staticmethod
    def merge_safe(module: BayesLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: BayesLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter)

    @staticmethod
    def unmerge(module: BayesLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: BayesLoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        return module.bayes_forward(active_adapter, x, result)


class _SampledFactor:
    """Stands in for a LoRA factor's `nn.Linear` with a sampled weight: PEFT's DoRA layer calls the factor on its
    input and reads its `weight`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.weight, self.bias)


class BayesDoraLinearVariant(_peft_compat.DoraLinearVariant):
    """Bayesian DoRA on a Linear layer: the magnitude vector deterministic, the low-rank direction Bayesian.

    While sampling, PEFT's own DoRA computation runs with the sampled factors, so the weight norm is that of the
    sampled weight `W0 + scaling * B_s A_s` (detached, as in DoRA); otherwise (eval, merge, export) it is PEFT's DoRA
    on the means, bit-identical to a plain DoRA adapter with the same A, B and magnitude.
    """

    @staticmethod
    def init(module: BayesLoraLayer, adapter_name: str, config: BayesLoraConfig, **kwargs: Any) -> None:
        _peft_compat.DoraLinearVariant.init(module, adapter_name, config=config, **kwargs)
        module.init_posterior(adapter_name, config)

    @staticmethod
    def forward(
        module: BayesLoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        settings = module.bayes_settings[active_adapter]
        if not (module.training or settings.sample_at_inference):
            return _peft_compat.DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
        factors = {
            factor: _SampledFactor(
                module.sampled_weight(factor, active_adapter, settings), module.factor_bias(factor, active_adapter)
            )
            for factor in "AB"
        }
        dropout = module.lora_dropout[active_adapter]
        # As PEFT's DoRA: the base output is reused unless dropout changes the input it must be recomputed on.
        if isinstance(dropout, nn.Identity) or not module.training:
            base_result = result
        else:
            x, base_result = dropout(x), None
        return result + module.lora_magnitude_vector[active_adapter](
            x,
            lora_A=factors["A"],
            lora_B=factors["B"],
            scaling=module.scaling[active_adapter],
            base_layer=module.get_base_layer(),
            base_result=base_result,
            adapter_name=active_adapter,
        )
