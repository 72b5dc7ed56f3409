"""Lab v3's arms (PLAN_V3.md): one adapter config per regulariser, on the lab UNet's SD-named layers."""

from __future__ import annotations

import dataclasses

import peft

from bayes_adapter import BayesLoraConfig


TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
ARMS = ("lora", "bayes_paper", "bayes_default", "bayes_kl", "fixed_noise", "lora_dropout", "l2", "full")
ARM_LABELS = {
    "lora": "plain LoRA",
    "bayes_paper": "Bayesian, KL 0, no std bound (paper)",
    "bayes_default": "Bayesian, KL 0, bounded std (our default)",
    "bayes_kl": "Bayesian + ELBO KL, bounded std",
    "fixed_noise": "fixed-sigma weight noise",
    "lora_dropout": "LoRA dropout 0.1",
    "l2": "L2 pull to pretrained",
    "full": "full fine-tuning of the UNet (no adapter)",
}
BAYESIAN_ARMS = ("bayes_paper", "bayes_default", "bayes_kl", "fixed_noise")


def has_std_bound() -> bool:
    """Whether the installed package has issue 32's ``posterior_std_max`` (a bounded posterior std)."""
    return "posterior_std_max" in {f.name for f in dataclasses.fields(BayesLoraConfig)}


def adapter_config(
    arm: str, *, rank: int = 4, sigma: float = 0.01, kl_weight: float = 0.0, dropout: float = 0.1
) -> peft.LoraConfig:
    """The adapter config of ``arm``: plain LoRA (``lora``, ``l2``: the pull is a loss term), LoRA dropout, or Bayesian
    LoRA on the B factor with std init and prior std ``sigma`` (the paper's KL-0 arm without a std bound, our default
    with the package's bound, the ELBO KL with ``kl_weight``, or a fixed std)."""
    common = {"r": rank, "lora_alpha": rank, "target_modules": TARGETS}
    if arm in ("lora", "l2"):
        return peft.LoraConfig(**common)
    if arm == "lora_dropout":
        return peft.LoraConfig(lora_dropout=dropout, **common)
    if arm not in ARMS or arm == "full":
        raise ValueError(f"arm must be one of the adapter arms {ARMS[:-1]}, got {arm!r}")
    bayes = {
        "bayesian_factors": "B",
        "posterior_std_init": sigma,
        "prior_std": sigma,
        "estimator": "weight",
        "sample_at_inference": False,
        "train_posterior_std": arm != "fixed_noise",
        "kl_weight": kl_weight if arm == "bayes_kl" else 0.0,
    }
    if arm in ("bayes_default", "bayes_kl"):
        if not has_std_bound():
            raise ValueError(f"arm {arm!r} needs BayesLoraConfig.posterior_std_max (issue 32), not in this package")
    elif has_std_bound():
        bayes["posterior_std_max"] = None  # the paper had no bound; unbounded as before issue 32
    return BayesLoraConfig(**bayes, **common)
