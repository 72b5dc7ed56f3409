"""Atomic folder writes: a folder appears complete or not at all, and an existing one is replaced only when asked."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


__all__ = ["atomic_folder", "check_not_overlapping", "check_output_folder", "recover_interrupted_swap"]


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder next to `out_dir`, renamed to `out_dir` when the block succeeds.

    If the block raises, the temporary folder is deleted and `out_dir` is left as it was. An existing `out_dir` is
    replaced only with `overwrite=True`, and only once the new folder is complete.

    Args:
        out_dir: The folder to create.
        overwrite: Replace `out_dir` if it exists.

    Raises:
        FileExistsError: if `out_dir` exists and `overwrite` is False.
    """
    out = Path(out_dir)
    recover_interrupted_swap(out)
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            _swap(out, tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_interrupted_swap(out: str | os.PathLike) -> bool:
    """Puts back the previous `out` if a replacement was killed between its two renames; cleans up after a swap.

    `_swap` moves `out` into a hidden sibling `.<name>.old-*` and then renames the new folder to `out`. A process
    killed between those two renames leaves no `out`, the previous folder complete inside the `.old-*` sibling and the
    new one (complete or not) in a `.<name>.tmp-*` sibling: this renames the previous folder back to `out` and deletes
    both siblings. When `out` exists, `.old-*` siblings are what a finished swap had not yet deleted: deleted too.
    `atomic_folder` runs it first, so the next write to `out` recovers; anyone may call it before reading `out`.

    Returns:
        Whether a previous folder was put back.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return False
    olds = sorted(out.parent.glob(f".{glob.escape(out.name)}.old-*"))
    restored = False
    if not out.exists() and not out.is_symlink():
        for old in olds:
            if (old / out.name).exists():
                os.replace(old / out.name, out)
                restored = True
                for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
                    shutil.rmtree(tmp, ignore_errors=True)  # the interrupted replacement, maybe incomplete
                break
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    return restored


def _swap(out: Path, new: Path) -> None:
    """Replaces the folder `out` by `new`; if any step fails, `out` is what it was before."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old / out.name)
    except BaseException:
        shutil.rmtree(old, ignore_errors=True)
        raise
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old / out.name, out)  # put the previous folder back before reporting the failure
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_not_overlapping(out: Path, *sources: Path) -> None:
    """Refuses an output folder that is, contains, or lies inside one of `sources`: replacing it would lose data."""
    resolved = out.resolve()
    for source in sources:
        source = source.resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            relation = "is" if resolved == source else "contains" if source.is_relative_to(resolved) else "lies inside"
            raise ValueError(
                f"out_dir={str(out)!r} {relation} the source folder {str(source)!r}; writing there could delete the "
                "source. Export to a folder outside it."
            )


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Raises unless `out` can be written: absent, or an existing folder with `overwrite=True`."""
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"out_dir={str(out)!r} exists and is not a folder")
        if not overwrite:
            raise FileExistsError(f"out_dir={str(out)!r} already exists; pass overwrite=True to replace it")
