"""The ``monitor.jsonl`` file: one JSON object per monitored step of a fine-tuning run (`MonitorRecord`).

Its one writer (`append_monitor_record`), one reader (`read_monitor`) and the rewind for a resumed run
(`drop_records_after`). The stage judge (`bayes_adapter.stage`) reads what these return; the README documents the
format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


__all__ = [
    "MONITOR_SCHEMA",
    "MonitorFileError",
    "MonitorRecord",
    "append_monitor_record",
    "drop_records_after",
    "read_monitor",
]

MONITOR_SCHEMA = "bayes-adapter/monitor/1"

_REQUIRED = ("step", "fidelity", "noise_energy", "noise_whiteness")
_OPTIONAL = ("loss", "copy_rate", "fidelity_ceiling")


@dataclass
class MonitorRecord:
    """One monitored step of a fine-tuning run: one line of ``monitor.jsonl``."""

    step: int = field(metadata={"help": "Optimisation step at which the samples were drawn."})
    fidelity: float = field(
        metadata={"help": "<= 1, higher = closer to the training images: mean SSIM of each sample to the nearest one."}
    )
    noise_energy: float = field(
        metadata={
            "help": ">= 0: mean squared residual between a sample's latent and the nearest training latent, over the "
            "training latents' variance (median over samples)."
        }
    )
    noise_whiteness: float = field(
        metadata={"help": "0..1: spectral flatness of that residual; white noise ~0.56, smooth drift ~0."}
    )
    loss: float | None = field(
        default=None, metadata={"help": "Training loss averaged since the previous record (optional)."}
    )
    copy_rate: float | None = field(
        default=None,
        metadata={"help": "Fraction of the samples that are clean copies of a training image (optional)."},
    )
    fidelity_ceiling: float | None = field(
        default=None,
        metadata={"help": "Fidelity of the VAE's own reconstruction of the training images; 1.0 when absent."},
    )

    def to_dict(self) -> dict:
        """The JSON object of this record: the schema first, absent optional fields left out."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {"schema": MONITOR_SCHEMA, **fields}


class MonitorFileError(ValueError):
    """A ``monitor.jsonl`` that cannot be read; the message is one line naming the file and the line number."""


def _field_error(name: str, value: object, expected: str) -> str:
    return f"field {name!r} is {json.dumps(value) if _jsonable(value) else repr(value)}; expected {expected}"


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _record_from_object(obj: object) -> MonitorRecord:
    """The record of one parsed JSON line; raises ValueError (without a location) on bad content."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    schema = obj.get("schema", MONITOR_SCHEMA)
    if schema != MONITOR_SCHEMA:
        raise ValueError(f"unsupported schema {schema!r}; this version reads {MONITOR_SCHEMA!r}")
    values: dict = {}
    for name in _REQUIRED:
        if name not in obj or obj[name] is None:
            raise ValueError(f"missing required field {name!r}")
        values[name] = obj[name]
    for name in _OPTIONAL:
        if obj.get(name) is not None:
            values[name] = obj[name]
    for name, value in values.items():
        if not _is_number(value):
            raise ValueError(_field_error(name, value, "a number"))
    step = values["step"]
    if not (math.isfinite(step) and float(step).is_integer() and step >= 0):
        raise ValueError(_field_error("step", step, "an integer >= 0"))
    values["step"] = int(step)
    # NaN passes these checks on purpose (a diverged sampler); the judge ignores it.
    checks = {
        "fidelity": (lambda v: not v > 1.0 + 1e-6, "a number <= 1"),
        "noise_energy": (lambda v: not v < 0, "a number >= 0"),
        "noise_whiteness": (lambda v: not (v < 0 or v > 1), "a number in [0, 1]"),
        "copy_rate": (lambda v: not (v < 0 or v > 1), "a number in [0, 1]"),
        "fidelity_ceiling": (lambda v: not v > 1.0 + 1e-6, "a number <= 1"),  # SSIM: even < 0 for a poor VAE
    }
    for name, (ok, expected) in checks.items():
        if name in values and not ok(values[name]):
            raise ValueError(_field_error(name, values[name], expected))
    return MonitorRecord(**{k: (v if k == "step" else float(v)) for k, v in values.items()})


def _read_lines(path: Path, allow_empty: bool = False) -> list[tuple[int, str, MonitorRecord]]:
    """``(line number, raw line, record)`` of every record line, checked; the shared core of the reader, the writer
    and `drop_records_after`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MonitorFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MonitorFileError(f"{path}: is a folder, expected a monitor.jsonl file") from None
    lines = raw.split(b"\n")
    unterminated_last = len(lines) - 1 if lines[-1] else None  # a run still writing leaves its last line open
    out: list[tuple[int, str, MonitorRecord]] = []
    for index, line in enumerate(lines):
        number = index + 1
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
            record = _record_from_object(json.loads(text))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            if index == unterminated_last:
                warnings.warn(
                    f"{path}, line {number}: skipped the truncated last line (a run still writing?)", stacklevel=3
                )
                continue
            reason = "not valid UTF-8" if isinstance(error, UnicodeDecodeError) else f"not JSON ({error.msg})"
            raise MonitorFileError(f"{path}, line {number}: {reason}") from None
        except ValueError as error:
            raise MonitorFileError(f"{path}, line {number}: {error}") from None
        if out and record.step <= out[-1][2].step:
            raise MonitorFileError(
                f"{path}, line {number}: step {record.step} does not increase (line {out[-1][0]} has step "
                f"{out[-1][2].step}); steps must be strictly increasing"
            )
        out.append((number, text, record))
    if not out and not allow_empty:
        raise MonitorFileError(f"{path}: empty; expected one JSON record per line")
    return out


def read_monitor(path: str | os.PathLike) -> list[MonitorRecord]:
    """Reads a ``monitor.jsonl`` file: one JSON object per line (see `MonitorRecord`; unknown fields are ignored).

    Args:
        path: The file.

    Returns:
        `list[MonitorRecord]`: the records, in file order (strictly increasing steps).

    Raises:
        MonitorFileError: a missing or non-numeric required field, a non-increasing step, an empty file, a line
            that is not JSON; the one-line message names the file and line. A truncated *last* line (no newline
            at its end and not JSON: a run still writing) is skipped with a warning instead.
    """
    return [record for _, _, record in _read_lines(Path(path))]


def append_monitor_record(path: str | os.PathLike, record: MonitorRecord) -> None:
    """Appends `record` as one line to ``monitor.jsonl`` (created if missing).

    A last line left unfinished by a crashed writer is dropped first, so that the new record starts a line of its
    own.

    Raises:
        ValueError: if `record` would not read back (a bad field, or a step not above the file's last one).
    """
    if not isinstance(record, MonitorRecord):
        raise ValueError(f"record must be a MonitorRecord, got {type(record).__name__}")
    line = json.dumps(record.to_dict())
    _record_from_object(json.loads(line))  # the reader's own checks: never write a line it would refuse
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = _read_lines(path, allow_empty=True)
        if kept and record.step <= kept[-1][2].step:
            raise ValueError(f"record step {record.step} must be above the last step in {path} ({kept[-1][2].step})")
        if not path.read_bytes().endswith(b"\n"):
            _rewrite(path, [text for _, text, _ in kept])
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()


def _rewrite(path: Path, lines: Sequence[str]) -> None:
    """Replaces `path` by `lines` atomically: a crash leaves the old file or the new one, never half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def drop_records_after(path: str | os.PathLike, step: int) -> None:
    """Removes the records after `step` (for a run resumed from the checkpoint of that step); a missing file is
    left missing. The file is rewritten atomically, kept lines unchanged."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    path = Path(path)
    if not path.exists():
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = [text for _, text, record in _read_lines(path, allow_empty=True) if record.step <= step]
    _rewrite(path, kept)
