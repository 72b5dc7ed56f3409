"""SANA: a flow-matching linear DiT over a deep-compression autoencoder, conditioned on a Gemma-2 text encoder."""

from __future__ import annotations

import functools
import inspect

import torch

from .base import (
    FlowMatchingFamily,
    text_only_pipeline,
)


@functools.cache
def complex_human_instruction() -> tuple[str, ...]:
    """The instruction `SanaPipeline.__call__` puts before every prompt by default (its `complex_human_instruction`
    argument's default), read from the installed diffusers."""
    from diffusers import SanaPipeline

    return tuple(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class Sana(FlowMatchingFamily):
    """SANA: a Gemma-2 text encoder (its last hidden states of the prompt's tokens, with a mask, frozen), whose
    prompts carry the pipeline's complex human instruction as at inference; a deterministic deep-compression
    autoencoder (AutoencoderDC: a latent, no posterior to sample); the timestep as the pipeline passes it (not divided
    by 1000); the transformer predicts the velocity."""

    name = "sana"
    label = "SANA"
    pipeline_class = "SanaPipeline"
    class_name_prefixes = ("SanaPipeline",)
    text_encoders = ("text_encoder",)
    trainable_text_encoders = ()  # a 2B-parameter language model: it stays frozen
    default_targets = "to_k,to_q,to_v"  # as diffusers' train_dreambooth_lora_sana.py
    resolution_multiple = 32  # the autoencoder downsamples by 32
    default_max_sequence_length = 300  # the pipeline's default
    default_weighting_scheme = "none"
    # By default the pipeline generates at the nearest size of its aspect-ratio table for the model's native
    # resolution (1024 px for most) and resizes the image to the asked size: validation would not see the model at
    # the --resolution it trains at.
    pipeline_call_kwargs = {"use_resolution_binning": False}

    def vae_dtype(self, vae, weight_dtype, separate_vae):
        return torch.float32  # as diffusers' train_dreambooth_lora_sana.py keeps the deep-compression autoencoder

    def text_encoder_dtype(self, weight_dtype):
        # Gemma-2's activations overflow in float16: diffusers' SANA script and pipeline examples run it in bfloat16.
        return torch.bfloat16 if weight_dtype == torch.float16 else weight_dtype

    def encode_images(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = vae.encode(pixels).latent
        return latent, torch.zeros_like(latent)

    def encode_prompts(self, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        from diffusers import SanaPipeline

        pipeline = text_only_pipeline(SanaPipeline, text_encoders[0], tokenizers[0])
        states, masks = [], []
        for prompt in prompts:
            # The pipeline puts its instruction before a prompt but not before the empty negative prompt of
            # classifier-free guidance: so here, so that caption dropout's "" is the unconditional input it sees.
            state, mask, _, _ = pipeline.encode_prompt(
                prompt,
                do_classifier_free_guidance=False,
                device=device,
                max_sequence_length=max_sequence_length or self.default_max_sequence_length,
                complex_human_instruction=list(complex_human_instruction()) if prompt else None,
            )
            states.append(state)
            masks.append(mask)
        return {"encoder_hidden_states": torch.cat(states), "mask": torch.cat(masks)}

    def predict(self, denoiser, noisy, timesteps, cond, time_ids=None, guidance_scale=None):
        prediction = denoiser(
            noisy,
            # As the pipeline casts them: the text encoder may run in another dtype (`text_encoder_dtype`).
            encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
            encoder_attention_mask=cond["mask"],
            timestep=timesteps * getattr(denoiser, "module", denoiser).config.timestep_scale,  # DDP wraps it
            return_dict=False,
        )[0]
        if prediction.shape[1] == 2 * noisy.shape[1]:  # a learned variance in the second half, as the pipeline drops
            prediction = prediction[:, : noisy.shape[1]]
        return prediction
