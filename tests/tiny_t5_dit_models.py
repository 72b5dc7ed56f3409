"""Tiny DiT pipelines with CLIP and T5 text encoders (Flux.1, SD3) and a bare SD3 transformer, built from configs in
code, so that no test touches the Hub. The DiTs with a language model as text encoder are in `tiny_llm_dit_models`, the
UNet pipelines and shared helpers in `tiny_models`."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from tiny_models import CROSS_ATTENTION_DIM, tiny_text_config, tiny_text_encoder, tiny_tokenizer, tiny_vae
from transformers import CLIPTextModelWithProjection


T5_WIDTH = 32  # the T5 encoder's d_model: the DiTs' joint_attention_dim


def tiny_t5_tokenizer():
    """A SentencePiece-free T5 tokenizer built in memory: the special tokens, letters, digits and space pieces."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=32)


def tiny_t5_encoder(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        vocab_size=len(tiny_t5_tokenizer()),
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def tiny_dit_vae(seed: int) -> AutoencoderKL:
    """The DiTs' tiny VAE (Flux.1, SD3, Z-Image): they shift their latents before scaling them, so a non-zero
    `shift_factor` exercises that path."""
    return tiny_vae(seed, shift_factor=0.0609, scaling_factor=1.5035)


def tiny_flux_pipeline(seed: int = 0):
    """A whole FluxPipeline (32 px images, 16 px latents packed into 8x8 tokens) with random weights.

    `joint_attention_dim` is the T5 width and `pooled_projection_dim` the CLIP width, as in Flux.1.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CROSS_ATTENTION_DIM,
        axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_dit_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_t5_encoder(seed),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
    )


def tiny_sd3_pipeline(seed: int = 0):
    """A whole StableDiffusion3Pipeline (32 px images, 16 px latents): two CLIPs (their states padded to the T5
    width) and a T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=2,  # the last block is context_pre_only (no to_add_out): the first is a full joint block
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=2 * 8,  # the two CLIPs' projections side by side
        out_channels=4,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(tiny_text_config(projection_dim=8))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(projection_dim=8))
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_dit_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=tiny_t5_encoder(seed),
        tokenizer_3=tiny_t5_tokenizer(),
        transformer=transformer,
    )


def tiny_sd3_transformer(seed: int = 0):
    """A tiny DiT: `SD3Transformer2DModel` with one joint block (as in diffusers' own SD3 LoRA tests)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )


def sd3_transformer_inputs(seed: int = 0) -> dict:
    """Inputs for `tiny_sd3_transformer`: 8x8 latents, 5 text tokens, one timestep."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=generator),
        "pooled_projections": torch.randn(1, 64, generator=generator),
        "timestep": torch.tensor([10]),
    }
