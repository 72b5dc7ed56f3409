"""Bayesian LoRA layers: PEFT's LoRA layers whose factors carry a learnable posterior standard deviation.

Each layer subclasses PEFT's own LoRA layer (so `isinstance(layer, LoraLayer)` holds and diffusers' `fuse_lora` /
`set_adapters` keep working) and plugs in through PEFT's LoRA-variant hook: PEFT keeps handling disabled, merged and
mixed-batch adapters, and calls `BayesLoraVariant.forward` for a Bayesian adapter. In eval mode that forward is
PEFT's own LoRA expression on the means, so the output is bit-identical to a plain LoRA with the same A and B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import _peft_compat
from ._peft_compat import LoraLayer, LoraVariant
from .bayes import (
    gaussian_kl,
    initial_rho,
    local_reparameterisation,
    posterior_std,
    posterior_std_and_log_std,
    random_signs,
    sample_weight,
)
from .config import BayesLoraConfig
from .variants import BayesDoraLinearVariant, BayesLoraVariant


@dataclass(frozen=True)
class BayesSettings:
    """The Bayesian settings of one adapter on one layer (copied from its `BayesLoraConfig`)."""

    factors: str
    estimator: str
    prior_std: float
    posterior_std_parametrisation: str
    posterior_std_init: float
    posterior_std_max: float | None
    sample_at_inference: bool
    train_posterior_std: bool
    kl_weight: float


class BayesLoraLayer(LoraLayer):
    """What every Bayesian LoRA layer adds to PEFT's LoRA layer; combined with a concrete PEFT layer class.

    Per adapter and Bayesian factor it holds `lora_posterior_rho_{A,B}[adapter]`, a free parameter of the factor's
    shape holding the std (`bayes.posterior_std`, by the adapter's `posterior_std_parametrisation`), and
    `bayes_settings[adapter]`.
    """

    posterior_param_names = ("lora_posterior_rho_A", "lora_posterior_rho_B")
    # The DoRA variant of this layer type; None where Bayesian DoRA does not exist (convolutions, embeddings).
    dora_variant: type[LoraVariant] | None = None
    adapter_layer_names = LoraLayer.adapter_layer_names + posterior_param_names
    other_param_names = LoraLayer.other_param_names + ("bayes_settings",)

    def __repr__(self) -> str:
        # PEFT's layers print as "lora.<Class>(...)"; every Bayesian layer as "bayes_lora.<Class>(...)".
        return "bayes_" + super().__repr__()

    # --- set-up -------------------------------------------------------------------------------------------------

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        if not hasattr(self, "bayes_settings"):
            # PEFT's __init__ calls update_layer for the first adapter, so the containers are created here.
            self.lora_posterior_rho_A = nn.ParameterDict()
            self.lora_posterior_rho_B = nn.ParameterDict()
            self.bayes_settings: dict[str, BayesSettings] = {}
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> LoraVariant | None:
        if isinstance(config, BayesLoraConfig):
            if not config.use_dora:
                return BayesLoraVariant()
            if self.dora_variant is None:
                raise ValueError(
                    f"use_dora=True: Bayesian DoRA is not available on {type(self.get_base_layer()).__name__} layers; "
                    "it exists for torch.nn.Linear (also with bitsandbytes 4-bit or torchao weights), not for "
                    "convolutions, embeddings or bitsandbytes 8-bit layers. Leave such modules out of "
                    "target_modules, or set use_dora=False."
                )
            return self.dora_variant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def init_posterior(self, adapter_name: str, config: BayesLoraConfig) -> None:
        """Creates the posterior parameters of `adapter_name`, every std at `config.posterior_std_init`."""
        rho_init = initial_rho(config.posterior_std_init, config.posterior_std_parametrisation)
        factors = self.bayesian_factors_of(config)
        for factor in factors:
            mean = self.factor_mean(factor, adapter_name)
            rho = nn.Parameter(torch.full_like(mean, rho_init), requires_grad=config.train_posterior_std)
            getattr(self, f"lora_posterior_rho_{factor}")[adapter_name] = rho
        self.bayes_settings[adapter_name] = BayesSettings(
            factors=factors,
            estimator=config.estimator,
            prior_std=float(config.prior_std),
            posterior_std_parametrisation=config.posterior_std_parametrisation,
            posterior_std_init=float(config.posterior_std_init),
            posterior_std_max=None if config.posterior_std_max is None else float(config.posterior_std_max),
            sample_at_inference=config.sample_at_inference,
            train_posterior_std=config.train_posterior_std,
            kl_weight=float(config.kl_weight),
        )

    def bayesian_factors_of(self, config: BayesLoraConfig) -> str:
        """The factors `config` makes Bayesian on this layer."""
        return config.bayesian_factors

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self.freeze_fixed_posterior_std()

    def freeze_fixed_posterior_std(self) -> None:
        """Turns gradients off for the stds of adapters configured with `train_posterior_std=False`."""
        for adapter_name, settings in self.bayes_settings.items():
            if not settings.train_posterior_std:
                for factor in settings.factors:
                    self.posterior_rho(adapter_name, factor).requires_grad_(False)

    # --- the posterior ------------------------------------------------------------------------------------------

    def is_bayesian(self, adapter_name: str) -> bool:
        """Whether `adapter_name` is a Bayesian adapter on this layer."""
        return adapter_name in self.bayes_settings

    def posterior_rho(self, adapter_name: str, factor: str) -> nn.Parameter:
        """The free parameter `rho` holding the std of factor `"A"` or `"B"` of `adapter_name`."""
        return getattr(self, f"lora_posterior_rho_{factor}")[adapter_name]

    def posterior_std(self, adapter_name: str, factor: str) -> torch.Tensor:
        """The posterior standard deviation of factor `"A"` or `"B"` of `adapter_name`."""
        settings = self.bayes_settings[adapter_name]
        return posterior_std(
            self.posterior_rho(adapter_name, factor),
            settings.posterior_std_parametrisation,
            settings.posterior_std_init,
            settings.posterior_std_max,
        )

    def posterior_std_and_log_std(self, adapter_name: str, factor: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior std of factor `"A"` or `"B"` of `adapter_name` and its log (computed directly where
        possible, so that it stays finite where the std underflows)."""
        settings = self.bayes_settings[adapter_name]
        return posterior_std_and_log_std(
            self.posterior_rho(adapter_name, factor),
            settings.posterior_std_parametrisation,
            settings.posterior_std_init,
            settings.posterior_std_max,
        )

    def posterior_log_std(self, adapter_name: str, factor: str) -> torch.Tensor:
        """`log(posterior_std)` of factor `"A"` or `"B"` of `adapter_name`, computed directly where possible."""
        return self.posterior_std_and_log_std(adapter_name, factor)[1]

    def kl_divergence(self, adapter_name: str) -> torch.Tensor:
        """Closed-form KL(q || p) of `adapter_name`'s Bayesian factors on this layer."""
        settings = self.bayes_settings[adapter_name]
        kls = []
        for factor in settings.factors:
            std, log_std = self.posterior_std_and_log_std(adapter_name, factor)
            kls.append(gaussian_kl(self.factor_mean(factor, adapter_name), std, settings.prior_std, log_std=log_std))
        return torch.stack(kls).sum()

    # --- forward ------------------------------------------------------------------------------------------------

    def bayes_forward(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` plus the adapter's output: sampled while training (or if asked to), the mean otherwise."""
        settings = self.bayes_settings[adapter_name]
        if not (self.training or settings.sample_at_inference):
            return self.mean_forward(adapter_name, x, result)
        hidden = self.sample_factor("A", adapter_name, self.adapter_input(adapter_name, x), settings)
        output = self.sample_factor("B", adapter_name, hidden, settings)
        return result + self.scale_output(adapter_name, output)

    def sample_factor(
        self, factor: str, adapter_name: str, inputs: torch.Tensor, settings: BayesSettings
    ) -> torch.Tensor:
        """Applies factor `"A"` or `"B"` to `inputs`, sampling its weight if it is Bayesian."""
        mean = self.factor_mean(factor, adapter_name)
        bias = self.factor_bias(factor, adapter_name)
        if factor not in settings.factors:
            return self.apply_factor(factor, adapter_name, inputs, mean, bias)
        std = self.posterior_std(adapter_name, factor)
        if settings.estimator == "weight":
            return self.apply_factor(factor, adapter_name, inputs, sample_weight(mean, std), bias)
        if settings.estimator == "local":
            return local_reparameterisation(
                lambda i, w: self.apply_factor(factor, adapter_name, i, w, None),
                inputs,
                self.square_input(factor, inputs),
                mean,
                std,
                bias,
            )
        output = self.apply_factor(factor, adapter_name, inputs, mean, bias)
        perturbation, output_signs = self.flipout_perturbation(
            factor, adapter_name, inputs, std * torch.randn_like(std)
        )
        return torch.addcmul(output, perturbation, output_signs)

    def sampled_weight(self, factor: str, adapter_name: str, settings: BayesSettings) -> torch.Tensor:
        """One draw of factor `"A"` or `"B"`'s weight from the posterior; the mean if the factor is not Bayesian."""
        mean = self.factor_mean(factor, adapter_name)
        if factor not in settings.factors:
            return mean
        return sample_weight(mean, self.posterior_std(adapter_name, factor))

    def flipout_perturbation(
        self, factor: str, adapter_name: str, inputs: torch.Tensor, weight_noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`W_noise (x * s)` and the output signs `r` to multiply it by; s and r are per-example random signs."""
        input_signs = random_signs(self.sign_shape(inputs), inputs)
        perturbation = self.apply_factor(factor, adapter_name, inputs * input_signs, weight_noise, None)
        return perturbation, random_signs(self.sign_shape(perturbation), perturbation)

    # --- what differs between layer types (dense defaults, for Linear) ------------------------------------------

    def mean_forward(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """PEFT's plain LoRA expression, kept literally so that eval output is bit-identical to plain LoRA."""
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        return result + lora_B(lora_A(self.lora_dropout[adapter_name](x))) * self.scaling[adapter_name]

    def adapter_input(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_dropout[adapter_name](x)

    def scale_output(self, adapter_name: str, output: torch.Tensor) -> torch.Tensor:
        return output * self.scaling[adapter_name]

    def factor_mean(self, factor: str, adapter_name: str) -> torch.Tensor:
        return getattr(self, f"lora_{factor}")[adapter_name].weight

    def factor_bias(self, factor: str, adapter_name: str) -> torch.Tensor | None:
        return getattr(self, f"lora_{factor}")[adapter_name].bias

    def apply_factor(
        self, factor: str, adapter_name: str, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.linear(inputs, weight, bias)

    def square_input(self, factor: str, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * inputs

    def sign_shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        """Broadcast shape of per-example, per-channel signs; channels last."""
        shape = [1] * tensor.dim()
        shape[-1] = tensor.shape[-1]
        if tensor.dim() >= 2:
            shape[0] = tensor.shape[0]
        return tuple(shape)


class BayesLinear(BayesLoraLayer, _peft_compat.Linear):
    """Bayesian LoRA (and DoRA) for `nn.Linear` and transformers' `Conv1D`."""

    dora_variant = BayesDoraLinearVariant


class _BayesConvNd(BayesLoraLayer):
    """Bayesian LoRA for convolutions: A is a convolution with the base kernel, B a 1x1 convolution."""

    def apply_factor(
        self, factor: str, adapter_name: str, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        conv = getattr(self, f"lora_{factor}")[adapter_name]
        return self.conv_fn(inputs, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def sign_shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        """Channels first; the batch dimension only exists when the input has as many dims as the kernel."""
        shape = [1] * tensor.dim()
        batched = tensor.dim() == self.get_base_layer().weight.dim()
        shape[int(batched)] = tensor.shape[int(batched)]
        if batched:
            shape[0] = tensor.shape[0]
        return tuple(shape)


class BayesConv1d(_BayesConvNd, _peft_compat.Conv1d):
    """Bayesian LoRA for `nn.Conv1d`."""


class BayesConv2d(_BayesConvNd, _peft_compat.Conv2d):
    """Bayesian LoRA for `nn.Conv2d`."""


class BayesConv3d(_BayesConvNd, _peft_compat.Conv3d):
    """Bayesian LoRA for `nn.Conv3d`."""


class BayesEmbedding(BayesLoraLayer, _peft_compat.Embedding):
    """Bayesian LoRA for `nn.Embedding`: A (r x vocab) is looked up by index, B (dim x r) is a matmul."""

    def mean_forward(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        after_A = _peft_compat.embed(self, x, self.lora_embedding_A[adapter_name].T, adapter_name)
        adapter_output = (after_A @ self.lora_embedding_B[adapter_name].T) * self.scaling[adapter_name]
        scale = _peft_compat.embed_scale(self)
        if scale is not None:
            adapter_output = adapter_output * scale.to(adapter_output.dtype)
        return result + adapter_output

    def adapter_input(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def scale_output(self, adapter_name: str, output: torch.Tensor) -> torch.Tensor:
        output = output * self.scaling[adapter_name]
        scale = _peft_compat.embed_scale(self)
        return output if scale is None else output * scale.to(output.dtype)

    def bayesian_factors_of(self, config: BayesLoraConfig) -> str:
        return config.factors_of_embeddings()

    def factor_mean(self, factor: str, adapter_name: str) -> torch.Tensor:
        return getattr(self, f"lora_embedding_{factor}")[adapter_name]

    def factor_bias(self, factor: str, adapter_name: str) -> torch.Tensor | None:
        return None

    def apply_factor(
        self, factor: str, adapter_name: str, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if factor == "A":
            return _peft_compat.embed(self, inputs, weight.T, adapter_name)
        return inputs @ weight.T

    def square_input(self, factor: str, inputs: torch.Tensor) -> torch.Tensor:
        # A one-hot input squared is itself.
        return inputs if factor == "A" else inputs * inputs

    def flipout_perturbation(
        self, factor: str, adapter_name: str, inputs: torch.Tensor, weight_noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if factor == "B":
            return super().flipout_perturbation(factor, adapter_name, inputs, weight_noise)
        # Flipping the sign of a one-hot input flips the looked-up row: draw one sign per example and vocabulary entry.
        perturbation = self.apply_factor("A", adapter_name, inputs, weight_noise, None)
        vocab_size = weight_noise.shape[1]
        if inputs.dim() >= 2:
            signs = random_signs((inputs.shape[0], vocab_size), perturbation)
            token_signs = signs.gather(1, inputs.reshape(inputs.shape[0], -1)).reshape(inputs.shape)
        else:
            token_signs = random_signs((vocab_size,), perturbation)[inputs]
        perturbation = perturbation * token_signs.unsqueeze(-1)
        return perturbation, random_signs(self.sign_shape(perturbation), perturbation)


def bayes_layer_class(base_layer: nn.Module) -> type[BayesLoraLayer] | None:
    """The Bayesian LoRA layer class for a base module, or None if it has none."""
    for base_cls, bayes_cls in (
        (nn.Embedding, BayesEmbedding),
        (nn.Conv2d, BayesConv2d),
        (nn.Conv3d, BayesConv3d),
        (nn.Conv1d, BayesConv1d),
        (nn.Linear, BayesLinear),
        (Conv1D, BayesLinear),
    ):
        if isinstance(base_layer, base_cls):
            return bayes_cls
    return None
