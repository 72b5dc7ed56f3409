"""The stage judge's controls (issue 31, item 5): trajectories whose answer is known, with that answer, declared
before the judge's thresholds were tuned. Shared by the judge's and the console command's tests.

Numbers are shaped on the lab model's positive control (the team's shared notes, "Added for the third round"): SSIM
ceiling 0.92; white latent noise has whiteness ~0.55 at every level, energy 0.04 at SSIM 0.77 and 0.09 at 0.65 (a
grainy near-copy), 0.25 at 0.46; learning the subject moves the latent smoothly (whiteness well below 0.45).
"""

from __future__ import annotations

from dataclasses import dataclass

from bayes_adapter.stage import MonitorRecord


CEILING = 0.92


@dataclass
class Control:
    name: str
    records: list[MonitorRecord]
    stage: bool
    kinds: list[str]  # the episodes' kinds, in order
    recovered: list[bool]
    fit_step: int | None
    best_step: int | None


def _records(rows: list[tuple], every: int = 100, with_loss: bool = True) -> list[MonitorRecord]:
    """rows of (fidelity, noise_energy, noise_whiteness, copy_rate, loss) -> records at steps every, 2 every, ..."""
    return [
        MonitorRecord(
            step=every * (i + 1),
            fidelity=f,
            noise_energy=e,
            noise_whiteness=w,
            copy_rate=c,
            loss=loss if with_loss else None,
            fidelity_ceiling=CEILING,
        )
        for i, (f, e, w, c, loss) in enumerate(rows)
    ]


LEARNING = [  # steps 100-500: the subject is learnt (fit at 300), smooth latent drift
    (0.30, 0.80, 0.20, 0.0, 0.20),
    (0.55, 0.30, 0.25, 0.0, 0.15),
    (0.80, 0.06, 0.30, 0.0, 0.12),
    (0.86, 0.03, 0.35, 0.0, 0.11),
    (0.84, 0.03, 0.38, 0.0, 0.11),
]
NOISY = [  # four records of white latent noise on near-copies
    (0.65, 0.09, 0.55, 0.0, 0.10),
    (0.47, 0.25, 0.56, 0.0, 0.10),
    (0.40, 0.30, 0.55, 0.0, 0.10),
    (0.52, 0.20, 0.56, 0.0, 0.09),
]
CLEAN_COPIES = [(0.91, 0.010, 0.45, 1.0, 0.08)] * 4


def paper_order() -> Control:
    """Fit -> >= 4 noisy records -> clean copies: a corruption stage, recovered; best samples before it."""
    return Control("paper_order", _records(LEARNING + NOISY + CLEAN_COPIES), True, ["corruption"], [True], 300, 400)


def smooth_rise() -> Control:
    """Fidelity rises smoothly into clean copies: no stage; best samples just before the first copy."""
    rows = [
        (0.30 + 0.06 * i, max(0.6 * 0.7**i, 0.005), 0.25, 1.0 if 0.30 + 0.06 * i >= 0.89 else 0.0, 0.1)
        for i in range(11)
    ]
    # fidelity 0.30 ... 0.90; fit (>= 0.69) at step 800; the first clean copy at step 1,100 (0.90, energy 0.017)
    return Control("smooth_rise", _records(rows), False, [], [], 800, 1000)


def grainy_end() -> Control:
    """Fit, then grainy near-copies (energy 0.09, SSIM 0.65) to the end, never clean: a stage, not recovered."""
    return Control("grainy_end", _records(LEARNING + [NOISY[0]] * 6), True, ["corruption"], [False], 300, 400)


def loss_spike() -> Control:
    """The noisy stretch of the paper's order, but with the loss spiking as it starts (Adam's instability): only
    an instability episode, no stage."""
    noisy = [(f, e, w, c, loss * 8) for f, e, w, c, loss in NOISY]
    return Control("loss_spike", _records(LEARNING + noisy + CLEAN_COPIES), False, ["instability"], [True], 300, 400)


def never_fit() -> Control:
    """Fidelity never reaches 0.75 x ceiling (0.69), noisy throughout: no stage, fit_step None."""
    rows = [(0.30 + 0.03 * i, 0.30, 0.55, 0.0, 0.1) for i in range(8)] + [(0.40, 0.3, 0.55, 0.0, 0.1)] * 4
    return Control("never_fit", _records(rows), False, [], [], None, 800)


CONTROLS = (paper_order, smooth_rise, grainy_end, loss_spike, never_fit)
