"""The DreamBooth denoising losses: the instance MSE (Min-SNR or per-sigma weighted) and prior preservation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def denoising_loss(settings, noise_scheduler, model_pred, target, timesteps, weighting=None) -> torch.Tensor:
    """The instance loss, plus `--prior_loss_weight` x the class half's with prior preservation.

    DDPM models: the MSE (Min-SNR weighted with `--snr_gamma`); flow matching: the MSE weighted per sigma.
    """

    def one(pred, target, timesteps, weighting, instance: bool) -> torch.Tensor:
        if weighting is not None:
            return (weighting.float() * (pred.float() - target.float()) ** 2).flatten(1).mean(1).mean()
        if instance:
            return instance_loss(settings.snr_gamma, noise_scheduler, pred, target, timesteps)
        return F.mse_loss(pred.float(), target.float())

    if not settings.with_prior_preservation:
        return one(model_pred, target, timesteps, weighting, True)
    halves = [t.chunk(2) if t is not None else (None, None) for t in (model_pred, target, timesteps, weighting)]
    instance = one(*(half[0] for half in halves), True)
    return instance + settings.prior_loss_weight * one(*(half[1] for half in halves), False)


def instance_loss(snr_gamma: float | None, noise_scheduler, model_pred, target, timesteps) -> torch.Tensor:
    """The denoising MSE, with Min-SNR weighting when `snr_gamma` (`--snr_gamma`) is set (diffusers' `compute_snr`)."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    weights = weights / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
    per_example = F.mse_loss(model_pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_example * weights).mean()
