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


# Replaces `out` in a child process that is killed (os._exit, no cleanup) at the given os.replace call of the swap.
KILLED_REPLACEMENT = """
import importlib.util, os, sys

# _atomic uses the standard library only: loaded by path, without importing the package (torch, peft, ...).
spec = importlib.util.spec_from_file_location("_atomic", sys.argv[3])
_atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_atomic)
out, kill_at = sys.argv[1], int(sys.argv[2])
real_replace, calls = os.replace, []


def replace(src, dst):
    calls.append(src)
    if len(calls) == kill_at:
        os._exit(9)
    return real_replace(src, dst)


_atomic.os.replace = replace
with _atomic.atomic_folder(out, overwrite=True) as tmp:
    with open(os.path.join(tmp, "file.txt"), "w") as f:
        f.write("new")
"""


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_replacement_killed_at_any_rename_leaves_the_old_folder_or_recovers_it(tmp_path, kill_at):
    """Killed before the first rename, `out` is untouched; between the two, the next write (or an explicit
    `recover_interrupted_swap`) puts the previous folder back before doing anything else."""
    import subprocess
    import sys

    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        _write(tmp, "old")
    argv = [sys.executable, "-c", KILLED_REPLACEMENT, str(out), str(kill_at), _atomic.__file__]
    child = subprocess.run(argv, timeout=120)
    assert child.returncode == 9
    if kill_at == 1:
        assert (out / "file.txt").read_text() == "old"
    else:
        assert not out.exists()  # the window between the two renames
        assert any(name.startswith(".out.old-") for name in _hidden(tmp_path))
        assert _atomic.recover_interrupted_swap(out)
        assert (out / "file.txt").read_text() == "old"
        assert _hidden(tmp_path) == []
    # The next replacement succeeds and leaves nothing behind but the killed run's unfinished temporary folder.
    with atomic_folder(out, overwrite=True) as tmp:
        _write(tmp, "newer")
    assert (out / "file.txt").read_text() == "newer"
    assert not any(".old-" in name for name in _hidden(tmp_path))


def test_the_next_write_recovers_an_interrupted_swap_by_itself(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / ".out.old-abc123"
    (old / "out").mkdir(parents=True)
    _write(old / "out", "old")
    (tmp_path / ".out.tmp-def456").mkdir()  # the interrupted replacement, incomplete
    with pytest.raises(FileExistsError, match="already exists"):  # recovered first: out exists again
        with atomic_folder(out) as tmp:
            _write(tmp, "new")
    assert (out / "file.txt").read_text() == "old" and _hidden(tmp_path) == []
