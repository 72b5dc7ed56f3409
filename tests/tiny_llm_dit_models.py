"""Tiny DiT pipelines with a language model as text encoder (Flux.2 [dev] and [klein], Qwen-Image, Z-Image, SANA),
built from configs in code with in-memory tokenizers, so that no test touches the Hub. The CLIP + T5 DiTs (Flux.1,
SD3) are in `tiny_t5_dit_models`, the UNet pipelines and shared helpers in `tiny_models`."""

from __future__ import annotations

import torch
from tiny_models import byte_level_codepoints
from tiny_t5_dit_models import tiny_dit_vae


def tiny_chat_tokenizer():
    """A character-level fast tokenizer with a chat template, built in memory: what Flux.2's and Z-Image's pipelines
    need of their tokenizer (message contents as a string or as a list of text parts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["<pad>", "<unk>", "<s>", "</s>", "[SYS]", "[USER]"] + [chr(c) for c in range(32, 127)]
    backend = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}[SYS]{% else %}[USER]{% endif %}"
        "{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{% endfor %}"
    )
    return tokenizer


def _flux2_transformer_and_vae(text_width: int, guidance_embeds: bool = True):
    """Flux.2's transformer (`joint_attention_dim` three text-encoder layers wide) and VAE, tiny."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_width,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=32,
    )
    return transformer, vae


def tiny_flux2_pipeline(seed: int = 0):
    """A whole Flux2Pipeline (32 px images, 16 px latents patchified to 8x8 tokens of 16 channels) with random weights.

    The Mistral-3 text encoder has 30 tiny layers, so that the pipeline's default hidden-state layers (10, 20, 30)
    exist; the transformer's `joint_attention_dim` is three times its width.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    text_config = dict(
        model_type="mistral",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
    )
    vision_config = dict(
        model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(text_config=text_config, vision_config={**vision_config, "head_dim": 8, "image_size": 32})
    )
    transformer, vae = _flux2_transformer_and_vae(text_width=16)
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_chat_tokenizer(),
        transformer=transformer,
    )


def tiny_qwen3_config(num_hidden_layers: int):
    """A Qwen3 text config 16 wide (Z-Image's and Flux.2 [klein]'s encoders), for `tiny_chat_tokenizer`'s ids."""
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
    )


def tiny_flux2_klein_pipeline(seed: int = 0):
    """A whole base (not step-distilled) Flux2KleinPipeline with random weights: Flux.2's tiny transformer without a
    guidance embedding and its VAE, a Qwen3 causal LM of 27 tiny layers, so that the pipeline's default hidden-state
    layers (9, 18, 27) exist, and a chat template that, like Qwen3's, adds the assistant's turn and an empty thinking
    block when asked to."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(tiny_qwen3_config(num_hidden_layers=27))
    tokenizer = tiny_chat_tokenizer()
    tokenizer.chat_template += (
        "{% if add_generation_prompt %}[ASSISTANT]{% if enable_thinking is defined and not enable_thinking %}"
        "<think></think>{% endif %}{% endif %}"
    )
    transformer, vae = _flux2_transformer_and_vae(text_width=16, guidance_embeds=False)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def tiny_qwen2_tokenizer():
    """A byte-level Qwen2 tokenizer built in memory: the 256 bytes and Qwen's chat special tokens, no merges."""
    from transformers import Qwen2Tokenizer

    vocab = {chr(code): i for i, code in enumerate(byte_level_codepoints())}
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", eos_token="<|im_end|>", bos_token=None)


def tiny_qwenimage_pipeline(seed: int = 0):
    """A whole QwenImagePipeline (32 px images, 16 px latents packed into 8x8 tokens) with random weights.

    The Qwen2.5-VL text encoder's rope `mrope_section` sums to half its head size; the VAE has one spatial
    downsampling and no temporal one.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = tiny_qwen2_tokenizer()
    text_config = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
    )
    vision_config = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=16,
        patch_size=8,
        spatial_merge_size=1,
        temporal_patch_size=1,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config)
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def tiny_zimage_pipeline(seed: int = 0):
    """A whole ZImagePipeline (32 px images, 16 px latents patched 2x2) with random weights: a tiny Qwen3 text
    encoder, the DiTs' shifted VAE, a static-shift flow-matching scheduler as Z-Image's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    text_encoder = Qwen3Model(tiny_qwen3_config(num_hidden_layers=2))
    transformer = ZImageTransformer2DModel(
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 32, 32],  # caption positions come first: room for a 512-token prompt
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_dit_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tiny_chat_tokenizer(),
        transformer=transformer,
    )


def tiny_sana_pipeline(seed: int = 0):
    """A whole SanaPipeline (32 px images, 16 px latents) with random weights: a tiny Gemma-2 text encoder (room for
    the pipeline's ~1,100-token complex human instruction in the character-level tokenizer), a two-block
    AutoencoderDC (downsampling by 2, not SANA's 32), a one-layer SanaTransformer2DModel, a flow-matching scheduler."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=128,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=2048,
        )
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        scaling_factor=0.41407,
    )
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        sample_size=16,
    )
    return SanaPipeline(
        tokenizer=tiny_chat_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
