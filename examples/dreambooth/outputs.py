"""What a DreamBooth run writes into `--output_dir`, and the guard that keeps a new run from mixing with an old one.

A run writes `checkpoint-<step>/`, the exported mean LoRA (`pytorch_lora_weights.safetensors`, `lora_kohya.safetensors`,
`export/`), the whole Bayesian adapters (`bayesian_adapter/`), validation images (`samples/`), the monitor's records
(`monitor.jsonl`) and the tracker logs (`--logging_dir`, `logs/`). A later run into the same folder must say whether
it continues that run (`--resume_from_checkpoint`) or replaces it (`--overwrite_output_dir`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image


BAYES_ADAPTER_DIR = "bayesian_adapter"
SAMPLES_DIR = "samples"
MONITOR_FILE = "monitor.jsonl"
EXPORT_DIR = "export"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # as bayes_adapter.export writes them
KOHYA_WEIGHTS_NAME = "lora_kohya.safetensors"
RUN_ENTRIES = (DIFFUSERS_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME, EXPORT_DIR, BAYES_ADAPTER_DIR, SAMPLES_DIR, MONITOR_FILE)


def _is_run_entry(path: Path, names: set[str]) -> bool:
    name = path.name
    if name.startswith(".") and (".tmp-" in name or ".old-" in name):  # an interrupted atomic write's sibling
        name = name[1:].split(".tmp-")[0].split(".old-")[0]
    return name in names or (name.startswith("checkpoint-") and name.removeprefix("checkpoint-").isdigit())


def previous_run_files(output_dir: str | Path, logging_dir: str | Path = "logs") -> list[Path]:
    """What a previous run left in `output_dir`: checkpoints, exports, adapters, samples, monitor records, logs.

    `logging_dir` counts when it lies inside `output_dir` (as `--logging_dir` is read: relative to it).
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    names = set(RUN_ENTRIES)
    logs = out / logging_dir
    if logs.parent.resolve() == out.resolve():
        names.add(logs.name)
    return sorted(path for path in out.iterdir() if _is_run_entry(path, names))


def check_output_dir(settings) -> None:
    """Refuses an `--output_dir` holding a previous run unless the settings resume it or overwrite it.

    Raises:
        `ValueError`: one line naming the flags and what was found.
    """
    out = Path(settings.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir={settings.output_dir!r} is a file; expected a folder (new or existing).")
    if settings.overwrite_output_dir and settings.resume_from_checkpoint:
        raise ValueError(
            "--overwrite_output_dir removes the checkpoints that --resume_from_checkpoint resumes from; give one."
        )
    found = previous_run_files(out, settings.logging_dir)
    if found and not settings.resume_from_checkpoint and not settings.overwrite_output_dir:
        shown = ", ".join(path.name for path in found[:5]) + (", ..." if len(found) > 5 else "")
        raise ValueError(
            f"--output_dir={settings.output_dir!r} holds a previous run ({shown}); give --resume_from_checkpoint "
            "latest to continue it, --overwrite_output_dir to replace it, or another --output_dir."
        )


def remove_previous_run(settings) -> list[Path]:
    """`--overwrite_output_dir`: deletes the previous run's files (`previous_run_files`); other files stay.

    Returns:
        `list[Path]`: what was deleted.
    """
    found = previous_run_files(settings.output_dir, settings.logging_dir)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


def save_samples(output_dir: str | Path, images: list[Image.Image], step: int, prefix: str = "step") -> Path:
    """Writes validation images as `<output_dir>/samples/<prefix>_<step:06d>_<i>.png`.

    Returns:
        `Path`: the samples folder.
    """
    folder = Path(output_dir, SAMPLES_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{prefix}_{step:06d}_{i}.png")
    return folder
