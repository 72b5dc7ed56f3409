"""Hugging Face Hub: push the mean LoRA of a Bayesian adapter with a model card, loadable by repo id.

The repo root holds the exported mean LoRA in both formats (so `pipe.load_lora_weights(repo_id)` and
`PeftModel.from_pretrained(model, repo_id)` work without bayes-adapter) and a README model card; with
`include_bayesian=True` the full Bayesian adapter goes to the `bayesian/` subfolder, from which
`PeftModel.from_pretrained(model, repo_id, subfolder="bayesian")` resumes training (with `bayes_adapter` imported).

Everything is first written to a local folder (kept if the upload fails), then uploaded in one commit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from ._atomic import atomic_folder
from ._images import check_pil_images
from .adapter import BayesianAdapter
from .export import (
    DEFAULT_FORMATS,
    DIFFUSERS_WEIGHTS_NAME,
    EXPORT_SUMMARY_NAME,
    add_stage_to_summary,
    export_components,
    read_components,
    read_stage_verdict,
    write_export,
)
from .model_card import BAYESIAN_SUBFOLDER, build_model_card
from .save_and_load import load_bayesian_adapter, write_bayesian_adapter


logger = logging.getLogger(__name__)

__all__ = ["BAYESIAN_SUBFOLDER", "HubPushError", "build_model_card", "push_to_hub"]

IMAGES_SUBFOLDER = "images"
DEFAULT_COMMIT_MESSAGE = "Upload Bayesian LoRA (mean) with bayes-adapter"


class HubPushError(RuntimeError):
    """An upload to the Hub failed; `local_dir` holds the complete export, ready to push again."""

    def __init__(self, message: str, local_dir: Path):
        super().__init__(message)
        self.local_dir = local_dir


def _check_repo_id(repo_id: object) -> str:
    if not isinstance(repo_id, str):
        raise ValueError(f"repo_id must be a string like 'user/name', got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id={repo_id!r} is not a valid Hub repo id (expected 'user/name'): {error}") from None
    return repo_id


def _check_optional_str(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")


def _mask_tokens(text: str, token: str | None) -> str:
    """`text` with every token the Hub client could have sent replaced by ***: explicit, `HF_TOKEN`, stored login."""
    from huggingface_hub import get_token

    try:
        stored = get_token()
    except Exception:  # a broken token file must not hide the real error
        stored = None
    for candidate in {token, os.environ.get("HF_TOKEN"), stored}:
        if candidate:
            text = text.replace(candidate, "***")
    return text


def _is_export_dir(path: Path) -> bool:
    return (path / DIFFUSERS_WEIGHTS_NAME).is_file() and (path / EXPORT_SUMMARY_NAME).is_file()


def push_to_hub(
    model_or_export_dir: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    include_bayesian: bool = False,
    base_model: str | None = None,
    instance_prompt: str | None = None,
    validation_images: Sequence[str | os.PathLike | Any] | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    adapter_name: str = "default",
    component: str | None = None,
    local_dir: str | os.PathLike | None = None,
    pipeline_cls: Any = None,
    monitor: str | os.PathLike | None = None,
) -> str:
    """Pushes the mean LoRA of a Bayesian adapter to a Hub model repo, with a model card.

    The repo is created if needed (`exist_ok`). Uploaded in one commit: the mean LoRA in PEFT and diffusers formats
    at the root, `bayes_lora_export.json`, a README model card, the validation images, and with
    `include_bayesian=True` the full Bayesian adapter in `bayesian/`. The token is only sent to the Hub: it is
    written to no file and no log line.

    Args:
        model_or_export_dir: A model with a Bayesian adapter (PeftModel or `add_adapter`), a folder saved by
            `save_pretrained` holding one, a folder written by `export_lora`, or a `{component: model}` mapping
            (UNet or transformer and text encoders): then the root holds every component in one diffusers file
            (`export_components`, needs `pipeline_cls`), `export/<component>/` each, and `bayesian/<component>/`.
        repo_id: The Hub repo, "user/name".
        token: A Hub token with write access; by default the stored login or `HF_TOKEN`.
        private: Create the repo private (None: the Hub's default). Ignored for an existing repo.
        include_bayesian: Also upload the full Bayesian adapter (posterior stds included) to `bayesian/`, so that
            training can resume elsewhere. Needs a model or a saved Bayesian adapter, not an export folder.
        base_model: The base model's Hub id, for the card (e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5").
        instance_prompt: The prompt the adapter was trained with, for the card.
        validation_images: Image files or PIL images to upload and show as the card's widget.
        commit_message: The commit message.
        adapter_name: Which adapter of a model or saved folder to push.
        component: The pipeline component ("unet", "transformer", "text_encoder", "text_encoder_2"); inferred if None.
        local_dir: Where to write what is uploaded (must not exist); a new temporary folder by default. Kept either
            way: after a failed upload, push it again with `push_to_hub(local_dir, repo_id)`.
        pipeline_cls: For a mapping: the diffusers pipeline class whose `save_lora_weights` writes the components.
        monitor: The training run's `monitor.jsonl`: its corruption-stage verdict (stage, best step; see
            `bayes_adapter.stage`) goes into the card and `bayes_lora_export.json`. An export folder whose summary
            already holds a verdict (`export_lora(..., monitor=...)`) shows it without this.

    Returns:
        The URL of the commit.

    Raises:
        ValueError: for an invalid argument (repo id, images, source), before any request or write.
        RuntimeError: in offline mode (`HF_HUB_OFFLINE=1`), before any request or write.
        HubPushError: if a Hub request fails; the message names the repo and the cause, `local_dir` is kept.
    """
    _check_push_arguments(repo_id, base_model, instance_prompt, commit_message, token, private, include_bayesian)
    images = check_pil_images("validation_images", validation_images, min_count=0, paths=True)
    stage = read_stage_verdict(monitor)
    if local_dir is not None and Path(local_dir).exists():
        raise FileExistsError(f"local_dir={str(local_dir)!r} already exists; pass a new folder (or None)")
    _check_online(repo_id)
    source = _read_source(model_or_export_dir, adapter_name, component, pipeline_cls, include_bayesian)
    staging = (
        Path(local_dir) if local_dir is not None else Path(tempfile.mkdtemp(prefix="bayes-adapter-push-")) / "upload"
    )
    with atomic_folder(staging) as tmp:
        summary = _write_adapter_files(tmp, source, pipeline_cls, include_bayesian, stage)
        card = build_model_card(
            summary,
            repo_id,
            base_model=base_model,
            instance_prompt=instance_prompt,
            widget_images=_write_images(tmp, images),
            include_bayesian=include_bayesian,
        )
        card.save(tmp / "README.md")
    return _upload(staging, repo_id, token, private, commit_message)


def _check_push_arguments(repo_id, base_model, instance_prompt, commit_message, token, private, include_bayesian):
    """`push_to_hub`'s checks of its plain arguments, before any read, write or request."""
    _check_repo_id(repo_id)
    for name, value in (("base_model", base_model), ("instance_prompt", instance_prompt)):
        _check_optional_str(name, value)
    if base_model is not None:  # the Hub refuses a card whose base_model is no model id (e.g. a local path)
        try:
            validate_repo_id(base_model)
        except HFValidationError:
            raise ValueError(
                f"base_model={base_model!r} is not a Hub model id; the card's base_model must name one (e.g. "
                "'stable-diffusion-v1-5/stable-diffusion-v1-5'): give the id a local folder was downloaded from, or "
                "None"
            ) from None
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError(f"commit_message must be a non-empty string, got {commit_message!r}")
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("token must be a non-empty string or None (the stored login)")
    if private is not None and not isinstance(private, bool):
        raise ValueError(f"private must be True, False or None, got {private!r}")
    if not isinstance(include_bayesian, bool):
        raise ValueError(f"include_bayesian must be True or False, got {include_bayesian!r}")


def _check_online(repo_id: str) -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise RuntimeError(
            f"Cannot push to the Hub repo {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE to "
            "upload, or use bayes_adapter.export_lora to export locally."
        )


@dataclass
class _PushSource:
    """What `push_to_hub` uploads, read and checked before anything is written: one of the three is set."""

    summary: dict[str, Any]
    adapter: BayesianAdapter | None = None  # a model's or a saved folder's adapter
    components: dict[str, BayesianAdapter] | None = None  # a {component: model} mapping's adapters
    export_dir: Path | None = None  # a folder written by export_lora


def _read_source(model_or_export_dir, adapter_name, component, pipeline_cls, include_bayesian) -> _PushSource:
    if isinstance(model_or_export_dir, Mapping):
        components = read_components(model_or_export_dir, adapter_name, pipeline_cls)
        # The card describes the denoiser's adapter (the text encoders' share its settings in the scripts).
        main = next(
            (components[n] for n in ("unet", "transformer") if n in components), next(iter(components.values()))
        )
        return _PushSource({**main.summary(), "components": sorted(components)}, components=components)
    if isinstance(model_or_export_dir, (str, os.PathLike)) and _is_export_dir(Path(model_or_export_dir)):
        export_dir = Path(model_or_export_dir)
        if include_bayesian:
            raise ValueError(
                f"include_bayesian=True needs the Bayesian adapter, but model_or_export_dir={str(export_dir)!r} is "
                "an export (the mean only): pass the model or the folder saved with save_pretrained instead"
            )
        try:
            summary = json.loads((export_dir / EXPORT_SUMMARY_NAME).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{str(export_dir / EXPORT_SUMMARY_NAME)!r} is not valid JSON ({error})") from None
        if not isinstance(summary, dict):
            raise ValueError(f"{str(export_dir / EXPORT_SUMMARY_NAME)!r} does not hold an export summary")
        return _PushSource(summary, export_dir=export_dir)
    adapter = load_bayesian_adapter(model_or_export_dir, adapter_name, component)
    return _PushSource(adapter.summary(), adapter=adapter)


def _write_adapter_files(tmp: Path, source: _PushSource, pipeline_cls, include_bayesian: bool, stage) -> dict:
    """Writes the mean LoRA (and the Bayesian adapter) of `source` into `tmp`; returns the summary for the card."""
    if source.components is not None:
        export_components(source.components, tmp, pipeline_cls)
        if include_bayesian:
            for name, component_adapter in source.components.items():
                (tmp / BAYESIAN_SUBFOLDER / name).mkdir(parents=True)
                write_bayesian_adapter(component_adapter, tmp / BAYESIAN_SUBFOLDER / name)
    elif source.adapter is not None:
        write_export(source.adapter, tmp, DEFAULT_FORMATS)
        if include_bayesian:
            (tmp / BAYESIAN_SUBFOLDER).mkdir()
            write_bayesian_adapter(source.adapter, tmp / BAYESIAN_SUBFOLDER)
    else:
        for path in source.export_dir.iterdir():
            if path.is_file() and path.name != "README.md":
                shutil.copy2(path, tmp / path.name)
    if stage is None:
        return source.summary
    if (tmp / EXPORT_SUMMARY_NAME).is_file():
        add_stage_to_summary(tmp, stage)
    return {**source.summary, "stage": stage}


def _write_images(tmp: Path, images: list) -> list[str]:
    """Copies or saves the validation images into `tmp/images/`; returns their paths relative to `tmp`."""
    widget_paths = []
    if images:
        (tmp / IMAGES_SUBFOLDER).mkdir()
    for i, image in enumerate(images):
        relative = f"{IMAGES_SUBFOLDER}/validation_{i}.png"
        if isinstance(image, (str, os.PathLike)):
            relative = f"{IMAGES_SUBFOLDER}/validation_{i}{Path(image).suffix.lower() or '.png'}"
            shutil.copy2(image, tmp / relative)
        else:
            image.save(tmp / relative)
        widget_paths.append(relative)
    return widget_paths


def _upload(staging: Path, repo_id: str, token: str | None, private: bool | None, commit_message: str) -> str:
    """Creates the repo if needed and uploads `staging` in one commit; a failure keeps `staging` and masks tokens."""
    api = HfApi(token=token)
    cause = None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(staging), commit_message=commit_message, repo_type="model"
        )
    except Exception as error:
        cause = _mask_tokens(f"{type(error).__name__}: {error}", token)
    if cause is not None:
        # Raised outside the except block: the original exception, which may quote the token, is neither the
        # cause nor the context of this one.
        raise HubPushError(
            f"Pushing to the Hub repo {repo_id!r} failed: {cause}. The export is kept in {str(staging)!r}; push it "
            f"again with bayes_adapter.push_to_hub({str(staging)!r}, {repo_id!r}).",
            staging,
        )
    logger.info("Pushed %s to the Hub repo %s", staging, repo_id)
    return str(getattr(commit, "commit_url", commit))
