"""The studies PLAN_V3.md declares, as run lists in the declared order."""

from __future__ import annotations

import json
import os

from .train import MODEL_DIR, RunSpec


PAPER_LRS = (3e-3, 6e-3, 1.2e-2)
BOUNDED_STD_LRS = (1e-2, 3e-3)
SEEDS = (0, 1, 2)
STUDIES = (
    "paper_recipe",
    "bounded_std",
    "paper_recipe_arms",
    "memorise_probe",
    "paper_recipe_v3w",
    "paper_recipe_arms_v3w",
)
ARMS_STUDIES = ("paper_recipe_arms", "paper_recipe_arms_v3w")  # study 2, run at the learning rate study 1 chose
# PLAN_V3's amendments of 7 December, 01:43 and 03:00: studies 1 and 2 repeated on the wider base model v3w, on its
# stage d once it passed lab v2's gate 1, else on one more stage e once that passed; (model, gate file) in that order
V3W_BASE_MODELS = (
    ("base_model_v3w_d", os.path.join("results", "v3w", "v3w_gate1.json")),
    ("base_model_v3w_e", os.path.join("results", "v3w", "v3w_e_gate1.json")),
)
STUDY_BASE_MODELS = {"paper_recipe_v3w": V3W_BASE_MODELS, "paper_recipe_arms_v3w": V3W_BASE_MODELS}
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


def _gate1_state(gate_file: str) -> bool | None | str:
    """What a gate-1 file (relative to the lab's folder) says: ``passed`` True or False; the missing file as None;
    a file without a verdict as the text the refusal quotes."""
    lab_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(lab_dir, gate_file)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        passed = (json.load(f).get("gate1_class") or {}).get("passed")
    return passed if isinstance(passed, bool) else f"says passed={passed}"


def _base_model(study: str) -> tuple[str, str, bool | None | str] | None:
    """The (model, gate file, gate state) ``study`` fine-tunes: the first candidate whose gate 1 has not failed (it
    passed, or the model still waits to be pretrained or gated), else the last; None for v2f."""
    candidates = STUDY_BASE_MODELS.get(study)
    if not candidates:
        return None
    for model, gate in candidates:
        state = _gate1_state(gate)
        if state is not False:
            return model, gate, state
    return model, gate, state


def study_model_dir(study: str) -> str:
    """The folder of the base model ``study`` fine-tunes (v2f unless the plan names another)."""
    chosen = _base_model(study)
    return os.path.join(os.path.dirname(MODEL_DIR), chosen[0] if chosen else os.path.basename(MODEL_DIR))


def gate_refusal(study: str) -> str | None:
    """Why ``study`` may not run yet (the base model it would fine-tune has not passed its declared gate 1), or
    None."""
    chosen = _base_model(study)
    if chosen is None or chosen[2] is True:
        return None
    model, gate, state = chosen
    said = {None: "does not exist", False: "says passed=False"}.get(state, state)
    return f"study {study} runs only on a base model that passed gate 1 (PLAN_V3.md): for {model}, {gate} {said}"


def study_runs(study: str, seeds: tuple[int, ...] = SEEDS, lr: float | None = None) -> list[RunSpec]:
    """The runs of ``study`` for ``seeds``, in the plan's order (``lr``: the arms study's learning rate)."""
    if lr is not None and study not in ARMS_STUDIES:
        raise ValueError(f"--lr applies to the studies {ARMS_STUDIES} only, got --lr {lr:g} for study {study}")
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
    if study in ARMS_STUDIES:
        if lr is None:
            raise ValueError(f"study {study} needs the learning rate study 1's rule chose (--lr)")
        return [paper_recipe_run(arm, lr, seed) for seed in seeds for arm in PAPER_ARMS]
    if study == "memorise_probe":
        return memorise_probe_runs()
    raise ValueError(f"study must be one of {STUDIES}, got {study!r}")
