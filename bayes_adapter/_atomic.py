"""Atomic folder writes: a folder appears complete or not at all, and an existing one is replaced only when asked."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


__all__ = ["atomic_folder", "check_output_folder"]


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
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Raises unless `out` can be written: absent, or an existing folder with `overwrite=True`."""
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"out_dir={str(out)!r} exists and is not a folder")
        if not overwrite:
            raise FileExistsError(f"out_dir={str(out)!r} already exists; pass overwrite=True to replace it")
