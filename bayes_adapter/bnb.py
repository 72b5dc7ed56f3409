"""Bayesian LoRA over bitsandbytes' quantised linear layers (`Linear4bit`: NF4 / FP4, and `Linear8bitLt`).

As PEFT's own `peft.tuners.lora.bnb` layers: the quantised base stays frozen, the adapter lives in floating point
(PEFT creates it in the default dtype; the input is cast to it and the output back to the base's compute dtype), and
`merge` dequantises the base, adds the mean update and quantises again (bitsandbytes rounds, so a merged model differs
slightly from the unmerged one). The Bayesian part is the same `BayesLoraVariant` hook as on an `nn.Linear`.

This module imports bitsandbytes; `BayesLoraModel` imports it only for a model that already holds bitsandbytes layers.
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
from torch import nn

from . import _peft_compat
from .layer import BayesLoraLayer
from .variants import BayesDoraLinearVariant


_PeftLinear8bitLt, _PeftLinear4bit = _peft_compat.bnb_lora_layers()


class BayesLinear8bitLt(BayesLoraLayer, _PeftLinear8bitLt):
    """Bayesian LoRA for bitsandbytes' `Linear8bitLt` (LLM.int8() weights). No DoRA: PEFT's own DoRA fails on it
    from the second training step on (bitsandbytes 0.50.2 on CPU: the layer's int8 scales are gone)."""


class BayesLinear4bit(BayesLoraLayer, _PeftLinear4bit):
    """Bayesian LoRA (and DoRA) for bitsandbytes' `Linear4bit` (NF4 or FP4 weights)."""

    dora_variant = BayesDoraLinearVariant

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        # On CPUs with AVX512-BF16 an eval-mode forward without gradients repacks the 4-bit weight for a kernel that
        # has no backward: later training steps would then silently drop the gradient through this layer (or fail on
        # layers whose size the packing does not support). A layer being fine-tuned keeps the differentiable kernel.
        base = self.get_base_layer()
        if hasattr(base, "support_avx512bf16_for_cpu"):
            base.support_avx512bf16_for_cpu = False


def bnb_layer_class(base_layer: nn.Module) -> type[BayesLoraLayer] | None:
    """The Bayesian LoRA layer class for a bitsandbytes layer, or None if `base_layer` is not one.

    Dispatches on the layer type, as PEFT does, but without needing the model's `is_loaded_in_4bit` /
    `is_loaded_in_8bit` flag: a model whose Linears were swapped for bitsandbytes layers by hand gets them too.
    """
    if isinstance(base_layer, bnb.nn.Linear4bit):
        return BayesLinear4bit
    if isinstance(base_layer, bnb.nn.Linear8bitLt):
        return BayesLinear8bitLt
    return None
