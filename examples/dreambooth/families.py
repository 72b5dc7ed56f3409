"""The model families the DreamBooth script trains: what differs between SD 1.x/2.x, SDXL, SD3 and Flux.1.

A family is told by the pipeline's `model_index.json` (`_class_name`), as diffusers' own loaders tell it. It fixes
which components are loaded (by the classes `model_index.json` names), which text encoders may carry a Bayesian
adapter (the CLIP ones; T5 stays frozen, as in diffusers' scripts), how prompts become conditioning, how latents
are noised (DDPM noise prediction, or flow matching for the DiTs) and what the denoiser is asked to predict.

Adding a family is adding one subclass of `DDPMFamily` or `FlowMatchingFamily` with a `name`: it registers itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import ArgumentsError


FAMILIES: dict[str, ModelFamily] = {}


@dataclass
class NoisedLatents:
    """One batch's denoiser inputs and what the loss compares its output with."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    sigmas: torch.Tensor | None = None  # flow matching: the noise level of each example, (B, 1, 1, 1)
    weighting: torch.Tensor | None = None  # flow matching: the loss weight of each example


class ModelFamily:
    """What the training script needs to know about one kind of pipeline; subclasses fill in the class attributes."""

    name: ClassVar[str]  # a short id, e.g. "sdxl"
    label: ClassVar[str]  # the family as messages name it, e.g. "SDXL"
    pipeline_class: ClassVar[str]  # the diffusers pipeline, e.g. "StableDiffusionXLPipeline"
    class_name_prefixes: ClassVar[tuple[str, ...]]  # `_class_name`s of model_index.json that belong to the family
    excluded_prefixes: ClassVar[tuple[str, ...]] = ()  # ... except these
    denoiser: ClassVar[str]  # "unet" or "transformer"
    text_encoders: ClassVar[tuple[str, ...]]  # the pipeline's text encoders, in the order the prompts use them
    trainable_text_encoders: ClassVar[tuple[str, ...]]  # those that may carry a Bayesian adapter
    default_targets: ClassVar[str]  # the denoiser's LoRA targets, as diffusers' DreamBooth LoRA scripts choose them
    flow_matching: ClassVar[bool]
    resolution_multiple: ClassVar[int] = 8  # the VAE downsamples by 8
    default_max_sequence_length: ClassVar[int | None] = None  # T5 tokens of a prompt
    default_weighting_scheme: ClassVar[str | None] = None
    writes_kohya_layout: ClassVar[bool] = False  # --output_kohya_format
    accepts_precondition_outputs: ClassVar[bool] = False  # --precondition_outputs
    other_kind: ClassVar[str]  # the models that the flags of `refused_flags` apply to, as messages name them
    target_modules_flag: ClassVar[str]  # the flag of the denoiser's LoRA targets

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete family
            FAMILIES[cls.name] = cls()

    def matches(self, class_name: str) -> int:
        """How well `class_name` matches the family: the length of its longest matching prefix, 0 for none."""
        if class_name.startswith(self.excluded_prefixes):
            return 0
        return max((len(prefix) for prefix in self.class_name_prefixes if class_name.startswith(prefix)), default=0)

    def denoiser_targets(self, settings) -> str:
        """The denoiser's comma-separated LoRA targets, from `target_modules_flag` or the family's default."""
        raise NotImplementedError

    def tokenizer_of(self, text_encoder: str) -> str:
        return text_encoder.replace("text_encoder", "tokenizer")

    def resolved_defaults(self, settings) -> dict[str, Any]:
        """The settings whose default depends on the family, filled in where the command line left them unset."""
        return {}

    def refused_flags(self, settings) -> list[str]:
        """The given flags that do not apply to this family."""
        return []

    def vae_dtype(self, vae, weight_dtype: torch.dtype, separate_vae: bool) -> torch.dtype:
        return weight_dtype

    def noise_scheduler_class(self):
        raise NotImplementedError

    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` as the family's VAE encodes them."""
        return pixels

    def to_latents(self, vae, sample: torch.Tensor) -> torch.Tensor:
        """A VAE sample as the denoiser's latents `(B, C, H, W)` (scaled, and for some families patchified)."""
        return to_latents(vae, sample)

    def guidance_scale(self, denoiser, settings) -> float | None:
        """The guidance scale the denoiser is told while training (guidance-distilled models), or None."""
        return None

    def encode_prompts(
        self, text_encoders: list, tokenizers: list, prompts: list[str], device, max_sequence_length=None
    ) -> dict[str, torch.Tensor]:
        """The conditioning of `prompts`, as the family's pipeline computes it for its denoiser.

        Returns:
            `dict`: `encoder_hidden_states`, and `pooled` (SDXL's `text_embeds`, the DiTs' `pooled_projections`)
            except for SD 1.x/2.x.
        """
        raise NotImplementedError

    def noised_latents(self, settings, scheduler, latents: torch.Tensor, noise: torch.Tensor) -> NoisedLatents:
        """Noises `latents` with `noise` at random timesteps; what the denoiser sees and what its output is compared
        with (before `loss_inputs`)."""
        raise NotImplementedError

    def predict(self, denoiser, noisy, timesteps, cond: dict, time_ids=None, guidance_scale=None) -> torch.Tensor:
        """The denoiser's output for `noisy` latents `(B, C, H, W)`, in the same layout."""
        raise NotImplementedError

    def loss_inputs(self, settings, prediction, batch: NoisedLatents, latents) -> tuple[torch.Tensor, torch.Tensor]:
        """`(prediction, target)` as the loss compares them."""
        return prediction, batch.target


def family_of_class_name(class_name: str) -> ModelFamily | None:
    """The family of a pipeline class name from `model_index.json`, or None if the script does not train it."""
    score, family = max(((f.matches(class_name), f) for f in FAMILIES.values()), key=lambda pair: pair[0])
    return family if score else None


def read_model_index(path: str, revision: str | None = None) -> dict:
    """The pipeline's `model_index.json` (a local folder's, or downloaded from the Hub): no weights are read."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(path, revision=revision))


def load_component(path: str, model_index: dict, name: str, **load):
    """Loads component `name` with the class `model_index.json` records for it (e.g. CLIPTextModelWithProjection).

    Raises:
        `ArgumentsError`: it cannot be loaded; the message names the flags to check.
    """
    import importlib

    library, class_name = model_index[name]
    cls = getattr(importlib.import_module(library), class_name)
    try:
        return cls.from_pretrained(path, subfolder=name, **load)
    except (OSError, ValueError) as error:  # missing files (e.g. of a variant), a bad revision, a broken download
        flags = [f"--{key}={value!r}" for key, value in load.items() if value is not None]
        hint = f"check {', '.join(flags)} (the files they name may not exist)" if flags else "download it again"
        raise ArgumentsError(
            f"--pretrained_model_name_or_path={path!r}: cannot load its {name} ({class_name}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); {hint}."
        ) from None


def to_latents(vae, sample: torch.Tensor) -> torch.Tensor:
    """A VAE sample scaled for the denoiser: `(x - shift_factor) * scaling_factor` (SD's VAEs have no shift)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (sample - shift) * vae.config.scaling_factor


def _token_ids(tokenizer, prompts: list[str], max_length: int, device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def _clip_token_ids(tokenizers: list, prompts: list[str], device) -> list[torch.Tensor]:
    """Each CLIP tokenizer's ids, padded to its own `model_max_length` (77), as the pipelines do."""
    return [_token_ids(tokenizer, prompts, tokenizer.model_max_length, device) for tokenizer in tokenizers]


class PromptCache:
    """Conditioning computed once per distinct prompt, for frozen text encoders (diffusers' precomputed embeddings)."""

    def __init__(self, family: ModelFamily, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        self.entries: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for prompt in dict.fromkeys(prompts):
                encoded = family.encode_prompts(text_encoders, tokenizers, [prompt], device, max_sequence_length)
                self.entries[prompt] = encoded

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        rows = [self.entries[prompt] for prompt in prompts]
        return {key: _cat_padded([row[key] for row in rows]) for key in rows[0]}


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates along the batch, zero-padding the token dimension (dim 1) to the longest: families whose prompts
    are as long as their tokens (Qwen-Image) carry a mask, which the zeros extend."""
    if tensors[0].dim() < 2 or len({t.shape[1] for t in tensors}) == 1:
        return torch.cat(tensors)
    length = max(t.shape[1] for t in tensors)
    pads = [(0, 0) * (t.dim() - 2) + (0, length - t.shape[1]) for t in tensors]
    return torch.cat([torch.nn.functional.pad(t, pad) for t, pad in zip(tensors, pads)])


# --- DDPM UNets ---------------------------------------------------------------------------------------------------


class DDPMFamily(ModelFamily):
    """UNets trained by noise (or v) prediction at DDPM timesteps."""

    denoiser = "unet"
    default_targets = "to_k,to_q,to_v,to_out.0"
    flow_matching = False
    writes_kohya_layout = True
    other_kind = "flow-matching models (SD3, Flux)"
    target_modules_flag = "--unet_target_modules"

    def denoiser_targets(self, settings) -> str:
        return settings.unet_target_modules

    def refused_flags(self, settings) -> list[str]:
        given = {
            "--weighting_scheme": settings.weighting_scheme is not None,
            "--max_sequence_length": settings.max_sequence_length is not None,
            "--transformer_target_modules": settings.transformer_target_modules is not None,
        }
        return [flag for flag, present in given.items() if present]

    def noise_scheduler_class(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler

    def noised_latents(self, settings, scheduler, latents, noise) -> NoisedLatents:
        if settings.noise_offset:
            offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
            noise = noise + settings.noise_offset * offset.to(noise.dtype)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        ).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return NoisedLatents(noisy, timesteps, target)


class StableDiffusion(DDPMFamily):
    name = "sd"
    label = "SD 1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"
    class_name_prefixes = ("StableDiffusion",)
    text_encoders = ("text_encoder",)
    trainable_text_encoders = ("text_encoder",)

    def encode_prompts(self, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        (ids,) = _clip_token_ids(tokenizers, prompts, device)
        return {"encoder_hidden_states": text_encoders[0](ids)[0]}

    def predict(self, denoiser, noisy, timesteps, cond, time_ids=None, guidance_scale=None):
        return denoiser(noisy, timesteps, cond["encoder_hidden_states"], return_dict=False)[0]


class StableDiffusionXL(DDPMFamily):
    name = "sdxl"
    label = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    class_name_prefixes = ("StableDiffusionXL",)
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")

    def vae_dtype(self, vae, weight_dtype, separate_vae):
        # SDXL's own VAE overflows in fp16 (force_upcast): keep it in fp32 unless a separate (fp16-safe) VAE is given.
        upcast = getattr(vae.config, "force_upcast", False) and not separate_vae
        return torch.float32 if upcast else weight_dtype

    def encode_prompts(self, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        ids = _clip_token_ids(tokenizers, prompts, device)
        outputs = [encoder(i, output_hidden_states=True) for encoder, i in zip(text_encoders, ids)]
        # The projected pooled embedding of the last (CLIPTextModelWithProjection) encoder; penultimate states.
        states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        return {"encoder_hidden_states": states, "pooled": outputs[-1][0]}

    def predict(self, denoiser, noisy, timesteps, cond, time_ids=None, guidance_scale=None):
        added = {"text_embeds": cond["pooled"], "time_ids": time_ids.to(noisy.device, cond["pooled"].dtype)}
        return denoiser(noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False)[0]


# --- flow-matching DiTs -------------------------------------------------------------------------------------------


class FlowMatchingFamily(ModelFamily):
    """Transformers trained by flow matching, the sigmas drawn by `--weighting_scheme`, as diffusers' scripts."""

    denoiser = "transformer"
    flow_matching = True
    other_kind = "DDPM models (SD 1.x/2.x, SDXL)"
    target_modules_flag = "--transformer_target_modules"

    def denoiser_targets(self, settings) -> str:
        return settings.transformer_target_modules or self.default_targets

    def resolved_defaults(self, settings) -> dict[str, Any]:
        return {
            "weighting_scheme": settings.weighting_scheme or self.default_weighting_scheme,
            "max_sequence_length": settings.max_sequence_length or self.default_max_sequence_length,
        }

    def refused_flags(self, settings) -> list[str]:
        given = {
            "--snr_gamma": settings.snr_gamma is not None,
            "--noise_offset": bool(settings.noise_offset),
            "--kl_weight elbo": settings.kl_weight == "elbo",  # 2 / (D * T) is derived for DDPM's T-step ELBO
        }
        return [flag for flag, present in given.items() if present]

    def noise_scheduler_class(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    def noised_latents(self, settings, scheduler, latents, noise) -> NoisedLatents:
        """Sigmas drawn by `--weighting_scheme`, the noisy latents `(1 - sigma) x + sigma noise`, the loss weights;
        the target is `noise - latents`."""
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        u = compute_density_for_timestep_sampling(
            weighting_scheme=settings.weighting_scheme,
            batch_size=latents.shape[0],
            logit_mean=settings.logit_mean,
            logit_std=settings.logit_std,
            mode_scale=settings.mode_scale,
        )
        indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
        timesteps = scheduler.timesteps[indices].to(latents.device)
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=settings.weighting_scheme, sigmas=sigmas)
        return NoisedLatents(noisy, timesteps, noise - latents, sigmas, weighting)

    def _t5_states(self, text_encoders, tokenizers, prompts, device, max_sequence_length) -> torch.Tensor:
        """The last text encoder's (T5's) states, its prompt tokenised to `max_sequence_length` tokens."""
        return text_encoders[-1](_token_ids(tokenizers[-1], prompts, max_sequence_length, device))[0]


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    label = "SD3"
    pipeline_class = "StableDiffusion3Pipeline"
    class_name_prefixes = ("StableDiffusion3",)
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    default_targets = (
        "attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,attn.to_k,attn.to_out.0,attn.to_q,attn.to_v"
    )
    default_max_sequence_length = 77
    default_weighting_scheme = "logit_normal"
    accepts_precondition_outputs = True

    def resolved_defaults(self, settings) -> dict[str, Any]:
        precondition = 1 if settings.precondition_outputs is None else settings.precondition_outputs
        return {**super().resolved_defaults(settings), "precondition_outputs": precondition}

    def encode_prompts(self, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        t5_states = self._t5_states(text_encoders, tokenizers, prompts, device, max_sequence_length)
        # Both CLIPs' penultimate states side by side, padded to the T5 width, before the T5 tokens.
        ids = _clip_token_ids(tokenizers[:2], prompts, device)
        outputs = [encoder(i, output_hidden_states=True) for encoder, i in zip(text_encoders[:2], ids)]
        clip_states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        pooled = torch.cat([output[0] for output in outputs], dim=-1)
        return {
            "encoder_hidden_states": torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2),
            "pooled": pooled,
        }

    def predict(self, denoiser, noisy, timesteps, cond, time_ids=None, guidance_scale=None):
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]

    def loss_inputs(self, settings, prediction, batch, latents):
        if settings.precondition_outputs:  # EDM preconditioning: the loss compares the predicted clean latents
            return prediction * (-batch.sigmas) + batch.noisy, latents
        return prediction, batch.target


class Flux(FlowMatchingFamily):
    name = "flux"
    label = "Flux.1"
    pipeline_class = "FluxPipeline"
    class_name_prefixes = ("Flux",)
    excluded_prefixes = ("Flux2",)
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder",)
    default_targets = (
        "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,"
        "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"
    )
    resolution_multiple = 16  # the VAE downsamples by 8, and the transformer packs 2x2 latent patches
    default_max_sequence_length = 512
    default_weighting_scheme = "none"

    def guidance_scale(self, denoiser, settings) -> float | None:
        # Flux.1-dev is guidance-distilled: it is told a guidance scale; Flux.1-schnell is not.
        return settings.guidance_scale if denoiser.config.guidance_embeds else None

    def encode_prompts(self, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        t5_states = self._t5_states(text_encoders, tokenizers, prompts, device, max_sequence_length)
        (ids,) = _clip_token_ids(tokenizers[:1], prompts, device)
        return {"encoder_hidden_states": t5_states, "pooled": text_encoders[0](ids).pooler_output}

    def predict(self, denoiser, noisy, timesteps, cond, time_ids=None, guidance_scale=None):
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
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


class Flux2(FlowMatchingFamily):
    """Flux.2 [dev]: one Mistral-3 text encoder (its hidden states at three layers, frozen), latents patchified 2x2
    and normalised by the VAE's batch-norm statistics, 4-D position ids, a guidance embedding."""

    name = "flux2"
    label = "Flux.2"
    pipeline_class = "Flux2Pipeline"
    class_name_prefixes = ("Flux2Pipeline", "Flux2Img2ImgPipeline")
    text_encoders = ("text_encoder",)
    trainable_text_encoders = ()  # a 24B-parameter LLM: it stays frozen
    default_targets = (
        "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,"
        "attn.to_qkv_mlp_proj"
    )
    resolution_multiple = 16  # the VAE downsamples by 8, and the latents are patchified 2x2
    default_max_sequence_length = 512
    default_weighting_scheme = "none"

    def guidance_scale(self, denoiser, settings) -> float | None:
        return settings.guidance_scale if denoiser.config.guidance_embeds else None

    def to_latents(self, vae, sample: torch.Tensor) -> torch.Tensor:
        """As `Flux2Pipeline` encodes an image: patchified 2x2, then normalised by the VAE's `bn` running statistics."""
        from diffusers import Flux2Pipeline

        latents = Flux2Pipeline._patchify_latents(sample)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        return (latents - mean) / std

    def encode_prompts(self, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        from diffusers import Flux2Pipeline

        states = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            text_encoders[0], tokenizers[0], prompts, device=device, max_sequence_length=max_sequence_length
        )
        return {"encoder_hidden_states": states}

    def predict(self, denoiser, noisy, timesteps, cond, time_ids=None, guidance_scale=None):
        from diffusers import Flux2Pipeline

        batch, channels, height, width = noisy.shape
        guidance = None
        if guidance_scale is not None:
            guidance = torch.full((batch,), float(guidance_scale), device=noisy.device)
        tokens = denoiser(
            hidden_states=Flux2Pipeline._pack_latents(noisy),
            timestep=timesteps / 1000,
            guidance=guidance,
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=Flux2Pipeline._prepare_text_ids(cond["encoder_hidden_states"]).to(noisy.device),
            img_ids=Flux2Pipeline._prepare_latent_ids(noisy).to(noisy.device),
            return_dict=False,
        )[0]
        # The tokens are in row-major order of the latent grid (`_prepare_latent_ids`): back to (B, C, H, W).
        return tokens.permute(0, 2, 1).reshape(batch, channels, height, width)


@functools.lru_cache(maxsize=2)
def text_only_pipeline(pipeline_cls, text_encoder, tokenizer):
    """A pipeline holding only the text encoder and tokenizer, to call diffusers' own `encode_prompt` with."""
    return pipeline_cls(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None)


class QwenImage(FlowMatchingFamily):
    """Qwen-Image: a Qwen2.5-VL text encoder (its last hidden states without the prompt template's system tokens,
    frozen, with an attention mask), a video VAE used on one frame and normalised by its per-channel latent mean and
    std, latents packed 2x2 by the transformer's own patching, RoPE positions from the image shapes."""

    name = "qwenimage"
    label = "Qwen-Image"
    pipeline_class = "QwenImagePipeline"
    class_name_prefixes = ("QwenImagePipeline", "QwenImageImg2ImgPipeline")
    text_encoders = ("text_encoder",)
    trainable_text_encoders = ()  # a 7B-parameter vision-language model: it stays frozen
    default_targets = (
        "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out"
    )
    resolution_multiple = 16  # the VAE downsamples by 8, and the latents are packed 2x2
    default_max_sequence_length = 512
    default_weighting_scheme = "none"

    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.unsqueeze(2)  # one frame of the video VAE

    def to_latents(self, vae, sample: torch.Tensor) -> torch.Tensor:
        """As the pipeline decodes, inverted: `(x - latents_mean) / latents_std` per channel, the frame dropped."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(sample.device, sample.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(sample.device, sample.dtype)
        return ((sample - mean) / std)[:, :, 0]

    def encode_prompts(self, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        from diffusers import QwenImagePipeline

        # diffusers' own prompt encoding (template, dropped system tokens, mask).
        pipeline = text_only_pipeline(QwenImagePipeline, text_encoders[0], tokenizers[0])
        states, mask = pipeline.encode_prompt(
            prompts, device=device, max_sequence_length=max_sequence_length or self.default_max_sequence_length
        )
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        return {"encoder_hidden_states": states, "mask": mask}

    def predict(self, denoiser, noisy, timesteps, cond, time_ids=None, guidance_scale=None):
        from diffusers import QwenImagePipeline

        batch, channels, height, width = noisy.shape
        mask = cond["mask"]
        tokens = denoiser(
            hidden_states=QwenImagePipeline._pack_latents(noisy, batch, channels, height, width),
            timestep=timesteps / 1000,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        # _unpack_latents takes pixel sizes: with vae_scale_factor 1 they are the latent sizes.
        return QwenImagePipeline._unpack_latents(tokens, height, width, 1)[:, :, 0]


class ZImage(FlowMatchingFamily):
    """Z-Image: a Qwen3 text encoder (its second-to-last hidden states of the prompt's tokens, frozen), the
    transformer taking lists of per-image latents `(C, 1, H, W)` and of prompt states, the time as `1 - sigma`, and
    predicting the negated velocity."""

    name = "zimage"
    label = "Z-Image"
    pipeline_class = "ZImagePipeline"
    class_name_prefixes = ("ZImagePipeline", "ZImageImg2ImgPipeline")
    text_encoders = ("text_encoder",)
    trainable_text_encoders = ()  # a 4B-parameter language model: it stays frozen
    default_targets = "attention.to_q,attention.to_k,attention.to_v,attention.to_out.0"
    resolution_multiple = 16  # the VAE downsamples by 8, and the transformer patches 2x2
    default_max_sequence_length = 512
    default_weighting_scheme = "none"

    def encode_prompts(self, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        from diffusers import ZImagePipeline

        pipeline = text_only_pipeline(ZImagePipeline, text_encoders[0], tokenizers[0])
        states, _ = pipeline.encode_prompt(
            list(prompts),
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length or self.default_max_sequence_length,
        )
        # One tensor per prompt, as long as its tokens: padded into a batch with a mask (`PromptCache` pads too).
        lengths = torch.tensor([len(s) for s in states], device=states[0].device)
        padded = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
        mask = (torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None]).long()
        return {"encoder_hidden_states": padded, "mask": mask}

    def predict(self, denoiser, noisy, timesteps, cond, time_ids=None, guidance_scale=None):
        states, mask = cond["encoder_hidden_states"], cond["mask"].bool()
        outputs = denoiser(
            list(noisy.unsqueeze(2).unbind(0)),
            (1000 - timesteps) / 1000,  # the pipeline's time: 1 - sigma
            [state[keep] for state, keep in zip(states, mask)],
            return_dict=False,
        )[0]
        return -torch.stack(outputs).squeeze(2)  # the transformer predicts the negated velocity
