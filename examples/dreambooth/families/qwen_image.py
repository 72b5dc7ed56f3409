"""Qwen-Image: a flow-matching DiT conditioned on a Qwen2.5-VL text encoder's states."""

from __future__ import annotations

import torch

from .base import (
    FlowMatchingFamily,
    text_only_pipeline,
)


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
