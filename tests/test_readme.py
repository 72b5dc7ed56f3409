"""The README's Quick start, run as written on a tiny pipeline cached under the model id it names (no Hub)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from tiny_models import save_tiny_pipeline


ROOT = Path(__file__).resolve().parents[1]


def quick_start_code() -> str:
    """The first Python block under the README's "## Quick start" heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Quick start\n") :]
    section = section[: section.index("\n## ", 1)]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def cache_pipeline(hub_cache: Path, model_id: str) -> None:
    """The tiny SD pipeline as the Hub cache holds a download of `model_id` (what offline from_pretrained reads)."""
    commit = "0" * 40
    repo = hub_cache / f"models--{model_id.replace('/', '--')}"
    save_tiny_pipeline(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_the_quick_start_runs_as_written(tmp_path):
    code = quick_start_code()
    model_id = re.search(r'model_id = "([^"]+)"', code).group(1)
    cache_pipeline(tmp_path / "hub", model_id)
    work = tmp_path / "work"
    (work / "dog").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):  # the user's photos: any size, JPEG
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(work / "dog" / f"{i}.jpg")
    (work / "quick_start.py").write_text(code)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, "quick_start.py"], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert process.returncode == 0, process.stderr[-4000:]
    lora = load_file(str(work / "dog-lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all(key.startswith("unet.") for key in lora)
    assert any(value.abs().sum() > 0 for key, value in lora.items() if "lora_B" in key), "the LoRA was not trained"
    with Image.open(work / "dog-in-snow.png") as image:
        assert image.size == (64, 64)  # the tiny UNet's sample_size (32) times its VAE's scale factor (2)
