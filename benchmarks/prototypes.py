"""Prototypes of proposed changes to bayes_adapter, applied to a model at run time (bayes_adapter/ is untouched).

An arm named `<estimator>_<factors>+proto` (e.g. `weight_B+proto`) runs with these:

- `kl_loss_flat`: the KL term evaluated once over the concatenated means and rhos of all layers (per prior std and
  KL weight), instead of ~12 autograd ops per layer and factor (the closed form, `gaussian_kl`, is unchanged), with
  the list of those tensors cached per model (`cache=False`: gathered on every call).
- `ProtoSampling`: `BayesLoraLayer.sample_factor` with fewer ops and allocations: `addcmul` for
  `mean + std * eps` (weight) and `output + perturbation * signs` (flipout); for "local", `LocalNoise`, an
  autograd function that saves one full-size tensor per layer instead of two; random signs drawn straight in the
  input's dtype.

Each is checked against the shipped code in tests/test_benchmarks.py (same KL; same outputs under the same seed).
"""

from __future__ import annotations

import types
import weakref

import torch

import bayes_adapter
from bayes_adapter import bayes as bayes_math


PROTO_SUFFIX = "+proto"


def _kl_groups(model: torch.nn.Module, weighted: bool) -> dict[tuple[float, float], tuple[list, list]]:
    """The active Bayesian factors' mean and rho tensors, grouped by (prior std, KL weight)."""
    groups: dict[tuple[float, float], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for layer in bayes_adapter.bayes_layers(model):
        for name in layer.active_adapters:
            if not layer.is_bayesian(name):
                continue
            settings = layer.bayes_settings[name]
            weight = settings.kl_weight if weighted else 1.0
            if not weight:
                continue
            means, rhos = groups.setdefault((settings.prior_std, weight), ([], []))
            for factor in settings.factors:
                means.append(layer.factor_mean(factor, name))
                rhos.append(getattr(layer, f"lora_posterior_rho_{factor}")[name])
    return groups


# Walking the modules and the ParameterDicts costs about as much as the KL itself (1.4 ms of 3 ms on the small
# UNet): the proposal caches the parameter lists per model, invalidated when adapters change (here: never).
_KL_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kl_divergence_flat(model: torch.nn.Module, weighted: bool = False, cache: bool = True) -> torch.Tensor:
    """Sum over active Bayesian factors of KL(q || p) (times each adapter's kl_weight if `weighted`)."""
    if cache:
        groups = _KL_CACHE.get(model, {}).get(weighted)
        if groups is None:
            groups = _KL_CACHE.setdefault(model, {})[weighted] = _kl_groups(model, weighted)
    else:
        groups = _kl_groups(model, weighted)
    total = None
    for (prior_std, weight), (means, rhos) in groups.items():
        mean = torch.cat([t.reshape(-1) for t in means])
        std = bayes_math.posterior_std(torch.cat([t.reshape(-1) for t in rhos]))
        kl = bayes_math.gaussian_kl(mean, std, prior_std)
        kl = kl if weight == 1.0 else weight * kl
        total = kl if total is None else total + kl
    if total is None:
        parameter = next(model.parameters(), None)
        return torch.zeros((), device=None if parameter is None else parameter.device)
    return total


def kl_loss_flat(model: torch.nn.Module, num_examples: int, cache: bool = True) -> torch.Tensor:
    """Same value as `bayes_adapter.kl_loss(model, num_examples)`."""
    return kl_divergence_flat(model, weighted=True, cache=cache) / num_examples


def random_signs(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, tuple(shape), device=like.device, dtype=like.dtype).mul_(2).sub_(1)


class LocalNoise(torch.autograd.Function):
    """`out_mean + sqrt(variance + floor) * eps`, saving one full-size tensor for backward instead of two.

    Autograd's version keeps `sqrt(...)` (for the square root's backward) and `eps` (for the product's); the gradient
    with respect to the variance is `grad * eps / (2 sqrt(variance + floor))`, so saving that ratio is enough.
    """

    @staticmethod
    def forward(ctx, out_mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        out_std = variance.add(bayes_math._VARIANCE_FLOOR).sqrt_()
        eps = torch.randn_like(out_std)
        output = torch.addcmul(out_mean, out_std, eps)
        ctx.save_for_backward(eps.div_(out_std).mul_(0.5))
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (ratio,) = ctx.saved_tensors
        return grad, grad * ratio


class ProtoSampling:
    """The proposed `sample_factor` / `flipout_perturbation` of `BayesLoraLayer` (bound onto layers by `apply`)."""

    def sample_factor(self, factor, adapter_name, inputs, settings):
        mean = self.factor_mean(factor, adapter_name)
        bias = self.factor_bias(factor, adapter_name)
        if factor not in settings.factors:
            return self.apply_factor(factor, adapter_name, inputs, mean, bias)
        std = self.posterior_std(adapter_name, factor)
        if settings.estimator == "weight":
            return self.apply_factor(
                factor, adapter_name, inputs, torch.addcmul(mean, std, torch.randn_like(mean)), bias
            )
        if settings.estimator == "local":
            out_mean = self.apply_factor(factor, adapter_name, inputs, mean, bias)
            variance = self.apply_factor(factor, adapter_name, self.square_input(factor, inputs), std * std, None)
            return LocalNoise.apply(out_mean, variance)
        output = self.apply_factor(factor, adapter_name, inputs, mean, bias)
        weight_noise = std * torch.randn_like(std)
        return self.flipout_perturbation(factor, adapter_name, inputs, weight_noise, output)

    def flipout_perturbation(self, factor, adapter_name, inputs, weight_noise, output=None):
        input_signs = random_signs(self.sign_shape(inputs), inputs)
        perturbation = self.apply_factor(factor, adapter_name, inputs * input_signs, weight_noise, None)
        output_signs = random_signs(self.sign_shape(perturbation), perturbation)
        if output is None:
            return perturbation * output_signs
        return torch.addcmul(output, perturbation, output_signs)


def apply(model: torch.nn.Module) -> torch.nn.Module:
    """Binds the prototype methods onto every dense / conv Bayesian layer of `model` (instance attributes)."""
    for layer in bayes_adapter.bayes_layers(model):
        if isinstance(layer, bayes_adapter.BayesEmbedding):
            continue
        for name in ("sample_factor", "flipout_perturbation"):
            object.__setattr__(layer, name, types.MethodType(getattr(ProtoSampling, name), layer))
    return model
