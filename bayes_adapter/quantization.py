"""Quantising a base model's Linear layers in place, for QLoRA-style training on a small memory budget.

Two ways to the same quantised layers: `load_time_quantization_config` builds the diffusers config
(`quantization_config=` of `from_pretrained`) that quantises the chosen Linears while the weights load (peak memory:
the quantised model; diffusers' bitsandbytes quantiser needs a GPU, its torchao one loads on any device), and
`quantize_linears` quantises them in a model already loaded, on any device (CPU included): it swaps the chosen
`nn.Linear` layers for bitsandbytes' `Linear4bit` (NF4 / FP4) or `Linear8bitLt`, or quantises their weights with
torchao's int8 weight-only scheme. A Bayesian (or plain PEFT) LoRA added afterwards dispatches to the quantised
layer classes (`bayes_adapter.bnb`, `bayes_adapter.torchao`). The library (bitsandbytes or torchao) is imported only
when its method is asked for: `pip install -e ".[quant]"` from the repository.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn


if TYPE_CHECKING:
    from diffusers import BitsAndBytesConfig, TorchAoConfig


__all__ = [
    "QUANTISATION_METHODS",
    "load_time_quantization_config",
    "load_time_quantized_layer_names",
    "quantize_linears",
    "quantized_layer_names",
    "linears_to_quantize",
]

QUANTISATION_METHODS = ("bnb_nf4", "bnb_fp4", "bnb_int8", "torchao_int8")


def _bnb_layer(linear: nn.Linear, method: str) -> nn.Module:
    import bitsandbytes as bnb

    device, dtype = linear.weight.device, linear.weight.dtype
    has_bias = linear.bias is not None
    if method == "bnb_int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype, quant_type=method[4:]
        )
        # On CPUs with AVX512-BF16 an eval forward without gradients would repack the weight for a kernel with no
        # backward (and one that rejects small layers): keep the kernel that trains.
        layer.support_avx512bf16_for_cpu = False
    layer.load_state_dict(linear.state_dict())
    # bitsandbytes quantises when the layer is moved to its device.
    return layer.to(device)


def _check_method(method: str) -> None:
    if method not in QUANTISATION_METHODS:
        raise ValueError(f"method must be one of {QUANTISATION_METHODS}, got {method!r}")


def linears_to_quantize(
    model: nn.Module, module_filter: Callable[[str, nn.Linear], bool] | Iterable[str] | None = None
) -> list[str]:
    """The names of the `nn.Linear` layers of `model` that `module_filter` chooses (see `quantize_linears`).

    Raises:
        ValueError: when no Linear matches.
    """
    if module_filter is None or callable(module_filter):
        accept = module_filter or (lambda name, module: True)
    else:
        suffixes = tuple(module_filter)
        accept = lambda name, module: any(name == s or name.endswith("." + s) for s in suffixes)  # noqa: E731
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear and accept(name, module)]
    if not names:
        raise ValueError(f"No torch.nn.Linear layer of {type(model).__name__} matches module_filter={module_filter!r}")
    return names


def quantized_layer_names(model: nn.Module) -> list[str]:
    """The names of the layers of `model` whose weights are quantised: bitsandbytes layers, and Linears with a
    torchao tensor as weight (bitsandbytes and torchao are looked at only if already imported)."""
    import sys

    kinds = []
    if "bitsandbytes" in sys.modules:
        import bitsandbytes as bnb

        kinds += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    is_torchao = lambda weight: False  # noqa: E731
    if "torchao" in sys.modules:
        from torchao.utils import TorchAOBaseTensor

        is_torchao = lambda weight: isinstance(weight, TorchAOBaseTensor)  # noqa: E731
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, tuple(kinds)) or is_torchao(getattr(module, "weight", None))
    ]


def load_time_quantization_config(
    model: nn.Module,
    method: str,
    module_filter: Callable[[str, nn.Linear], bool] | Iterable[str] | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> BitsAndBytesConfig | TorchAoConfig:
    """The diffusers quantisation config that quantises, while `from_pretrained` loads the weights, the Linears that
    `quantize_linears(model, method, module_filter)` would quantise after loading, and only those.

    Args:
        model: The model's layers, e.g. built from its config on the meta device (no weights are read).
        method: One of `QUANTISATION_METHODS`.
        module_filter: Which Linears, as in `quantize_linears`.
        compute_dtype: The compute dtype of bitsandbytes' 4-bit layers (pass the `dtype` of the load).

    Returns:
        A `diffusers.BitsAndBytesConfig` (diffusers loads it on a GPU only) or a `diffusers.TorchAoConfig` with
        torchao's `Int8WeightOnlyConfig` (any device), the other Linears of `model` named as the modules not to
        convert. (A torchao `FqnToConfig` naming the chosen Linears would choose them as well, but a layer cannot
        be quantised again with it, which merging an adapter does.) Check what loaded with `quantized_layer_names`.
    """
    _check_method(method)
    selected = set(linears_to_quantize(model, module_filter))
    # diffusers' quantisers convert every Linear they are not told to leave alone.
    others = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in selected]
    if method == "torchao_int8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=others)
    from diffusers import BitsAndBytesConfig

    if method == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=others)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method[4:],
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=others,
    )


def load_time_quantized_layer_names(model: nn.Module, quantization_config) -> list[str]:
    """The layers of `model` that diffusers' quantiser for `quantization_config` would quantise while
    `from_pretrained` loads the weights, decided as diffusers decides it, on the empty model: nothing is loaded.

    Args:
        model: The model's layers built from its config on the meta device (a diffusers `ModelMixin`; left as it is).
        quantization_config: A diffusers quantisation config, e.g. from `load_time_quantization_config`.

    Returns:
        The names of the layers whose weight diffusers' quantiser would quantise, in `model.named_modules()` order:
        what `quantized_layer_names` gives for the loaded model.
    """
    import copy

    from diffusers.quantizers import DiffusersAutoQuantizer

    # The quantiser changes the model (bitsandbytes swaps its Linears) and extends the config's list of modules not
    # to convert: both are copied.
    model, quantization_config = copy.deepcopy(model), copy.deepcopy(quantization_config)
    quantizer = DiffusersAutoQuantizer.from_config(quantization_config, pre_quantized=False)  # quantised as it loads
    keep_in_fp32 = type(model)._keep_in_fp32_modules if getattr(quantizer, "use_keep_in_fp32_modules", False) else None
    if isinstance(keep_in_fp32, str):
        keep_in_fp32 = [keep_in_fp32]
    quantizer.preprocess_model(model=model, device_map=None, keep_in_fp32_modules=list(keep_in_fp32 or []))
    return [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
        and quantizer.check_if_quantized_param(model, module.weight, f"{name}.weight" if name else "weight", {})
    ]


def quantize_linears(
    model: nn.Module, method: str, module_filter: Callable[[str, nn.Linear], bool] | Iterable[str] | None = None
) -> list[str]:
    """Quantises the weights of `model`'s `nn.Linear` layers in place.

    Args:
        model: Any module (a diffusers transformer or UNet, a text encoder).
        method: One of `QUANTISATION_METHODS`: "bnb_nf4" / "bnb_fp4" (bitsandbytes `Linear4bit`, compute dtype the
            layer's dtype), "bnb_int8" (bitsandbytes `Linear8bitLt`, int8 weights) or "torchao_int8" (torchao's
            `Int8WeightOnlyConfig`).
        module_filter: Which Linears to quantise: a function `(module name, module) -> bool`, or names whose last
            components match (`"to_q"` matches `"...attn.to_q"`, `"to_out.0"` matches `"...attn.to_out.0"`); every
            Linear when None.

    Returns:
        The names of the quantised layers. bitsandbytes methods also set `model.is_loaded_in_4bit` /
        `is_loaded_in_8bit`, the flags PEFT's own LoRA reads to pick its quantised layers.

    Raises:
        ValueError: for an unknown method, or when no Linear matches (before anything is changed).
    """
    _check_method(method)
    names = linears_to_quantize(model, module_filter)
    if method == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        selected = set(names)
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: name in selected)
        return names
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, _bnb_layer(getattr(parent, child_name), method))
    setattr(model, "is_loaded_in_8bit" if method == "bnb_int8" else "is_loaded_in_4bit", True)
    return names
