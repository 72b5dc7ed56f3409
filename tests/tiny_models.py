"""Tiny diffusers models and pipelines built from configs in code, so that no test touches the Hub."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import get_peft_model
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import bayes_adapter
from bayes_adapter import BayesLoraConfig


CROSS_ATTENTION_DIM = 8


# The tiny UNet diffusers' own tests use; benchmarks/common.py builds its "tiny" size from it too.
TINY_UNET_CONFIG = dict(
    block_out_channels=(4, 8),
    layers_per_block=1,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=CROSS_ATTENTION_DIM,
    norm_num_groups=2,
)


# A Bayesian LoRA adapter saved by bayes-adapter 0.1.0 (see tests/fixtures/make_adapter_v0_1_0.py), over tiny_unet().
ADAPTER_V0_1_0 = Path(__file__).resolve().parent / "fixtures" / "adapter_v0_1_0"
# One saved by bayes-adapter 0.2.0 (exp_linear, no std bound), with 0.2.0's export (make_adapter_v0_2_0.py).
ADAPTER_V0_2_0 = Path(__file__).resolve().parent / "fixtures" / "adapter_v0_2_0"


def tiny_unet(seed: int = 0, block_out_channels: tuple[int, int] = (4, 8), **overrides) -> UNet2DConditionModel:
    """`TINY_UNET_CONFIG` with random weights (and any overrides)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET_CONFIG, "block_out_channels": block_out_channels, **overrides})


def byte_level_codepoints() -> list[int]:
    """GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to code points from 256 on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = iter(range(256, 512))
    return [b if b in printable else next(extra) for b in range(256)]


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer built in memory: the 256 bytes (also with `</w>`) and the two special tokens."""
    characters = [chr(code) for code in byte_level_codepoints()]
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[], model_max_length=16)


def tiny_text_config(**overrides) -> CLIPTextConfig:
    config = dict(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=16,
        layer_norm_eps=1e-05,
        num_attention_heads=2,
        num_hidden_layers=2,
        pad_token_id=1,
        vocab_size=len(tiny_tokenizer()),
        max_position_embeddings=16,
    )
    return CLIPTextConfig(**{**config, **overrides})


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(tiny_text_config())


def tiny_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    """A VAE that halves the image size (32 px images, 16 px latents, 4 channels)."""
    torch.manual_seed(seed)
    config = dict(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )
    return AutoencoderKL(**{**config, **overrides})


def tiny_scheduler() -> DDIMScheduler:
    """SD's DDIM scheduler settings."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A whole StableDiffusionPipeline (32 px images, 16 px latents) with random weights."""
    return StableDiffusionPipeline(
        unet=tiny_unet(seed),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A whole StableDiffusionXLPipeline (32 px) from configs: text_time UNet, two CLIP text encoders."""
    unet = tiny_unet(
        seed,
        attention_head_dim=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8,  # six time ids x 4 + the pooled text embedding
        cross_attention_dim=2 * CROSS_ATTENTION_DIM,  # the two encoders' hidden states concatenated
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=CLIPTextModel(tiny_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(projection_dim=8)),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def save_tiny_pipeline(path, seed: int = 0) -> StableDiffusionPipeline:
    """Builds the tiny pipeline and saves it with `save_pretrained`, as a local stand-in for a Hub model id."""
    pipe = tiny_pipeline(seed)
    pipe.save_pretrained(str(path))
    return pipe


# --- comparing float results ------------------------------------------------------------------------------------

# A few float32 ulps: rounding, not a bug, is all that may separate the two sides of `assert_same_numerics`.
FLOAT32_ROUNDING_ULPS = 8


def assert_same_numerics(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Asserts that two float results agree to float32 rounding: a few ulps of `expected`'s scale.

    torch gives bit-identical floats only for the same op on the same tensors in one process. Two rows of one batch
    need not be bit-identical (a CPU's gemm kernel may treat rows differently: AVX-512 machines do), nor need a
    result computed in another process, or from tensors loaded from a file (other memory alignment, other kernel
    paths; ~1e-7 apart on AVX-512). Use this helper for exactly those comparisons, and `torch.equal` where both sides
    run the same kernels on the same tensors in one process, or compare stored tensors (a file keeps every bit).
    """
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.detach().abs().max().item(), 1.0) if expected.numel() else 1.0
    atol = FLOAT32_ROUNDING_ULPS * torch.finfo(torch.float32).eps * scale
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=atol, msg=msg)


# --- Bayesian UNets and their inputs, shared by the test modules ---------------------------------------------------

# Linear (attention, proj_in) and Conv2d (resnet) targets of the tiny UNet.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]


def unet_config(**overrides) -> BayesLoraConfig:
    """alpha != r, a rank pattern, an alpha pattern, Linear and Conv2d targets, both factors Bayesian."""
    kwargs = dict(
        r=4,
        lora_alpha=8,
        target_modules=UNET_TARGETS,
        rank_pattern={"to_k": 2},
        alpha_pattern={"to_v": 3},
        bayesian_factors="AB",
    )
    kwargs.update(overrides)
    return BayesLoraConfig(**kwargs)


def randomise(model: torch.nn.Module, adapter_name: str = "default", seed: int = 1) -> None:
    """Non-zero means (B starts at zero) and spread-out posterior stds, so that a wrong export shows.

    The stds are spread around the default `posterior_std_init` (0.01) of the default "exp_linear" parametrisation.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if f".{adapter_name}" not in name:
                continue
            noise = torch.randn(parameter.shape, generator=generator)
            if ".lora_A." in name or ".lora_B." in name:
                parameter.copy_(0.3 * noise)
            elif "lora_posterior_rho" in name:
                parameter.copy_(0.005 * noise)


def bayesian_unet(wrap: str = "add_adapter", config: BayesLoraConfig | None = None, seed: int = 1):
    """A tiny UNet with a randomised Bayesian adapter, in eval mode: `wrap` "peft" (get_peft_model) or "add_adapter"."""
    unet = tiny_unet()
    config = config or unet_config()
    if wrap == "peft":
        model = get_peft_model(unet, config)
    else:
        unet.add_adapter(config)
        model = unet
    randomise(model, seed=seed)
    return model.eval()


def unet_inputs(seed: int = 0, batch_size: int = 1, tokens: int = 5, cross_attention_dim: int = CROSS_ATTENTION_DIM):
    """Latents `x`, timesteps `t` (10, then up to 500) and text states `enc` for a tiny UNet."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch_size, 4, 16, 16, generator=generator),
        "t": torch.linspace(10, 500, batch_size).long() if batch_size > 1 else torch.tensor([10]),
        "enc": torch.randn(batch_size, tokens, cross_attention_dim, generator=generator),
    }


@torch.no_grad()
def run_unet(unet: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The UNet's output on `unet_inputs`, without gradients."""
    return unet(inputs["x"], inputs["t"], inputs["enc"]).sample


def train_diffusion_loss(model, steps: int, lr: float = 1e-4, seed: int = 0, latent_size: int = 16) -> list[float]:
    """`steps` of the noise-prediction loss on two fixed latents with a plain AdamW over every trainable parameter.

    What a user who never calls `param_groups` runs; returns the losses. `model` is a tiny UNet holding adapters.
    """
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, latent_size, latent_size, generator=generator)
    text = torch.randn(2, 3, CROSS_ATTENTION_DIM, generator=generator)
    scheduler = tiny_scheduler()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        prediction = model(scheduler.add_noise(latents, noise, timesteps), timesteps, text).sample
        loss = torch.nn.functional.mse_loss(prediction, noise) + bayes_adapter.kl_loss(model, len(latents))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def read_safetensors_metadata(path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (without reading its tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def save_tiny_clip(path, seed: int = 0) -> str:
    """A tiny `CLIPModel` with its `CLIPProcessor` (in-memory tokenizer, 32 px images), saved to `path`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    text = tiny_text_config(hidden_size=16, intermediate_size=32).to_dict()
    vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
    model = CLIPModel(
        CLIPConfig(text_config=text, vision_config={**vision, "num_attention_heads": 2}, projection_dim=8)
    )
    size = {"shortest_edge": 32}
    image_processor = CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32})
    model.save_pretrained(str(path))
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer()).save_pretrained(str(path))
    return str(path)


def save_tiny_dino(path, seed: int = 0) -> str:
    """A tiny `ViTModel` (the DINO architecture) with its `ViTImageProcessor` (32 px), saved to `path`."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
    config.num_attention_heads = 2
    ViTModel(config, add_pooling_layer=False).save_pretrained(str(path))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(path))
    return str(path)


def save_random_lpips(folder, seed: int = 0) -> tuple[str, str]:
    """LPIPS's two weight files with random values, in the layouts `bayes_adapter.lpips.load_lpips` reads: an AlexNet
    backbone under torchvision's key names (plus a classifier key, which LPIPS ignores) and non-negative linear
    weights under the lpips package's names. Returns (backbone path, linear weights path)."""
    from bayes_adapter.lpips import AlexNetLPIPS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        features = AlexNetLPIPS().features.state_dict()
        backbone = {f"features.{k}": v for k, v in features.items()} | {"classifier.6.bias": torch.zeros(1000)}
        linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(backbone, folder / "alexnet-owt-7be5be79.pth")
    torch.save(linear, folder / "alex.pth")
    return str(folder / "alexnet-owt-7be5be79.pth"), str(folder / "alex.pth")


def natural_image(name: str = "grace_hopper.jpg"):
    """A natural photograph that ships inside matplotlib (no download), as an RGB PIL image."""
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / name
    with Image.open(path) as image:
        return image.convert("RGB")


# --- the example scripts, run in-process --------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The DreamBooth script users run; in-process tests import its package, `examples.dreambooth`.
DREAMBOOTH_SCRIPT = EXAMPLES / "train_dreambooth_bayes_lora.py"


def write_images(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` random 40x48 RGB PNGs `0.png`, `1.png`, ... in `folder`."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def dreambooth_args(model, instance, output, *extra) -> list[str]:
    """The DreamBooth script's command line for a local pipeline folder: 32 px, seed 0, then `extra`."""
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--instance_data_dir",
        str(instance),
        "--instance_prompt",
        "a photo of sks dog",
        "--output_dir",
        str(output),
        "--resolution",
        "32",
        "--seed",
        "0",
        *extra,
    ]


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """The TensorBoard scalars `tag` written under `log_dir`, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return values


def tensorboard_histogram_steps(log_dir: Path, tag: str) -> list[int]:
    """The steps at which the TensorBoard histogram `tag` was written under `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"histograms": 0})  # 0: keep every step
        accumulator.Reload()
        if tag in accumulator.Tags().get("histograms", []):
            steps += [event.step for event in accumulator.Histograms(tag)]
    return sorted(steps)


def reset_accelerate_state() -> None:
    """Forgets accelerate's process-wide singletons, so that the next in-process run builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
