"""What every model family shares: the `ModelFamily` interface and its registry, the DDPM and flow-matching bases,
and the helpers the families use (component loading, token ids, the prompt cache)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ArgumentsError
from .precision import run_outside_autocast


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
    # Extra keyword arguments of the pipeline's __call__ wherever the script generates (validation, monitor, class
    # images), e.g. to keep an image at the asked --resolution.
    pipeline_call_kwargs: ClassVar[dict[str, Any]] = {}
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

    def text_encoder_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the frozen text encoders when the run's frozen weights are in `weight_dtype`."""
        return weight_dtype

    def cast_text_encoder(self, model, weight_dtype: torch.dtype) -> None:
        """Casts a frozen text encoder to `text_encoder_dtype(weight_dtype)`; in another dtype than `weight_dtype`,
        it also runs outside a mixed-precision autocast (validation's), which would run its matmuls in
        `weight_dtype` anyway."""
        dtype = self.text_encoder_dtype(weight_dtype)
        model.to(dtype=dtype)
        if dtype != weight_dtype:
            # as accelerate wraps a prepared model's forward in autocast
            run_outside_autocast(model, "forward", cast_inputs=False)

    def validation_autocast(self, weight_dtype: torch.dtype) -> bool:
        """Whether validation samples under autocast in the run's precision (`weight_dtype`): not when the text
        encoders run in another dtype (SANA's Gemma-2 in bfloat16 under fp16), whose prompt states the pipeline
        keeps and concatenates, which float16 autocast refuses for bfloat16 tensors; each component then runs in its
        own dtype, the trained denoiser under the autocast accelerate gives its forward."""
        return self.text_encoder_dtype(weight_dtype) == weight_dtype

    def cast_vae(self, vae, weight_dtype: torch.dtype, separate_vae: bool) -> torch.dtype:
        """Casts the frozen VAE to `vae_dtype(...)` and returns that dtype; kept in another dtype than `weight_dtype`
        (SDXL's own VAE and SANA's autoencoder in float32), it also encodes and decodes outside a mixed-precision
        autocast, which would run its convolutions in `weight_dtype` and overflow where float32 was chosen to avoid
        it, with floating inputs cast to its dtype as a pipeline outside autocast would need."""
        dtype = self.vae_dtype(vae, weight_dtype, separate_vae)
        vae.to(dtype=dtype)
        if dtype != weight_dtype:
            for method in ("encode", "decode"):
                run_outside_autocast(vae, method, cast_inputs=True)
        return dtype

    def cast_for_generation(self, pipeline, dtype: torch.dtype, separate_vae: bool = False) -> None:
        """Casts the components of a pipeline loaded in `dtype` (class images, the final validation) that the family
        keeps in other dtypes: its text encoders (`cast_text_encoder`) and its VAE (`cast_vae`)."""
        for name in self.text_encoders:
            self.cast_text_encoder(getattr(pipeline, name), dtype)
        self.cast_vae(pipeline.vae, dtype, separate_vae)

    def noise_scheduler_class(self):
        raise NotImplementedError

    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` as the family's VAE encodes them."""
        return pixels

    def encode_images(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of images (as `vae_input` gives them): the `(mean, std)` of the raw latents, whose
        sample `mean + std * noise` the denoiser learns from (after `to_latents`)."""
        posterior = vae.encode(pixels).latent_dist
        return posterior.mean, posterior.std

    def sample_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """A draw of the VAE posterior of images (raw latents, before `to_latents`), as diffusers'
        `latent_dist.sample()` draws it from the same random state."""
        mean, std = self.encode_images(vae, pixels)
        # randn, not randn_like: a convolution may leave the mean channels-last, and randn_like would follow that
        # layout (other values from the same seed).
        return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)

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


def load_component(path: str, model_index: dict, name: str, options: dict | None = None, **load):
    """Loads component `name` with the class `model_index.json` records for it (e.g. CLIPTextModelWithProjection).

    `load` holds the loading flags (`revision`, `variant`: named in the error message); `options` more keyword
    arguments of `from_pretrained` that are not flags (e.g. `quantization_config`, `dtype`).

    Raises:
        `ArgumentsError`: it cannot be loaded; the message names the flags to check, or says that quantising it (as
            `options` asked) failed.
    """
    import importlib

    library, class_name = model_index[name]
    cls = getattr(importlib.import_module(library), class_name)
    quantisation = (options or {}).get("quantization_config")
    # diffusers' quantisers refuse with a ValueError, RuntimeError ("No GPU found") or ImportError.
    refusals = (ValueError, RuntimeError, ImportError) if quantisation is not None else (ValueError,)
    try:
        return cls.from_pretrained(path, subfolder=name, **load, **(options or {}))
    except (OSError, *refusals) as error:  # missing files (e.g. of a variant), a bad revision, a broken download
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if quantisation is not None and not isinstance(error, OSError):  # the quantiser refused the load
            raise ArgumentsError(
                f"--pretrained_model_name_or_path={path!r}: quantising its {name} ({class_name}) while loading it "
                f"through diffusers' {type(quantisation).__name__} failed ({reason}); the run without "
                "--quantize_base loads it unquantised."
            ) from None
        flags = [f"--{key}={value!r}" for key, value in load.items() if value is not None]
        hint = f"check {', '.join(flags)} (the files they name may not exist)" if flags else "download it again"
        raise ArgumentsError(
            f"--pretrained_model_name_or_path={path!r}: cannot load its {name} ({class_name}: {reason}); {hint}."
        ) from None


def to_latents(vae, sample: torch.Tensor) -> torch.Tensor:
    """A VAE sample scaled for the denoiser: `(x - shift_factor) * scaling_factor` (SD's VAEs have no shift)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (sample - shift) * vae.config.scaling_factor


def token_ids(tokenizer, prompts: list[str], max_length: int, device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def clip_token_ids(tokenizers: list, prompts: list[str], device) -> list[torch.Tensor]:
    """Each CLIP tokenizer's ids, padded to its own `model_max_length` (77), as the pipelines do."""
    return [token_ids(tokenizer, prompts, tokenizer.model_max_length, device) for tokenizer in tokenizers]


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
        return {key: cat_padded([row[key] for row in rows]) for key in rows[0]}


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates along the batch, zero-padding the token dimension (dim 1) to the longest: families whose prompts
    are as long as their tokens (Qwen-Image) carry a mask, which the zeros extend."""
    if tensors[0].dim() < 2 or len({t.shape[1] for t in tensors}) == 1:
        return torch.cat(tensors)
    length = max(t.shape[1] for t in tensors)
    pads = [(0, 0) * (t.dim() - 2) + (0, length - t.shape[1]) for t in tensors]
    return torch.cat([torch.nn.functional.pad(t, pad) for t, pad in zip(tensors, pads)])


@functools.lru_cache(maxsize=2)
def text_only_pipeline(pipeline_cls, text_encoder, tokenizer):
    """A pipeline holding only the text encoder and tokenizer, to call diffusers' own `encode_prompt` with."""
    return pipeline_cls(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None)


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
        return text_encoders[-1](token_ids(tokenizers[-1], prompts, max_sequence_length, device))[0]
