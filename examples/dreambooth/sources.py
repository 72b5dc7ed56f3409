"""Where the DreamBooth instance images and their prompts come from: a folder with caption files, a local
imagefolder, a dataset saved by `datasets`' `save_to_disk`, or a Hub dataset (`--dataset_name`)."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


logger = logging.getLogger(__name__)


def caption_suffix(settings) -> str | None:
    """`--caption_extension`, or None when caption files are ignored."""
    extension = settings.caption_extension
    return None if not extension or extension.lower() == "none" else extension


# Files that operating systems and file managers leave in folders (Windows, macOS, KDE, GNOME, Synology); kohya's and
# diffusers' loaders skip them too. Dotfiles (.DS_Store, ._dog.jpg, .directory, ...) are skipped as hidden files.
OS_FILES = frozenset({"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r", "@eadir"})


def is_os_file(path: Path) -> bool:
    """A hidden file or one an operating system leaves in folders (`Thumbs.db`, `desktop.ini`, ...)."""
    return path.name.startswith(".") or path.name.lower() in OS_FILES


def data_files(folder: Path) -> list[Path]:
    """The files of `folder` a user put there: hidden and operating-system files are skipped (logged at debug)."""
    files = []
    for path in sorted(folder.iterdir()):
        if is_os_file(path):
            logger.debug(f"Skipping {str(path)!r}: a hidden or operating-system file, not an image.")
        elif path.is_file():
            files.append(path)
    return files


def list_images(folder: Path, argument: str, caption_suffix: str | None = None) -> list[Path]:
    """Every file of `folder` but caption files (`caption_suffix`, .txt, .caption) and hidden or operating-system
    files (`is_os_file`), each checked to open as an image."""
    suffixes = tuple(filter(None, (caption_suffix, ".txt", ".caption")))
    files = [p for p in data_files(folder) if not p.name.endswith(suffixes)]
    for path in files:
        check_image(path, argument)
    return files


def check_image(path: Path, argument: str) -> None:
    """Raises `ValueError` naming `argument` if `path` is not a readable image."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises several types for unreadable files
        raise ValueError(
            f"{argument}: {str(path)!r} is not a readable image ({type(error).__name__}: {error}); expected only "
            "image files (PNG, JPEG, ...) in the folder."
        ) from None


IMAGEFOLDER_METADATA = "metadata.jsonl"
DEFAULT_CAPTION_COLUMN = "text"  # read where a dataset has it when --caption_column is not given
DEFAULT_IMAGE_COLUMN = "image"


@dataclass(frozen=True)
class DatasetImage:
    """One image of a `datasets` dataset: where it is (hashable, so it keys the latent and bucket caches as a file
    path does). `open_image` decodes it.

    `source` is a folder written by `save_to_disk` (`hub_config` unused), or what `datasets.load_dataset` loads with
    `from_hub`: a Hub dataset id or a downloaded Hub dataset's folder, with its config name `hub_config`."""

    source: str
    split: str | None
    index: int
    column: str
    from_hub: bool = False
    hub_config: str | None = None

    def __str__(self) -> str:
        return f"{self.source}[{self.split + ', ' if self.split else ''}{self.index}]"


@functools.lru_cache(maxsize=4)
def _saved_dataset(folder: str, split: str | None):
    import datasets

    dataset = datasets.load_from_disk(folder)
    return dataset[split] if split else dataset


@functools.lru_cache(maxsize=4)
def _hub_dataset(source: str, config: str | None):
    """The train split as diffusers' scripts load `--dataset_name` (downloaded once into the datasets cache)."""
    import datasets

    return datasets.load_dataset(source, config, split="train")


def open_image(source: Path | DatasetImage) -> Image.Image:
    """The image of a file or of a `datasets` row, as PIL opens it (not yet oriented or converted)."""
    if isinstance(source, DatasetImage):
        if source.from_hub:
            dataset = _hub_dataset(source.source, source.hub_config)
        else:
            dataset = _saved_dataset(source.source, source.split)
        image = dataset[source.index][source.column]
        if not isinstance(image, Image.Image):
            raise ValueError(
                f"--image_column: {str(source)!r} holds a {type(image).__name__}, not an image; expected a column "
                "of datasets.Image() type."
            )
        return image
    return Image.open(source)


def imagefolder_images(folder: Path, caption_column: str | None, default_prompt: str) -> tuple[list[Path], list[str]]:
    """The images of a local imagefolder (diffusers' / datasets' convention): `metadata.jsonl` (which
    `instance_images_and_captions` found in `folder`), one JSON object a line with the image's `file_name` (relative
    to the folder) and its caption in `caption_column`.

    Rows without the caption use `default_prompt` (`--instance_prompt`); with `caption_column` None, captions are
    read from the `text` key where rows have one.

    Raises:
        `ValueError` naming `--dataset_name` / `--caption_column`, the file and line, and what was expected.
    """
    argument = f"--dataset_name={str(folder)!r}"
    metadata = folder / IMAGEFOLDER_METADATA
    images, prompts, columns = [], [], set()
    root = folder.resolve()
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{argument}: {IMAGEFOLDER_METADATA} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not JSON ({error}); expected one JSON object a line.") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ValueError(f'{where} has no "file_name"; expected {{"file_name": "<image>", ...}}.')
        path = (folder / row["file_name"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise ValueError(f"{where}: file_name {row['file_name']!r} is not a file inside the folder.")
        check_image(path, where)
        columns.update(row)
        key = caption_column or DEFAULT_CAPTION_COLUMN
        caption = row.get(key)
        if caption is not None and (not isinstance(caption, str) or not caption.strip()):
            raise ValueError(f"{where}: --caption_column {key!r} holds {caption!r}; expected a caption.")
        images.append(path)
        prompts.append(caption.strip() if caption is not None else default_prompt)
    if not images:
        raise ValueError(f"{argument}: {IMAGEFOLDER_METADATA} lists no image; expected one JSON object per image.")
    used = caption_column or (DEFAULT_CAPTION_COLUMN if DEFAULT_CAPTION_COLUMN in columns else None)
    _log_caption_source(argument, used, sorted(columns))
    if caption_column is not None and caption_column not in columns:
        raise ValueError(
            f"--caption_column={caption_column!r} is in no row of {argument}'s {IMAGEFOLDER_METADATA}; its columns: "
            f"{sorted(columns)}."
        )
    return images, prompts


def _log_caption_source(argument: str, column: str | None, columns: list[str]) -> None:
    """Says where the captions come from: a dataset whose captions sit in an unexpected column otherwise trains on
    the instance prompt without a word."""
    if column is None:
        logger.info(
            f"{argument}: no caption column (no --caption_column, no {DEFAULT_CAPTION_COLUMN!r} among {columns}): "
            "every image uses --instance_prompt"
        )
    else:
        logger.info(f"{argument}: captions from {column!r}; images without one use --instance_prompt")


def saved_dataset_images(
    folder: Path, image_column: str, caption_column: str | None, default_prompt: str
) -> tuple[list[DatasetImage], list[str]]:
    """The rows of a dataset written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict`'s "train" split):
    each image in `image_column` (decoded and checked here), its caption in `caption_column` (None: `default_prompt`).

    Raises:
        `ValueError` naming `--dataset_name`, `--image_column` / `--caption_column` and the row.
    """
    argument = f"--dataset_name={str(folder)!r}"
    split = None
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if "train" not in splits:
            raise ValueError(f"{argument} is a DatasetDict without a 'train' split (it has {splits}).")
        split = "train"
    dataset = _saved_dataset(str(folder), split)
    images = [DatasetImage(str(folder), split, index, image_column) for index in range(len(dataset))]
    return _dataset_rows(dataset, images, argument, image_column, caption_column, default_prompt)


def hub_dataset_images(
    name: str, config: str | None, image_column: str, caption_column: str | None, default_prompt: str
) -> tuple[list[DatasetImage], list[str]]:
    """The train split of what `datasets.load_dataset(name, config)` loads: a Hub dataset id (downloaded into the
    datasets cache), or a Hub dataset's folder downloaded by hand (`hf download --repo-type dataset`, `git clone`).
    Images in `image_column`, captions in `caption_column` (None: `default_prompt`).

    Raises:
        `ValueError` naming `--dataset_name` (and `--dataset_config_name`), what `datasets` said, and the row.
    """
    argument = f"--dataset_name={name!r}" + (f" --dataset_config_name={config!r}" if config else "")
    try:
        dataset = _hub_dataset(name, config)
    except Exception as error:  # offline, not found, gated, no train split, unknown config: datasets' many types
        what = (
            "is a folder with no metadata.jsonl that is not a save_to_disk folder either, and"
            if Path(name).is_dir()
            else "is not an existing local folder and, as a Hub dataset id,"
        )
        raise ValueError(
            f"{argument} {what} did not load with datasets.load_dataset ({type(error).__name__}: {error}); expected "
            f"a local imagefolder (images and {IMAGEFOLDER_METADATA}), a save_to_disk folder, a downloaded Hub "
            "dataset, or the id of a Hub dataset with a 'train' split."
        ) from None
    images = [DatasetImage(name, "train", index, image_column, True, config) for index in range(len(dataset))]
    return _dataset_rows(dataset, images, argument, image_column, caption_column, default_prompt)


def _dataset_rows(
    dataset,
    images: list[DatasetImage],
    argument: str,
    image_column: str,
    caption_column: str | None,
    default_prompt: str,
) -> tuple[list[DatasetImage], list[str]]:
    """Checks the columns and every row of a loaded dataset: each image decodes, each caption is text or None.
    Without `caption_column`, captions come from a `text` column if there is one, else every image gets
    `default_prompt` (an images-only dataset such as diffusers/dog-example)."""
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"{flag}={column!r} is not a column of {argument}; its columns: {dataset.column_names}.")
    if not len(dataset):
        raise ValueError(f"{argument} has no rows; expected one row per image.")
    if caption_column is None and DEFAULT_CAPTION_COLUMN in dataset.column_names:
        caption_column = DEFAULT_CAPTION_COLUMN
    _log_caption_source(argument, caption_column, dataset.column_names)
    captions = dataset[caption_column] if caption_column is not None else [None] * len(dataset)
    prompts = []
    for image, caption in zip(images, captions, strict=True):
        try:
            open_image(image).load()
        except ValueError:
            raise
        except Exception as error:  # PIL and datasets raise several types for undecodable data
            raise ValueError(
                f"{argument}: row {image.index}'s {image_column!r} is not a readable image ({error})."
            ) from None
        if caption is not None and (not isinstance(caption, str) or not caption.strip()):
            raise ValueError(
                f"{argument}: row {image.index}'s {caption_column!r} holds {caption!r}; expected a caption."
            )
        prompts.append(caption.strip() if caption is not None else default_prompt)
    return images, prompts


def instance_images_and_captions(settings) -> tuple[list[Path | DatasetImage], list[str]]:
    """The instance images and each one's prompt: from `--dataset_name` (a local imagefolder with `metadata.jsonl`, a
    dataset saved by `save_to_disk`, else what `datasets.load_dataset` loads: a Hub dataset id or a downloaded one),
    or from `--instance_data_dir` with caption files (`--caption_extension`)."""
    if settings.dataset_name:
        folder = Path(settings.dataset_name)
        local_format = None
        if any((folder / name).is_file() for name in ("state.json", "dataset_dict.json")):
            local_format = "save_to_disk"
        elif (folder / IMAGEFOLDER_METADATA).is_file():
            local_format = "imagefolder"
        if local_format and settings.dataset_config_name:
            raise ValueError(
                f"--dataset_config_name={settings.dataset_config_name!r} applies to a Hub dataset (or a downloaded "
                f"one), but --dataset_name={settings.dataset_name!r} is a local {local_format} folder; drop it."
            )
        if local_format == "save_to_disk":
            return saved_dataset_images(
                folder,
                settings.image_column or DEFAULT_IMAGE_COLUMN,
                settings.caption_column,
                settings.instance_prompt,
            )
        if local_format == "imagefolder":
            return imagefolder_images(folder, settings.caption_column, settings.instance_prompt)
        return hub_dataset_images(
            settings.dataset_name,
            settings.dataset_config_name,
            settings.image_column or DEFAULT_IMAGE_COLUMN,
            settings.caption_column,
            settings.instance_prompt,
        )
    images = list_images(Path(settings.instance_data_dir), "--instance_data_dir", caption_suffix(settings))
    return images, instance_captions(images, settings)


def instance_captions(images: list[Path], settings) -> list[str]:
    """Each instance image's prompt: its caption file's text, or `--instance_prompt` where it has none."""
    suffix = caption_suffix(settings)
    prompts = []
    for image in images:
        caption = image.with_name(image.stem + suffix) if suffix else None
        if caption is not None and caption.is_file():
            try:
                text = caption.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"--caption_extension: {str(caption)!r} is not UTF-8 text") from None
            if not text:
                raise ValueError(f"--caption_extension: {str(caption)!r} is empty; write the caption or delete it")
            prompts.append(text)
        else:
            prompts.append(settings.instance_prompt)
    return prompts
