"""Loading the denoiser, quantised by `--quantize_base {nf4,int8}` when asked.

Where the environment supports it, the denoiser is quantised while its weights load, through diffusers' own
quantisation config (`quantization_config=` of `from_pretrained`: the peak memory of loading is that of the quantised
model); elsewhere it is loaded and then its targeted Linears are swapped for quantised ones. Both paths quantise the
same layers (the denoiser's targeted Linears, chosen by `bayes_adapter.quantization`), so the adapter, its export and
the model card do not depend on the path taken.
"""

from __future__ import annotations

import torch
from accelerate.logging import get_logger

from . import families
from .arguments import QUANTISATION_METHODS
from .settings import ArgumentsError, Settings
from .targets import empty_component, split_targets


logger = get_logger(__name__)

LOAD_TIME = "load_time"
AFTER_LOADING = "after_loading"
# The diffusers config each --quantize_base choice loads through, as the log names it.
LOAD_TIME_CONFIGS = {"nf4": "BitsAndBytesConfig", "int8": "TorchAoConfig"}


def quantisation_path(choice: str, device_type: str) -> str:
    """Where `--quantize_base choice` quantises the denoiser on a `device_type` device ("cuda", "cpu", ...).

    diffusers' bitsandbytes quantiser refuses to load without a GPU ("No GPU found"), so nf4 loads quantised on CUDA
    and is quantised after loading elsewhere; diffusers' torchao quantiser loads int8 weight-only on any device.

    Returns:
        `LOAD_TIME` (diffusers' quantisation config in `from_pretrained`) or `AFTER_LOADING` (`quantize_linears` on
        the loaded denoiser).
    """
    if choice not in QUANTISATION_METHODS:
        raise ValueError(f"--quantize_base must be one of {sorted(QUANTISATION_METHODS)}, got {choice!r}")
    if choice == "nf4" and device_type != "cuda":
        return AFTER_LOADING
    return LOAD_TIME


def load_denoiser(settings: Settings, device: torch.device, weight_dtype: torch.dtype) -> torch.nn.Module:
    """The denoiser, frozen, on `device` in `weight_dtype`; its targeted Linears quantised with `--quantize_base`
    (the path taken is logged once)."""
    from bayes_adapter.quantization import (
        linears_to_quantize,
        load_time_quantization_config,
        quantize_linears,
        quantized_layer_names,
    )

    family, path = settings.family, settings.pretrained_model_name_or_path
    load = {"variant": settings.variant, "revision": settings.revision}
    choice = settings.quantize_base
    if choice is None or quantisation_path(choice, device.type) == AFTER_LOADING:
        denoiser = families.load_component(path, settings.model_index, family.denoiser, **load)
        denoiser.requires_grad_(False).to(device, dtype=weight_dtype)
        if choice is None:
            return denoiser
        method = QUANTISATION_METHODS[choice]
        quantised = quantize_linears(denoiser, method, split_targets(family.denoiser_targets(settings)))
        logger.info(
            f"--quantize_base {choice}: {len(quantised)} Linear layers of the {family.denoiser} quantised after "
            f"loading ({method}; diffusers' {LOAD_TIME_CONFIGS[choice]} loads them on CUDA only, this run is on "
            f"{device.type})."
        )
        return denoiser
    method, targets = QUANTISATION_METHODS[choice], split_targets(family.denoiser_targets(settings))
    layers = empty_component(path, settings.model_index, family.denoiser, settings.revision)
    config = load_time_quantization_config(layers, method, targets, compute_dtype=weight_dtype)
    options = {"quantization_config": config, "torch_dtype": weight_dtype}
    denoiser = families.load_component(path, settings.model_index, family.denoiser, options, **load)
    # diffusers refuses to cast a quantised model to another dtype: it was loaded in weight_dtype.
    denoiser.requires_grad_(False).to(device)
    expected, quantised = linears_to_quantize(layers, targets), quantized_layer_names(denoiser)
    if quantised != expected:  # diffusers matches the modules not to convert by name: a clash would show here
        differ = sorted(set(expected) ^ set(quantised))
        raise ArgumentsError(
            f"--quantize_base {choice}: diffusers' {LOAD_TIME_CONFIGS[choice]} quantised other layers of the "
            f"{family.denoiser} than its targeted Linears ({len(quantised)} instead of {len(expected)}; e.g. "
            f"{', '.join(differ[:3])}); choose --{family.target_modules_flag.lstrip('-')} that name other layers."
        )
    logger.info(
        f"--quantize_base {choice}: {len(quantised)} Linear layers of the {family.denoiser} quantised while loading, "
        f"through diffusers' {LOAD_TIME_CONFIGS[choice]} ({method})."
    )
    return denoiser
