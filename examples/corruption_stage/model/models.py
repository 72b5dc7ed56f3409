"""The lab's latent diffusion model: a tiny ``AutoencoderKL``, a condition embedding and a ``UNet2DConditionModel``.

The UNet has Stable Diffusion's layer names (``to_q``/``to_k``/``to_v``/``to_out.0`` in self- and cross-attention,
``conv1``/``conv2`` in the resnets), so LoRA targets the same modules as on SD. Sizes are chosen for a laptop CPU:
32x32 RGB images, 8x8x4 latents (4x spatial downsampling, 12x fewer numbers, as in SD).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from . import data


@dataclass
class LabModelConfig:
    image_size: int = 32
    latent_channels: int = 4
    ae_channels: tuple[int, ...] = (16, 32, 64)
    unet_channels: tuple[int, ...] = (32, 64)
    cond_dim: int = 64
    cond_len: int = 4
    num_train_timesteps: int = 1000
    extra_tokens: int = 0  # lab v2: data.V2_EXTRA_TOKENS (class and photo tokens)
    # What the UNet predicts: "epsilon" (v1, v2) or "v_prediction" (v2b, PLAN_V2.md: an epsilon model's clean-latent
    # estimate at the first sampling step is 1 / sqrt(alpha_bar) = 16x its noise error, and fine-tuning never fixes it)
    prediction_type: str = "epsilon"
    # Lab v2d (PLAN_V2.md): the condition also reaches every resnet through the time embedding, pooled as SD XL's and
    # Kandinsky's text embeddings are (diffusers' ``addition_embed_type="text"``); cross-attention alone left v2-v2c
    # drawing nearly the same blob for every kind
    pooled_condition: bool = False

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.ae_channels) - 1)


# Condition sequence: [START, token, END, END]; two extra ids beyond the data's tokens.
START_TOKEN = data.NUM_TOKENS
END_TOKEN = data.NUM_TOKENS + 1
VOCAB = data.NUM_TOKENS + 2


class ConditionEmbedding(torch.nn.Module):
    """A token id -> a short sequence of embeddings (the lab's stand-in for a text encoder)."""

    def __init__(self, dim: int, length: int, extra_tokens: int = 0):
        super().__init__()
        self.length = length
        self.tokens = torch.nn.Embedding(VOCAB + extra_tokens, dim)
        self.positions = torch.nn.Parameter(torch.randn(length, dim) * 0.02)
        torch.nn.init.normal_(self.tokens.weight, std=1.0)

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """``token``: ``(B,)`` ids, or ``(B, k)`` for a k-token prompt (lab v2's "sks cross"), k < length."""
        tokens = token[:, None] if token.dim() == 1 else token
        if tokens.shape[1] >= self.length:
            raise ValueError(f"a prompt holds at most {self.length - 1} tokens, got {tokens.shape[1]}")
        ids = torch.full((token.shape[0], self.length), END_TOKEN, dtype=torch.long, device=token.device)
        ids[:, 0] = START_TOKEN
        ids[:, 1 : 1 + tokens.shape[1]] = tokens
        return self.tokens(ids) + self.positions


def build_autoencoder(cfg: LabModelConfig) -> AutoencoderKL:
    n = len(cfg.ae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.ae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=16,
        sample_size=cfg.image_size,
    )


def build_unet(cfg: LabModelConfig) -> UNet2DConditionModel:
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cfg.cond_dim,
        attention_head_dim=4,
        norm_num_groups=16,
        addition_embed_type="text" if cfg.pooled_condition else None,
        addition_embed_type_num_heads=4,
    )


def add_pooled_condition(model: LabModel) -> LabModel:
    """``model`` with a pooled-condition path added to its denoiser's time embedding (``pooled_condition``), every
    other weight kept. The path's last LayerNorm gain starts at zero, so the new model's output equals the old one's
    until training moves it (a zero projection instead would sit under a LayerNorm of a zero vector, whose gradient
    is 1 / sqrt(eps))."""
    if model.cfg.pooled_condition:
        raise ValueError("the model's denoiser already takes the pooled condition")
    cfg = replace(model.cfg, pooled_condition=True)
    unet = build_unet(cfg)
    result = unet.load_state_dict(model.unet.state_dict(), strict=False)
    if result.unexpected_keys or any(not k.startswith("add_embedding.") for k in result.missing_keys):
        raise ValueError(f"denoiser weights do not match the lab's UNet: {result}")
    torch.nn.init.zeros_(unet.add_embedding.norm2.weight)
    unet.train(model.unet.training)
    unet.requires_grad_(any(p.requires_grad for p in model.unet.parameters()))
    return LabModel(cfg, model.vae, model.cond, unet, model.latent_scale)


def build_scheduler(cfg: LabModelConfig) -> DDIMScheduler:
    # Cosine ("squaredcos_cap_v2") schedule, SD-style DDIM settings; epsilon or v prediction as the model was trained.
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=cfg.prediction_type,
    )


@dataclass
class LabModel:
    cfg: LabModelConfig
    vae: AutoencoderKL
    cond: ConditionEmbedding
    unet: UNet2DConditionModel
    latent_scale: float = 1.0  # latents fed to the UNet are vae_mean * latent_scale (unit variance)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.latent_scale).sample.clamp(-1, 1)


def new_model(cfg: LabModelConfig | None = None, seed: int = 0) -> LabModel:
    cfg = cfg or LabModelConfig()
    torch.manual_seed(seed)
    return LabModel(
        cfg, build_autoencoder(cfg), ConditionEmbedding(cfg.cond_dim, cfg.cond_len, cfg.extra_tokens), build_unet(cfg)
    )


WEIGHTS_FILE = "lab_model.safetensors"
CONFIG_FILE = "lab_model.json"


def save_model(model: LabModel, directory: str, extra: dict | None = None) -> None:
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for prefix, module in (("vae", model.vae), ("cond", model.cond), ("unet", model.unet)):
        for k, v in module.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().to(torch.float16).contiguous()
    # each file replaced whole: the config file marks a finished model (a pretraining stage's rerun skips it)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE + ".tmp"))
    os.replace(os.path.join(directory, WEIGHTS_FILE + ".tmp"), os.path.join(directory, WEIGHTS_FILE))
    meta = {"config": asdict(model.cfg), "latent_scale": model.latent_scale, **(extra or {})}
    with open(os.path.join(directory, CONFIG_FILE + ".tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(directory, CONFIG_FILE + ".tmp"), os.path.join(directory, CONFIG_FILE))


def load_model(directory: str) -> LabModel:
    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no lab model at {path}; run `python -m examples.corruption_stage experiment --pretrain`"
        )
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        meta = json.load(f)
    c = meta["config"]
    cfg = LabModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
    model = new_model(cfg)
    tensors = load_file(path)
    for prefix, module in (("vae", model.vae), ("cond", model.cond), ("unet", model.unet)):
        sd = {k[len(prefix) + 1 :]: v.float() for k, v in tensors.items() if k.startswith(prefix + ".")}
        module.load_state_dict(sd)
    model.latent_scale = float(meta["latent_scale"])
    for m in (model.vae, model.cond, model.unet):
        m.eval().requires_grad_(False)
    return model
