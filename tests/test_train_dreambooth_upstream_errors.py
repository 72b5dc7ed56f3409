"""Errors from accelerate, diffusers and torch that the DreamBooth script turns into one line saying what to change."""

from __future__ import annotations

import pytest
import torch
from tiny_models import dreambooth_args

from examples.dreambooth import training
from examples.dreambooth.settings import parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert training.run_command(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]  # after models loaded, progress bars too
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_a_tracker_that_is_not_installed_is_refused(tmp_path, instance_dir):
    # accelerate only warns, then logs nothing.
    with pytest.raises(ValueError, match=r"--report_to='tensorboard,nosuchtracker': nosuchtracker is not installed"):
        parse_args(dreambooth_args("m/m", instance_dir, tmp_path / "o", "--report_to", "tensorboard,nosuchtracker"))


def test_a_missing_vae_folder_is_refused(tmp_path, instance_dir):
    with pytest.raises(ValueError, match=r"--pretrained_vae_model_name_or_path='\./no-vae': no such folder"):
        parse_args(
            dreambooth_args("m/m", instance_dir, tmp_path / "o", "--pretrained_vae_model_name_or_path", "./no-vae")
        )


def test_a_missing_variant_names_the_flag(tmp_path, tiny_sd, instance_dir, capsys):
    err = _error(capsys, dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", "--variant", "fp16"))
    assert "cannot load its unet" in err and "check --variant='fp16'" in err, err


def test_resuming_with_other_adapter_settings_names_the_flags(tmp_path, tiny_sd, instance_dir, capsys):
    out = tmp_path / "out"
    first = ["--max_train_steps", "1", "--checkpointing_steps", "1", "--report_to", "none"]
    training.main(parse_args(dreambooth_args(tiny_sd, instance_dir, out, *first)))
    resumed = ["--max_train_steps", "2", "--rank", "2", "--resume_from_checkpoint", "latest", "--report_to", "none"]
    from tiny_models import reset_accelerate_state

    reset_accelerate_state()
    err = _error(capsys, dreambooth_args(tiny_sd, instance_dir, out, *resumed))
    assert "--resume_from_checkpoint: checkpoint-1 holds another adapter" in err and "--rank" in err, err


def test_out_of_memory_says_what_to_change(tmp_path, instance_dir, monkeypatch, capsys):
    def out_of_memory(settings):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "main", out_of_memory)
    assert training.run_command(dreambooth_args("m/m", instance_dir, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "failed: out of memory (CUDA out of memory." in err and "--gradient_checkpointing" in err
