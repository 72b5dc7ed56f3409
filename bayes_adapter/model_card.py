"""The model card of a pushed mean LoRA: diffusers' card metadata (library, tags, base model, trigger words,
widget) and a body saying how to load it, how it was trained and, when the run was monitored, the stage verdict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .stage import stage_card_section


__all__ = ["BAYESIAN_SUBFOLDER", "build_model_card"]

BAYESIAN_SUBFOLDER = "bayesian"  # where a push with include_bayesian=True puts the full Bayesian adapter
BASE_TAGS = ("lora", "bayes-lora", "diffusers", "text-to-image")
# Tags that diffusers' own training scripts give LoRAs of each model family, matched on the base model id.
_FAMILY_TAGS = (
    ("stable-diffusion-3", ("sd3", "sd3-diffusers")),
    ("flux.2", ("flux2", "flux2-diffusers")),  # before "flux": FLUX.2-dev, FLUX.2-klein-4B
    ("flux2", ("flux2", "flux2-diffusers")),
    ("flux", ("flux", "flux-diffusers")),
    ("qwen-image", ("qwen-image", "qwen-image-diffusers")),
    ("sana", ("sana", "sana-diffusers")),
    ("z-image", ("z-image",)),  # diffusers' Z-Image script gives no "-diffusers" twin
    ("xl", ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")),
    ("stable-diffusion", ("stable-diffusion", "stable-diffusion-diffusers")),
)


def _family_tags(base_model: str | None, component: str) -> list[str]:
    name = (base_model or "").lower()
    for needle, tags in _FAMILY_TAGS:
        if needle in name:
            return list(tags)
    return ["stable-diffusion", "stable-diffusion-diffusers"] if component == "unet" else []


def _format_bound(bound: object) -> str:
    # A summary without the field was exported before the bound existed: its stds were unbounded.
    return "none (unbounded)" if bound is None else _format_float(bound)


def _format_float(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def build_model_card(
    summary: dict[str, Any],
    repo_id: str,
    *,
    base_model: str | None = None,
    instance_prompt: str | None = None,
    widget_images: Sequence[str] = (),
    include_bayesian: bool = False,
) -> ModelCard:
    """The README of a pushed mean LoRA: diffusers metadata (library, tags, base model, prompt, widget) and a body.

    Args:
        summary: The export summary (`bayes_lora_export.json`): component, rank, Bayesian settings, sigma statistics.
        repo_id: The repo the card is for (used in the loading snippets).
        base_model: The base model's Hub id.
        instance_prompt: The prompt (trigger words) the adapter was trained with.
        widget_images: Paths, relative to the repo root, of validation images to show.
        include_bayesian: Whether the repo also holds the full Bayesian adapter in `bayesian/`.
    """
    from diffusers.utils.hub_utils import populate_model_card

    component = summary.get("component", "unet")
    bayesian = summary.get("bayesian") or {}
    stats = summary.get("posterior_std") or {}
    widget = [{"text": instance_prompt or "", "output": {"url": path}} for path in widget_images]
    card_data = ModelCardData(
        library_name="diffusers",
        base_model=base_model,
        instance_prompt=instance_prompt,
        widget=widget or None,
    )
    prompt = instance_prompt or "a photo"
    base = base_model or "<base model id>"
    load_component = {"unet": "unet", "transformer": "transformer"}.get(component, component)
    # float16 for the UNet models (SD 1.x/2.x, SDXL), bfloat16 for the transformers (SD3, Flux, SANA, Qwen-Image),
    # as their model cards load them; `dtype` is diffusers' name since `torch_dtype` was deprecated
    run_dtype = "torch.float16" if component == "unet" else "torch.bfloat16"
    # Several components (a {component: model} push) are stored one subfolder each.
    components = summary.get("components")
    # one component: its PEFT files at the root; several: one export/<component>/ folder each
    peft_subfolder = f', subfolder="export/{component}"' if components else ""
    peft_where = f"in `export/{component}/`" if components else "at the root"
    lines = [
        f"# Bayesian LoRA: {repo_id}",
        "",
        f"A LoRA for the `{component}` of [{base}](https://huggingface.co/{base}), trained with "
        "bayes-adapter (Bayesian LoRA: a Gaussian posterior over the LoRA weights) and "
        "exported as its posterior mean: a plain LoRA, loaded and run at plain LoRA's cost, without bayes-adapter.",
        "",
    ]
    if instance_prompt:
        lines += ["## Trigger words", "", f"Use `{instance_prompt}` in the prompt.", ""]
    lines += [
        "## How to use",
        "",
        "```python",
        "import torch",
        "from diffusers import AutoPipelineForText2Image",
        "",
        f'pipe = AutoPipelineForText2Image.from_pretrained("{base}", dtype={run_dtype}).to("cuda")',
        f'pipe.load_lora_weights("{repo_id}")',
        f'image = pipe(prompt="{prompt}").images[0]',  # a keyword: Flux.2's first argument is an image
        "```",
        "",
        f'With PEFT: `PeftModel.from_pretrained(pipe.{load_component}, "{repo_id}"{peft_subfolder})` (the '
        f"`adapter_config.json` / `adapter_model.safetensors` {peft_where}).",
        "",
        "## Bayesian training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| rank / alpha | {summary.get('r')} / {summary.get('lora_alpha')} |",
        f"| adapted modules | {len(summary.get('target_modules') or [])} |",
        f"| Bayesian factors | {bayesian.get('bayesian_factors')} |",
        f"| estimator | {bayesian.get('estimator')} |",
        f"| prior std | {bayesian.get('prior_std')} |",
        f"| initial posterior std | {bayesian.get('posterior_std_init')} |",
        f"| KL weight | {bayesian.get('kl_weight')} |",
        f"| posterior std learned | {bayesian.get('train_posterior_std')} |",
        f"| posterior std parametrisation | {bayesian.get('posterior_std_parametrisation')} |",
        f"| posterior std bound (posterior_std_max) | {_format_bound(bayesian.get('posterior_std_max'))} |",
        f"| posterior std (mean / min / max) | {_format_float(stats.get('mean'))} / {_format_float(stats.get('min'))}"
        f" / {_format_float(stats.get('max'))} over {stats.get('count')} weights |",
    ]
    if bayesian.get("posterior_std_max") is not None and stats.get("near_bound_fraction") is not None:
        lines.append(f"| posterior stds within 5% of the bound | {stats['near_bound_fraction']:.1%} |")
    lines += [
        "",
        "Inference uses the posterior mean only: the exported LoRA gives exactly the Bayesian adapter's outputs in "
        "eval mode.",
        "",
    ]
    stage = summary.get("stage")
    if isinstance(stage, dict) and "stage" in stage:
        lines += stage_card_section(stage)
    bayesian_subfolder = f"{BAYESIAN_SUBFOLDER}/{component}" if components else BAYESIAN_SUBFOLDER
    if include_bayesian:
        lines += [
            "## Resume Bayesian training",
            "",
            f"The full Bayesian adapter (means and posterior stds) is in `{bayesian_subfolder}/`:",
            "",
            "```python",
            "import bayes_adapter  # registers the Bayesian LoRA tuner with PEFT",
            "from peft import PeftModel",
            "",
            "# pipe: the base pipeline, loaded as above (without load_lora_weights)",
            f'{load_component} = PeftModel.from_pretrained(pipe.{load_component}, "{repo_id}", '
            f'subfolder="{bayesian_subfolder}", is_trainable=True)',
            "```",
            "",
        ]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    tags = list(dict.fromkeys([*BASE_TAGS, *_family_tags(base_model, component)]))
    return populate_model_card(card, tags=tags)
