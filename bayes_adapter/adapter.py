"""The Bayesian LoRA adapter as data: its config, its tensors and the component it belongs to, and their checks.

A `BayesianAdapter` is what `save_and_load.load_bayesian_adapter` reads from a model or a saved folder and what
`save_and_load.save_bayesian_adapter` and the plain-LoRA exports (`export.py`) write. `check_bayesian_adapter` refuses,
before anything is written, what a saved adapter or a plain mean LoRA cannot carry.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
from peft import LoraConfig

from ._components import COMPONENTS
from ._peft_compat import get_pattern_key
from ._version import __version__
from .bayes import posterior_std, std_summary
from .config import BayesLoraConfig, saved_parametrisation, saved_posterior_std_max


__all__ = [
    "BAYESIAN_CONFIG_FIELDS",
    "COMPONENTS",
    "PEFT_CONFIG_NAME",
    "PEFT_PREFIX",
    "PEFT_WEIGHTS_NAME",
    "BayesianAdapter",
    "check_bayesian_adapter",
]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"

_LORA_FIELDS = {f.name for f in dataclasses.fields(LoraConfig)}
# The fields BayesLoraConfig adds to LoraConfig: exactly what an export drops from the config.
BAYESIAN_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(BayesLoraConfig) if f.name not in _LORA_FIELDS)
PEFT_PREFIX = "base_model.model."
_POSTERIOR_MARKER = ".lora_posterior_rho_"
_MEAN_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_B.bias",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_magnitude_vector",  # DoRA's magnitude (deterministic), as PEFT saves it
)


@dataclasses.dataclass
class BayesianAdapter:
    """A Bayesian LoRA adapter read from a model or a folder, independent of where it came from.

    Attributes:
        config: The adapter's `BayesLoraConfig` as a dict (`to_dict()` form, `peft_type` "BAYES_LORA").
        state_dict: The adapter's tensors on CPU, keyed by module path (no `base_model.model.` prefix, no adapter
            name), posterior parameters (`lora_posterior_rho_*`) included.
        component: Which pipeline component the adapter belongs to: one of `COMPONENTS`.
        adapter_name: The adapter's name in its model (or the name it was asked by, for a folder).
        source: A short description of where it came from, for messages.
    """

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    component: str
    adapter_name: str
    source: str

    def mean_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain-LoRA tensors (module-path keys): every tensor but the posterior parameters."""
        return {k: v for k, v in self.state_dict.items() if _POSTERIOR_MARKER not in k}

    def lora_config(self) -> LoraConfig:
        """The plain `LoraConfig` of the mean: the Bayesian config without its Bayesian fields."""
        kwargs = {k: v for k, v in self.config.items() if k in _LORA_FIELDS and k not in ("peft_type", "peft_version")}
        kwargs["inference_mode"] = True
        return LoraConfig(**kwargs)

    def target_module_names(self) -> list[str]:
        """The full paths of the modules that carry the adapter, sorted."""
        names = set()
        for key in self.mean_state_dict():
            for suffix in _MEAN_SUFFIXES:
                if key.endswith(suffix):
                    names.add(key[: -len(suffix)])
        return sorted(names)

    def module_rank_and_scaling(self, module_name: str) -> tuple[int, float]:
        """The rank and the LoRA scaling (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA) of one adapted module."""
        config = self.config
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        rank_key = get_pattern_key(list(rank_pattern), module_name)
        alpha_key = get_pattern_key(list(alpha_pattern), module_name)
        rank = int(rank_pattern.get(rank_key, config["r"]))
        alpha = float(alpha_pattern.get(alpha_key, config["lora_alpha"]))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        return rank, scaling

    def posterior_std_stats(self) -> dict[str, float]:
        """Mean, min, max posterior std over the Bayesian weights, their count and the fraction near the bound (as
        `posterior_std_stats`)."""
        parametrisation = saved_parametrisation(self.config)
        std_init = float(self.config.get("posterior_std_init", BayesLoraConfig.posterior_std_init))
        std_max = saved_posterior_std_max(self.config)
        rhos = [rho for key, rho in self.state_dict.items() if _POSTERIOR_MARKER in key]
        return std_summary(
            (posterior_std(rho, parametrisation, std_init, std_max) for rho in rhos), [std_max] * len(rhos)
        )

    def bayesian_settings(self) -> dict[str, Any]:
        """The Bayesian fields of the config (factors, estimator, prior std, KL weight, std bound, ...)."""
        settings = {name: self.config.get(name) for name in BAYESIAN_CONFIG_FIELDS}
        return {
            **settings,
            "posterior_std_parametrisation": saved_parametrisation(self.config),
            "posterior_std_max": saved_posterior_std_max(self.config),
        }

    def summary(self) -> dict[str, Any]:
        """What `bayes_lora_export.json` records about the export."""
        return {
            "exported_by": f"bayes-adapter {__version__}",
            "adapter_name": self.adapter_name,
            "component": self.component,
            "r": self.config["r"],
            "lora_alpha": self.config["lora_alpha"],
            "target_modules": self.target_module_names(),
            "bayesian": self.bayesian_settings(),
            "posterior_std": self.posterior_std_stats(),
        }


# --- checking -----------------------------------------------------------------------------------------------------


def _check_config(adapter: BayesianAdapter) -> None:
    """Refuses a config `BayesLoraConfig` itself would refuse (e.g. a hand-edited `bayesian_factors='C'`)."""
    config = adapter.config
    fields = {field.name for field in dataclasses.fields(BayesLoraConfig) if field.init} - {"peft_type"}
    kwargs = {name: value for name, value in config.items() if name in fields}
    # As saved: a config written before a field existed means what that version did.
    kwargs["posterior_std_parametrisation"] = saved_parametrisation(config)
    kwargs["posterior_std_max"] = saved_posterior_std_max(config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LoraConfig's advice is for training, not for a saved adapter
            BayesLoraConfig(**kwargs)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{adapter.source}: {PEFT_CONFIG_NAME} is invalid ({error}); fix the file, or save the adapter again with "
            "save_pretrained. Nothing was written."
        ) from None


def check_bayesian_adapter(adapter: BayesianAdapter) -> None:
    """Refuses what a plain mean LoRA cannot carry, and an invalid config, before anything is written.

    Raises:
        ValueError: naming the adapter (or its source), the offending field or tensor and what was expected.
    """
    _check_config(adapter)
    config = adapter.config
    if config.get("modules_to_save"):
        raise ValueError(
            f"adapter {adapter.adapter_name!r} has modules_to_save={config['modules_to_save']!r}: fully trained "
            "modules are not part of a LoRA and cannot be exported to diffusers' LoRA format"
        )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"adapter {adapter.adapter_name!r} has bias={config['bias']!r}: trained base-layer biases cannot be "
            "exported as a LoRA; only bias='none' is supported"
        )
    unknown = [k for k in adapter.mean_state_dict() if not k.endswith(_MEAN_SUFFIXES)]
    if unknown:
        raise ValueError(f"adapter {adapter.adapter_name!r} holds tensors that are not LoRA factors: {unknown[:5]}")
    if not adapter.target_module_names():
        raise ValueError(f"adapter {adapter.adapter_name!r} from {adapter.source} holds no LoRA weights")
    for field, kind in (("r", int), ("lora_alpha", (int, float))):
        if isinstance(config.get(field), bool) or not isinstance(config.get(field), kind) or config[field] <= 0:
            raise ValueError(f"{adapter.source}: {PEFT_CONFIG_NAME} has {field}={config.get(field)!r}; expected > 0")
    means = adapter.mean_state_dict()
    for module in adapter.target_module_names():
        rank, _ = adapter.module_rank_and_scaling(module)
        for suffix, axis in (
            (".lora_A.weight", 0),
            (".lora_B.weight", 1),
            (".lora_embedding_A", 0),
            (".lora_embedding_B", 1),
        ):
            tensor = means.get(module + suffix)
            if tensor is not None and tensor.shape[axis] != rank:
                raise ValueError(
                    f"{adapter.source}: {module}{suffix} has rank {tensor.shape[axis]} (shape {tuple(tensor.shape)}), "
                    f"but the config (r, rank_pattern) gives {module!r} rank {rank}"
                )
