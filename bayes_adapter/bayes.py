"""The Bayesian maths of bayes-adapter, in plain torch (no PEFT import).

A Bayesian LoRA factor is a mean-field Gaussian posterior q(W) = N(mean, posterior_std^2) over every entry of the
factor. The prior is p(W) = N(0, prior_std^2): since LoRA adds `B @ A` to the pretrained weight, a zero-mean prior on
a factor centres the prior of the full weight on the pretrained model.

The std is held by a free parameter `rho`, in one of two parametrisations (`POSTERIOR_STD_PARAMETRISATIONS`):

- ``"exp_linear"`` (the default since 0.2.0): `posterior_std = std_init * (1 + elu(rho / std_init))`, `rho` from 0:
  exponential below the initial std (`std_init * exp(rho / std_init)`, so it never reaches 0 and needs no clamp),
  linear above it (`std_init + rho`, as the paper's code, which stores the std itself). Adam moves `rho` by about the
  learning rate per step, so the std moves by about `lr / std_init` relative per step near its start (1% at lr 1e-4
  and std 0.01) at any learning rate a LoRA uses, and by at most about `lr` per step when it grows, so a noisy
  gradient cannot blow it up (a pure exponential did, in the lab: examples/corruption_stage/RESULTS.md). Weight decay
  pulls it back to its initial value.
- ``"softplus"`` (0.1.0's): `posterior_std = softplus(rho)`. Adam moves `log(std)` by about the learning rate per step:
  at fine-tuning learning rates the std barely moves. Kept so that adapters saved by 0.1.0 load unchanged.

Either parametrisation can be bounded above by `std_max` (`bounded_std`): the std is unchanged up to its initial
value, then bends smoothly towards `std_max`, `std_init + headroom * (1 - exp(-excess / headroom))` with
`headroom = std_max - std_init` and `excess` the unbounded std's excess over `std_init`. The slope is 1 at `std_init`
(where the std starts) and `exp(-excess / headroom)` above: no clamp cuts the gradient, it only fades (in float32 it
underflows to 0 about 100 headrooms above the start, which Adam does not reach: its step shrinks with the gradient,
tests/test_std_bound.py). For "exp_linear" this is one more ATen `elu` on the two the unbounded std takes. With
`std_max=None` the std is the unbounded one, computed by exactly the same ops as before the bound existed.

Three estimators turn the posterior into a forward pass during training:

- ``"weight"``: one weight sample per layer per forward, shared by the whole batch (the paper's choice).
- ``"local"``: local reparameterisation (Kingma et al., 2015): the factor's output is Gaussian given its input, so it is
  sampled directly, independently for every example and every output element.
- ``"flipout"`` (Wen et al., 2018): one shared weight perturbation, decorrelated across examples by random sign flips
  of its input and output.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


ESTIMATORS = ("weight", "local", "flipout")
POSTERIOR_STD_PARAMETRISATIONS = ("exp_linear", "softplus")

# Keeps sqrt differentiable where a local-reparameterisation variance is exactly zero (e.g. zero inputs).
_VARIANCE_FLOOR = 1e-16


def softplus_inverse(std: float) -> float:
    """The `rho` for which `softplus(rho) == std`.

    Args:
        std: A positive standard deviation.
    """
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std!r}")
    # log(expm1(x)) overflows for large x, where softplus is the identity anyway.
    return std if std > 20 else math.log(math.expm1(std))


def initial_rho(posterior_std_init: float, parametrisation: str) -> float:
    """The value of the free parameter `rho` that holds the std `posterior_std_init`.

    Args:
        posterior_std_init: The initial posterior standard deviation, > 0.
        parametrisation: One of `POSTERIOR_STD_PARAMETRISATIONS`.
    """
    _check_parametrisation(parametrisation)
    return 0.0 if parametrisation == "exp_linear" else softplus_inverse(posterior_std_init)


def posterior_log_std(
    rho: torch.Tensor,
    parametrisation: str = "softplus",
    posterior_std_init: float = 1.0,
    posterior_std_max: float | None = None,
) -> torch.Tensor:
    """`log(posterior_std)`, computed directly where the parametrisation allows, so that it stays finite.

    Args:
        rho: The free parameter.
        parametrisation: One of `POSTERIOR_STD_PARAMETRISATIONS`.
        posterior_std_init: The initial std: the `std_init` of "exp_linear", and where a bound starts to bend.
        posterior_std_max: The smooth upper bound of the std (see `bounded_std`); None for none.
    """
    if posterior_std_max is None:
        return _unbounded_log_std(rho, parametrisation, posterior_std_init)
    return posterior_std_and_log_std(rho, parametrisation, posterior_std_init, posterior_std_max)[1]


def posterior_std(
    rho: torch.Tensor,
    parametrisation: str = "softplus",
    posterior_std_init: float = 1.0,
    posterior_std_max: float | None = None,
) -> torch.Tensor:
    """The posterior standard deviation held by the free parameter `rho`, always >= 0 (and <= `posterior_std_max`).

    Args:
        rho: The free parameter.
        parametrisation: One of `POSTERIOR_STD_PARAMETRISATIONS`; the default is 0.1.0's `softplus(rho)`.
        posterior_std_init: The initial std: the `std_init` of "exp_linear", and where a bound starts to bend.
        posterior_std_max: The smooth upper bound of the std (see `bounded_std`); None for none.
    """
    if posterior_std_max is None:
        return _unbounded_std(rho, parametrisation, posterior_std_init)
    _check_parametrisation(parametrisation)
    if parametrisation == "exp_linear":
        # elu with scale -1 gives -(std - std_init) in one op; a second elu (scale -1) bends its positive side:
        # `x` below 0, `headroom * (1 - exp(-x / headroom))` above. Exact below std_init (x * -1 * -1), and std_init
        # at rho = 0. Three ATen ops in all: this runs on every layer's every forward (benchmarks/RESULTS.md).
        headroom = _headroom(posterior_std_init, posterior_std_max, rho.dtype)
        minus_excess = torch.ops.aten.elu(rho, posterior_std_init, -1.0, 1.0 / posterior_std_init)
        return torch.ops.aten.elu(minus_excess, headroom, -1.0, 1.0 / headroom) + posterior_std_init
    return bounded_std(_unbounded_std(rho, parametrisation, posterior_std_init), posterior_std_init, posterior_std_max)


def posterior_std_and_log_std(
    rho: torch.Tensor,
    parametrisation: str = "softplus",
    posterior_std_init: float = 1.0,
    posterior_std_max: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`posterior_std` and `posterior_log_std` of the same `rho`, sharing their work (the KL needs both).

    Args: as `posterior_std`.
    """
    log_std = _unbounded_log_std(rho, parametrisation, posterior_std_init)
    if posterior_std_max is None:
        return _unbounded_std(rho, parametrisation, posterior_std_init), log_std
    std = posterior_std(rho, parametrisation, posterior_std_init, posterior_std_max)
    # Above std_init the bound bends the std (> 0: its log is finite); up to it the std is the unbounded one, whose
    # log is computed directly (finite where the std underflows). The inner where keeps log's gradient finite at the
    # entries it does not use.
    bent = std > posterior_std_init
    bent_log = torch.where(bent, std, posterior_std_init).log()
    return std, torch.where(bent, bent_log, log_std)


def _unbounded_log_std(rho: torch.Tensor, parametrisation: str, posterior_std_init: float) -> torch.Tensor:
    _check_parametrisation(parametrisation)
    if parametrisation == "exp_linear":
        scaled = rho / posterior_std_init
        # clamp: log1p's gradient at the unused (negative) branch must stay finite.
        return torch.where(scaled > 0, torch.log1p(scaled.clamp(min=0)), scaled) + math.log(posterior_std_init)
    return F.softplus(rho).log()


def _unbounded_std(rho: torch.Tensor, parametrisation: str, posterior_std_init: float) -> torch.Tensor:
    _check_parametrisation(parametrisation)
    if parametrisation == "exp_linear":
        # ATen's elu(x, alpha, scale, input_scale) is `x` above 0 and `alpha * (exp(x * input_scale) - 1)` below:
        # with `+ std_init`, exactly this parametrisation in two ops (it runs on every layer's every forward; a
        # where/clamp/exp form cost ~4% more of a small UNet's training step, benchmarks/RESULTS.md). The sum is
        # exact to about 1e-7 * std_init in float32, so stds below ~1e-6 * std_init lose precision and reach 0;
        # the KL takes `posterior_log_std`, which stays exact there.
        return torch.ops.aten.elu(rho, posterior_std_init, 1.0, 1.0 / posterior_std_init) + posterior_std_init
    return F.softplus(rho)


def _check_std_max(posterior_std_init: float, posterior_std_max: float) -> None:
    if not posterior_std_max > posterior_std_init:
        raise ValueError(
            f"posterior_std_max must be > posterior_std_init ({posterior_std_init!r}) or None, got "
            f"{posterior_std_max!r}"
        )


@functools.lru_cache(maxsize=64)
def _headroom(std_init: float, std_max: float, dtype: torch.dtype) -> float:
    """`std_max - std_init`, lowered by an ulp or two of `dtype` where needed so that the largest bounded std,
    `std_init + headroom` (where the exponential underflows to 0), rounds to at most `std_max` in `dtype`."""
    _check_std_max(std_init, std_max)
    headroom = std_max - std_init
    top = torch.tensor(std_max, dtype=dtype)
    saturated = torch.tensor([-math.inf], dtype=dtype)  # the ops of the bounded std at its limit, in `dtype`
    while bool(torch.ops.aten.elu(saturated, headroom, -1.0, 1.0 / headroom) + std_init > top):
        headroom -= torch.finfo(dtype).eps * headroom
    return headroom


def bounded_std(std: torch.Tensor, std_init: float, std_max: float) -> torch.Tensor:
    """A std bounded smoothly by `std_max`: unchanged up to `std_init`, then approaching `std_max`.

    Above `std_init`, `std_init + headroom * (1 - exp(-(std - std_init) / headroom))`, `headroom = std_max -
    std_init`: continuous with slope 1 at `std_init`, slope `exp(-(std - std_init) / headroom)` > 0 above, never
    above `std_max`, also after rounding in `std`'s dtype.

    Args:
        std: The unbounded std (differentiable).
        std_init: Where the bound starts to bend (the initial std: a std that has not grown is left as it is).
        std_max: The bound, > `std_init`.
    """
    headroom = _headroom(std_init, std_max, std.dtype)
    bent = torch.ops.aten.elu(std_init - std, headroom, -1.0, 1.0 / headroom) + std_init
    return torch.where(std > std_init, bent, std)


def _check_parametrisation(parametrisation: str) -> None:
    if parametrisation not in POSTERIOR_STD_PARAMETRISATIONS:
        raise ValueError(f"parametrisation must be one of {POSTERIOR_STD_PARAMETRISATIONS}, got {parametrisation!r}")


def gaussian_kl(
    mean: torch.Tensor, std: torch.Tensor, prior_std: float, log_std: torch.Tensor | None = None
) -> torch.Tensor:
    """Closed-form KL(N(mean, std^2) || N(0, prior_std^2)), summed over all entries.

    Args:
        mean: Posterior means.
        std: Posterior standard deviations, same shape as `mean`.
        prior_std: Standard deviation of the zero-mean prior.
        log_std: `log(std)`, if known directly: keeps the KL finite where `std` underflows to 0.

    Returns:
        A 0-dim tensor, differentiable with respect to `mean` and `std` (or `log_std`).
    """
    if log_std is None:
        log_std = torch.log(std)
    variance_ratio = (std / prior_std) ** 2
    kl = 0.5 * (variance_ratio + (mean / prior_std) ** 2 - 1.0) - (log_std - math.log(prior_std))
    return kl.sum()


def elbo_kl_weight(latent_shape: Sequence[int], num_train_timesteps: int) -> float:
    """The KL weight `2 / (D * T)` that makes `mse + kl_weight * KL / num_examples` a negative ELBO per example.

    Diffusion losses average the squared error over the D numbers of a latent and sample one of T timesteps. Read
    as a unit-variance Gaussian likelihood of the noise, summed over the D numbers and the T terms of the variational
    bound, the negative log-likelihood of one example is `D * T * mse / 2`; dividing the whole ELBO by that scale puts
    the KL (already spread over the training set by `kl_loss`) at `2 / (D * T)` times the mean loss.

    Args:
        latent_shape: The shape of one example's latent (the model input without its batch axis), e.g. `(4, 64, 64)`
            for Stable Diffusion 1.5 at 512 px, or its packed DiT token shape `(4096, 64)` for Flux at 1024 px.
        num_train_timesteps: T, the scheduler's `config.num_train_timesteps` (1000 for SD, SDXL, SD3 and Flux).

    Example: `BayesLoraConfig(..., kl_weight=elbo_kl_weight((4, 64, 64), 1000))` gives `kl_weight=1.22e-07`.
    """
    shape = tuple(latent_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"latent_shape must be a non-empty sequence of positive ints, got {latent_shape!r}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    return 2.0 / (math.prod(shape) * num_train_timesteps)


def sample_weight(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """One reparameterised sample `mean + std * eps`, `eps ~ N(0, I)`."""
    # addcmul: one op and one autograd node instead of two, which shows on small layers (benchmarks/).
    return torch.addcmul(mean, std, torch.randn_like(mean))


class _GaussianOutputNoise(torch.autograd.Function):
    """`mean + sqrt(variance + floor) * eps`, keeping one output-sized tensor for backward instead of two.

    Autograd would keep both `sqrt(...)` and `eps`; the gradient with respect to the variance only needs their ratio,
    `eps / (2 sqrt(variance + floor))`.
    """

    @staticmethod
    def forward(ctx, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        # At least fp32: in fp16 the floor rounds to 0 and eps / sqrt(0) poisons the gradient.
        compute_dtype = torch.promote_types(variance.dtype, torch.float32)
        std = variance.to(compute_dtype).add_(_VARIANCE_FLOOR).sqrt_()
        eps = torch.randn_like(std)
        output = torch.addcmul(mean.to(compute_dtype), std, eps).to(mean.dtype)
        ctx.save_for_backward(eps.div_(std).mul_(0.5))
        ctx.variance_dtype = variance.dtype
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (half_eps_over_std,) = ctx.saved_tensors
        grad_variance = grad * half_eps_over_std
        if grad_variance.dtype != ctx.variance_dtype:
            # Near a zero variance this gradient exceeds fp16's range; inf would turn the zero inputs behind that
            # variance into NaN (0 * inf) in the layer's backward, a finite bound keeps them at 0.
            limit = torch.finfo(ctx.variance_dtype).max
            grad_variance = grad_variance.clamp_(-limit, limit).to(ctx.variance_dtype)
        return grad, grad_variance


def local_reparameterisation(
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    x_squared: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Samples the output of a linear map with Gaussian weights directly from its Gaussian.

    Args:
        apply: `apply(input, weight)`, the linear map without bias (a matmul, a convolution, an embedding lookup).
        x: The input.
        x_squared: The input squared element-wise, as the map sees it (for an index input, the input itself).
        mean: Posterior mean of the weight.
        std: Posterior standard deviation of the weight.
        bias: A deterministic bias broadcast onto the output, if any.
    """
    out_mean = apply(x, mean)
    if bias is not None:
        out_mean = out_mean + bias
    return _GaussianOutputNoise.apply(out_mean, apply(x_squared, std * std))


def random_signs(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A tensor of independent +1/-1 entries with the dtype and device of `like`."""
    return torch.randint(0, 2, tuple(shape), device=like.device, dtype=like.dtype).mul_(2).sub_(1)


# `posterior_std_stats`' "near_bound_fraction": a std within this fraction of its bound counts as at the bound.
NEAR_BOUND_MARGIN = 0.05


@torch.no_grad()
def std_summary(stds: Iterable[torch.Tensor], bounds: Iterable[float | None] | None = None) -> dict[str, float]:
    """Mean, min and max over all entries of some standard-deviation tensors, how many entries there are, and which
    fraction of them is within `NEAR_BOUND_MARGIN` (5%) of its upper bound.

    Args:
        stds: Tensors of standard deviations (any shapes); NaN statistics and a zero count if there are none.
        bounds: The upper bound (`posterior_std_max`) of each tensor, None for an unbounded one (never near its
            bound); by default all are unbounded.
    """
    total, count, near, low, high = 0.0, 0, 0, math.inf, -math.inf
    bounds = iter(bounds) if bounds is not None else None
    for std in stds:
        bound = None if bounds is None else next(bounds)
        std = std.float()
        total += std.sum().item()
        count += std.numel()
        low, high = min(low, std.min().item()), max(high, std.max().item())
        if bound is not None:
            near += int((std >= (1.0 - NEAR_BOUND_MARGIN) * bound).sum().item())
    if count == 0:
        return {"mean": math.nan, "min": math.nan, "max": math.nan, "count": 0, "near_bound_fraction": math.nan}
    return {"mean": total / count, "min": low, "max": high, "count": count, "near_bound_fraction": near / count}
