"""Reading a Bayesian LoRA adapter from a model or a saved folder, and writing it back: the saved adapter's only
reader and writer (as PEFT's `utils/save_and_load.py` is for its adapters).

`load_bayesian_adapter` reads an adapter (a `PeftModel`, a model with an added adapter, or a folder written by
`save_pretrained`) into a `BayesianAdapter`: its config, its tensors on CPU and the pipeline component it belongs to.
`save_bayesian_adapter` writes the whole adapter (means and posterior) atomically in PEFT's layout, the folder
`PeftModel.from_pretrained` restores; `load_bayesian_weights` puts a saved adapter's tensors back into a model. Only
safetensors are read; nothing is unpickled. The plain-LoRA exports of an adapter are in `export.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from ._atomic import atomic_folder
from ._components import COMPONENTS, component_of_base_class, component_of_folder, component_of_model
from .adapter import PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME, BayesianAdapter, check_bayesian_adapter
from .config import PEFT_TYPE_NAME, BayesLoraConfig, saved_parametrisation, saved_posterior_std_max
from .layer import BayesLoraLayer


__all__ = ["load_bayesian_adapter", "load_bayesian_weights", "save_bayesian_adapter", "write_bayesian_adapter"]


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
    adapter = BayesianAdapter(
        config=config_dict,
        state_dict=state_dict,
        component=component,
        adapter_name=adapter_name,
        source=f"{kind} in memory",
    )
    check_bayesian_adapter(adapter)
    return adapter


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
    adapter = BayesianAdapter(
        config=config,
        state_dict=state_dict,
        component=component,
        adapter_name=adapter_name,
        source=str(adapter_dir),
    )
    check_bayesian_adapter(adapter)
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
