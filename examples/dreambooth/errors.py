"""The error the DreamBooth command line reports as `error: ...` with exit status 2 and no traceback."""

from __future__ import annotations


class ArgumentsError(ValueError):
    """Bad input, found before any training step: the message names the flag, the value and what to change."""
