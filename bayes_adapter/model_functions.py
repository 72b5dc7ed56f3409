"""Functions over a model's Bayesian LoRA layers: the KL and its loss term, optimizer parameter groups, posterior-std
statistics, dtype casting. They take any model holding the layers (a PeftModel, a diffusers model with an added
adapter, any `nn.Module`); the tuner that creates the layers is `model.py`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ._peft_compat import BaseTunerLayer
from .bayes import gaussian_kl, posterior_std_and_log_std, std_summary
from .layer import BayesLoraLayer


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module holding Bayesian LoRA layers (a PeftModel or a model with an added "
            f"adapter), got {type(model).__name__}"
        )


def bayes_layers(model: nn.Module) -> Iterator[BayesLoraLayer]:
    """The Bayesian LoRA layers of a model (a PeftModel, a diffusers model with an adapter, any module)."""
    _check_model(model)
    return (module for module in model.modules() if isinstance(module, BayesLoraLayer))


def _selected_adapters(layer: BayesLoraLayer, adapter_names: Iterable[str] | None) -> list[str]:
    names = layer.active_adapters if adapter_names is None else adapter_names
    return [name for name in names if layer.is_bayesian(name)]


def _zero_like_model(model: nn.Module) -> torch.Tensor:
    parameter = next(model.parameters(), None)
    return torch.zeros((), device=None if parameter is None else parameter.device)


def _check_adapter_names(model: nn.Module, adapter_names: Iterable[str] | None) -> list[str] | None:
    if adapter_names is None:
        return None
    _check_model(model)
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    names = list(adapter_names) if isinstance(adapter_names, Iterable) else None
    if names is None or not all(isinstance(name, str) for name in names):
        raise TypeError(f"adapter_names must be a name, a list of names or None, got {adapter_names!r}")
    adapter_names = names
    known = {name for layer in bayes_layers(model) for name in layer.bayes_settings}
    unknown = [name for name in adapter_names if name not in known]
    if unknown:
        raise ValueError(f"adapter_names={unknown!r} are not Bayesian adapters of this model; it has {sorted(known)}")
    return adapter_names


def _weighted_kl(model: nn.Module, adapter_names: list[str] | None, use_kl_weight: bool) -> torch.Tensor:
    """Sum of (kl_weight or 1) * KL(q || p) over the selected adapters' Bayesian factors.

    The closed form runs once per (prior std, weight) group over the concatenated parameters of all layers: per-layer
    evaluation costs ~12 autograd ops per factor, several percent of a small UNet's step (benchmarks/RESULTS.md).
    """
    groups: dict[tuple[float, float, str, float, float | None], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for layer in bayes_layers(model):
        for name in _selected_adapters(layer, adapter_names):
            settings = layer.bayes_settings[name]
            weight = settings.kl_weight if use_kl_weight else 1.0
            if not weight:
                continue
            key = (
                settings.prior_std,
                weight,
                settings.posterior_std_parametrisation,
                settings.posterior_std_init,
                settings.posterior_std_max,
            )
            means, rhos = groups.setdefault(key, ([], []))
            for factor in settings.factors:
                means.append(layer.factor_mean(factor, name).reshape(-1))
                rhos.append(layer.posterior_rho(name, factor).reshape(-1))
    total = _zero_like_model(model)
    for (prior_std, weight, parametrisation, std_init, std_max), (means, rhos) in groups.items():
        std, log_std = posterior_std_and_log_std(torch.cat(rhos), parametrisation, std_init, std_max)
        kl = gaussian_kl(torch.cat(means), std, prior_std, log_std=log_std)
        total = total + (kl if weight == 1.0 else weight * kl)
    return total


def kl_divergence(model: nn.Module, adapter_names: Iterable[str] | str | None = None) -> torch.Tensor:
    """Closed-form KL(q || p) summed over every Bayesian LoRA parameter of the model.

    Args:
        model: A model holding Bayesian LoRA layers (a PeftModel, or a diffusers model with `add_adapter`).
        adapter_names: The adapters to include; by default the active ones.

    Returns:
        A 0-dim tensor with gradients to the means and standard deviations; zero if nothing is Bayesian.
    """
    return _weighted_kl(model, _check_adapter_names(model, adapter_names), use_kl_weight=False)


def kl_loss(model: nn.Module, num_examples: int, adapter_names: Iterable[str] | str | None = None) -> torch.Tensor:
    """The KL term to add to a training loss: `sum over adapters of kl_weight * KL / num_examples`.

    Args:
        model: A model holding Bayesian LoRA layers.
        num_examples: Number of training examples (images) the KL is spread over.
        adapter_names: The adapters to include; by default the active ones.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be an integer >= 1, got {num_examples!r}")
    return _weighted_kl(model, _check_adapter_names(model, adapter_names), use_kl_weight=True) / num_examples


def param_groups(model: nn.Module, posterior_std_lr: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the trainable parameters, the posterior stds' free parameters in their own group.

    Not needed for the std to learn: with the default "exp_linear" parametrisation one optimizer over all trainable
    parameters moves the std by about `lr / posterior_std_init` relative per step, as the paper's code (which stores
    the std itself) does. The groups are for a separate learning rate for the stds, and for no weight decay on them
    (decay pulls an "exp_linear" std back to its initial value, a 0.1.0 "softplus" one towards `softplus(0) = 0.69`).
    With the "softplus" parametrisation Adam moves `log(std)` by about the learning rate per step, and
    `posterior_std_lr = lr / posterior_std_init` gives the paper's step at the start of training.

    Args:
        model: A model holding Bayesian LoRA layers.
        posterior_std_lr: Learning rate of the posterior-std parameters; None keeps the optimizer's default.

    Returns:
        `[{"params": means...}, {"params": rhos..., "weight_decay": 0.0[, "lr": posterior_std_lr]}]`; the second
        group only if some posterior std is trainable.
    """
    if posterior_std_lr is not None and (
        isinstance(posterior_std_lr, bool)
        or not isinstance(posterior_std_lr, (int, float))
        or not 0 < posterior_std_lr < math.inf
    ):
        raise ValueError(f"posterior_std_lr must be a finite number > 0 or None, got {posterior_std_lr!r}")
    posterior_ids = {
        id(rho)
        for layer in bayes_layers(model)
        for name in layer.posterior_param_names
        for rho in getattr(layer, name).values()
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    posterior = {"params": [p for p in trainable if id(p) in posterior_ids], "weight_decay": 0.0}
    if posterior_std_lr is not None:
        posterior["lr"] = posterior_std_lr
    groups = [{"params": [p for p in trainable if id(p) not in posterior_ids]}]
    return groups + [posterior] if posterior["params"] else groups


def _posterior_std_tensors(
    model: nn.Module, adapter_names: Iterable[str] | str | None
) -> Iterator[tuple[torch.Tensor, float | None]]:
    """Each Bayesian factor's posterior std (detached) with its bound (`posterior_std_max`, None for none)."""
    adapter_names = _check_adapter_names(model, adapter_names)
    return (
        (layer.posterior_std(name, factor).detach(), layer.bayes_settings[name].posterior_std_max)
        for layer in bayes_layers(model)
        for name in _selected_adapters(layer, adapter_names)
        for factor in layer.bayes_settings[name].factors
    )


def posterior_std_stats(model: nn.Module, adapter_names: Iterable[str] | str | None = None) -> dict[str, float]:
    """Mean, min and max posterior standard deviation over the Bayesian weights, how many there are, and the fraction
    within 5% of their bound (`posterior_std_max`; "near_bound_fraction", 0 where no std is bounded).

    Many stds at their bound mean the optimiser pushes them up as far as the bound lets it: with kl_weight=0 a sign
    that the learning rate is too large for the stds.

    Args:
        model: A model holding Bayesian LoRA layers.
        adapter_names: The adapters to include; by default the active ones.
    """
    pairs = list(_posterior_std_tensors(model, adapter_names))
    return std_summary((std for std, _ in pairs), (bound for _, bound in pairs))


def posterior_stds(model: nn.Module, adapter_names: Iterable[str] | str | None = None) -> torch.Tensor:
    """Every posterior standard deviation of the Bayesian weights as one flat float32 tensor (for histograms).

    Args:
        model: A model holding Bayesian LoRA layers.
        adapter_names: The adapters to include; by default the active ones.
    """
    stds = [std.float().reshape(-1).cpu() for std, _ in _posterior_std_tensors(model, adapter_names)]
    return torch.cat(stds) if stds else torch.zeros(0)


def cast_adapter_params(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Casts every adapter parameter (LoRA means and posterior std parameters, trainable or frozen) to `dtype`.

    For mixed-precision training with a half-precision base model: diffusers' `cast_training_params` casts only the
    trainable parameters, which would leave a frozen posterior (`train_posterior_std=False`) in half precision.

    Args:
        model: A model holding PEFT adapter layers.
        dtype: The dtype to cast to.
    """
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                for parameter in getattr(module, name).parameters():
                    if parameter.dtype != dtype:
                        parameter.data = parameter.data.to(dtype)
