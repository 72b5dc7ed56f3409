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
