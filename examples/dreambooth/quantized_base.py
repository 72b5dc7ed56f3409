"""Loading the denoiser, quantised by `--quantize_base {nf4,int8}` when asked.

Where the environment supports it, the denoiser is quantised while its weights load, through diffusers' own
quantisation config (`quantization_config=` of `from_pretrained`: the peak memory of loading is that of the quantised
model); elsewhere it is loaded and then its targeted Linears are swapped for quantised ones. Both paths quantise the
same layers (the denoiser's targeted Linears, chosen by `bayes_adapter.quantization`), so the adapter, its export and
the model card do not depend on the path taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class QuantisationPlan:
    """How the denoiser is loaded and quantised, decided before any weight loads."""

    choice: str | None = field(metadata={"help": "--quantize_base (None: not quantised)."})
    config: Any = field(default=None, metadata={"help": "diffusers' config to load through; None: after loading."})
    expected: list[str] = field(default_factory=list, metadata={"help": "The Linears a load-time config quantises."})
    reason: str = field(default="", metadata={"help": "Why the denoiser is quantised after loading."})


def plan_quantisation(settings: Settings, device_type: str, weight_dtype: torch.dtype) -> QuantisationPlan:
    """Where `--quantize_base` quantises the denoiser, decided on the empty (meta) denoiser before anything loads.

    diffusers matches the modules its config must not convert by name: where the config would quantise other layers
    than the targeted Linears while loading, the denoiser is quantised after loading instead (which quantises exactly
    them); the reason goes into the log line of `load_denoiser`.
    """
    from bayes_adapter.quantization import (
        linears_to_quantize,
        load_time_quantization_config,
        load_time_quantized_layer_names,
    )

    choice, family = settings.quantize_base, settings.family
    if choice is None:
        return QuantisationPlan(None)
    config_name = LOAD_TIME_CONFIGS[choice]
    if quantisation_path(choice, device_type) == AFTER_LOADING:
        return QuantisationPlan(
            choice, reason=f"diffusers' {config_name} loads them on CUDA only, this run is on {device_type}"
        )
    method, targets = QUANTISATION_METHODS[choice], split_targets(family.denoiser_targets(settings))
    path = settings.pretrained_model_name_or_path
    layers = empty_component(path, settings.model_index, family.denoiser, settings.revision)
    config = load_time_quantization_config(layers, method, targets, compute_dtype=weight_dtype)
    expected, planned = linears_to_quantize(layers, targets), load_time_quantized_layer_names(layers, config)
    if planned != expected:
        clash = ", ".join(sorted(set(expected) ^ set(planned))[:3])
        reason = (
            f"diffusers' {config_name} would quantise other layers than the targeted Linears while loading, as it "
            f"matches the layers to leave alone by name (e.g. {clash})"
        )
        return QuantisationPlan(choice, reason=reason)
    return QuantisationPlan(choice, config, expected)


def load_denoiser(
    settings: Settings, device: torch.device, weight_dtype: torch.dtype, plan: QuantisationPlan | None = None
) -> torch.nn.Module:
    """The denoiser, frozen, on `device` in `weight_dtype`; its targeted Linears quantised with `--quantize_base`
    (the path taken is logged once).

    Args:
        plan: `plan_quantisation`'s answer, when asked before (the script asks before it generates class images);
            asked here when None.
    """
    from bayes_adapter.quantization import quantize_linears, quantized_layer_names

    plan = plan or plan_quantisation(settings, device.type, weight_dtype)
    family, path, choice = settings.family, settings.pretrained_model_name_or_path, plan.choice
    load = {"variant": settings.variant, "revision": settings.revision}
    if plan.config is None:
        denoiser = families.load_component(path, settings.model_index, family.denoiser, **load)
        denoiser.requires_grad_(False).to(device, dtype=weight_dtype)
        if choice is None:
            return denoiser
        method = QUANTISATION_METHODS[choice]
        quantised = quantize_linears(denoiser, method, split_targets(family.denoiser_targets(settings)))
        logger.info(
            f"--quantize_base {choice}: {len(quantised)} Linear layers of the {family.denoiser} quantised after "
            f"loading ({method}; {plan.reason})."
        )
        return denoiser
    options = {"quantization_config": plan.config, "dtype": weight_dtype}
    denoiser = families.load_component(path, settings.model_index, family.denoiser, options, **load)
    # diffusers refuses to cast a quantised model to another dtype: it was loaded in weight_dtype.
    denoiser.requires_grad_(False).to(device)
    quantised = quantized_layer_names(denoiser)
    if quantised != plan.expected:  # foreseen on the empty model already: a safety net
        differ = sorted(set(plan.expected) ^ set(quantised))
        raise ArgumentsError(
            f"--quantize_base {choice}: diffusers' {LOAD_TIME_CONFIGS[choice]} quantised other layers of the "
            f"{family.denoiser} than its targeted Linears ({len(quantised)} instead of {len(plan.expected)}; e.g. "
            f"{', '.join(differ[:3])}); choose --{family.target_modules_flag.lstrip('-')} that name other layers."
        )
    logger.info(
        f"--quantize_base {choice}: {len(quantised)} Linear layers of the {family.denoiser} quantised while loading, "
        f"through diffusers' {LOAD_TIME_CONFIGS[choice]} ({QUANTISATION_METHODS[choice]})."
    )
    return denoiser
