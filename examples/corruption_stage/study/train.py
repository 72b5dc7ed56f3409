"""One lab v3 fine-tuning run (PLAN_V3.md): an arm on the v2f base model and the circle subject, with the package's
stage records (`bayes_adapter.stage.MonitorRecord`, measured by `bayes_adapter.sample_measures.measure_samples`)
written as it goes, one JSONL file per guidance scale."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import bayes_adapter
from bayes_adapter import kl_loss
from bayes_adapter.sample_measures import measure_samples, structural_fidelity
from bayes_adapter.stage import MonitorRecord, append_monitor_record, drop_records_after, read_monitor

from ..model import data
from ..model.diffusion import condition_tokens, diffusion_loss, sample
from ..model.models import LabModel
from ..model.resume import load_resume_state, save_resume_state, weights_sha256
from .arms import ARMS, BAYESIAN_ARMS, adapter_config


MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model", "base_model_v2f")
SUBJECT_SEED, EVAL_SEED, CLASS_SEED = 1234, 10_000, 30_000


def format_lr(lr: float) -> str:
    """``3e-3``, ``1.2e-2``: the learning rate as run names spell it."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: the arm, its learning rate and seed, the training recipe and the record schedules."""

    arm: str
    lr: float
    seed: int
    steps: int
    batch: int
    prior_loss_weight: float = 0.0
    num_class_images: int = 32
    class_guidance: float = 7.5
    schedules: tuple[tuple[float, int], ...] = ((7.5, 50), (3.0, 200))  # (guidance, record every N steps)
    rank: int = 4
    sigma: float = 0.01
    n_images: int = 1
    n_samples: int = 12
    sample_steps: int = 25
    subject_kind: str = "circle"
    variant: str = ""  # a name tag for a run that departs from its study's recipe, e.g. "noprior"

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")
        if not (self.lr > 0 and self.steps >= 1 and self.batch >= 1 and self.n_samples >= 2):
            raise ValueError(f"lr, steps, batch must be positive and n_samples >= 2, got {self}")
        if not self.schedules or any(g < 1 or every < 1 for g, every in self.schedules):
            raise ValueError(f"schedules must be (guidance >= 1, every >= 1) pairs, got {self.schedules}")

    @property
    def name(self) -> str:
        tag = f"_{self.variant}" if self.variant else ""
        return f"{self.arm}{tag}_lr{format_lr(self.lr)}_seed{self.seed}"

    def record_path(self, out_dir: str, guidance: float) -> str:
        return os.path.join(out_dir, f"{self.name}_g{guidance:g}.jsonl")


def kl_weight_default(model: LabModel) -> float:
    """``2 / (D * T)``, the ELBO weight of lab v2 (see `study.experiment.kl_weight_default`)."""
    c = model.cfg
    return 2.0 / (c.latent_channels * c.latent_size**2 * c.num_train_timesteps)


def _record_steps(steps: int, every: int) -> set[int]:
    return {0, steps, *range(every, steps + 1, every)}


def check_records_reach(
    out_dir: str, spec: RunSpec, schedules: list[tuple[float, set[int]]], step: int, resume_path: str
) -> None:
    """Refuses to resume from the checkpoint of ``step`` unless each record file holds that schedule's records up to
    it (a file deleted or cut short would leave the judged curve with a hole)."""
    for guidance, steps in schedules:
        path = spec.record_path(out_dir, guidance)
        have = [r.step for r in read_monitor(path) if r.step <= step] if os.path.exists(path) else []
        want = sorted(s for s in steps if s <= step)
        if have != want:
            raise ValueError(
                f"resume checkpoint {resume_path!r} is at step {step}, but {path} holds records at steps "
                f"{have[:3]}{'...' if len(have) > 3 else ''} ({len(have)} of the {len(want)} due): delete the "
                "checkpoint to start this run over"
            )


def train_run(
    base: LabModel,
    spec: RunSpec,
    out_dir: str,
    progress: Callable[[int], None] | None = None,
    keep_samples: int = 0,
    resume_path: str | None = None,
    resume_every: int = 250,
) -> dict:
    """Fine-tunes one adapter as ``spec`` says, appending a record to each guidance scale's JSONL file in ``out_dir``
    at its steps; returns the run's settings, the ceiling, posterior-std statistics (Bayesian arms) and, with
    ``keep_samples``, that many samples (uint8) of the first schedule at each of its records.

    With ``resume_path``, a checkpoint is written there every ``resume_every`` steps (after that step's records), and
    a run that finds one of its own continues from it, its record files cut back to the checkpoint's step (a study's
    runs outlast a session); the caller removes the file once the run's result is saved."""
    if resume_path is not None and (keep_samples or resume_every < 1):
        raise ValueError(f"resume_path needs keep_samples=0 and resume_every >= 1, got {keep_samples}, {resume_every}")
    schedules = [(guidance, _record_steps(spec.steps, every)) for guidance, every in spec.schedules]
    fingerprint = {  # checked before any work: a checkpoint of another run stops this one at once
        "spec": json.loads(json.dumps(asdict(spec))),
        "base_weights_sha256": weights_sha256(base.unet, base.cond, base.vae),
    }
    resumed = load_resume_state(resume_path, fingerprint) if resume_path else None
    if resumed is not None:
        check_records_reach(out_dir, spec, schedules, resumed["step"], resume_path)
    size = base.cfg.image_size
    subject = data.make_subject_set(spec.n_images, seed=SUBJECT_SEED, size=size, kind=spec.subject_kind)
    with torch.no_grad():
        train_latents = base.encode(subject)
        ceiling = structural_fidelity(base.decode(train_latents), subject)
    kl_w = kl_weight_default(base)
    model = copy.copy(base)
    model.unet = copy.deepcopy(base.unet)
    torch.manual_seed(spec.seed)
    if spec.arm == "full":  # every UNet weight trains, as in the paper's DreamBooth runs
        model.unet.requires_grad_(True)
        opt = torch.optim.AdamW(model.unet.parameters(), lr=spec.lr, weight_decay=0.0)
    else:
        model.unet.add_adapter(adapter_config(spec.arm, rank=spec.rank, sigma=spec.sigma, kl_weight=kl_w))
        opt = torch.optim.AdamW(bayes_adapter.param_groups(model.unet), lr=spec.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(spec.seed)
    prompt = data.v2_prompt(spec.subject_kind)
    tokens = condition_tokens(prompt, spec.batch)
    class_latents = None
    if spec.prior_loss_weight:  # drawn by the base model before fine-tuning, as DreamBooth's class images are
        class_token = data.class_token(spec.subject_kind)
        _, class_latents = sample(
            base,
            class_token,
            spec.num_class_images,
            CLASS_SEED,
            spec.sample_steps,
            spec.class_guidance,
            return_latents=True,
        )
        class_tokens = condition_tokens(class_token, spec.batch)
    l2_coef = kl_w / (2 * spec.sigma**2 * spec.n_images)
    bayesian = spec.arm in BAYESIAN_ARMS
    loss_sums = {guidance: [0.0, 0] for guidance, _ in spec.schedules}
    std_stats: list[dict] = []
    kept: list[torch.Tensor] = []

    @torch.no_grad()
    def record(step: int, guidance: float) -> None:
        images, latents = sample(
            model, prompt, spec.n_samples, EVAL_SEED, spec.sample_steps, guidance, return_latents=True
        )
        measured = measure_samples(images, subject, latents, train_latents, fidelity_ceiling=ceiling)
        total, n = loss_sums[guidance]
        loss_sums[guidance] = [0.0, 0]
        append_monitor_record(
            spec.record_path(out_dir, guidance),
            MonitorRecord(
                step=step,
                fidelity=float(measured["fidelity"]),
                noise_energy=float(measured["noise_energy"]),
                noise_whiteness=float(measured["noise_whiteness"]),
                loss=total / n if n else None,
                copy_rate=float(measured["copy_rate"]),
                fidelity_ceiling=ceiling,
            ),
        )
        if keep_samples and guidance == spec.schedules[0][0]:
            kept.append(((images[:keep_samples].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))

    def record_all(step: int) -> None:
        if not any(step in steps for _, steps in schedules):
            return
        model.unet.eval()
        for guidance, steps in schedules:
            if step in steps:
                record(step, guidance)
        if bayesian:
            std_stats.append({"step": step, **bayes_adapter.posterior_std_stats(model.unet)})
        model.unet.train()

    os.makedirs(out_dir, exist_ok=True)
    clock = time.time()
    resumed_at = [] if resumed is None else [*resumed["resumed_at"], resumed["step"]]
    if resumed is None:
        record_all(0)
        first_step = 1
    else:
        model.unet.load_state_dict(resumed["unet"])
        opt.load_state_dict(resumed["optimizer"])
        g.set_state(resumed["generator"])
        torch.set_rng_state(resumed["torch_rng"])  # weight noise and dropout draw from torch's global generator
        loss_sums = {guidance: list(sums) for guidance, sums in resumed["loss_sums"]}
        std_stats = resumed["std_stats"]
        first_step = resumed["step"] + 1
        for guidance, _ in spec.schedules:
            drop_records_after(spec.record_path(out_dir, guidance), resumed["step"])
        if progress is not None:
            progress(resumed["step"])
    model.unet.train()  # record_all leaves it so; a resumed run has not recorded yet (weight noise, dropout)
    for step in range(first_step, spec.steps + 1):
        idx = torch.randint(spec.n_images, (spec.batch,), generator=g)
        loss = diffusion_loss(model, train_latents[idx], tokens, generator=g)
        total = loss
        if class_latents is not None:
            class_idx = torch.randint(len(class_latents), (spec.batch,), generator=g)
            total = total + spec.prior_loss_weight * diffusion_loss(
                model, class_latents[class_idx], class_tokens, generator=g
            )
        if spec.arm == "bayes_kl":
            total = total + kl_loss(model.unet, spec.n_images)  # the config carries kl_weight
        elif spec.arm == "l2":
            b = [p for n, p in model.unet.named_parameters() if "lora_B" in n and p.requires_grad]
            total = total + l2_coef * sum(p.pow(2).sum() for p in b)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        value = float(loss.detach())
        for sums in loss_sums.values():
            sums[0] += value if math.isfinite(value) else float("nan")
            sums[1] += 1
        record_all(step)
        if resume_path is not None and step % resume_every == 0 and step < spec.steps:
            save_resume_state(
                resume_path,
                {
                    "fingerprint": fingerprint,
                    "step": step,
                    "unet": model.unet.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": g.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "loss_sums": [(guidance, sums) for guidance, sums in loss_sums.items()],
                    "std_stats": std_stats,
                    "seconds": (resumed["seconds"] if resumed else 0.0) + time.time() - clock,
                    "resumed_at": resumed_at,
                },
            )
        if progress is not None:
            progress(1)
    out = {"spec": asdict(spec), "name": spec.name, "fidelity_ceiling": ceiling, "kl_weight": kl_w}
    out["posterior_std"] = std_stats
    out["resumed_at"] = resumed_at
    out["seconds_before_resume"] = 0.0 if resumed is None else resumed["seconds"]
    if keep_samples:
        out["samples"] = torch.stack(kept)
    return out
