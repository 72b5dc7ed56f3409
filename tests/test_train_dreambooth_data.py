"""The DreamBooth script's data: images, crops, caption files, repeats and caption dropout."""

from __future__ import annotations

import logging
import random

import pytest
from tiny_models import (
    dreambooth_args,
    write_images,
)

from examples.dreambooth import data as dreambooth_data
from examples.dreambooth import sources, training
from examples.dreambooth.settings import parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_load_image_crops_resizes_and_records_sdxl_time_ids(tmp_path):
    write_images(tmp_path, 1)
    pixels, time_ids = dreambooth_data.load_image(tmp_path / "0.png", 32, center_crop=True)
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    # 40x48 (h x w) -> 32x38, centre crop: 3 px from the left.
    assert time_ids.tolist() == [40, 48, 0, 3, 32, 32]


def test_caption_files_repeats_and_caption_dropout(tmp_path):
    folder = write_images(tmp_path / "imgs", 2)
    images = sorted(p for p in folder.iterdir())
    images[0].with_suffix(".txt").write_text("a photo of sks dog on grass\n")
    args = parse_args(dreambooth_args("no/such/model", folder, tmp_path / "out", "--repeats", "3"))
    listed = sources.list_images(folder, "--instance_data_dir", ".txt")
    assert listed == images  # the caption file is not taken for an image
    captions = sources.instance_captions(listed, args)
    assert captions == ["a photo of sks dog on grass", "a photo of sks dog"]  # the instance prompt is the fallback
    dataset = dreambooth_data.DreamBoothDataset(listed, captions, 32, repeats=args.repeats)
    assert len(dataset) == 6
    assert [dataset[i]["instance_prompt"] for i in range(6)] == captions * 3
    dropped = dreambooth_data.DreamBoothDataset(listed, captions, 32, caption_dropout=0.5)
    random.seed(0)
    prompts = [dropped[i % 2]["instance_prompt"] for i in range(200)]
    assert 60 < prompts.count("") < 140
    assert (
        sources.instance_captions(
            listed, parse_args(dreambooth_args("m", folder, tmp_path / "o", "--caption_extension", "none"))
        )
        == ["a photo of sks dog"] * 2
    )


def test_training_reads_caption_files(tmp_path, tiny_sd, monkeypatch):
    folder = write_images(tmp_path / "imgs", 2)
    next(iter(sorted(folder.iterdir()))).with_suffix(".txt").write_text("a photo of sks dog on grass")
    batches = []
    collate = dreambooth_data.collate
    monkeypatch.setattr(
        dreambooth_data, "collate", lambda examples, prior: batches.append(collate(examples, prior)) or batches[-1]
    )
    args = parse_args(
        dreambooth_args(tiny_sd, folder, tmp_path / "out", "--max_train_steps", "4", "--report_to", "none")
    )
    training.main(args)
    prompts = {prompt for batch in batches for prompt in batch["prompts"]}
    assert prompts == {"a photo of sks dog on grass", "a photo of sks dog"}


def test_os_files_in_an_image_folder_are_skipped_with_a_debug_line(tmp_path, caplog):
    folder = write_images(tmp_path / "imgs", 2)
    for name in ("Thumbs.db", "desktop.ini", ".DS_Store", "._0.png", "ehthumbs.db"):
        (folder / name).write_bytes(b"\x00not an image")
    (folder / "@eaDir").mkdir()  # Synology's thumbnail folder
    with caplog.at_level(logging.DEBUG, logger="examples.dreambooth.sources"):
        listed = sources.list_images(folder, "--instance_data_dir")
    assert [p.name for p in listed] == ["0.png", "1.png"]
    skipped = " ".join(record.getMessage() for record in caplog.records if record.levelno == logging.DEBUG)
    assert "Thumbs.db" in skipped and "desktop.ini" in skipped and ".DS_Store" in skipped
    # Any other file that is no image is still refused, naming it.
    (folder / "notes.doc").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"--instance_data_dir: '.*notes\.doc' is not a readable image"):
        sources.list_images(folder, "--instance_data_dir")
