"""The Bayesian LoRA adapter as data: read from a model or a saved folder, checked, written back.

`load_bayesian_adapter` reads an adapter (a `PeftModel`, a model with an added adapter, or a folder written by
`save_pretrained`) into a `BayesianAdapter`: its config, its tensors on CPU and the pipeline component it belongs to.
`save_bayesian_adapter` writes the whole adapter (means and posterior) atomically in PEFT's layout, the folder
`PeftModel.from_pretrained` restores. Only safetensors are read; nothing is unpickled. The plain-LoRA exports of an
adapter are in `export.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from ._atomic import atomic_folder
from ._components import COMPONENTS, component_of_base_class, component_of_folder, component_of_model
from ._peft_compat import get_pattern_key
from ._version import __version__
from .bayes import posterior_std, std_summary
from .config import PEFT_TYPE_NAME, BayesLoraConfig, saved_parametrisation, saved_posterior_std_max
from .layer import BayesLoraLayer


__all__ = [
    "BAYESIAN_CONFIG_FIELDS",
    "COMPONENTS",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "BayesianAdapter",
    "load_bayesian_adapter",
    "load_bayesian_weights",
    "save_bayesian_adapter",
    "write_bayesian_adapter",
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


# --- reading ------------------------------------------------------------------------------------------------------


def load_bayesian_adapter(
    source: nn.Module | str | os.PathLike, adapter_name: str = "default", component: str | None = None
) -> BayesianAdapter:
    """Reads a Bayesian LoRA adapter from a model in memory or a folder saved with `save_pretrained`.

    Nothing is written. Every check that `export_lora` makes on its input happens here.

    Args:
        source: A `PeftModel`, a diffusers / transformers model with an added adapter (`add_adapter`), or the path of
            a folder holding `adapter_config.json` (peft_type "BAYES_LORA") and `adapter_model.safetensors` (or a
            folder whose subfolder `adapter_name` holds them, as `save_pretrained` writes non-default adapters).
        adapter_name: The adapter to read.
        component: The pipeline component the adapter belongs to (one of `COMPONENTS`); inferred when None.

    Returns:
        A `BayesianAdapter`.

    Raises:
        ValueError: if the source holds no Bayesian adapter, not one named `adapter_name`, a merged one, or an
            argument is invalid.
        FileNotFoundError: if the folder or its files do not exist.
    """
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if component is not None and component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS} or None (inferred), got {component!r}")
    if isinstance(source, nn.Module):
        return _read_model(source, adapter_name, component)
    if isinstance(source, (str, os.PathLike)):
        return _read_folder(Path(source), adapter_name, component)
    raise ValueError(
        f"source must be a model (PeftModel or a model with an added adapter) or a folder path, got "
        f"{type(source).__name__}"
    )


def _bayesian_adapter_names(peft_config: dict[str, Any]) -> list[str]:
    return sorted(name for name, config in peft_config.items() if config.peft_type == PEFT_TYPE_NAME)


def _read_model(model: nn.Module, adapter_name: str, component: str | None) -> BayesianAdapter:
    peft_config = getattr(model, "peft_config", None)
    kind = type(model).__name__
    if not isinstance(peft_config, dict) or not peft_config:
        raise ValueError(
            f"source: the {kind} has no PEFT adapter (no `peft_config`); expected a PeftModel or a model with a "
            "Bayesian adapter added by `add_adapter` (a merged-and-unloaded model has none left)."
        )
    bayesian = _bayesian_adapter_names(peft_config)
    if not bayesian:
        found = {name: getattr(config.peft_type, "value", config.peft_type) for name, config in peft_config.items()}
        raise ValueError(
            f"source: the {kind} has no Bayesian LoRA adapter (peft_type {PEFT_TYPE_NAME}); found {found}"
        )
    if adapter_name not in bayesian:
        raise ValueError(f"adapter_name={adapter_name!r} is not a Bayesian adapter of the {kind}; it has {bayesian}")
    merged = [
        name
        for name, module in model.named_modules()
        if isinstance(module, BayesLoraLayer) and adapter_name in module.merged_adapters
    ]
    if merged:
        raise ValueError(
            f"adapter {adapter_name!r} is merged into the base weights of {len(merged)} module(s) (e.g. {merged[0]!r}); "
            "its mean cannot be read back exactly. Call `unmerge_adapter()` (or `unfuse_lora()`) before exporting."
        )
    config: BayesLoraConfig = peft_config[adapter_name]
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    # save_embedding_layers=False: "auto" may query the Hub for the base model's config.
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    state_dict = {_strip_prefix(k): v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    config_dict = config.to_dict()
    # PEFT records the base class only for some PeftModels; record it always, so that a saved folder can be checked
    # against the component it is exported as (an add_adapter model's save included).
    if not config_dict.get("auto_mapping"):
        config_dict["auto_mapping"] = {
            "base_model_class": type(base).__name__,
            "parent_library": type(base).__module__,
        }
    _check_component(component, config_dict, f"the {kind} in memory")
    if component is None:
        component = component_of_model(base)
    return _checked(
        BayesianAdapter(
            config=config_dict,
            state_dict=state_dict,
            component=component,
            adapter_name=adapter_name,
            source=f"{kind} in memory",
        )
    )


def _check_component(component: str | None, config: dict[str, Any], where: str) -> None:
    recorded = component_of_base_class(config)
    if component is not None and recorded is not None and component != recorded:
        if not (recorded == "text_encoder" and component == "text_encoder_2"):  # both are CLIPTextModel* classes
            raise ValueError(
                f"component={component!r} contradicts {where}: its base_model_class "
                f"{config['auto_mapping']['base_model_class']!r} is a {recorded!r}"
            )


def _strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def _read_folder(folder: Path, adapter_name: str, component: str | None) -> BayesianAdapter:
    if not folder.is_dir():
        raise FileNotFoundError(f"source={str(folder)!r} is not a folder (expected a saved Bayesian adapter)")
    # save_pretrained writes the "default" adapter at the root and any other one to a subfolder named after it.
    if (folder / adapter_name / PEFT_CONFIG_NAME).is_file():
        adapter_dir = folder / adapter_name
    elif adapter_name == "default" and (folder / PEFT_CONFIG_NAME).is_file():
        adapter_dir = folder
    else:
        found = sorted(p.parent.name for p in folder.glob(f"*/{PEFT_CONFIG_NAME}"))
        if (folder / PEFT_CONFIG_NAME).is_file():
            found = ["default", *found]
        raise (ValueError if found else FileNotFoundError)(
            f"adapter_name={adapter_name!r}: source={str(folder)!r} holds no adapter of that name (save_pretrained "
            f"writes 'default' at the root, others to a subfolder named after them, each with {PEFT_CONFIG_NAME}); "
            f"adapters found: {found}"
        )
    try:
        config = json.loads((adapter_dir / PEFT_CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"source={str(adapter_dir)!r}: {PEFT_CONFIG_NAME} is not valid JSON ({error})") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != PEFT_TYPE_NAME:
        raise ValueError(
            f"source={str(adapter_dir)!r} is not a Bayesian LoRA adapter: its {PEFT_CONFIG_NAME} has peft_type "
            f"{peft_type!r}, expected {PEFT_TYPE_NAME!r}"
        )
    weights = adapter_dir / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"source={str(adapter_dir)!r} has no {PEFT_WEIGHTS_NAME}; only safetensors weights are read (never pickles)"
        )
    missing = [key for key in ("r", "lora_alpha") if key not in config]
    if missing:
        raise ValueError(f"source={str(adapter_dir)!r}: {PEFT_CONFIG_NAME} lacks {missing}")
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as error:  # safetensors raises its own error type for a corrupt file
        raise ValueError(f"source={str(weights)!r} is not a readable safetensors file ({error})") from None
    state_dict = {_strip_prefix(k): v for k, v in tensors.items()}
    _check_component(component, config, f"the adapter in {str(adapter_dir)!r} ({PEFT_CONFIG_NAME})")
    if component is None:
        component = component_of_folder(config, state_dict, adapter_dir)
    return _checked(
        BayesianAdapter(
            config=config,
            state_dict=state_dict,
            component=component,
            adapter_name=adapter_name,
            source=str(adapter_dir),
        )
    )


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


def _checked(adapter: BayesianAdapter) -> BayesianAdapter:
    """Refuses what a plain mean LoRA cannot carry, and an invalid config, before anything is written."""
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
    return adapter


# --- writing ------------------------------------------------------------------------------------------------------


def write_bayesian_adapter(adapter: BayesianAdapter, folder: Path) -> None:
    """Writes the whole Bayesian adapter (means and posterior) in PEFT's layout into the existing `folder`.

    `PeftModel.from_pretrained(base, folder)` (with bayes_adapter imported) restores it; not atomic (see
    `atomic_folder`).
    """
    config = {k: v for k, v in adapter.config.items() if k != "runtime_config"}
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config["inference_mode"] = True
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in adapter.state_dict.items()}
    save_file(tensors, str(folder / PEFT_WEIGHTS_NAME), {"format": "pt"})


def save_bayesian_adapter(
    source: nn.Module | str | os.PathLike | BayesianAdapter,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    *,
    component: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes the whole Bayesian adapter (means and posterior) to `out_dir`, atomically, in PEFT's layout.

    Args:
        source: What `load_bayesian_adapter` reads, or a `BayesianAdapter` already read.
        out_dir: The folder to write; it must not exist unless `overwrite=True`.
        adapter_name: Which adapter to save (ignored for a `BayesianAdapter`).
        component: The pipeline component (inferred when None; ignored for a `BayesianAdapter`).
        overwrite: Replace `out_dir` if it exists (only once the new folder is complete).

    Returns:
        The path of the written folder, which `PeftModel.from_pretrained(base, out_dir)` restores.
    """
    adapter = source if isinstance(source, BayesianAdapter) else load_bayesian_adapter(source, adapter_name, component)
    with atomic_folder(out_dir, overwrite) as tmp:
        write_bayesian_adapter(adapter, tmp)
    return Path(out_dir)


def load_bayesian_weights(
    model: nn.Module,
    source: str | os.PathLike,
    adapter_name: str = "default",
    *,
    component: str | None = None,
) -> None:
    """Loads a saved Bayesian adapter's tensors (means and posterior) into `model`, which already holds it.

    What `save_bayesian_adapter` (or `save_pretrained`) wrote goes back into a model to which the same adapter was
    added, e.g. when resuming training from a checkpoint. Every tensor must match in name and shape.

    Args:
        model: A `PeftModel` or a model with an added Bayesian adapter named `adapter_name`.
        source: The saved folder.
        adapter_name: The adapter to fill.
        component: The pipeline component (only needed where the folder does not tell it, e.g. a text encoder).

    Raises:
        ValueError: if the model has no such Bayesian adapter, or the saved tensors do not match it (names, shapes),
            all before anything is changed.
    """
    current = _read_model(model, adapter_name, component or "unet")  # component only labels the data here
    saved = load_bayesian_adapter(source, adapter_name, component)
    missing = sorted(current.state_dict.keys() - saved.state_dict.keys())
    unexpected = sorted(saved.state_dict.keys() - current.state_dict.keys())
    if missing or unexpected:
        raise ValueError(
            f"source={saved.source!r} does not match adapter {adapter_name!r} of the {type(model).__name__}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]} ({len(missing)} and {len(unexpected)} in all)"
        )
    # The saved rho means a std only under its own parametrisation, initial std and bound.
    for field, mine, theirs in (
        ("posterior_std_parametrisation", saved_parametrisation(current.config), saved_parametrisation(saved.config)),
        ("posterior_std_init", current.config.get("posterior_std_init"), saved.config.get("posterior_std_init")),
        ("posterior_std_max", saved_posterior_std_max(current.config), saved_posterior_std_max(saved.config)),
    ):
        if mine != theirs:
            raise ValueError(
                f"source={saved.source!r} was saved with {field}={theirs!r}, but adapter {adapter_name!r} of the "
                f"model has {mine!r}; add the adapter with the saved config (PeftModel.from_pretrained reads it)"
            )
    for key, tensor in saved.state_dict.items():
        if tensor.shape != current.state_dict[key].shape:
            raise ValueError(
                f"source={saved.source!r}: {key} has shape {tuple(tensor.shape)}, adapter {adapter_name!r} of the "
                f"model has {tuple(current.state_dict[key].shape)} (saved with another rank or targets?)"
            )
    prefix = PEFT_PREFIX if isinstance(model, PeftModel) else ""
    state = {prefix + key: tensor for key, tensor in saved.state_dict.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"PEFT did not place {result.unexpected_keys[:3]} from {saved.source!r}")
