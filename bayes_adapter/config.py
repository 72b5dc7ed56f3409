"""`BayesLoraConfig`: a `LoraConfig` whose LoRA factors carry a Gaussian posterior."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig

from . import _peft_compat
from .bayes import ESTIMATORS, POSTERIOR_STD_PARAMETRISATIONS


PEFT_TYPE_NAME = "BAYES_LORA"
BAYESIAN_FACTORS = ("A", "B", "AB")
# What a saved config without `posterior_std_parametrisation` was written with: bayes-adapter 0.1.0's softplus.
LEGACY_POSTERIOR_STD_PARAMETRISATION = "softplus"


# `posterior_std_max="auto"`: this many times `posterior_std_init`.
DEFAULT_STD_MAX_FACTOR = 10.0


# The smallest std accepted: the KL squares `mean / prior_std` and `std / prior_std`, and the adapters train in
# float32, whose squares overflow past 3.4e38 (a mean of 1 over a prior std of 1e-19) and whose numbers underflow to
# 0 below 1.4e-45. 1e-12 keeps both far away for any mean a LoRA reaches.
MIN_STD = 1e-12


def _check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_std(name: str, value: object) -> None:
    _check_positive_float(name, value)
    if value < MIN_STD:
        raise ValueError(
            f"{name}={value!r} is too small for float32 (the KL would be infinite or NaN); the smallest accepted "
            f"value is {MIN_STD:g}"
        )


@dataclass
class BayesLoraConfig(LoraConfig):
    """Configuration of a Bayesian LoRA adapter.

    Every `LoraConfig` field keeps its meaning. On top of them, the LoRA factors named by `bayesian_factors` get a
    mean-field Gaussian posterior `N(mean, posterior_std^2)`, the mean being the usual LoRA weight; training samples
    weights from it, and `bayes_adapter.kl_divergence(model)` gives the KL to the prior `N(0, prior_std^2)`. In eval
    mode the adapter is its mean: exactly a plain LoRA.

    Weighting the KL: the loss to minimise is `diffusion_loss + kl_weight * kl_divergence(model) / num_examples`,
    with `num_examples` the number of training images (the KL is spread over the data set, as in Bayes by Backprop).
    The paper's released scripts use `kl_weight=0`: learned weight noise without a pull towards the prior.

    With `use_dora=True` (Linear layers, estimator "weight") DoRA's low-rank direction is Bayesian and its magnitude
    vector deterministic; the weight norm is that of the sampled weight while sampling, of the mean otherwise.
    """

    bayesian_factors: Literal["A", "B", "AB"] = field(
        default="B",
        metadata={
            "help": (
                "Which LoRA factors are Bayesian: 'B' (the up matrix, the paper's choice: with B initialised to zero "
                "and A random, its noise perturbs the output from the first step), 'A' (the down matrix, as BLoB), or "
                "'AB' (both). Applies to Linear and convolution layers; nn.Embedding layers follow "
                "`embedding_bayesian_factors`."
            ),
            "is_lora_variant": True,
        },
    )
    embedding_bayesian_factors: Literal["A", "B", "AB"] | None = field(
        default=None,
        metadata={
            "help": (
                "Which factors are Bayesian on nn.Embedding layers. PEFT initialises an embedding's A to zero and its "
                "B at random (the reverse of Linear), so the roles swap: None (the default) takes the factor in the "
                "role `bayesian_factors` names, 'B' -> 'A' (the zero-initialised factor, whose noise perturbs the "
                "output from the first step), 'A' -> 'B', 'AB' -> 'AB'. A config saved before this field existed "
                "loads with its `bayesian_factors`, as it was trained."
            )
        },
    )
    posterior_std_init: float = field(
        default=0.01,
        metadata={"help": "Initial posterior standard deviation of every Bayesian weight (the paper uses 0.01)."},
    )
    prior_std: float = field(
        default=0.01,
        metadata={"help": "Standard deviation of the zero-mean Gaussian prior on every Bayesian weight."},
    )
    estimator: Literal["weight", "local", "flipout"] = field(
        default="weight",
        metadata={
            "help": (
                "How training samples the posterior: 'weight' (one weight sample per layer per forward, shared by the "
                "batch: the paper's), 'local' (local reparameterisation: the adapter's output sampled per example and "
                "element from its Gaussian), 'flipout' (one shared perturbation with per-example sign flips, as BLoB)."
            )
        },
    )
    sample_at_inference: bool = field(
        default=False,
        metadata={
            "help": "Keep sampling weights in eval mode (for predictive uncertainty); by default eval uses the mean."
        },
    )
    train_posterior_std: bool = field(
        default=True,
        metadata={
            "help": (
                "Learn the posterior standard deviations. False freezes them at `posterior_std_init`: plain "
                "fixed-scale weight noise, the control that tells Bayesian learning from noise injection."
            )
        },
    )
    posterior_std_parametrisation: Literal["exp_linear", "softplus"] = field(
        default="exp_linear",
        metadata={
            "help": (
                "How the free parameter rho holds the std: 'exp_linear' (std = posterior_std_init * (1 + "
                "elu(rho / posterior_std_init)), rho from 0: exponential below the initial std, linear above; Adam "
                "moves the std by about lr / posterior_std_init relative per step, so it learns at LoRA learning "
                "rates, and by at most about lr per step upwards) or 'softplus' (std = softplus(rho), "
                "bayes-adapter 0.1.0's: the std barely moves at fine-tuning learning rates). Saved with the adapter; "
                "a config saved without it (0.1.0) loads as 'softplus'."
            )
        },
    )
    posterior_std_max: float | Literal["auto"] | None = field(
        default="auto",
        metadata={
            "help": (
                "Smooth upper bound of every posterior std: the std is unchanged up to posterior_std_init and then "
                "approaches this value, never passing it (no clamp: the gradient only fades, `bayes.bounded_std`); "
                "the KL uses the same bounded std. It keeps a large learning rate from growing the stds without limit "
                "(with kl_weight=0 nothing else holds them, and large stds turn samples into noise). 'auto' (the "
                f"default) is {DEFAULT_STD_MAX_FACTOR:g} x posterior_std_init, None is unbounded (the paper's and "
                "bayes-adapter 0.1.0's and 0.2.0's: a config saved without this field loads as None). Must be > "
                "posterior_std_init."
            )
        },
    )
    kl_weight: float = field(
        default=0.0,
        metadata={
            "help": (
                "Weight of the KL term, recorded with the adapter and used by `bayes_adapter.kl_loss`: the training "
                "loss adds `kl_weight * KL / num_examples`. 0 (the default) is the paper's released setting; "
                "`bayes_adapter.elbo_kl_weight(latent_shape, num_train_timesteps)` gives the weight that makes the "
                "loss a negative ELBO per example (2 / (D * T)), which the lab found to hold the std at the prior at "
                "a fidelity cost (README, 'The posterior'). Much larger weights pull the means towards zero."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = _peft_compat.peft_type_member(PEFT_TYPE_NAME)
        if self.bayesian_factors not in BAYESIAN_FACTORS:
            raise ValueError(f"bayesian_factors must be one of {BAYESIAN_FACTORS}, got {self.bayesian_factors!r}")
        if self.embedding_bayesian_factors is not None and self.embedding_bayesian_factors not in BAYESIAN_FACTORS:
            raise ValueError(
                f"embedding_bayesian_factors must be None or one of {BAYESIAN_FACTORS}, got "
                f"{self.embedding_bayesian_factors!r}"
            )
        if self.posterior_std_parametrisation not in POSTERIOR_STD_PARAMETRISATIONS:
            raise ValueError(
                f"posterior_std_parametrisation must be one of {POSTERIOR_STD_PARAMETRISATIONS}, got "
                f"{self.posterior_std_parametrisation!r}"
            )
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        _check_std("posterior_std_init", self.posterior_std_init)
        _check_std("prior_std", self.prior_std)
        if self.posterior_std_max == "auto":
            self.posterior_std_max = DEFAULT_STD_MAX_FACTOR * self.posterior_std_init
        if self.posterior_std_max is not None and (
            isinstance(self.posterior_std_max, bool)
            or not isinstance(self.posterior_std_max, (int, float))
            or not self.posterior_std_init < self.posterior_std_max < math.inf
        ):
            raise ValueError(
                "posterior_std_max must be a finite number > posterior_std_init "
                f"({self.posterior_std_init!r}), 'auto' ({DEFAULT_STD_MAX_FACTOR:g} x posterior_std_init) or None "
                f"(unbounded), got {self.posterior_std_max!r}"
            )
        if (
            isinstance(self.kl_weight, bool)
            or not isinstance(self.kl_weight, (int, float))
            or not math.isfinite(self.kl_weight)
            or self.kl_weight < 0
        ):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {self.kl_weight!r}")
        for name in ("sample_at_inference", "train_posterior_std"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        variants = {k: v for k, v in _peft_compat.enabled_lora_variants(self).items() if k != "use_dora"}
        if variants:
            name, value = next(iter(variants.items()))
            raise ValueError(
                f"{name}={value!r} is a LoRA variant that BayesLoraConfig does not support; Bayesian LoRA combines "
                "with plain LoRA and DoRA (use_dora=True) only (leave it at its default)."
            )
        if self.use_dora and self.estimator != "weight":
            raise ValueError(
                f"use_dora=True needs estimator='weight', got estimator={self.estimator!r}: DoRA divides by the norm "
                "of the sampled weight, which the 'local' and 'flipout' estimators never form."
            )
        if self.target_parameters:
            raise ValueError(
                f"target_parameters={self.target_parameters!r} is not supported by BayesLoraConfig: target modules "
                "(target_modules) instead."
            )

    def factors_of_embeddings(self) -> str:
        """The Bayesian factors of an nn.Embedding layer: `embedding_bayesian_factors`, or `bayesian_factors`'s
        roles on an embedding (B <-> A, since there PEFT initialises A to zero)."""
        if self.embedding_bayesian_factors is not None:
            return self.embedding_bayesian_factors
        return {"A": "B", "B": "A", "AB": "AB"}[self.bayesian_factors]

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Called by PEFT on a saved config before building it: what an older config was trained with is kept
        (0.1.0's softplus std; without `embedding_bayesian_factors`, embeddings Bayesian in `bayesian_factors`'s
        letters, as adapters were built before that field existed; without `posterior_std_max`, unbounded stds)."""
        kwargs = super().check_kwargs(**kwargs)
        legacy = {
            "posterior_std_parametrisation": saved_parametrisation(kwargs),
            "posterior_std_max": saved_posterior_std_max(kwargs),
        }
        if "embedding_bayesian_factors" not in kwargs:
            legacy["embedding_bayesian_factors"] = kwargs.get("bayesian_factors", "B")
        return {**legacy, **kwargs}


def saved_parametrisation(config: dict) -> str:
    """The posterior-std parametrisation a saved config (`adapter_config.json` as a dict) was written with."""
    return config.get("posterior_std_parametrisation") or LEGACY_POSTERIOR_STD_PARAMETRISATION


def saved_posterior_std_max(config: dict) -> float | None:
    """The std bound a saved config (`adapter_config.json` as a dict) was written with: None (unbounded) for a config
    saved before `posterior_std_max` existed (bayes-adapter 0.1.0 and 0.2.0)."""
    return config.get("posterior_std_max")
