"""Flux.1, Flux.2 [dev] and Flux.2 [klein]: flow-matching DiTs over packed 2x2 latent patches, told a guidance scale
when guidance-distilled."""

from __future__ import annotations

import torch

from .base import (
    FlowMatchingFamily,
    clip_token_ids,
)


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
        (ids,) = clip_token_ids(tokenizers[:1], prompts, device)
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


class Flux2Klein(Flux2):
    """Flux.2 [klein]: Flux.2's transformer and VAE with a Qwen3 text encoder (its hidden states at layers 9, 18 and 27
    of the chat-templated prompt, as `Flux2KleinPipeline` reads them; frozen) and no guidance embedding: the pipeline
    passes the transformer no guidance (the base models use classifier-free guidance, the distilled ones none)."""

    name = "flux2klein"
    label = "Flux.2 [klein]"
    pipeline_class = "Flux2KleinPipeline"
    class_name_prefixes = ("Flux2KleinPipeline",)

    def guidance_scale(self, denoiser, settings) -> float | None:
        return None  # as `Flux2KleinPipeline`, whatever the transformer's `guidance_embeds`

    def encode_prompts(self, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        from diffusers import Flux2KleinPipeline

        # The pipeline's own recipe with its defaults (layers 9, 18, 27), which validation and users' pipe(...) use.
        states = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoders[0],
            tokenizers[0],
            prompts,
            device=device,
            max_sequence_length=max_sequence_length or self.default_max_sequence_length,
        )
        return {"encoder_hidden_states": states}
