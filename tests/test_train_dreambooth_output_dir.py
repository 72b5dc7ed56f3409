"""The DreamBooth script's --output_dir: a previous run is refused, resumed or replaced, never mixed into."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import dreambooth_args, write_images

from examples.dreambooth import training
from examples.dreambooth.outputs import previous_run_files
from examples.dreambooth.settings import parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _previous_run(out: Path) -> None:
    """What a previous run leaves, and a file of the user's."""
    write_images(out / "checkpoint-7" / "unet", 1)
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"old lora")
    write_images(out / "samples", 1)
    (out / "logs").mkdir()
    (out / "logs" / "events.out.tfevents.old").write_bytes(b"old")
    (out / "notes.txt").write_text("my notes")


@pytest.mark.parametrize(
    "entry",
    [
        "checkpoint-12",
        "pytorch_lora_weights.safetensors",
        "bayesian_adapter",
        "export",
        "samples",
        "monitor.jsonl",
        "logs",
        "lora_kohya.safetensors",
        ".export.tmp-abc12",
    ],
)
def test_each_kind_of_previous_run_file_is_refused(tmp_path, instance_dir, entry):
    out = tmp_path / "out"
    out.mkdir()
    if "." in entry and not entry.startswith("."):
        (out / entry).write_bytes(b"x")
    else:
        (out / entry).mkdir()
    with pytest.raises(ValueError, match=rf"--output_dir='.*out' holds a previous run \({entry}\); give"):
        parse_args(dreambooth_args("no/such/model", instance_dir, out))
    # Continuing or replacing it is allowed.
    parse_args(dreambooth_args("no/such/model", instance_dir, out, "--overwrite_output_dir"))
    if entry.startswith("checkpoint-"):
        parse_args(dreambooth_args("no/such/model", instance_dir, out, "--resume_from_checkpoint", "latest"))


def test_a_folder_without_a_previous_run_is_accepted(tmp_path, instance_dir):
    out = tmp_path / "out"
    write_images(out / "my_images", 1)
    (out / "checkpoint-notes.txt").write_text("not a checkpoint")
    (out / "README.md").write_text("mine")
    assert previous_run_files(out) == []
    parse_args(dreambooth_args("no/such/model", instance_dir, out))


def test_the_command_line_refuses_a_previous_run_in_one_line_and_touches_nothing(
    tmp_path, tiny_sd, instance_dir, capsys
):
    out = tmp_path / "out"
    _previous_run(out)
    before = _tree(out)
    status = training.run_command(dreambooth_args(tiny_sd, instance_dir, out, "--max_train_steps", "1"))
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        "error: --output_dir=" in err and "--resume_from_checkpoint latest" in err and "--overwrite_output_dir" in err
    )
    assert "checkpoint-7" in err and "Traceback" not in err
    assert _tree(out) == before


def test_overwrite_and_resume_together_are_refused(tmp_path, instance_dir):
    with pytest.raises(
        ValueError, match="--overwrite_output_dir removes the checkpoints that --resume_from_checkpoint"
    ):
        parse_args(
            dreambooth_args(
                "no/such/model",
                instance_dir,
                tmp_path / "o",
                "--overwrite_output_dir",
                "--resume_from_checkpoint",
                "latest",
            )
        )


def test_overwrite_output_dir_replaces_the_previous_run_only(tmp_path, tiny_sd, instance_dir, capsys):
    out = tmp_path / "out"
    _previous_run(out)
    extra = ["--overwrite_output_dir", "--max_train_steps", "2", "--checkpointing_steps", "2"]
    extra += ["--validation_prompt", "a photo of sks dog", "--validation_steps", "2", "--num_validation_images", "1"]
    extra += ["--validation_inference_steps", "1"]
    training.main(parse_args(dreambooth_args(tiny_sd, instance_dir, out, *extra)))
    assert (out / "notes.txt").read_text() == "my notes"
    assert not (out / "checkpoint-7").exists() and (out / "checkpoint-2").is_dir()
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() != b"old lora"
    assert not (out / "logs" / "events.out.tfevents.old").exists()
    # The validation images, on disk: the validation's at step 2, then the exported LoRA's.
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["export_step_000002_0.png", "step_000002_0.png"]
    summary = capsys.readouterr().out
    assert "Trained 2 steps" in summary and "samples/" in summary and "pipe.load_lora_weights(" in summary
