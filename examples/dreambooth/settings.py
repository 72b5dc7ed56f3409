"""The DreamBooth script's settings: the command line checked before any model loads, then resolved, read-only."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import families, targets
from .adapters import lora_config
from .arguments import QUANTISATION_PACKAGES, build_parser, config_error_with_flags
from .errors import ArgumentsError
from .outputs import check_output_dir
from .sources import caption_suffix, instance_images_and_captions, list_images


class Settings:
    """The run's settings, read-only: every command-line option as an attribute, and what is resolved from them.

    Resolved: `family` and `model_index` (from the pipeline's `model_index.json`), the family's defaults (e.g.
    `weighting_scheme`), `evaluators` (the CLIP and DINO models of `--eval_clip_model` / `--eval_dino_model`, or
    None), `lpips_model` (LPIPS with `--eval_lpips`, or None). `replace(**changes)` returns new settings; nothing changes them in place.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(
            self, "_values", {"family": None, "model_index": None, "evaluators": (None, None), "lpips_model": None}
        )
        self._values.update(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"settings are read-only; use settings.replace({name}=...)")

    def replace(self, **changes: Any) -> Settings:
        """New settings with `changes`; each must name an existing setting."""
        unknown = sorted(set(changes) - set(self._values))
        if unknown:
            raise AttributeError(f"no setting {unknown[0]!r}")
        return Settings({**self._values, **changes})

    def tracker_config(self) -> dict[str, int | float | str | bool]:
        """The plain values (numbers, strings, flags), as trackers record a run's hyperparameters."""
        return {k: v for k, v in self._values.items() if isinstance(v, (int, float, str, bool))}

    def __repr__(self) -> str:
        return f"Settings({self.tracker_config()})"


def parse_args(input_args: list[str] | None = None) -> Settings:
    """Parses and checks the command line; every check runs before any training model is loaded.

    Args:
        input_args (`list[str]`, *optional*): The arguments; `sys.argv[1:]` by default.

    Raises:
        `ArgumentsError` (a `ValueError`): an argument is missing or wrong; the message names the argument, the value
        and what was expected.
    """
    settings = Settings(vars(build_parser().parse_args(input_args)))
    try:
        return check_settings(settings)
    except ArgumentsError:
        raise
    except ValueError as error:
        raise ArgumentsError(str(error)) from None


def _check_number(settings: Settings, name: str, minimum: float, integer: bool = True) -> None:
    value = getattr(settings, name)
    if value is not None and not (math.isfinite(value) and value >= minimum):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"--{name}={value!r} is invalid; expected {kind} >= {minimum}.")


def _check_trackers(settings: Settings) -> None:
    """`--report_to`: every tracker named must be installed (accelerate would only warn, and log nothing)."""
    from accelerate.tracking import get_available_trackers

    names = [name.strip() for name in settings.report_to.split(",") if name.strip()]
    if names in (["none"], ["all"]):
        return
    available = sorted(str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers())
    missing = [name for name in names if name not in available]
    if missing:
        raise ValueError(
            f"--report_to={settings.report_to!r}: {', '.join(missing)} is not installed (installed trackers: "
            f"{', '.join(available) or 'none'}); pip install it, or pass --report_to "
            f"{available[0] if available else 'none'} (or none)."
        )


def check_settings(settings: Settings) -> Settings:
    """Checks what argparse cannot; raises `ValueError` naming the argument. Loads no training model.

    Returns:
        `Settings`: with the evaluators loaded (on CPU) and, for a local pipeline, the model family resolved.
    """
    if bool(settings.instance_data_dir) == bool(settings.dataset_name):
        raise ValueError(
            f"give one of --instance_data_dir (a folder of images, with optional caption files) and --dataset_name "
            f"(a local dataset folder or a Hub dataset id); got --instance_data_dir={settings.instance_data_dir!r} and "
            f"--dataset_name={settings.dataset_name!r}."
        )
    for flag in ("dataset_config_name", "image_column", "caption_column"):
        value = getattr(settings, flag)
        if settings.instance_data_dir and value is not None:
            raise ValueError(
                f"--{flag}={value!r} applies to --dataset_name; with --instance_data_dir="
                f"{settings.instance_data_dir!r} captions come from caption files (--caption_extension)."
            )
    if settings.instance_data_dir:
        instance_dir = Path(settings.instance_data_dir)
        if not instance_dir.is_dir():
            raise ValueError(
                f"--instance_data_dir={settings.instance_data_dir!r} is not an existing folder; expected a "
                "folder of instance images."
            )
        if not list_images(instance_dir, "--instance_data_dir", caption_suffix(settings)):
            raise ValueError(
                f"--instance_data_dir={settings.instance_data_dir!r} is empty; expected at least one image."
            )
    if not settings.instance_prompt.strip():
        raise ValueError(
            "--instance_prompt is empty; expected a prompt naming the instance, e.g. 'a photo of sks dog'."
        )
    if settings.resolution <= 0 or settings.resolution % 8:
        raise ValueError(
            f"--resolution={settings.resolution} is invalid; expected a positive multiple of 8 (the VAE "
            "downsamples by 8), e.g. 512 or 1024."
        )
    if settings.with_prior_preservation:
        if not settings.class_data_dir:
            raise ValueError(
                "--with_prior_preservation needs --class_data_dir (a folder; missing class images are "
                "generated there)."
            )
        if not settings.class_prompt or not settings.class_prompt.strip():
            raise ValueError(
                f"--with_prior_preservation needs --class_prompt, got {settings.class_prompt!r}; expected "
                "a prompt of the class, e.g. 'a photo of dog'."
            )
        class_dir = Path(settings.class_data_dir)
        if class_dir.exists() and not class_dir.is_dir():
            raise ValueError(f"--class_data_dir={settings.class_data_dir!r} exists but is not a folder.")
        if class_dir.is_dir():
            list_images(class_dir, "--class_data_dir")
        if settings.aspect_ratio_buckets:
            raise ValueError(
                "--aspect_ratio_buckets cannot be combined with --with_prior_preservation (a batch stacks instance and "
                "class images, which would need the same bucket); drop one of them."
            )
    elif settings.class_data_dir or settings.class_prompt:
        logging.getLogger(__name__).warning(
            "--class_data_dir/--class_prompt are ignored without --with_prior_preservation."
        )
    for name in (
        "rank",
        "train_batch_size",
        "num_train_epochs",
        "max_train_steps",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "num_validation_images",
        "validation_inference_steps",
        "num_class_images",
        "sample_batch_size",
        "num_class_inference_steps",
        "lora_alpha",
        "repeats",
        "lr_num_cycles",
        "max_sequence_length",
        "monitor_images",
    ):
        _check_number(settings, name, 1)
    _check_number(settings, "monitor_steps", 0)
    if settings.monitor_steps is None:
        settings = settings.replace(monitor_steps=settings.checkpointing_steps)
    for name in ("logit_mean", "guidance_scale", "mode_scale"):
        _check_number(settings, name, -math.inf, integer=False)
    if not (math.isfinite(settings.logit_std) and settings.logit_std > 0):
        raise ValueError(f"--logit_std={settings.logit_std!r} is invalid; expected a finite number > 0.")
    for name in ("text_encoder_lr", "snr_gamma"):
        value = getattr(settings, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name}={value!r} is invalid; expected a finite number > 0.")
    import importlib.util

    for flag, module, wanted in (
        ("--optimizer prodigy", "prodigyopt", settings.optimizer == "prodigy"),
        ("--use_8bit_adam", "bitsandbytes", settings.use_8bit_adam),
    ):
        if wanted and importlib.util.find_spec(module) is None:
            raise ValueError(
                f"{flag} needs the {module} package, which is not installed (it is not a dependency of bayes-adapter); "
                f"pip install {module} (pinning your installed torch, e.g. `pip install {module} torch==<yours>`, so "
                f"that it cannot pull another torch), or drop {flag}."
            )
    if settings.use_dora and settings.output_kohya_format:
        raise ValueError("--output_kohya_format cannot carry a DoRA adapter (--use_dora); drop one of them.")
    if settings.quantize_base is not None:
        package = QUANTISATION_PACKAGES[settings.quantize_base]
        if importlib.util.find_spec(package) is None:
            raise ValueError(
                f"--quantize_base {settings.quantize_base} needs the {package} package, which is not installed; "
                'from the repository, pip install -e ".[quant]" (bitsandbytes and torchao), or drop --quantize_base.'
            )
    if settings.optimizer == "prodigy" and settings.use_8bit_adam:
        raise ValueError("--use_8bit_adam applies to AdamW only; drop it with --optimizer prodigy.")
    if not 0 <= settings.caption_dropout < 1:
        raise ValueError(f"--caption_dropout={settings.caption_dropout!r} is invalid; expected a number in [0, 1).")
    instance_images_and_captions(settings)
    for name in ("lr_warmup_steps", "dataloader_num_workers"):
        _check_number(settings, name, 0)
    for name in ("learning_rate", "prior_loss_weight", "max_grad_norm", "lora_dropout", "noise_offset", "lr_power"):
        _check_number(settings, name, 0, integer=False)
    if settings.posterior_std_learning_rate is not None and not (
        math.isfinite(settings.posterior_std_learning_rate) and settings.posterior_std_learning_rate > 0
    ):
        raise ValueError(
            f"--posterior_std_learning_rate={settings.posterior_std_learning_rate!r} is invalid; expected a finite number "
            "> 0."
        )
    if not 0 <= settings.lora_dropout < 1:
        raise ValueError(f"--lora_dropout={settings.lora_dropout!r} is invalid; expected a number in [0, 1).")
    if settings.resume_from_checkpoint not in (None, "latest"):
        resume = Path(settings.output_dir, Path(settings.resume_from_checkpoint).name)
        if not resume.name.startswith("checkpoint-") or not resume.is_dir():
            raise ValueError(
                f"--resume_from_checkpoint={settings.resume_from_checkpoint!r} is not a checkpoint-N folder "
                f"of --output_dir={settings.output_dir!r}; expected one of those or 'latest'."
            )
    check_output_dir(settings)
    _check_trackers(settings)
    vae = settings.pretrained_vae_model_name_or_path
    if vae and not Path(vae).expanduser().is_dir() and vae.startswith(("/", ".", "~")):
        raise ValueError(
            f"--pretrained_vae_model_name_or_path={vae!r}: no such folder; expected a diffusers VAE folder or Hub id."
        )
    if settings.push_to_hub:
        from huggingface_hub import constants
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(settings.hub_model_id or "")
        except HFValidationError:
            raise ValueError(
                f"--push_to_hub needs --hub_model_id as 'user/name', got {settings.hub_model_id!r}."
            ) from None
        if constants.is_offline_mode():
            raise ValueError(
                "--push_to_hub cannot upload in offline mode (HF_HUB_OFFLINE=1); unset it, or drop "
                "--push_to_hub and upload the output folder later."
            )
    if settings.validation_prompts_file is not None:
        settings = settings.replace(validation_prompt=[*(settings.validation_prompt or []), *read_prompts(settings)])
    # The metric models are loaded here (on CPU), so that a wrong path is reported before any training model loads.
    from bayes_adapter import evaluation

    if settings.eval_lpips:
        from bayes_adapter.lpips import load_lpips

        try:
            lpips_model = load_lpips(settings.eval_lpips_backbone, settings.eval_lpips_linear_weights)
        except FileNotFoundError as error:
            raise ValueError(f"--eval_lpips: {error}") from None
        settings = settings.replace(lpips_model=lpips_model)
    elif settings.eval_lpips_backbone is not None or settings.eval_lpips_linear_weights is not None:
        raise ValueError(
            "--eval_lpips_backbone and --eval_lpips_linear_weights are used only with --eval_lpips; add --eval_lpips."
        )
    evaluators = []
    for flag, name, load in (
        ("--eval_clip_model", settings.eval_clip_model, evaluation.load_clip),
        ("--eval_dino_model", settings.eval_dino_model, evaluation.load_dino),
    ):
        try:
            evaluators.append(load(name) if name else None)
        except ValueError as error:
            raise ValueError(f"{flag}={name!r}: {error}") from None
    settings = settings.replace(evaluators=tuple(evaluators))
    # The Bayesian settings are checked by BayesLoraConfig itself (no model needed); name the flags in the error.
    try:
        lora_config(
            settings,
            settings.unet_target_modules,
            kl_weight=0.0 if settings.kl_weight == "elbo" else settings.kl_weight,
        )
    except (ValueError, TypeError) as error:
        raise ValueError(f"Invalid Bayesian LoRA settings: {config_error_with_flags(str(error))}") from None
    # A local pipeline's family is checked now; a Hub id's when main() has read its model_index.json, still before
    # any model loads.
    if Path(settings.pretrained_model_name_or_path).is_dir():
        return resolve_model(settings)
    return settings


def read_prompts(settings: Settings) -> list[str]:
    """The prompts of `--validation_prompts_file`, one a line, blank lines skipped."""
    path = Path(settings.validation_prompts_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(
            f"--validation_prompts_file={str(path)!r} does not exist; expected a text file, one prompt a line."
        ) from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise ValueError(
            f"--validation_prompts_file={str(path)!r} is not a UTF-8 text file ({type(error).__name__}); expected "
            "one prompt a line."
        ) from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--validation_prompts_file={str(path)!r} holds no prompt; expected one prompt a line.")
    return prompts


def resolve_model(settings: Settings) -> Settings:
    """The settings with the model family of `--pretrained_model_name_or_path` and its defaults; reads no weights.

    Runs the checks that depend on the family; settings already resolved are returned as they are.

    Raises:
        `ArgumentsError`: the pipeline is of no family the script trains, or an argument does not apply to it.
    """
    if settings.family is not None:
        return settings
    path = settings.pretrained_model_name_or_path
    try:
        model_index = families.read_model_index(path, settings.revision)
    except Exception as error:  # diffusers raises OSError, EnvironmentError or hub errors
        raise ArgumentsError(
            f"--pretrained_model_name_or_path={path!r}: cannot read its model_index.json ({type(error).__name__}: "
            f"{error}); expected a diffusers pipeline folder or Hub id."
        ) from None
    class_name = str(model_index.get("_class_name"))
    family = families.family_of_class_name(class_name)
    if family is None:
        supported = ", ".join(f.pipeline_class for f in families.FAMILIES.values())
        raise ArgumentsError(
            f"--pretrained_model_name_or_path={path!r} is a {class_name}, which this script does not train; "
            f"expected one of {supported} (or their image-to-image variants)."
        )
    if settings.resolution % family.resolution_multiple:
        raise ArgumentsError(
            f"--resolution={settings.resolution} is invalid for {family.label}; expected a multiple of "
            f"{family.resolution_multiple}."
        )
    if settings.train_text_encoder and not family.trainable_text_encoders:
        raise ArgumentsError(
            f"--train_text_encoder: {family.label}'s text encoder ({', '.join(family.text_encoders)}) stays frozen "
            "in this script (a large language model). Drop the flag."
        )
    wrong = family.refused_flags(settings)
    if wrong:
        raise ArgumentsError(
            f"{', '.join(wrong)} applies to {family.other_kind} only; {path!r} is {family.label}. Drop it"
            + (" (give --kl_weight a number)." if "--kl_weight elbo" in wrong else ".")
        )
    if settings.precondition_outputs is not None and not family.accepts_precondition_outputs:
        raise ArgumentsError(
            f"--precondition_outputs applies to SD3 only (as in diffusers' scripts); {path!r} is {family.label}. "
            "Drop it."
        )
    if settings.output_kohya_format and not family.writes_kohya_layout:
        raise ArgumentsError(
            f"--output_kohya_format writes the UNet kohya layout (SD 1.x/2.x, SDXL); {family.label} has none here. "
            "Drop it; the diffusers file pytorch_lora_weights.safetensors is written in any case."
        )
    settings = settings.replace(family=family, model_index=model_index, **family.resolved_defaults(settings))
    try:
        targets.check_model_targets(settings)
    except ValueError as error:
        raise ArgumentsError(str(error)) from None
    return settings
