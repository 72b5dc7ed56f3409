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
posterior-std statistics), for model cards. The output folder is written atomically (`_atomic.atomic_folder`). Reading
the Bayesian adapter, and saving it whole, is `save_and_load.py`'s job.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ._atomic import atomic_folder, check_not_overlapping, check_output_folder
from .adapter import PEFT_PREFIX, PEFT_WEIGHTS_NAME, BayesianAdapter
from .save_and_load import load_bayesian_adapter


logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FORMATS",
    "DIFFUSERS_WEIGHTS_NAME",
    "EXPORT_SUMMARY_NAME",
    "FORMATS",
    "KOHYA_WEIGHTS_NAME",
    "add_stage_to_summary",
    "read_stage_verdict",
    "diffusers_metadata",
    "export_components",
    "export_lora",
    "read_components",
    "write_export",
]

FORMATS = ("peft", "diffusers", "kohya")
DEFAULT_FORMATS = ("peft", "diffusers")
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "lora_kohya.safetensors"
EXPORT_SUMMARY_NAME = "bayes_lora_export.json"

_CLIP_TEXT_ROOTS = {"embeddings", "encoder", "final_layer_norm"}
_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def _check_formats(format: str | Sequence[str]) -> tuple[str, ...]:
    if not isinstance(format, (str, Sequence)):
        raise TypeError(f"format must be one of {FORMATS} or a list of them, got {format!r}")
    formats = (format,) if isinstance(format, str) else tuple(format)
    bad = [f for f in formats if f not in FORMATS]
    if not formats or bad:
        raise ValueError(f"format must be one of {FORMATS} or a list of them, got {format!r}")
    return tuple(dict.fromkeys(formats))


def export_lora(
    source: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    *,
    component: str | None = None,
    format: str | Sequence[str] = DEFAULT_FORMATS,
    overwrite: bool = False,
    pipeline_cls: Any = None,
    monitor: str | os.PathLike | None = None,
) -> Path:
    """Exports the mean of a Bayesian LoRA adapter as a plain LoRA that loads without bayes-adapter.

    The export drops the posterior standard deviations and keeps `lora_A` / `lora_B`, so the exported LoRA gives
    exactly the outputs of the Bayesian adapter in eval mode, at plain LoRA's cost.

    Args:
        source: A `PeftModel`, a diffusers / transformers model with an added Bayesian adapter, or a folder saved by
            `save_pretrained` holding one. Or a `{component: model}` mapping (as diffusers' `save_lora_weights`
            takes `unet_lora_layers=..., text_encoder_lora_layers=...`): then `out_dir` holds every component in one
            `pytorch_lora_weights.safetensors` (so `format` must include "diffusers"), `export/<component>/` each in
            the other formats asked for, and with "kohya" one `lora_kohya.safetensors` (`export_components`;
            `pipeline_cls` is needed, `component` is refused: the mapping's keys name the components).
        out_dir: The folder to write; it must not exist unless `overwrite=True`. Written atomically.
        adapter_name: Which adapter to export.
        component: The pipeline component the adapter belongs to, which sets the diffusers key prefix: "unet",
            "transformer", "text_encoder" or "text_encoder_2". Inferred from the model class (or the saved config and
            module names) when None.
        format: One of "peft", "diffusers", "kohya", or a list of them. By default both "peft" (`adapter_config.json`
            + `adapter_model.safetensors`) and "diffusers" (`pytorch_lora_weights.safetensors`).
        overwrite: Replace `out_dir` if it exists.
        pipeline_cls: For a mapping: the diffusers pipeline class whose `save_lora_weights` writes the components.
        monitor: The training run's `monitor.jsonl`: its corruption-stage verdict (`bayes_adapter.stage.stage_summary`)
            is written into `bayes_lora_export.json` under ``"stage"``, where `push_to_hub` puts it in the model card.

    Returns:
        The path of the written folder.

    Raises:
        ValueError: for a source without a Bayesian adapter, an unknown adapter name, a merged adapter, an unknown
            format or component, an unreadable `monitor`; FileExistsError for an existing `out_dir`. All before
            anything is written.
    """
    out = Path(out_dir)
    stage = read_stage_verdict(monitor)
    if isinstance(source, Mapping):
        formats = _check_formats(format)
        if component is not None:
            raise ValueError(
                f"component={component!r} does not apply to a {{component: model}} mapping: its keys name the "
                "components; drop component"
            )
        if "diffusers" not in formats:
            raise ValueError(
                f"format={format!r}: a {{component: model}} mapping is exported as one diffusers file for all "
                "components; include 'diffusers' (and 'peft' or 'kohya' if wanted)"
            )
        check_output_folder(out, overwrite)
        adapters = read_components(source, adapter_name, pipeline_cls)
        per_component = tuple(f for f in formats if f != "kohya")
        with atomic_folder(out, overwrite) as tmp:
            export_components(adapters, tmp, pipeline_cls, kohya="kohya" in formats, formats=per_component)
            for name in adapters:
                add_stage_to_summary(tmp / "export" / name, stage)
        return out
    formats = _check_formats(format)
    check_output_folder(out, overwrite)
    adapter = load_bayesian_adapter(source, adapter_name, component)
    if isinstance(source, (str, os.PathLike)):
        check_not_overlapping(out, Path(source), Path(adapter.source))
    if "kohya" in formats:
        _check_kohya(adapter)
    with atomic_folder(out, overwrite) as tmp:
        write_export(adapter, tmp, formats)
        add_stage_to_summary(tmp, stage)
    logger.info("Exported the mean of adapter %r (%s) to %s", adapter.adapter_name, adapter.source, out)
    return out


def read_stage_verdict(monitor: str | os.PathLike | None) -> dict[str, Any] | None:
    """The corruption-stage verdict of a run's `monitor.jsonl` for an export summary (None for None); raises
    ValueError (`MonitorFileError`) on a file that cannot be read."""
    if monitor is None:
        return None
    if not isinstance(monitor, (str, os.PathLike)):
        raise ValueError(f"monitor must be the path of a monitor.jsonl file or None, got {monitor!r}")
    from .stage import stage_summary

    return stage_summary(monitor)


def add_stage_to_summary(folder: Path, stage: dict[str, Any] | None) -> None:
    """Adds a run's corruption-stage verdict (`bayes_adapter.stage.stage_summary`) to `folder`'s
    `bayes_lora_export.json` under ``"stage"``; nothing to do for None."""
    if stage is None:
        return
    path = folder / EXPORT_SUMMARY_NAME
    summary = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**summary, "stage": stage}, indent=2, sort_keys=True) + "\n")


def read_components(models: object, adapter_name: str, pipeline_cls: Any) -> dict[str, BayesianAdapter]:
    """Reads (and checks) each adapter of a `{component: model}` mapping, before anything is written.

    Args:
        models: `{component: model}`; a value may also be a `BayesianAdapter` already read.
        adapter_name: The adapter to read from each model.
        pipeline_cls: The diffusers pipeline class that will write the combined file (checked here).
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models must be a non-empty {{component: model}} mapping, got {models!r}")
    if not callable(getattr(pipeline_cls, "save_lora_weights", None)):
        raise ValueError(
            f"pipeline_cls must be a diffusers pipeline class with save_lora_weights, got {pipeline_cls!r}"
        )
    return {
        name: model if isinstance(model, BayesianAdapter) else load_bayesian_adapter(model, adapter_name, name)
        for name, model in models.items()
    }


def export_components(
    models: Mapping[str, nn.Module | BayesianAdapter],
    out_dir: str | os.PathLike,
    pipeline_cls: Any,
    adapter_name: str = "default",
    per_component: bool = True,
    kohya: bool = False,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> Path:
    """Exports the means of several components' Bayesian adapters (UNet or transformer, text encoders) together.

    Writes `<out_dir>/pytorch_lora_weights.safetensors`, every component in one file in diffusers' format (written by
    `pipeline_cls.save_lora_weights`, so `pipe.load_lora_weights(out_dir)` loads all of them), and, as `export_lora`
    does, `<out_dir>/export/<component>/` for each. Each adapter is read once; each file and folder is replaced
    atomically (other files in `out_dir`, e.g. a training run's checkpoints, are left alone).

    Args:
        models: `{component: model}`, components among `COMPONENTS` (e.g. `{"unet": unet, "text_encoder": te}`);
            a value may also be a `BayesianAdapter` already read.
        out_dir: The folder to write into (created if needed).
        pipeline_cls: The diffusers pipeline class whose `save_lora_weights` takes these components, e.g.
            `StableDiffusionPipeline` or `StableDiffusionXLPipeline`.
        adapter_name: The adapter to export from each model.
        per_component: Also write `<out_dir>/export/<component>/`; False writes the combined file only (e.g. into
            a training checkpoint, so that `pipe.load_lora_weights("out/checkpoint-N")` loads it).
        kohya: Also write `<out_dir>/lora_kohya.safetensors`, every component in the kohya layout ComfyUI and A1111
            load (UNet and CLIP text encoders only; checked before anything is written).
        formats: The formats of each `export/<component>/` folder ("peft", "diffusers"; kohya is the combined
            file above).

    Returns:
        The path of the combined diffusers file.
    """
    adapters = read_components(models, adapter_name, pipeline_cls)
    if kohya:
        for adapter in adapters.values():
            _check_kohya(adapter)
    out = Path(out_dir)
    layers: dict[str, Any] = {}
    for name, adapter in adapters.items():
        if per_component:
            with atomic_folder(out / "export" / name, overwrite=True) as tmp:
                write_export(adapter, tmp, formats)
        layers[f"{name}_lora_layers"] = adapter.mean_state_dict()
        layers[f"{name}_lora_adapter_metadata"] = diffusers_metadata(adapter)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{DIFFUSERS_WEIGHTS_NAME}.tmp-", dir=out) as tmp:
        pipeline_cls.save_lora_weights(tmp, **layers)
        os.replace(Path(tmp, DIFFUSERS_WEIGHTS_NAME), out / DIFFUSERS_WEIGHTS_NAME)
    if kohya:
        tensors: dict[str, torch.Tensor] = {}
        for adapter in adapters.values():
            tensors.update(_kohya_state_dict(adapter, adapter.mean_state_dict()))
        with tempfile.TemporaryDirectory(prefix=f".{KOHYA_WEIGHTS_NAME}.tmp-", dir=out) as tmp:
            save_file(tensors, str(Path(tmp, KOHYA_WEIGHTS_NAME)), {"format": "pt"})
            os.replace(Path(tmp, KOHYA_WEIGHTS_NAME), out / KOHYA_WEIGHTS_NAME)
    return out / DIFFUSERS_WEIGHTS_NAME


def write_export(adapter: BayesianAdapter, folder: Path, formats: Sequence[str] = DEFAULT_FORMATS) -> None:
    """Writes the mean LoRA of `adapter` into the existing folder `folder` (not atomic; see `export_lora`)."""
    means = adapter.mean_state_dict()
    if "peft" in formats:
        adapter.lora_config().save_pretrained(str(folder))
        save_file({PEFT_PREFIX + k: v for k, v in means.items()}, str(folder / PEFT_WEIGHTS_NAME), {"format": "pt"})
    if "diffusers" in formats:
        _save_diffusers(adapter, means, folder)
    if "kohya" in formats:
        save_file(_kohya_state_dict(adapter, means), str(folder / KOHYA_WEIGHTS_NAME), {"format": "pt"})
    (folder / EXPORT_SUMMARY_NAME).write_text(json.dumps(adapter.summary(), indent=2, sort_keys=True) + "\n")


def diffusers_metadata(adapter: BayesianAdapter) -> dict[str, Any]:
    """The minimal `lora_adapter_metadata` diffusers turns into `LoraConfig(**metadata)` when loading.

    Only keys every PEFT version that diffusers supports accepts: rank and alpha with their patterns and the exact
    target modules; `use_rslora` / `lora_bias` / `use_dora` only when set.
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
    if config.get("use_dora"):
        metadata["use_dora"] = True
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
        if f"{module}.lora_magnitude_vector" in means:
            raise ValueError("format='kohya' cannot carry a DoRA adapter (use_dora=True); use the 'diffusers' format")


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
