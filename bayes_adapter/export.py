"""Export: collapse a Bayesian LoRA adapter to its mean, a plain LoRA that loads without bayes-adapter.

In eval mode a Bayesian adapter *is* its mean (`lora_A`, `lora_B`), so dropping the posterior standard deviations
gives a plain LoRA with exactly the same outputs and plain LoRA's inference cost. `export_lora` writes it in the
formats the ecosystem loads:

- ``"peft"``: `adapter_config.json` (``peft_type: LORA``) + `adapter_model.safetensors`, for
  `PeftModel.from_pretrained(base_model, out_dir)`.
- ``"diffusers"``: `pytorch_lora_weights.safetensors` written by diffusers' own `save_lora_weights`, keys prefixed
  ``unet.``, ``transformer.``, ``text_encoder.`` or ``text_encoder_2.``, with a minimal `lora_adapter_metadata` (rank,
  alpha, their patterns, the target modules), for `pipe.load_lora_weights(out_dir)`.
- ``"kohya"``: `lora_kohya.safetensors`, the ``lora_unet_*`` / ``lora_te_*`` layout with ``lora_down`` / ``lora_up`` /
  ``alpha`` keys that ComfyUI and A1111 load (UNet and CLIP text encoders only).

Every export also writes `bayes_lora_export.json`: what was exported (component, adapter name, the Bayesian settings and
posterior-std statistics), for model cards. The output folder is written atomically: a temporary sibling folder,
renamed into place once complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ._peft_compat import get_pattern_key
from .bayes import posterior_std, std_summary
from .config import PEFT_TYPE_NAME, BayesLoraConfig, saved_parametrisation
from .layer import BayesLoraLayer


logger = logging.getLogger(__name__)

__all__ = [
    "BAYESIAN_CONFIG_FIELDS",
    "COMPONENTS",
    "DEFAULT_FORMATS",
    "DIFFUSERS_WEIGHTS_NAME",
    "EXPORT_SUMMARY_NAME",
    "FORMATS",
    "KOHYA_WEIGHTS_NAME",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "BayesianAdapter",
    "export_lora",
    "load_bayesian_adapter",
]

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
FORMATS = ("peft", "diffusers", "kohya")
DEFAULT_FORMATS = ("peft", "diffusers")
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "lora_kohya.safetensors"
EXPORT_SUMMARY_NAME = "bayes_lora_export.json"

_LORA_FIELDS = {f.name for f in dataclasses.fields(LoraConfig)}
# The fields BayesLoraConfig adds to LoraConfig: exactly what an export drops from the config.
BAYESIAN_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(BayesLoraConfig) if f.name not in _LORA_FIELDS)
_PEFT_PREFIX = "base_model.model."
_POSTERIOR_MARKER = ".lora_posterior_rho_"
_MEAN_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B")
_CLIP_TEXT_ROOTS = {"embeddings", "encoder", "final_layer_norm"}
_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
# Top-level module names that tell a saved adapter's component when its config does not say.
_UNET_ROOTS = {"down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding"}
_TRANSFORMER_ROOTS = {
    "transformer_blocks",
    "single_transformer_blocks",
    "pos_embed",
    "context_embedder",
    "time_text_embed",
    "x_embedder",
    "norm_out",
    "proj_out",
}


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
        """Mean, min, max posterior std over the Bayesian weights and their count (as `posterior_std_stats`)."""
        parametrisation = saved_parametrisation(self.config)
        std_init = float(self.config.get("posterior_std_init", BayesLoraConfig.posterior_std_init))
        return std_summary(
            posterior_std(rho, parametrisation, std_init)
            for key, rho in self.state_dict.items()
            if _POSTERIOR_MARKER in key
        )

    def bayesian_settings(self) -> dict[str, Any]:
        """The Bayesian fields of the config (factors, estimator, prior std, KL weight, ...)."""
        settings = {name: self.config.get(name) for name in BAYESIAN_CONFIG_FIELDS}
        return {**settings, "posterior_std_parametrisation": saved_parametrisation(self.config)}

    def summary(self) -> dict[str, Any]:
        """What `bayes_lora_export.json` records about the export."""
        from . import __version__

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


# --- reading a Bayesian adapter -----------------------------------------------------------------------------------


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
    if component is None:
        component = _component_of_model(base)
    return _checked(
        BayesianAdapter(
            config=config.to_dict(),
            state_dict=state_dict,
            component=component,
            adapter_name=adapter_name,
            source=f"{kind} in memory",
        )
    )


def _strip_prefix(key: str) -> str:
    return key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key


def _component_of_model(base: nn.Module) -> str:
    name = type(base).__name__
    module = type(base).__module__
    if module.startswith("diffusers"):
        return "unet" if "UNet" in name else "transformer"
    if module.startswith("transformers") and name == "CLIPTextModel":
        # SDXL's second encoder (CLIPTextModelWithProjection), T5 and others are ambiguous: the caller must say.
        return "text_encoder"
    raise ValueError(
        f"component: cannot tell which pipeline component a {name} is; pass component= one of {COMPONENTS}"
    )


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
    if component is None:
        component = _component_of_folder(config, state_dict, adapter_dir)
    return _checked(
        BayesianAdapter(
            config=config,
            state_dict=state_dict,
            component=component,
            adapter_name=adapter_name,
            source=str(adapter_dir),
        )
    )


def _component_of_folder(config: dict[str, Any], state_dict: dict[str, torch.Tensor], folder: Path) -> str:
    base_class = (config.get("auto_mapping") or {}).get("base_model_class") or ""
    if "UNet" in base_class:
        return "unet"
    if "Transformer" in base_class:
        return "transformer"
    if base_class == "CLIPTextModel":
        return "text_encoder"
    roots = {key.split(".", 1)[0] for key in state_dict}
    if not base_class and roots and roots <= _UNET_ROOTS:
        return "unet"
    if not base_class and roots and roots <= _TRANSFORMER_ROOTS:
        return "transformer"
    raise ValueError(
        f"component: cannot tell which pipeline component the adapter in {str(folder)!r} belongs to (top-level "
        f"modules {sorted(roots)}); pass component= one of {COMPONENTS}"
    )


def _checked(adapter: BayesianAdapter) -> BayesianAdapter:
    """Refuses what a plain mean LoRA cannot carry, before anything is written."""
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
    return adapter


# --- writing ------------------------------------------------------------------------------------------------------


def _check_formats(format: str | Sequence[str]) -> tuple[str, ...]:
    formats = (format,) if isinstance(format, str) else tuple(format)
    bad = [f for f in formats if f not in FORMATS]
    if not formats or bad:
        raise ValueError(f"format must be one of {FORMATS} or a list of them, got {format!r}")
    return tuple(dict.fromkeys(formats))


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder next to `out_dir`, renamed to `out_dir` when the block succeeds.

    If the block raises, the temporary folder is deleted and `out_dir` is left as it was. An existing `out_dir` is
    replaced only with `overwrite=True`, and only once the new folder is complete.

    Args:
        out_dir: The folder to create.
        overwrite: Replace `out_dir` if it exists.

    Raises:
        FileExistsError: if `out_dir` exists and `overwrite` is False.
    """
    out = Path(out_dir)
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Raises unless `out` can be written: absent, or an existing folder with `overwrite=True`."""
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"out_dir={str(out)!r} exists and is not a folder")
        if not overwrite:
            raise FileExistsError(f"out_dir={str(out)!r} already exists; pass overwrite=True to replace it")


def export_lora(
    source: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    *,
    component: str | None = None,
    format: str | Sequence[str] = DEFAULT_FORMATS,
    overwrite: bool = False,
) -> Path:
    """Exports the mean of a Bayesian LoRA adapter as a plain LoRA that loads without bayes-adapter.

    The export drops the posterior standard deviations and keeps `lora_A` / `lora_B`, so the exported LoRA gives
    exactly the outputs of the Bayesian adapter in eval mode, at plain LoRA's cost.

    Args:
        source: A `PeftModel`, a diffusers / transformers model with an added Bayesian adapter, or a folder saved by
            `save_pretrained` holding one.
        out_dir: The folder to write; it must not exist unless `overwrite=True`. Written atomically.
        adapter_name: Which adapter to export.
        component: The pipeline component the adapter belongs to, which sets the diffusers key prefix: "unet",
            "transformer", "text_encoder" or "text_encoder_2". Inferred from the model class (or the saved config and
            module names) when None.
        format: One of "peft", "diffusers", "kohya", or a list of them. By default both "peft" (`adapter_config.json`
            + `adapter_model.safetensors`) and "diffusers" (`pytorch_lora_weights.safetensors`).
        overwrite: Replace `out_dir` if it exists.

    Returns:
        The path of the written folder.

    Raises:
        ValueError: for a source without a Bayesian adapter, an unknown adapter name, a merged adapter, an unknown
            format or component; FileExistsError for an existing `out_dir`. All before anything is written.
    """
    formats = _check_formats(format)
    out = Path(out_dir)
    check_output_folder(out, overwrite)
    adapter = load_bayesian_adapter(source, adapter_name, component)
    if isinstance(source, (str, os.PathLike)) and out.resolve() in (
        Path(source).resolve(),
        Path(adapter.source).resolve(),
    ):
        raise ValueError(f"out_dir={str(out)!r} is the source folder; export to another folder")
    if "kohya" in formats:
        _check_kohya(adapter)
    with atomic_folder(out, overwrite) as tmp:
        write_export(adapter, tmp, formats)
    logger.info("Exported the mean of adapter %r (%s) to %s", adapter.adapter_name, adapter.source, out)
    return out


def write_bayesian_adapter(adapter: BayesianAdapter, folder: Path) -> None:
    """Writes the whole Bayesian adapter (means and posterior) in PEFT's layout into the existing `folder`.

    `PeftModel.from_pretrained(base, folder)` (with bayes_adapter imported) restores it; not atomic (see
    `atomic_folder`).
    """
    config = {k: v for k, v in adapter.config.items() if k != "runtime_config"}
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config["inference_mode"] = True
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {_PEFT_PREFIX + k: v.contiguous() for k, v in adapter.state_dict.items()}
    save_file(tensors, str(folder / PEFT_WEIGHTS_NAME), {"format": "pt"})


def write_export(adapter: BayesianAdapter, folder: Path, formats: Sequence[str] = DEFAULT_FORMATS) -> None:
    """Writes the mean LoRA of `adapter` into the existing folder `folder` (not atomic; see `export_lora`)."""
    means = adapter.mean_state_dict()
    if "peft" in formats:
        adapter.lora_config().save_pretrained(str(folder))
        save_file({_PEFT_PREFIX + k: v for k, v in means.items()}, str(folder / PEFT_WEIGHTS_NAME), {"format": "pt"})
    if "diffusers" in formats:
        _save_diffusers(adapter, means, folder)
    if "kohya" in formats:
        save_file(_kohya_state_dict(adapter, means), str(folder / KOHYA_WEIGHTS_NAME), {"format": "pt"})
    (folder / EXPORT_SUMMARY_NAME).write_text(json.dumps(adapter.summary(), indent=2, sort_keys=True) + "\n")


def diffusers_metadata(adapter: BayesianAdapter) -> dict[str, Any]:
    """The minimal `lora_adapter_metadata` diffusers turns into `LoraConfig(**metadata)` when loading.

    Only keys every PEFT version that diffusers supports accepts: rank and alpha with their patterns and the exact
    target modules; `use_rslora` / `lora_bias` only when set.
    """
    config = adapter.config
    metadata: dict[str, Any] = {
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "rank_pattern": dict(config.get("rank_pattern") or {}),
        "alpha_pattern": dict(config.get("alpha_pattern") or {}),
        "target_modules": adapter.target_module_names(),
    }
    if config.get("use_rslora"):
        metadata["use_rslora"] = True
    if config.get("lora_bias"):
        metadata["lora_bias"] = True
    return metadata


def _save_diffusers(adapter: BayesianAdapter, means: dict[str, torch.Tensor], folder: Path) -> None:
    from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    metadata = diffusers_metadata(adapter)
    if adapter.component == "unet":
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            str(folder), unet_lora_layers=means, unet_lora_adapter_metadata=metadata
        )
    elif adapter.component == "text_encoder":
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            str(folder), text_encoder_lora_layers=means, text_encoder_lora_adapter_metadata=metadata
        )
    elif adapter.component == "text_encoder_2":
        StableDiffusionXLLoraLoaderMixin.save_lora_weights(
            str(folder), text_encoder_2_lora_layers=means, text_encoder_2_lora_adapter_metadata=metadata
        )
    else:
        SD3LoraLoaderMixin.save_lora_weights(
            str(folder), transformer_lora_layers=means, transformer_lora_adapter_metadata=metadata
        )
    if not (folder / DIFFUSERS_WEIGHTS_NAME).is_file():
        raise RuntimeError(f"diffusers' save_lora_weights did not write {DIFFUSERS_WEIGHTS_NAME} in {folder}")


def _check_kohya(adapter: BayesianAdapter) -> None:
    """Refuses, before anything is written, what the kohya layout cannot carry."""
    if adapter.component not in _KOHYA_PREFIXES:
        raise ValueError(
            f"format='kohya' supports the components {tuple(_KOHYA_PREFIXES)}, not {adapter.component!r}: DiT kohya "
            "layouts are specific to each model; use the 'diffusers' format"
        )
    means = adapter.mean_state_dict()
    for module in adapter.target_module_names():
        if f"{module}.lora_A.weight" not in means:
            raise ValueError(f"format='kohya' supports Linear and Conv layers only; {module!r} is not one")
        if f"{module}.lora_B.bias" in means:
            raise ValueError("format='kohya' cannot carry a LoRA bias (lora_bias=True)")


def _kohya_state_dict(adapter: BayesianAdapter, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = _KOHYA_PREFIXES[adapter.component]
    modules = adapter.target_module_names()
    alphas = {}
    for module in modules:
        rank = means[f"{module}.lora_A.weight"].shape[0]
        _, scaling = adapter.module_rank_and_scaling(module)
        # kohya's scale is alpha / rank: the alpha that reproduces PEFT's scaling (also with rsLoRA).
        alphas[module] = scaling * rank
    # diffusers' kohya loader drops per-module alphas that differ from the most common one (its alpha_pattern keys
    # never match a module), so a non-uniform alpha is folded into lora_up instead: the same delta for every loader,
    # exact where the alpha is the common one, within fp32 rounding elsewhere.
    common = Counter(alphas.values()).most_common(1)[0][0]
    out = {}
    for module in modules:
        name = prefix + _kohya_module_path(adapter.component, module).replace(".", "_")
        up = means[f"{module}.lora_B.weight"]
        if alphas[module] != common:
            up = (up.double() * (alphas[module] / common)).to(up.dtype)
        out[f"{name}.lora_down.weight"] = means[f"{module}.lora_A.weight"]
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(common, dtype=torch.float32)
    return out


def _kohya_module_path(component: str, module: str) -> str:
    # kohya, A1111 and ComfyUI name CLIP text-encoder modules from `text_model.`, which transformers 5 no longer has.
    if component.startswith("text_encoder") and module.split(".", 1)[0] in _CLIP_TEXT_ROOTS:
        return "text_model." + module
    return module


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (without reading its tensors)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})
