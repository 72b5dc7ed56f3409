"""_atomic: a folder appears complete or not at all, and the previous one survives any failed step of the swap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bayes_adapter import _atomic
from bayes_adapter._atomic import atomic_folder, check_not_overlapping


def _write(folder: Path, text: str) -> None:
    (folder / "file.txt").write_text(text)


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_failed_step_of_the_swap_keeps_the_previous_folder(tmp_path, monkeypatch, failing_call):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        _write(tmp, "old")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError(5, "injected EIO")
        return real_replace(src, dst)

    monkeypatch.setattr(_atomic.os, "replace", replace)
    with pytest.raises(OSError, match="injected EIO"):
        with atomic_folder(out, overwrite=True) as tmp:
            _write(tmp, "new")
    assert (out / "file.txt").read_text() == "old"
    assert _hidden(tmp_path) == []  # no temporary or old folder left behind


def test_a_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            _write(tmp, "half")
            raise RuntimeError("failed while writing")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "out, relation", [("run", "contains"), ("run/adapter", "is"), ("run/adapter/export", "lies inside")]
)
def test_output_overlapping_the_source_is_refused(tmp_path, out, relation):
    source = tmp_path / "run" / "adapter"
    source.mkdir(parents=True)
    with pytest.raises(ValueError, match=f"out_dir=.* {relation} the source folder"):
        check_not_overlapping(tmp_path / out, source)
    check_not_overlapping(tmp_path / "elsewhere", source)
