"""The corruption-stage monitor of a DreamBooth run: `<output_dir>/monitor.jsonl`, read by `bayes-adapter stage`.

Every `--monitor_steps` steps (by default the checkpointing interval, so that every record has a checkpoint to go
back to) it samples `--monitor_images` images of the instance prompt with fixed seeds, encodes them with the
pipeline's own VAE and appends one record of `bayes_adapter.sample_measures.measure_samples` (SSIM fidelity to the
nearest instance image, latent residual energy and whiteness, copy rate) with the training loss averaged since the
previous record. The file format and the judge are the package's (`bayes_adapter.stage`); nothing here reads or
writes the file by hand.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.logging import get_logger

from .outputs import MONITOR_FILE


logger = get_logger(__name__)


def encode(family, vae, images: torch.Tensor, device, dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Images in [-1, 1], one at a time, through the family's VAE: the raw latent means (for `decode`) and the
    latents as the denoiser sees them (`family.to_latents`: scaled, for some families patchified), float32 on the
    CPU, where the residuals are measured."""
    raw = [family.encode_images(vae, family.vae_input(image[None].to(device, dtype)))[0] for image in images]
    latents = torch.cat([family.to_latents(vae, sample) for sample in raw]).float().cpu()
    return raw, latents


def decode(vae, raw: list[torch.Tensor]) -> torch.Tensor:
    """Images in [-1, 1] of raw VAE latents (as `encode` returns them), float32 on the CPU."""
    images = [vae.decode(sample).sample for sample in raw]
    images = [image[:, :, 0] if image.dim() == 5 else image for image in images]  # a video VAE's one frame
    return torch.cat(images).float().clamp(-1, 1).cpu()


class StageMonitor:
    """Writes a run's monitor records; the loop calls `add_loss` every step and `maybe_record` after it."""

    def __init__(self, settings, accelerator, vae, vae_dtype, reference: torch.Tensor, resumed_step: int):
        """Measures the training images once (the latents of their VAE reconstruction, and the reconstruction's
        fidelity, the ceiling the samples' fidelity is judged against), and drops any record after `resumed_step` (0 for a new run: a
        previous run's records in the same folder go)."""
        import bayes_adapter

        self.settings, self.accelerator = settings, accelerator
        self.path = Path(settings.output_dir) / MONITOR_FILE
        self.vae, self.vae_dtype = vae, vae_dtype
        self.reference = reference.float()
        with torch.no_grad():
            raw, _ = encode(settings.family, vae, self.reference, accelerator.device, vae_dtype)
            reconstruction = decode(vae, raw)
            # A sample reaches latent space through decode -> encode; so do the references, so that a perfect copy
            # has residual 0 instead of the VAE's round-trip error (0.014 energy on the lab's VAE, near the 0.02
            # that counts a clean copy).
            _, self.train_latents = encode(settings.family, vae, reconstruction, accelerator.device, vae_dtype)
        self.fidelity_ceiling = bayes_adapter.structural_fidelity(reconstruction, self.reference)
        self.loss_sum, self.loss_count = 0.0, 0
        if accelerator.is_main_process:
            bayes_adapter.drop_records_after(self.path, resumed_step)
        if self.fidelity_ceiling < 0.5:
            logger.warning(
                f"Stage monitor: the VAE's reconstruction of the instance images has SSIM {self.fidelity_ceiling:.3f} "
                "only; fidelity is judged against it (the fidelity_ceiling of each record)."
            )
        logger.info(
            f"Stage monitor: {settings.monitor_images} samples of the instance prompt every {settings.monitor_steps} "
            f"steps to {self.path} (fidelity ceiling {self.fidelity_ceiling:.3f})."
        )

    def add_loss(self, loss: float) -> None:
        self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1

    def maybe_record(self, step: int, make_pipeline, trained: list) -> dict[str, float] | None:
        """On the main process every `--monitor_steps` steps: sample, measure, append a record, log its fields."""
        if step % self.settings.monitor_steps or not self.accelerator.is_main_process:
            return None
        import bayes_adapter

        from .validation import generate

        for model in trained:
            model.eval()
        with torch.random.fork_rng(
            devices=[self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        ):
            pipeline = make_pipeline()
            images = generate(
                self.settings,
                self.accelerator,
                pipeline,
                self.settings.instance_prompt,
                seeds=range(self.settings.monitor_images),
            )
            del pipeline
        for model in trained:
            model.train()
        samples = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
        with torch.no_grad():
            _, sample_latents = encode(
                self.settings.family, self.vae, samples, self.accelerator.device, self.vae_dtype
            )
        measured = bayes_adapter.measure_samples(
            samples, self.reference, sample_latents, self.train_latents, fidelity_ceiling=self.fidelity_ceiling
        )
        loss = self.loss_sum / self.loss_count if self.loss_count else None
        self.loss_sum, self.loss_count = 0.0, 0
        record = bayes_adapter.MonitorRecord(step=step, loss=loss, fidelity_ceiling=self.fidelity_ceiling, **measured)
        bayes_adapter.append_monitor_record(self.path, record)
        self.accelerator.log({f"monitor/{key}": value for key, value in measured.items()}, step=step)
        return measured

    def verdict_sentence(self) -> str | None:
        """The judge's sentence on the records so far (None without records), naming the checkpoint to go back to."""
        import bayes_adapter
        from bayes_adapter.stage import saved_checkpoint_steps

        if not self.path.is_file() or self.path.stat().st_size == 0:  # no record yet (e.g. fewer steps than N)
            return None
        verdict = bayes_adapter.judge(bayes_adapter.read_monitor(self.path))
        return bayes_adapter.verdict_sentence(verdict, saved_checkpoint_steps(self.settings.output_dir))
