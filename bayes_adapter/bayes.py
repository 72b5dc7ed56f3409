"""The Bayesian maths of bayes-adapter, in plain torch (no PEFT import).

A Bayesian LoRA factor is a mean-field Gaussian posterior q(W) = N(mean, posterior_std^2) over every entry of the
factor, with `posterior_std = softplus(rho)` so that it stays positive for any value of the free parameter `rho`. The
prior is p(W) = N(0, prior_std^2): since LoRA adds `B @ A` to the pretrained weight, a zero-mean prior on a factor
centres the prior of the full weight on the pretrained model.

Three estimators turn the posterior into a forward pass during training:

- ``"weight"``: one weight sample per layer per forward, shared by the whole batch (the paper's choice).
- ``"local"``: local reparameterisation (Kingma et al., 2015): the factor's output is Gaussian given its input, so it is
  sampled directly, independently for every example and every output element.
- ``"flipout"`` (Wen et al., 2018): one shared weight perturbation, decorrelated across examples by random sign flips
  of its input and output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


ESTIMATORS = ("weight", "local", "flipout")

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


def posterior_std(rho: torch.Tensor) -> torch.Tensor:
    """The posterior standard deviation held by the free parameter `rho`: `softplus(rho)`, always positive."""
    return F.softplus(rho)


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """Closed-form KL(N(mean, std^2) || N(0, prior_std^2)), summed over all entries.

    Args:
        mean: Posterior means.
        std: Posterior standard deviations, same shape as `mean`, all > 0.
        prior_std: Standard deviation of the zero-mean prior.

    Returns:
        A 0-dim tensor, differentiable with respect to `mean` and `std`.
    """
    variance_ratio = (std / prior_std) ** 2
    kl = 0.5 * (variance_ratio + (mean / prior_std) ** 2 - 1.0 - torch.log(variance_ratio))
    return kl.sum()


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


@torch.no_grad()
def std_summary(stds: Iterable[torch.Tensor]) -> dict[str, float]:
    """Mean, min and max over all entries of some standard-deviation tensors, and how many entries there are.

    Args:
        stds: Tensors of standard deviations (any shapes); NaN statistics and a zero count if there are none.
    """
    total, count, low, high = 0.0, 0, math.inf, -math.inf
    for std in stds:
        std = std.float()
        total += std.sum().item()
        count += std.numel()
        low, high = min(low, std.min().item()), max(high, std.max().item())
    if count == 0:
        return {"mean": math.nan, "min": math.nan, "max": math.nan, "count": 0}
    return {"mean": total / count, "min": low, "max": high, "count": count}
