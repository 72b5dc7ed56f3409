"""Diffusion utilities for the lab: the training loss, DDIM sampling with classifier-free guidance, and the
model's implied width of the learned distribution around a training image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler

from bayes_adapter.training_monitor import implied_width

from . import data
from .models import LabModel, build_scheduler


def diffusion_loss(
    model: LabModel,
    latents: torch.Tensor,
    tokens: torch.Tensor,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MSE of the model's prediction at random timesteps (DDPM training objective): of the noise for an
    "epsilon" model, of the velocity ``sqrt(ab) * noise - sqrt(1 - ab) * x0`` for a "v_prediction" one."""
    sched = _train_schedule(model)
    n = latents.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    ab = sched.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
    pred = model.unet(noisy, timesteps, model.cond(tokens)).sample
    target = noise if model.cfg.prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * latents
    return torch.nn.functional.mse_loss(pred, target)


def predicted_x0(model: LabModel, noisy: torch.Tensor, output: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The clean latent implied by the UNet's ``output`` at a noise level with cumulative alpha ``alpha_bar``."""
    ab = torch.as_tensor(alpha_bar, dtype=noisy.dtype)
    if model.cfg.prediction_type == "epsilon":
        return (noisy - (1 - ab).sqrt() * output) / ab.sqrt()
    return ab.sqrt() * noisy - (1 - ab).sqrt() * output


_SCHEDULES: dict[tuple[int, str], DDIMScheduler] = {}


def _train_schedule(model: LabModel) -> DDIMScheduler:
    key = (model.cfg.num_train_timesteps, model.cfg.prediction_type)
    if key not in _SCHEDULES:
        _SCHEDULES[key] = build_scheduler(model.cfg)
    return _SCHEDULES[key]


def condition_tokens(token: int | Sequence[int], n: int) -> torch.Tensor:
    """``n`` copies of a one-token (``int``) or several-token prompt, as the condition embedding takes them."""
    if isinstance(token, int):
        return torch.full((n,), token, dtype=torch.long)
    return torch.tensor([list(token)] * n, dtype=torch.long)


@torch.no_grad()
def sample(
    model: LabModel,
    token: int | Sequence[int],
    n: int,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 3.0,
    eta: float = 0.0,
    return_latents: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draws ``n`` images for the prompt ``token`` (an id or a sequence of ids) with DDIM (``eta`` = 0: deterministic
    given the seed) and classifier-free guidance; returns images in [-1, 1], and with ``return_latents`` also the
    final latents. The UNet is used in whatever mode it is in."""
    sched = build_scheduler(model.cfg)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    x = torch.randn((n, c.latent_channels, c.latent_size, c.latent_size), generator=g)
    cond = model.cond(condition_tokens(token, n))
    uncond = model.cond(torch.full((n,), data.NULL_TOKEN, dtype=torch.long))
    emb = torch.cat([uncond, cond])
    for t in sched.timesteps:
        eps = model.unet(torch.cat([x, x]), t, emb).sample
        eu, ec = eps.chunk(2)
        eps = eu + guidance * (ec - eu)
        x = sched.step(eps, t, x, eta=eta, generator=g).prev_sample
    return (model.decode(x), x) if return_latents else model.decode(x)


@torch.no_grad()
def learned_width(
    model: LabModel,
    latents: torch.Tensor,
    token: int | Sequence[int],
    timesteps: list[int],
    n_noise: int = 8,
    seed: int = 0,
) -> list[float]:
    """For each timestep, the std (in latent units) of the Gaussian around the training latents that the
    denoiser implies (see ``bayes_adapter.training_monitor.implied_width``); fixed noise from ``seed``."""
    sched = _train_schedule(model)
    g = torch.Generator().manual_seed(seed)
    x0 = latents.repeat_interleave(n_noise, 0)
    noise = torch.randn(x0.shape, generator=g)
    emb = model.cond(condition_tokens(token, x0.shape[0]))
    out = []
    for t in timesteps:
        ab = sched.alphas_cumprod[t]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        output = model.unet(xt, torch.full((x0.shape[0],), t), emb).sample
        x0_hat = predicted_x0(model, xt, output, float(ab))
        out.append(float(implied_width(x0, x0_hat, noise, float(ab))))
    return out
