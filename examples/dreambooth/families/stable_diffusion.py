"""Stable Diffusion: 1.x/2.x and SDXL (UNets, DDPM), SD3/3.5 (a DiT, flow matching)."""

from __future__ import annotations

from typing import Any

import torch

from .base import (
    DDPMFamily,
    FlowMatchingFamily,
    clip_token_ids,
)


class StableDiffusion(DDPMFamily):
    name = "sd"
    label = "SD 1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"
    class_name_prefixes = ("StableDiffusion",)
    text_encoders = ("text_encoder",)
    trainable_text_encoders = ("text_encoder",)

    def encode_prompts(self, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        (ids,) = clip_token_ids(tokenizers, prompts, device)
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
        ids = clip_token_ids(tokenizers, prompts, device)
        outputs = [encoder(i, output_hidden_states=True) for encoder, i in zip(text_encoders, ids)]
        # The projected pooled embedding of the last (CLIPTextModelWithProjection) encoder; penultimate states.
        states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        return {"encoder_hidden_states": states, "pooled": outputs[-1][0]}

    def predict(self, denoiser, noisy, timesteps, cond, time_ids=None, guidance_scale=None):
        added = {"text_embeds": cond["pooled"], "time_ids": time_ids.to(noisy.device, cond["pooled"].dtype)}
        return denoiser(noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False)[0]


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
        ids = clip_token_ids(tokenizers[:2], prompts, device)
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
