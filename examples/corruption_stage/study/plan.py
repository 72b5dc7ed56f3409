"""The studies PLAN_V3.md declares, as run lists in the declared order."""

from __future__ import annotations

import json
import os

from .train import MODEL_DIR, RunSpec


PAPER_LRS = (3e-3, 6e-3, 1.2e-2)
BOUNDED_STD_LRS = (1e-2, 3e-3)
SEEDS = (0, 1, 2)
STUDIES = ("paper_recipe", "bounded_std", "paper_recipe_arms", "memorise_probe", "paper_recipe_v3w")
# PLAN_V3's amendment of 7 December, 01:43: study 1 repeated on the wider base model v3w (its last stage), once that
# model has passed lab v2's gate 1 (the amendment of 03:00 names the file)
STUDY_BASE_MODELS = {"paper_recipe_v3w": "base_model_v3w_d"}
STUDY_GATES = {"paper_recipe_v3w": os.path.join("results", "v3w", "v3w_gate1.json")}
PAPER_ARMS = ("bayes_paper", "bayes_default", "bayes_kl", "fixed_noise", "lora_dropout", "l2")


def paper_recipe_run(arm: str, lr: float, seed: int, prior_loss_weight: float = 1.0, variant: str = "") -> RunSpec:
    """The paper's recipe: batch 1, prior preservation 1.0 with 32 class images, 4,000 steps; records at guidance 7.5
    every 50 steps (primary) and at guidance 3 every 200."""
    return RunSpec(
        arm=arm,
        lr=lr,
        seed=seed,
        steps=4000,
        batch=1,
        prior_loss_weight=prior_loss_weight,
        schedules=((7.5, 50), (3.0, 200)),
        variant=variant,
    )


def memorise_probe_runs() -> list[RunSpec]:
    """PLAN_V3.md's amendment of 7 December: can anything reach a clean copy on v2f within the paper's 4,000 steps?
    Full fine-tuning (the adapter's capacity removed) and plain LoRA without prior preservation (the class term
    removed), seed 0, otherwise the paper's recipe."""
    return [
        paper_recipe_run("full", 1e-3, 0),
        paper_recipe_run("lora", 6e-3, 0, prior_loss_weight=0.0, variant="noprior"),
    ]


def bounded_std_run(arm: str, lr: float, seed: int) -> RunSpec:
    """Lab v2's arms setting, where the unbounded std filled samples with noise: batch 4, 3,000 steps, guidance 3
    every 100 steps, no prior preservation."""
    return RunSpec(arm=arm, lr=lr, seed=seed, steps=3000, batch=4, schedules=((3.0, 100),))


def study_model_dir(study: str) -> str:
    """The folder of the base model ``study`` fine-tunes (v2f unless the plan names another)."""
    return os.path.join(os.path.dirname(MODEL_DIR), STUDY_BASE_MODELS.get(study, os.path.basename(MODEL_DIR)))


def gate_refusal(study: str) -> str | None:
    """Why ``study`` may not run yet (its base model has not passed its declared gate 1), or None."""
    if study not in STUDY_GATES:
        return None
    lab_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(lab_dir, STUDY_GATES[study])
    if not os.path.isfile(path):
        return f"study {study} runs only after gate 1 on its base model; {path} does not exist (PLAN_V3.md)"
    with open(path) as f:
        gate1 = json.load(f).get("gate1_class") or {}
    if gate1.get("passed") is not True:
        return (
            f"study {study} runs only after gate 1 on its base model passed; {path} says passed={gate1.get('passed')}"
        )
    return None


def study_runs(study: str, seeds: tuple[int, ...] = SEEDS, lr: float | None = None) -> list[RunSpec]:
    """The runs of ``study`` for ``seeds``, in the plan's order (``lr``: the arms study's learning rate)."""
    if lr is not None and study != "paper_recipe_arms":
        raise ValueError(f"--lr applies to study paper_recipe_arms only, got --lr {lr:g} for study {study}")
    if study == "memorise_probe" and tuple(seeds) != SEEDS:
        raise ValueError(f"study memorise_probe runs its declared runs (seed 0); --seeds does not apply, got {seeds}")
    if study in ("paper_recipe", "paper_recipe_v3w"):  # the same runs and rule, on another base model
        return [paper_recipe_run("lora", lr, seed) for seed in seeds for lr in PAPER_LRS]
    if study == "bounded_std":
        return [
            bounded_std_run(arm, lr, seed)
            for seed in seeds
            for lr in BOUNDED_STD_LRS
            for arm in ("bayes_paper", "bayes_default")
        ]
    if study == "paper_recipe_arms":
        if lr is None:
            raise ValueError("study paper_recipe_arms needs the learning rate study 1's rule chose (--lr)")
        return [paper_recipe_run(arm, lr, seed) for seed in seeds for arm in PAPER_ARMS]
    if study == "memorise_probe":
        return memorise_probe_runs()
    raise ValueError(f"study must be one of {STUDIES}, got {study!r}")
