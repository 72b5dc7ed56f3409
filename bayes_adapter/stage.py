"""Did a fine-tuning run go through the corruption stage, and at which step were its samples best?

A run that monitors its samples writes one JSON object per monitored step to ``monitor.jsonl`` (`MonitorRecord`;
`append_monitor_record` writes, `read_monitor` reads, `drop_records_after` rewinds it on resume; all in
`bayes_adapter.monitor_file`, re-exported here). `judge` reads the
records as a trajectory and returns a `StageVerdict`; `verdict_sentence` says it in one line.

The rule (every threshold a parameter of `judge`):

- *fit*: the first record with fidelity >= ``fit_fraction`` x ceiling (`fidelity_ceiling`, 1.0 when absent);
- *episode*: after fit, >= ``min_records`` consecutive records with fidelity <= running max - ``drop``,
  noise_energy >= ``energy_min`` and noise_whiteness >= ``whiteness_min``: samples that lost fidelity to white
  noise in latent space;
- it *recovers* if >= ``min_records`` consecutive later records have fidelity >= running max - ``recover_margin``
  and noise_energy < ``recover_energy``;
- it is an *instability* (Adam's late spikes, not the corruption stage) when a record from one before its start to
  its end has loss >= ``loss_spike`` x the median loss of the ``loss_window`` records before that record;
- a *clean copy*: copy_rate >= ``copy_rate_min`` when recorded, else fidelity >= ceiling - ``copy_margin`` and
  noise_energy < ``copy_energy``;
- *best step*: the highest-fidelity record before the first episode and before the first clean copy.

A NaN measure (a diverged sampler) counts as neither fit, corrupt, recovered nor a copy, and is never the best.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .monitor_file import (
    MONITOR_SCHEMA,
    MonitorFileError,
    MonitorRecord,
    append_monitor_record,
    drop_records_after,
    read_monitor,
)


__all__ = [
    "MONITOR_SCHEMA",
    "THRESHOLDS",
    "Episode",
    "MonitorFileError",
    "MonitorRecord",
    "StageVerdict",
    "append_monitor_record",
    "check_thresholds",
    "drop_records_after",
    "judge",
    "read_monitor",
    "saved_checkpoint_steps",
    "stage_card_section",
    "stage_summary",
    "verdict_sentence",
]


# name -> (default, type, what it is); `judge` documents each, the CLI's --threshold takes these names.
THRESHOLDS: dict[str, tuple[float | int, type, str]] = {
    "fit_fraction": (0.75, float, "fit: the first record with fidelity >= fit_fraction x ceiling"),
    "drop": (0.10, float, "an episode's records lie at least this far below the running max of fidelity"),
    "energy_min": (0.04, float, "... with latent noise energy >= energy_min"),
    "whiteness_min": (0.45, float, "... and noise whiteness >= whiteness_min (white noise ~0.56, smooth ~0)"),
    "min_records": (3, int, "consecutive records an episode, and a recovery, needs"),
    "recover_margin": (0.03, float, "recovery: fidelity >= running max - recover_margin ..."),
    "recover_energy": (0.02, float, "... and noise energy < recover_energy"),
    "loss_spike": (3.0, float, "instability: a loss >= loss_spike x the median of the loss_window records before it"),
    "loss_window": (10, int, "records whose median loss a spike is measured against"),
    "copy_rate_min": (0.5, float, "clean copy: copy_rate >= copy_rate_min when recorded, else ..."),
    "copy_margin": (0.03, float, "... fidelity >= ceiling - copy_margin ..."),
    "copy_energy": (0.02, float, "... and noise energy < copy_energy"),
}


@dataclass
class Episode:
    """A stretch of consecutive records whose samples lost fidelity to white latent noise."""

    start_step: int = field(metadata={"help": "Step of its first record."})
    end_step: int = field(metadata={"help": "Step of its last record."})
    kind: Literal["corruption", "instability"] = field(
        metadata={"help": "'instability' when the loss spiked with it (Adam's late instability), else 'corruption'."}
    )
    recovered: bool = field(metadata={"help": "Whether clean, high-fidelity samples came back after it."})
    recovery_step: int | None = field(default=None, metadata={"help": "First record of the recovery, if any."})


@dataclass
class StageVerdict:
    """What `judge` found in a run's monitor records."""

    stage: bool = field(metadata={"help": "Whether the run went through a corruption stage (a corruption episode)."})
    episodes: list[Episode] = field(metadata={"help": "Every episode, corruption or instability, in step order."})
    fit_step: int | None = field(metadata={"help": "First step whose samples fit the subject; None if none did."})
    best_step: int | None = field(
        metadata={"help": "Highest-fidelity step before the first episode and the first clean copy."}
    )
    first_copy_step: int | None = field(metadata={"help": "First step whose samples are clean copies."})
    num_records: int = field(metadata={"help": "Records judged."})
    thresholds: dict = field(metadata={"help": "The thresholds used, by name."})
    last_step: int | None = field(default=None, metadata={"help": "Step of the last record."})

    def to_dict(self) -> dict:
        """A JSON-ready dict of the verdict."""
        return dataclasses.asdict(self)


def check_thresholds(**thresholds: float) -> dict[str, float | int]:
    """All thresholds of `judge`, defaults filled in; raises ValueError naming an unknown or invalid one."""
    out: dict[str, float | int] = {}
    for name, value in thresholds.items():
        if name not in THRESHOLDS:
            raise ValueError(f"unknown threshold {name!r}; expected one of {', '.join(THRESHOLDS)}")
        kind = THRESHOLDS[name][1]
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"threshold {name}={value!r} is invalid; expected an integer >= 1")
        elif not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"threshold {name}={value!r} is invalid; expected a finite number >= 0")
    for name, (default, kind, _) in THRESHOLDS.items():
        out[name] = kind(thresholds.get(name, default))
    if not 0 < out["fit_fraction"] <= 1:
        raise ValueError(f"threshold fit_fraction={out['fit_fraction']!r} is invalid; expected a number in (0, 1]")
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _runs(flags: Sequence[bool], min_length: int) -> list[tuple[int, int]]:
    """``(first, last)`` index of every maximal run of True at least `min_length` long."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start >= min_length:
                runs.append((start, i - 1))
            start = None
    return runs


def judge(
    records: Sequence[MonitorRecord],
    *,
    fit_fraction: float = 0.75,
    drop: float = 0.10,
    energy_min: float = 0.04,
    whiteness_min: float = 0.45,
    min_records: int = 3,
    recover_margin: float = 0.03,
    recover_energy: float = 0.02,
    loss_spike: float = 3.0,
    loss_window: int = 10,
    copy_rate_min: float = 0.5,
    copy_margin: float = 0.03,
    copy_energy: float = 0.02,
) -> StageVerdict:
    """Judges a run's trajectory of monitor records: did it go through the corruption stage, and when were its
    samples best? The rule is in this module's docstring; each threshold below is one of its numbers.

    Args:
        records (`Sequence[MonitorRecord]`): the run's records, strictly increasing steps (`read_monitor`).
        fit_fraction: fit = fidelity >= fit_fraction x ceiling.
        drop: an episode record's fidelity is <= running max - drop ...
        energy_min: ... its noise_energy >= energy_min ...
        whiteness_min: ... and its noise_whiteness >= whiteness_min.
        min_records: consecutive records an episode, and a recovery, needs.
        recover_margin: a recovery record's fidelity is >= running max - recover_margin ...
        recover_energy: ... and its noise_energy < recover_energy.
        loss_spike: an episode is an instability when a loss from one record before it to its end is >= loss_spike
            x the median loss of the `loss_window` records before that loss.
        loss_window: see `loss_spike`.
        copy_rate_min: a record of clean copies has copy_rate >= copy_rate_min; without copy_rate ...
        copy_margin: ... fidelity >= ceiling - copy_margin ...
        copy_energy: ... and noise_energy < copy_energy.

    Returns:
        `StageVerdict`
    """
    t = check_thresholds(
        fit_fraction=fit_fraction,
        drop=drop,
        energy_min=energy_min,
        whiteness_min=whiteness_min,
        min_records=min_records,
        recover_margin=recover_margin,
        recover_energy=recover_energy,
        loss_spike=loss_spike,
        loss_window=loss_window,
        copy_rate_min=copy_rate_min,
        copy_margin=copy_margin,
        copy_energy=copy_energy,
    )
    records = list(records)
    if not records:
        raise ValueError("records is empty; judge needs at least one monitor record")
    for before, after in zip(records, records[1:]):
        if after.step <= before.step:
            raise ValueError(f"record steps must be strictly increasing, got {before.step} then {after.step}")
    steps = [r.step for r in records]
    fidelity = [r.fidelity for r in records]
    energy = [r.noise_energy for r in records]
    ceiling = [1.0 if r.fidelity_ceiling is None else r.fidelity_ceiling for r in records]
    running_max, peak = [], -math.inf
    for f in fidelity:
        peak = max(peak, f) if not math.isnan(f) else peak
        running_max.append(peak)

    fit = next((i for i, f in enumerate(fidelity) if f >= t["fit_fraction"] * ceiling[i]), None)
    episodes: list[Episode] = []
    if fit is not None:
        corrupt = [
            i > fit
            and fidelity[i] <= running_max[i] - t["drop"]
            and energy[i] >= t["energy_min"]
            and r.noise_whiteness >= t["whiteness_min"]
            for i, r in enumerate(records)
        ]
        recovering = [
            fidelity[i] >= running_max[i] - t["recover_margin"] and energy[i] < t["recover_energy"]
            for i in range(len(records))
        ]
        recoveries = _runs(recovering, t["min_records"])
        for start, end in _runs(corrupt, t["min_records"]):
            recovery = next((first for first, _ in recoveries if first > end), None)
            spiked = any(
                _loss_spike(records, j, t["loss_spike"], t["loss_window"]) for j in range(max(start - 1, 0), end + 1)
            )
            episodes.append(
                Episode(
                    start_step=steps[start],
                    end_step=steps[end],
                    kind="instability" if spiked else "corruption",
                    recovered=recovery is not None,
                    recovery_step=steps[recovery] if recovery is not None else None,
                )
            )

    def is_copy(i: int) -> bool:
        r = records[i]
        if r.copy_rate is not None:
            return r.copy_rate >= t["copy_rate_min"]
        return fidelity[i] >= ceiling[i] - t["copy_margin"] and energy[i] < t["copy_energy"]

    first_copy = next((i for i in range(len(records)) if is_copy(i)), None)
    cutoff = min(
        [
            len(records),
            *([steps.index(episodes[0].start_step)] if episodes else []),
            *([first_copy] if first_copy is not None else []),
        ]
    )
    candidates = [i for i in range(cutoff) if not math.isnan(fidelity[i])]
    best = max(candidates, key=lambda i: fidelity[i]) if candidates else None  # max keeps the first of ties
    return StageVerdict(
        stage=any(e.kind == "corruption" for e in episodes),
        episodes=episodes,
        fit_step=steps[fit] if fit is not None else None,
        best_step=steps[best] if best is not None else None,
        first_copy_step=steps[first_copy] if first_copy is not None else None,
        num_records=len(records),
        thresholds=t,
        last_step=steps[-1],
    )


def _loss_spike(records: Sequence[MonitorRecord], j: int, spike: float, window: int) -> bool:
    loss = records[j].loss
    if loss is None or not math.isfinite(loss):
        return False
    before = [r.loss for r in records[max(0, j - window) : j] if r.loss is not None and math.isfinite(r.loss)]
    if not before:
        return False
    median = statistics.median(before)
    return median > 0 and loss >= spike * median


def verdict_sentence(verdict: StageVerdict, checkpoint_steps: Iterable[int] | None = None) -> str:
    """One line a person can act on, e.g. "no corruption stage in 40 checkpoints; best samples at step 1,450" or
    "corruption stage from step 1,800 to 2,300, recovered at 2,600; best samples before it at step 1,450,
    checkpoint-1450".

    Args:
        verdict (`StageVerdict`): from `judge`.
        checkpoint_steps (`Iterable[int]`, *optional*): steps with a saved checkpoint; with them, the sentence names
            the checkpoint of the best step (or the nearest one saved before it).
    """
    saved = sorted(set(checkpoint_steps)) if checkpoint_steps is not None else None

    def best(where: str) -> str:
        if verdict.best_step is None and verdict.first_copy_step is not None:
            return f"no samples before the first clean copy (step {verdict.first_copy_step:,})"
        if verdict.best_step is None:
            return "no record with a finite fidelity"
        text = f"best samples {where}at step {verdict.best_step:,}"
        if saved is not None:
            earlier = [s for s in saved if s <= verdict.best_step]
            if earlier and earlier[-1] == verdict.best_step:
                text += f", checkpoint-{verdict.best_step}"
            elif earlier:
                text += f" (no checkpoint there; the nearest before it is checkpoint-{earlier[-1]})"
            else:
                text += " (no checkpoint saved at or before it)"
        return text

    corruption = [e for e in verdict.episodes if e.kind == "corruption"]
    if corruption:
        first = corruption[0]
        head = f"corruption stage from step {first.start_step:,} to {first.end_step:,}"
        if first.recovered:
            head += f", recovered at {first.recovery_step:,}"
        else:
            head += f", not recovered by the last record (step {verdict.last_step:,})"
        if len(corruption) > 1:
            head += f" (and {len(corruption) - 1} more corruption episode{'s' if len(corruption) > 2 else ''})"
        return f"{head}; {best('before it ')}"
    n = verdict.num_records
    head = f"no corruption stage in {n:,} checkpoint{'s' if n != 1 else ''}"
    if verdict.fit_step is None:
        fraction = verdict.thresholds.get("fit_fraction", THRESHOLDS["fit_fraction"][0])
        head += f" (the samples never fit: fidelity stayed below {fraction:g} x the ceiling)"
    instability = [e for e in verdict.episodes if e.kind == "instability"]
    if len(instability) == 1:
        head += (
            f" (only a loss-spike instability, from step {instability[0].start_step:,} to {instability[0].end_step:,})"
        )
    elif instability:
        spans = ", ".join(f"{e.start_step:,}-{e.end_step:,}" for e in instability)
        head += f" (only loss-spike instabilities, at steps {spans})"
    return f"{head}; {best('')}"


def saved_checkpoint_steps(folder: str | os.PathLike) -> list[int]:
    """The steps of the ``checkpoint-<step>`` folders in `folder` (a training run's output folder), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        prefix, _, number = child.name.partition("-")
        if prefix == "checkpoint" and number.isdigit() and child.is_dir():
            steps.append(int(number))
    return sorted(steps)


def stage_summary(path: str | os.PathLike) -> dict:
    """The default verdict on a ``monitor.jsonl``, JSON-ready, for an export summary and a model card: ``stage``,
    ``best_step``, ``fit_step``, ``first_copy_step``, ``episodes``, ``num_records``, ``last_step`` and the ``sentence``.

    Raises:
        MonitorFileError: if the file cannot be read (see `read_monitor`).
    """
    verdict = judge(read_monitor(path))
    data = verdict.to_dict()
    del data["thresholds"]  # the defaults; the sentence and the numbers are what a card reader needs
    return {**data, "sentence": verdict_sentence(verdict)}


def stage_card_section(stage: dict[str, Any]) -> list[str]:
    """The lines of a model card's section on the training run's verdict (a `stage_summary`), in Markdown."""

    def step(value: Any) -> str:
        return f"{value:,}" if isinstance(value, int) else "none"

    episodes = "; ".join(
        f"{e.get('kind')} {step(e.get('start_step'))}-{step(e.get('end_step'))}"
        + (f", recovered at {step(e.get('recovery_step'))}" if e.get("recovered") else ", not recovered")
        for e in stage.get("episodes") or []
    )
    return [
        "## Corruption stage",
        "",
        "Judged by `bayes-adapter stage` on the training run's monitor.jsonl (samples of the instance prompt measured "
        f"during training, {stage.get('num_records')} records): {stage.get('sentence', '')}.",
        "",
        "| corruption stage | best step | fit step | first clean copy | episodes |",
        "|---|---|---|---|---|",
        f"| {'yes' if stage.get('stage') else 'no'} | {step(stage.get('best_step'))} | {step(stage.get('fit_step'))} "
        f"| {step(stage.get('first_copy_step'))} | {episodes or 'none'} |",
        "",
    ]
