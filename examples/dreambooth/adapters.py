"""The Bayesian LoRA adapters of a DreamBooth run: their config, injection, checkpoints and the exported mean LoRA."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from accelerate.logging import get_logger

from .targets import split_targets


logger = get_logger(__name__)


def lora_config(settings, target_modules: str, kl_weight: float):
    """The `BayesLoraConfig` the arguments describe, for the given comma-separated target modules."""
    from bayes_adapter import BayesLoraConfig

    return BayesLoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha or settings.rank,
        lora_dropout=settings.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=split_targets(target_modules),
        bayesian_factors=settings.bayesian_factors,
        embedding_bayesian_factors=settings.embedding_bayesian_factors,
        posterior_std_init=settings.posterior_std_init,
        prior_std=settings.prior_std,
        estimator=settings.estimator,
        kl_weight=kl_weight,
        posterior_std_parametrisation=settings.posterior_std_parametrisation,
        posterior_std_max=settings.posterior_std_max,
        train_posterior_std=not settings.fixed_posterior_std,
        sample_at_inference=settings.sample_at_inference,
        use_dora=settings.use_dora,
    )


# ----------------------------------------------------------------------------------------------------------------


def elbo_kl_weight_for(settings, vae_config, scheduler_config) -> float:
    """`bayes_adapter.elbo_kl_weight` for the training latents: `--resolution` through the VAE, the scheduler's T."""
    from bayes_adapter import elbo_kl_weight

    side = settings.resolution // 2 ** (len(vae_config.block_out_channels) - 1)
    return elbo_kl_weight((vae_config.latent_channels, side, side), scheduler_config.num_train_timesteps)


def add_adapters(settings, denoiser, text_encoders: list, kl_weight: float) -> dict:
    """Adds a Bayesian LoRA adapter to the denoiser and (`--train_text_encoder`) the family's trainable text encoders.

    Returns:
        `dict`: the trained components by name (`unet` or `transformer`, `text_encoder`, ...), adapters in fp32.
    """
    from peft import inject_adapter_in_model

    import bayes_adapter

    family = settings.family
    denoiser.add_adapter(lora_config(settings, family.denoiser_targets(settings), kl_weight))
    trained = {family.denoiser: denoiser}
    if settings.train_text_encoder:
        for name, text_encoder in zip(family.text_encoders, text_encoders):
            if name in family.trainable_text_encoders:  # the CLIP encoders; T5 stays frozen
                config = lora_config(settings, settings.text_encoder_target_modules, kl_weight)
                inject_adapter_in_model(config, text_encoder, adapter_name="default")
                trained[name] = text_encoder
    if settings.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for name in trained:
            if name != family.denoiser:
                trained[name].gradient_checkpointing_enable()
    # cast_training_params only upcasts trainable parameters: the frozen posterior rho (--fixed_posterior_std) too.
    for model in trained.values():
        bayes_adapter.cast_adapter_params(model, torch.float32)
    return trained


def save_bayes_adapters(output_dir: str | Path, models: dict) -> None:
    """The whole Bayesian adapter (means and posterior) of each component, atomically: `<output_dir>/<name>/`."""
    import bayes_adapter

    for name, model in models.items():
        bayes_adapter.save_bayesian_adapter(model, Path(output_dir, name), component=name, overwrite=True)


def load_bayes_adapters(input_dir: str | Path, models: dict) -> None:
    """Restores what `save_bayes_adapters` wrote into models that already hold the same Bayesian adapter."""
    import bayes_adapter

    for name, model in models.items():
        if not Path(input_dir, name).is_dir():
            raise ValueError(f"Checkpoint {str(input_dir)!r} has no adapter for {name!r}.")
        bayes_adapter.load_bayesian_weights(model, Path(input_dir, name), component=name)
        bayes_adapter.cast_adapter_params(model, torch.float32)


def export_mean_lora(output_dir: str | Path, models: dict, pipeline_cls, kohya: bool = False) -> None:
    """The posterior mean as a plain LoRA that loads without bayes_adapter: `bayes_adapter.export_components`.

    `<output_dir>/pytorch_lora_weights.safetensors` (every trained component, for `pipe.load_lora_weights`) and
    `<output_dir>/export/<component>/` (PEFT's and diffusers' formats and a summary of the posterior).
    """
    from bayes_adapter.export import export_components

    export_components(models, output_dir, pipeline_cls, kohya=kohya)


# ----------------------------------------------------------------------------------------------------------------


def unwrap(accelerator, model):
    """The model accelerate wraps (DDP, torch.compile)."""
    model = accelerator.unwrap_model(model)
    return model._orig_mod if hasattr(model, "_orig_mod") else model


def register_checkpoint_hooks(accelerator, trained: dict, pipeline_cls) -> None:
    """Makes `accelerator.save_state` / `load_state` save and restore the whole Bayesian adapters (means and
    posterior stds) of `trained`, not the frozen base weights; every checkpoint is also a loadable mean LoRA."""
    import bayes_adapter

    def save_model_hook(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            by_id = {id(model): name for name, model in trained.items()}
            components = {by_id[id(unwrap(accelerator, m))]: unwrap(accelerator, m) for m in models}
            save_bayes_adapters(checkpoint_dir, components)
            # Every checkpoint is also a LoRA: pipe.load_lora_weights("out/checkpoint-N") loads its mean.
            bayes_adapter.export.export_components(components, checkpoint_dir, pipeline_cls, per_component=False)
        while weights:
            weights.pop()  # keep accelerate from saving the full models

    def load_model_hook(models, checkpoint_dir):
        by_id = {id(model): name for name, model in trained.items()}
        loaded = {}
        while models:
            model = unwrap(accelerator, models.pop())
            loaded[by_id[id(model)]] = model
        load_bayes_adapters(checkpoint_dir, loaded)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoint-<step>` folders of `output_dir`, oldest first."""
    found = (p for p in output_dir.glob("checkpoint-*") if p.is_dir())
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(settings, accelerator, global_step: int) -> None:
    """`accelerator.save_state` to `checkpoint-<step>`, first removing the oldest beyond `--checkpoints_total_limit`."""
    output_dir = Path(settings.output_dir)
    if settings.checkpoints_total_limit is not None:
        found = checkpoints(output_dir)
        for old in found[: max(0, len(found) - settings.checkpoints_total_limit + 1)]:
            logger.info(f"Removing checkpoint {old} (--checkpoints_total_limit={settings.checkpoints_total_limit})")
            shutil.rmtree(old)
    path = output_dir / f"checkpoint-{global_step}"
    accelerator.save_state(str(path))
    logger.info(f"Saved state to {path}")


def resume_checkpoint(settings) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names ('latest': the newest; None when there is none)."""
    output_dir = Path(settings.output_dir)
    if settings.resume_from_checkpoint == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    return output_dir / Path(settings.resume_from_checkpoint).name
