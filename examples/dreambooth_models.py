"""The model families `train_dreambooth_bayes_lora.py` trains: what differs between SD 1.x/2.x, SDXL, SD3 and Flux.

A family is told by the pipeline's `model_index.json` (`_class_name`), as diffusers' own loaders tell it. It fixes
which components are loaded (by the classes `model_index.json` names), which text encoders may carry a Bayesian
adapter (the CLIP ones; T5 stays frozen, as in diffusers' scripts), how prompts become conditioning, how latents
are noised (DDPM noise prediction, or flow matching for the DiTs) and what the denoiser is asked to predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelFamily:
    """What the training script needs to know about one kind of pipeline."""

    name: str
    pipeline_class: str
    denoiser: str  # "unet" or "transformer"
    text_encoders: tuple[str, ...]  # the pipeline's text-encoder components, in the order the prompts use them
    trainable_text_encoders: tuple[str, ...]  # those that may carry a Bayesian adapter (--train_text_encoder)
    default_targets: str  # the denoiser's LoRA targets, as diffusers' DreamBooth LoRA scripts choose them
    flow_matching: bool
    resolution_multiple: int  # the VAE downsamples by 8; Flux also packs 2x2 latent patches
    default_max_sequence_length: int | None = None  # T5 tokens (diffusers' scripts: 512 for Flux, 77 for SD3)
    default_weighting_scheme: str | None = None

    @property
    def label(self) -> str:
        return {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux.1"}[self.name]

    def tokenizer_of(self, text_encoder: str) -> str:
        return text_encoder.replace("text_encoder", "tokenizer")


_UNET_TARGETS = "to_k,to_q,to_v,to_out.0"
_SD3_TARGETS = (
    "attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,attn.to_k,attn.to_out.0,attn.to_q,attn.to_v"
)
_FLUX_TARGETS = (
    "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,"
    "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"
)

FAMILIES = {
    "sd": ModelFamily(
        "sd", "StableDiffusionPipeline", "unet", ("text_encoder",), ("text_encoder",), _UNET_TARGETS, False, 8
    ),
    "sdxl": ModelFamily(
        "sdxl",
        "StableDiffusionXLPipeline",
        "unet",
        ("text_encoder", "text_encoder_2"),
        ("text_encoder", "text_encoder_2"),
        _UNET_TARGETS,
        False,
        8,
    ),
    "sd3": ModelFamily(
        "sd3",
        "StableDiffusion3Pipeline",
        "transformer",
        ("text_encoder", "text_encoder_2", "text_encoder_3"),
        ("text_encoder", "text_encoder_2"),
        _SD3_TARGETS,
        True,
        8,
        default_max_sequence_length=77,
        default_weighting_scheme="logit_normal",
    ),
    "flux": ModelFamily(
        "flux",
        "FluxPipeline",
        "transformer",
        ("text_encoder", "text_encoder_2"),
        ("text_encoder",),
        _FLUX_TARGETS,
        True,
        16,
        default_max_sequence_length=512,
        default_weighting_scheme="none",
    ),
}


def family_of_class_name(class_name: str) -> ModelFamily | None:
    """The family of a pipeline class name from `model_index.json`, or None if the script does not train it."""
    if class_name.startswith("StableDiffusionXL"):
        return FAMILIES["sdxl"]
    if class_name.startswith("StableDiffusion3"):
        return FAMILIES["sd3"]
    if class_name.startswith("Flux") and not class_name.startswith("Flux2"):
        return FAMILIES["flux"]
    if class_name.startswith("StableDiffusion"):
        return FAMILIES["sd"]
    return None


def read_model_index(path: str, revision: str | None = None) -> dict:
    """The pipeline's `model_index.json` (a local folder's, or downloaded from the Hub): no weights are read."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(path, revision=revision))


def load_component(path: str, model_index: dict, name: str, **load):
    """Loads component `name` with the class `model_index.json` records for it (e.g. CLIPTextModelWithProjection)."""
    import importlib

    library, class_name = model_index[name]
    cls = getattr(importlib.import_module(library), class_name)
    return cls.from_pretrained(path, subfolder=name, **load)


# --- prompts ------------------------------------------------------------------------------------------------------


def _token_ids(tokenizer, prompts: list[str], max_length: int, device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def encode_prompts(
    family: ModelFamily, text_encoders: list, tokenizers: list, prompts: list[str], device, max_sequence_length=None
) -> dict[str, torch.Tensor]:
    """The conditioning of `prompts`, as the family's pipeline computes it for its denoiser.

    Returns:
        `dict`: `encoder_hidden_states`, and `pooled` (SDXL's `text_embeds`, the DiTs' `pooled_projections`) except
        for SD 1.x/2.x.
    """
    clip = [
        (tokenizer, encoder, _token_ids(tokenizer, prompts, tokenizer.model_max_length, device))
        for tokenizer, encoder in zip(tokenizers, text_encoders)
    ]
    if family.name == "sd":
        _, encoder, ids = clip[0]
        return {"encoder_hidden_states": encoder(ids)[0]}
    if family.name == "sdxl":
        outputs = [encoder(ids, output_hidden_states=True) for _, encoder, ids in clip]
        # The projected pooled embedding of the last (CLIPTextModelWithProjection) encoder; penultimate states.
        states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        return {"encoder_hidden_states": states, "pooled": outputs[-1][0]}
    t5_tokenizer, t5_encoder = tokenizers[-1], text_encoders[-1]
    t5_states = t5_encoder(_token_ids(t5_tokenizer, prompts, max_sequence_length, device))[0]
    if family.name == "flux":
        _, encoder, ids = clip[0]
        return {"encoder_hidden_states": t5_states, "pooled": encoder(ids).pooler_output}
    # SD3: both CLIPs' penultimate states side by side, padded to the T5 width, before the T5 tokens.
    outputs = [encoder(ids, output_hidden_states=True) for _, encoder, ids in clip[:2]]
    clip_states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
    clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    pooled = torch.cat([output[0] for output in outputs], dim=-1)
    return {
        "encoder_hidden_states": torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2),
        "pooled": pooled,
    }


class PromptCache:
    """Conditioning computed once per distinct prompt, for frozen text encoders (diffusers' precomputed embeddings)."""

    def __init__(self, family: ModelFamily, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        self.entries: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for prompt in dict.fromkeys(prompts):
                encoded = encode_prompts(family, text_encoders, tokenizers, [prompt], device, max_sequence_length)
                self.entries[prompt] = encoded

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        rows = [self.entries[prompt] for prompt in prompts]
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}


# --- latents, noise and the denoiser's target ---------------------------------------------------------------------


def to_latents(vae, sample: torch.Tensor) -> torch.Tensor:
    """A VAE sample scaled for the denoiser: `(x - shift_factor) * scaling_factor` (SD's VAEs have no shift)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (sample - shift) * vae.config.scaling_factor


def flow_matching_inputs(args, scheduler, latents: torch.Tensor, noise: torch.Tensor):
    """Sigmas drawn by `--weighting_scheme`, the noisy latents `(1 - sigma) x + sigma noise` and the loss weights.

    Returns:
        `(noisy, timesteps, sigmas, weighting)`; the target is `noise - latents`.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    u = compute_density_for_timestep_sampling(
        weighting_scheme=args.weighting_scheme,
        batch_size=latents.shape[0],
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
    )
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    return noisy, timesteps, sigmas, weighting


def predict(family: ModelFamily, denoiser, noisy, timesteps, cond: dict, time_ids=None, guidance_scale=None):
    """The denoiser's output for `noisy` latents `(B, C, H, W)`, in the same layout.

    `guidance_scale` is Flux's guidance embedding input: None for a model without one (`guidance_embeds=False`).
    """
    if family.name == "sd":
        return denoiser(noisy, timesteps, cond["encoder_hidden_states"], return_dict=False)[0]
    if family.name == "sdxl":
        added = {"text_embeds": cond["pooled"], "time_ids": time_ids.to(noisy.device, cond["pooled"].dtype)}
        return denoiser(noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False)[0]
    if family.name == "sd3":
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]
    from diffusers import FluxPipeline

    batch, channels, height, width = noisy.shape
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
    text_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    guidance = None  # a guidance-distilled Flux (Flux.1-dev) is told the guidance scale; Flux.1-schnell is not
    if guidance_scale is not None:
        guidance = torch.full((batch,), float(guidance_scale), device=noisy.device)
    packed = denoiser(
        hidden_states=FluxPipeline._pack_latents(noisy, batch, channels, height, width),
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=cond["pooled"],
        encoder_hidden_states=cond["encoder_hidden_states"],
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    # _unpack_latents takes pixel sizes: with vae_scale_factor 1 they are the latent sizes.
    return FluxPipeline._unpack_latents(packed, height, width, 1)
