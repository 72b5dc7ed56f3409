"""The DreamBooth script's data as users have it: a validation prompts file, aspect-ratio buckets, datasets folders."""

from __future__ import annotations

import pytest
from tiny_models import dreambooth_args

from examples.dreambooth.settings import ArgumentsError, parse_args


def test_validation_prompts_file_adds_one_prompt_a_line(tiny_sd, tmp_path, instance_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog in snow\n\n  a sks dog on the beach  \n", encoding="utf-8")
    argv = dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", "--validation_prompt", "a photo of sks dog")
    settings = parse_args([*argv, "--validation_prompts_file", str(prompts)])
    assert settings.validation_prompt == ["a photo of sks dog", "a photo of sks dog in snow", "a sks dog on the beach"]
    settings = parse_args(
        [*dreambooth_args(tiny_sd, instance_dir, tmp_path / "out"), "--validation_prompts_file", str(prompts)]
    )
    assert settings.validation_prompt == ["a photo of sks dog in snow", "a sks dog on the beach"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist; expected a text file, one prompt a line"),
        ("\n  \n", "holds no prompt"),
        (b"\xff\xfe\x00bad", "is not a UTF-8 text file"),
    ],
)
def test_bad_validation_prompts_file_is_refused_naming_it(tiny_sd, tmp_path, instance_dir, content, message):
    path = tmp_path / "prompts.txt"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif content is not None:
        path.write_bytes(content)
    argv = dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", "--validation_prompts_file", str(path))
    with pytest.raises(ArgumentsError, match=f"--validation_prompts_file='{path}' {message}"):
        parse_args(argv)


# --- aspect-ratio buckets -----------------------------------------------------------------------------------------


def write_image(path, width: int, height: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(
    "width, height, expected",
    [
        (40, 40, (32, 32)),
        (64, 32, (24, 48)),  # 2:1 at about 32^2 pixels, sides multiples of 8
        (32, 64, (48, 24)),
        (400, 40, (16, 64)),  # 10:1 is trained at the widest ratio, 4:1
    ],
)
def test_bucket_size_keeps_the_aspect_ratio_at_about_the_resolution_squared(width, height, expected):
    from examples.dreambooth.buckets import bucket_size

    assert bucket_size(width, height, 32, 8) == expected


def test_a_bucketed_image_is_resized_whole_not_centre_cropped(tmp_path):
    import numpy as np
    from PIL import Image

    from examples.dreambooth.data import load_image

    path = write_image(tmp_path / "wide.png", 64, 32)
    pixels, time_ids = load_image(path, (24, 48))
    whole = np.asarray(Image.open(path).convert("RGB").resize((48, 24), Image.BILINEAR), dtype=np.float32)
    assert pixels.shape == (3, 24, 48)
    assert np.array_equal(pixels.permute(1, 2, 0).numpy(), whole / 127.5 - 1.0)
    assert time_ids.tolist() == [32, 64, 0, 0, 24, 48]
    square, _ = load_image(path, 32)  # without buckets: the centre square, as before
    assert square.shape == (3, 32, 32)


def test_bucket_batches_hold_one_bucket_and_cover_every_image_once():
    from examples.dreambooth.buckets import BucketBatchSampler

    buckets = [(24, 40), (40, 24), (24, 40), (32, 32), (24, 40), (40, 24)]
    sampler = BucketBatchSampler(buckets, batch_size=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4  # (24, 40): 2 + 1, (40, 24): 1, (32, 32): 1
    assert sorted(i for batch in batches for i in batch) == list(range(len(buckets)))
    assert all(len({buckets[i] for i in batch}) == 1 and len(batch) <= 2 for batch in batches)


@pytest.mark.parametrize("cache", [[], pytest.param(["--cache_latents"], marks=pytest.mark.slow)])
def test_mixed_aspect_ratios_with_captions_train_in_buckets_at_batch_size_2(
    tiny_sd, tmp_path, monkeypatch, fresh_accelerate_state, cache
):
    from examples.dreambooth import families, training

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (width, height) in enumerate([(48, 32), (45, 30), (32, 48), (30, 45), (40, 40)]):
        write_image(folder / f"{i}.png", width, height, seed=i)
        (folder / f"{i}.txt").write_text(f"a photo of sks dog, view {i}", encoding="utf-8")
    seen = []
    family = families.FAMILIES["sd"]
    predict = family.predict

    def recording_predict(denoiser, noisy, *args, **kwargs):
        seen.append(tuple(noisy.shape))
        return predict(denoiser, noisy, *args, **kwargs)

    monkeypatch.setattr(family, "predict", recording_predict)
    extra = ["--aspect_ratio_buckets", "--train_batch_size", "2", "--max_train_steps", "3", *cache]
    result = training.main(parse_args(dreambooth_args(tiny_sd, folder, tmp_path / "out", *extra)))
    assert result["global_step"] == 3
    # 32 px buckets: 3:2 -> 24x40 px, 2:3 -> 40x24 px, 1:1 -> 32x32 px; the tiny VAE halves them.
    assert sorted(seen) == [(1, 4, 16, 16), (2, 4, 12, 20), (2, 4, 20, 12)]


def test_buckets_with_prior_preservation_are_refused(tiny_sd, tmp_path, instance_dir):
    extra = ["--aspect_ratio_buckets", "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class")]
    argv = dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", *extra, "--class_prompt", "a photo of dog")
    with pytest.raises(
        ArgumentsError, match="--aspect_ratio_buckets cannot be combined with --with_prior_preservation"
    ):
        parse_args(argv)


# --- --dataset_name: a local imagefolder with metadata.jsonl --------------------------------------------------------


def imagefolder(tmp_path, rows: list[dict], images: dict[str, tuple[int, int]]):
    import json

    folder = tmp_path / "dataset"
    (folder / "train").mkdir(parents=True)
    for i, (name, (width, height)) in enumerate(images.items()):
        write_image(folder / name, width, height, seed=i)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return folder


def dataset_args(tiny_sd, folder, out, *extra) -> list[str]:
    argv = dreambooth_args(tiny_sd, "unused", out, *extra)
    index = argv.index("--instance_data_dir")
    return [*argv[:index], "--dataset_name", str(folder), *argv[index + 2 :]]


def test_dataset_name_reads_captions_from_metadata_and_trains(tiny_sd, tmp_path, monkeypatch, fresh_accelerate_state):
    from examples.dreambooth import data as dreambooth_data
    from examples.dreambooth import sources, training

    rows = [
        {"file_name": "train/a.png", "caption": "a photo of sks dog on grass"},
        {"file_name": "train/b.png", "caption": "a photo of sks dog in snow", "extra": 1},
        {"file_name": "c.png"},  # no caption: --instance_prompt
    ]
    folder = imagefolder(tmp_path, rows, {"train/a.png": (40, 40), "train/b.png": (48, 32), "c.png": (32, 32)})
    argv = dataset_args(tiny_sd, folder, tmp_path / "out", "--caption_column", "caption", "--max_train_steps", "2")
    settings = parse_args(argv)
    images, captions = sources.instance_images_and_captions(settings)
    assert [p.name for p in images] == ["a.png", "b.png", "c.png"]
    assert captions == ["a photo of sks dog on grass", "a photo of sks dog in snow", "a photo of sks dog"]
    prompts = []
    dataset_class = dreambooth_data.DreamBoothDataset

    def recording_dataset(images, captions, *args, **kwargs):
        prompts.extend(captions)
        return dataset_class(images, captions, *args, **kwargs)

    monkeypatch.setattr(dreambooth_data, "DreamBoothDataset", recording_dataset)
    assert training.main(settings)["global_step"] == 2
    assert prompts == captions


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([], [], "metadata.jsonl lists no image"),
        ([{"file_name": "../x.png", "text": "t"}], [], "file_name '../x.png' is not a file inside the folder"),
        ([{"text": "t"}], [], 'metadata.jsonl line 1 has no "file_name"'),
        ([{"file_name": "c.png", "text": ""}], [], "--caption_column 'text' holds ''; expected a caption"),
        (
            [{"file_name": "c.png", "prompt": "t"}],
            ["--caption_column", "text"],
            r"--caption_column='text' is in no row .* \['file_name', 'prompt'\]",
        ),
    ],
)
def test_bad_imagefolder_is_refused_naming_the_line(tiny_sd, tmp_path, rows, extra, message):
    folder = imagefolder(tmp_path, rows, {"c.png": (32, 32)})
    with pytest.raises(ArgumentsError, match=message):
        parse_args(dataset_args(tiny_sd, folder, tmp_path / "out", *extra))


def test_dataset_name_and_instance_data_dir_are_one_or_the_other(tiny_sd, tmp_path, instance_dir):
    argv = [*dreambooth_args(tiny_sd, instance_dir, tmp_path / "out"), "--dataset_name", str(tmp_path)]
    with pytest.raises(ArgumentsError, match="give one of --instance_data_dir .* and --dataset_name"):
        parse_args(argv)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArgumentsError, match="is a folder with no metadata.jsonl that is not a save_to_disk folder"):
        parse_args(dataset_args(tiny_sd, tmp_path / "empty", tmp_path / "out"))


# --- --dataset_name: a folder written by datasets' save_to_disk ----------------------------------------------------


def saved_dataset(path, sizes: list[tuple[int, int]], captions: list, as_dict: bool = False, **columns):
    import datasets
    import numpy as np
    from PIL import Image

    images = [
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
        for i, (w, h) in enumerate(sizes)
    ]
    dataset = datasets.Dataset.from_dict({"image": images, "text": captions, **columns})
    dataset = dataset.cast_column("image", datasets.Image())
    (datasets.DatasetDict({"train": dataset}) if as_dict else dataset).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("as_dict", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_saved_dataset_trains_with_its_captions_in_buckets(
    tiny_sd, tmp_path, monkeypatch, fresh_accelerate_state, as_dict
):
    from examples.dreambooth import data as dreambooth_data
    from examples.dreambooth import sources, training

    captions = ["a photo of sks dog on grass", None, "a photo of sks dog in snow"]
    folder = saved_dataset(tmp_path / "saved", [(48, 32), (40, 40), (48, 32)], captions, as_dict=as_dict)
    extra = ["--aspect_ratio_buckets", "--cache_latents", "--train_batch_size", "2", "--max_train_steps", "2"]
    settings = parse_args(dataset_args(tiny_sd, folder, tmp_path / "out", *extra))
    images, prompts = sources.instance_images_and_captions(settings)
    assert [image.index for image in images] == [0, 1, 2] and images[0].split == ("train" if as_dict else None)
    assert prompts == ["a photo of sks dog on grass", "a photo of sks dog", "a photo of sks dog in snow"]
    pixels, _ = dreambooth_data.load_image(images[0], (24, 40))
    assert pixels.shape == (3, 24, 40)
    assert training.main(settings)["global_step"] == 2


@pytest.mark.parametrize(
    "flag, message",
    [
        (["--caption_column", "prompt"], r"--caption_column='prompt' is not a column of .*\['image', 'text'\]"),
        (["--image_column", "text"], "--image_column: .* holds a str, not an image"),
    ],
)
def test_a_saved_dataset_with_a_wrong_column_is_refused(tiny_sd, tmp_path, flag, message):
    folder = saved_dataset(tmp_path / "saved", [(32, 32)], ["a photo of sks dog"])
    with pytest.raises(ArgumentsError, match=message):
        parse_args(dataset_args(tiny_sd, folder, tmp_path / "out", *flag))


# --- --dataset_name: what datasets.load_dataset loads (a Hub dataset id, or a downloaded Hub dataset) --------------


def downloaded_hub_dataset(path, captions: list | None):
    """A Hub dataset's folder as `hf download --repo-type dataset` leaves it: a card and data/train-*.parquet."""
    import datasets
    import numpy as np
    from PIL import Image

    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 40, 3), dtype=np.uint8)) for i in (0, 1)]
    columns = {"picture": images} if captions is None else {"picture": images, "prompt": captions}
    dataset = datasets.Dataset.from_dict(columns).cast_column("picture", datasets.Image())
    (path / "data").mkdir(parents=True)
    dataset.to_parquet(str(path / "data" / "train-00000-of-00001.parquet"))
    (path / "README.md").write_text("---\nlicense: mit\n---\n# dogs\n")
    return path


def test_a_downloaded_hub_dataset_loads_with_load_dataset_and_trains(
    tiny_sd, tmp_path, monkeypatch, fresh_accelerate_state
):
    import datasets

    from examples.dreambooth import sources, training

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    folder = downloaded_hub_dataset(tmp_path / "dogs", ["a photo of sks dog on grass", None])
    extra = ["--image_column", "picture", "--caption_column", "prompt", "--max_train_steps", "2"]
    extra += ["--aspect_ratio_buckets", "--cache_latents"]
    settings = parse_args(dataset_args(tiny_sd, folder, tmp_path / "out", *extra))
    images, prompts = sources.instance_images_and_captions(settings)
    assert [(image.from_hub, image.split, image.index) for image in images] == [(True, "train", 0), (True, "train", 1)]
    assert prompts == ["a photo of sks dog on grass", "a photo of sks dog"]
    assert sources.open_image(images[1]).size == (40, 32)
    assert training.main(settings)["global_step"] == 2


def test_a_hub_dataset_id_reaches_load_dataset_with_its_config_and_the_train_split(tiny_sd, tmp_path, monkeypatch):
    import datasets
    from PIL import Image

    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        rows = {"image": [Image.new("RGB", (32, 32))], "text": ["a photo of sks dog"]}
        return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    parse_args(dataset_args(tiny_sd, "someone/sks-dogs", tmp_path / "out", "--dataset_config_name", "v2"))
    assert calls == [("someone/sks-dogs", "v2", "train")]


def test_a_hub_dataset_id_that_cannot_load_is_refused_with_what_datasets_said(tiny_sd, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # CI reaches package registries only
    message = (
        r"--dataset_name='someone/no-such-dogs' is not an existing local folder and, as a Hub dataset id, did not "
        r"load with datasets.load_dataset \(ConnectionError: .*someone/no-such-dogs"
    )
    with pytest.raises(ArgumentsError, match=message):
        parse_args(dataset_args(tiny_sd, "someone/no-such-dogs", tmp_path / "out"))
    folder = imagefolder(tmp_path, [{"file_name": "c.png", "text": "t"}], {"c.png": (32, 32)})
    with pytest.raises(
        ArgumentsError, match="--dataset_config_name='v2' applies to a Hub dataset .* local imagefolder"
    ):
        parse_args(dataset_args(tiny_sd, folder, tmp_path / "out", "--dataset_config_name", "v2"))


def test_without_caption_column_an_images_only_dataset_uses_the_instance_prompt(
    tiny_sd, tmp_path, monkeypatch, caplog
):
    """An images-only dataset (as diffusers/dog-example) trains on the instance prompt, as diffusers' DreamBooth
    scripts do without --caption_column; a dataset with a `text` column gives its captions; the log says which."""
    import logging

    import datasets

    from examples.dreambooth import sources

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    for captions in (None, ["a photo of sks dog on grass", None]):  # images only; captions in another column
        folder = downloaded_hub_dataset(tmp_path / f"dogs{captions is None}", captions)
        argv = dataset_args(tiny_sd, folder, tmp_path / "out", "--image_column", "picture")
        with caplog.at_level(logging.INFO, logger="examples.dreambooth.sources"):
            assert sources.instance_images_and_captions(parse_args(argv))[1] == ["a photo of sks dog"] * 2
        assert "no caption column" in caplog.text and "every image uses --instance_prompt" in caplog.text
        caplog.clear()
    saved = saved_dataset(tmp_path / "saved", [(32, 32)], ["a photo of sks dog on grass"])
    assert sources.instance_images_and_captions(parse_args(dataset_args(tiny_sd, saved, tmp_path / "out")))[1] == [
        "a photo of sks dog on grass"
    ]
    folder = imagefolder(tmp_path / "imgs", [{"file_name": "c.png", "prompt": "t"}], {"c.png": (32, 32)})
    assert sources.instance_images_and_captions(parse_args(dataset_args(tiny_sd, folder, tmp_path / "out")))[1] == [
        "a photo of sks dog"
    ]
    for flag in ("--dataset_config_name", "--image_column", "--caption_column"):  # with --instance_data_dir
        with pytest.raises(ArgumentsError, match=f"{flag}='v2' applies to --dataset_name"):
            parse_args([*dreambooth_args(tiny_sd, folder, tmp_path / "out"), flag, "v2"])
