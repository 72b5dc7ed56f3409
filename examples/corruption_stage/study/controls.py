"""PLAN_V3.md step 0: the judge's controls on the lab's own measured records. Latents built from v2f's training
latent plus noise whose scale follows a declared schedule, decoded, and measured exactly as a run's samples are."""

from __future__ import annotations

import json
import os

import torch

from bayes_adapter.sample_measures import measure_samples, structural_fidelity
from bayes_adapter.stage import MonitorRecord, append_monitor_record, judge, read_monitor, verdict_sentence

from ..model import data
from ..model.models import LabModel
from .train import SUBJECT_SEED


POSITIVE = (1.0, 0.6, 0.3, 0.2, 0.15, 0.15, 0.3, 0.5, 0.7, 0.7, 0.5, 0.3, 0.1, 0.05, 0.0, 0.0)
FIT_TO_COPY = (1.0, 0.6, 0.3, 0.2, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0)
# name: (noise, scales, the declared answer for `verdict.stage`, required by the plan)
CONTROLS = {
    "positive": ("white", POSITIVE, True, True),
    "negative_smooth": ("smooth", FIT_TO_COPY, False, True),
    "negative_white": ("white", FIT_TO_COPY, False, False),
}
N_SAMPLES, STEP_EVERY, NOISE_SEED = 12, 100, 2024


def control_noise(kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Unit-std noise: white Gaussian, or smooth (white on a 4x4 grid, bilinear upsampled, rescaled to unit std)."""
    if kind == "white":
        return torch.randn(shape, generator=generator)
    coarse = torch.randn((*shape[:2], 4, 4), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)
    return smooth / smooth.flatten(1).std(dim=1).view(-1, 1, 1, 1)


@torch.no_grad()
def control_records(model: LabModel, kind: str, scales: tuple[float, ...]) -> list[MonitorRecord]:
    """One record per scale (steps 0, 100, ...): ``N_SAMPLES`` decoded latents ``z + s * std(z) * noise``."""
    subject = data.make_subject_set(1, seed=SUBJECT_SEED, size=model.cfg.image_size, kind="circle")
    z = model.encode(subject)
    ceiling = structural_fidelity(model.decode(z), subject)
    records = []
    for i, s in enumerate(scales):
        g = torch.Generator().manual_seed(NOISE_SEED + i)
        latents = z.expand(N_SAMPLES, -1, -1, -1) + s * z.std() * control_noise(kind, (N_SAMPLES, *z.shape[1:]), g)
        m = measure_samples(model.decode(latents), subject, latents, z, fidelity_ceiling=ceiling)
        records.append(
            MonitorRecord(
                step=i * STEP_EVERY,
                fidelity=float(m["fidelity"]),
                noise_energy=float(m["noise_energy"]),
                noise_whiteness=float(m["noise_whiteness"]),
                copy_rate=float(m["copy_rate"]),
                fidelity_ceiling=ceiling,
            )
        )
    return records


def run_controls(model: LabModel, out_dir: str, command: str) -> dict:
    """Writes each control's records (``<name>.jsonl``) and ``summary.json``; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    summary = {"command": command, "controls": {}}
    for name, (kind, scales, expected, required) in CONTROLS.items():
        path = os.path.join(out_dir, f"{name}.jsonl")
        if os.path.exists(path):
            os.remove(path)
        for record in control_records(model, kind, scales):
            append_monitor_record(path, record)
        verdict = judge(read_monitor(path))
        summary["controls"][name] = {
            "noise": kind,
            "scales": list(scales),
            "declared_stage": expected,
            "required": required,
            "verdict": verdict.to_dict(),
            "sentence": verdict_sentence(verdict),
            "as_declared": verdict.stage == expected,
        }
    summary["required_controls_pass"] = all(c["as_declared"] for c in summary["controls"].values() if c["required"])
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
