"""The DreamBooth script's stage monitor: a tiny run writes <output_dir>/monitor.jsonl, `bayes-adapter stage` reads it,
a resumed run drops the records after its checkpoint, and the end-of-training summary prints the verdict."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_models import dreambooth_args, reset_accelerate_state, tensorboard_scalars

import bayes_adapter
from bayes_adapter.cli import main as cli_main
from examples.dreambooth import data as dreambooth_data
from examples.dreambooth import training
from examples.dreambooth.settings import ArgumentsError, parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

COMMON = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--monitor_images", "2"]
FAST = ["--validation_inference_steps", "2"]


def vae_ceiling(pipeline_dir, instance_dir) -> float:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(pipeline_dir), subfolder="vae")
    images = torch.stack([dreambooth_data.load_image(p, 32)[0] for p in sorted(instance_dir.iterdir())])
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    return bayes_adapter.structural_fidelity(reconstruction, images)


def test_a_tiny_run_writes_monitor_records_that_the_stage_command_reads(tmp_path, tiny_sd, instance_dir, capsys):
    out = tmp_path / "run"
    training.main(parse_args(dreambooth_args(tiny_sd, instance_dir, out, *COMMON, *FAST)))
    summary = capsys.readouterr().out

    records = bayes_adapter.read_monitor(out / "monitor.jsonl")
    assert [r.step for r in records] == [2, 4]  # the checkpointing interval by default
    losses = tensorboard_scalars(out / "logs", "loss")
    for record, steps in zip(records, ([1, 2], [3, 4])):
        # the loss averaged since the previous record (TensorBoard keeps float32)
        assert record.loss == pytest.approx(sum(losses[s] for s in steps) / 2, rel=1e-6)
        assert record.fidelity <= 1
        assert record.noise_energy >= 0 and 0 <= record.noise_whiteness <= 1 and record.copy_rate in (0.0, 0.5, 1.0)
    # The ceiling: SSIM of the VAE's reconstruction of the instance images (the tiny random VAE's is ~0), once.
    assert (
        records[0].fidelity_ceiling
        == records[1].fidelity_ceiling
        == pytest.approx(
            vae_ceiling(tiny_sd, instance_dir), abs=1e-5
        )  # float32 rounding: the script encodes one image at a time
    )
    assert tensorboard_scalars(out / "logs", "monitor/fidelity") == pytest.approx(
        {r.step: r.fidelity for r in records}, rel=1e-6
    )

    verdict = bayes_adapter.judge(records)
    sentence = bayes_adapter.verdict_sentence(verdict, [2, 4])
    assert f"\nCorruption stage: {sentence}\n" in summary  # the end-of-training summary
    assert cli_main(["stage", str(out / "monitor.jsonl")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == sentence
    assert cli_main(["stage", str(out / "monitor.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_records"] == 2

    # Resumed from checkpoint-2: the record of step 4 goes, the run writes it again; the record of step 2 stays.
    lines = (out / "monitor.jsonl").read_text().splitlines()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(out / "monitor.jsonl", resumed / "monitor.jsonl")
    reset_accelerate_state()
    training.main(
        parse_args(
            dreambooth_args(tiny_sd, instance_dir, resumed, *COMMON, *FAST, "--resume_from_checkpoint", "latest")
        )
    )
    again = (resumed / "monitor.jsonl").read_text().splitlines()
    assert len(again) == 2 and again[0] == lines[0]
    redone = bayes_adapter.read_monitor(resumed / "monitor.jsonl")[1]
    assert redone.step == 4 and redone.loss == pytest.approx(records[1].loss, rel=1e-4)
    assert redone.fidelity == pytest.approx(records[1].fidelity, abs=1e-4)  # same weights, same seeds


def test_monitor_steps_0_turns_it_off_and_bad_values_are_refused(tmp_path, tiny_sd, instance_dir):
    out = tmp_path / "off"
    training.main(parse_args(dreambooth_args(tiny_sd, instance_dir, out, *COMMON, *FAST, "--monitor_steps", "0")))
    assert (out / "checkpoint-4").is_dir() and not (out / "monitor.jsonl").exists()
    for flag, value, expected in (("--monitor_steps", "-1", ">= 0"), ("--monitor_images", "0", ">= 1")):
        with pytest.raises(ArgumentsError, match=f"{flag}={value} is invalid; expected an integer {expected}"):
            parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "new", flag, value))
    settings = parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "new", "--checkpointing_steps", "7"))
    assert (settings.monitor_steps, settings.monitor_images) == (7, 4)


@pytest.mark.parametrize("family", ["flux2", "qwenimage"])
def test_the_monitor_measures_the_newer_dit_families_in_their_denoisers_latent_space(
    request, family, tmp_path, instance_dir
):
    """Flux.2 (patchified, normalised latents) and Qwen-Image (a video VAE: one frame) write a record too."""
    out = tmp_path / "out"
    extra = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--monitor_images", "1", *FAST]
    training.main(parse_args(dreambooth_args(request.getfixturevalue(f"tiny_{family}"), instance_dir, out, *extra)))
    (record,) = bayes_adapter.read_monitor(out / "monitor.jsonl")
    assert record.step == 2 and record.loss > 0 and record.fidelity_ceiling <= 1
    assert record.noise_energy > 0 and 0 < record.noise_whiteness <= 1


class _CopyingPipeline:
    """Stands in for a pipeline whose samples are exact copies: it returns the VAE's decoding of the training latent,
    which is what a denoiser that reproduces the training latent gives."""

    def __init__(self, images):
        self.images = images

    def set_progress_bar_config(self, **kwargs):
        pass

    def to(self, device):
        return self

    def __call__(self, prompt, **kwargs):
        return type("Output", (), {"images": self.images[: len(prompt)]})()


def test_a_perfect_copy_has_no_latent_residual_despite_the_vae_round_trip(tmp_path, tiny_sd, instance_dir):
    from accelerate import Accelerator
    from diffusers import AutoencoderKL

    from examples.dreambooth.settings import resolve_model
    from examples.dreambooth.stage_monitor import StageMonitor, decode, encode

    settings = resolve_model(
        parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "run", "--monitor_images", "1"))
    )
    vae = AutoencoderKL.from_pretrained(str(tiny_sd), subfolder="vae")
    reference = torch.stack([dreambooth_data.load_image(p, 32)[0] for p in sorted(instance_dir.iterdir())])[:1]
    (tmp_path / "run").mkdir()
    monitor = StageMonitor(settings, Accelerator(cpu=True), vae, torch.float32, reference, resumed_step=0)
    with torch.no_grad():
        raw, train_latents = encode(settings.family, vae, reference, "cpu", torch.float32)
        copies = (decode(vae, raw).permute(0, 2, 3, 1).numpy() + 1) / 2
    round_trip = bayes_adapter.latent_residuals(
        encode(settings.family, vae, torch.from_numpy(copies * 2 - 1).permute(0, 3, 1, 2), "cpu", torch.float32)[1],
        train_latents,
    )
    assert float(round_trip["energy"].max()) > 1e-4  # the tiny VAE's round trip is not the identity

    measured = monitor.maybe_record(settings.monitor_steps, lambda: _CopyingPipeline(copies), trained=[])
    assert measured["noise_energy"] < 1e-8  # against the round-tripped references, a copy has no residual
