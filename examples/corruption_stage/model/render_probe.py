"""A diagnostic probe of lab v2 (PLAN_V2.md, after gate 1 failed on v2b and v2c): does the base model draw each kind
it was pretrained on, or only fail at the class? It decides nothing in the plan.

    python -m examples.corruption_stage render-probe --model-dirs examples/corruption_stage/model/base_model_v2 \\
        examples/corruption_stage/model/base_model_v2b examples/corruption_stage/model/base_model_v2c \\
        --out examples/corruption_stage/results/v2/v2_render_probe.json

Gate 1's kind classifier (settings T2, trained once) labels the evaluation's 12 fixed-seed samples of every kind's
prompt and of the class; per kind, the fraction labelled as that kind (square and diamond as one shape).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..study.gate import (
    ALL_KINDS,
    CLASSES,
    HELD_OUT_SEED,
    classifier_accuracy,
    merge_same_shapes,
    sample_kinds,
    train_kind_classifier,
)
from . import data
from .models import CONFIG_FILE, LabModel, load_model


CLASSIFIER_T2 = {"n_images": 28000, "steps": 12000, "width": 64, "cosine": True}  # PLAN_V2.md's chosen trial


@torch.no_grad()
def render_rates(
    model: LabModel,
    classifier: torch.nn.Module,
    n: int = 12,
    seed: int = 10_000,
    steps: int = 25,
    guidance: float = 3.0,
) -> dict[str, float]:
    """Per kind (the class for the cross): the fraction of ``n`` fixed-seed samples of its prompt that the
    classifier labels as that kind."""
    out = {}
    for index, kind in enumerate(ALL_KINDS):
        token = data.class_token(kind)
        predicted = merge_same_shapes(sample_kinds(model, classifier, token, n, seed, steps, guidance))
        target = merge_same_shapes(torch.tensor([index]))
        out[kind] = float((predicted == target).double().mean())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dirs", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--classifier-steps", type=int, default=CLASSIFIER_T2["steps"])
    parser.add_argument("--classifier-images", type=int, default=CLASSIFIER_T2["n_images"])
    parser.add_argument(
        "--eval-seed", type=int, default=10_000, help="seed of the generator drawing each kind's 12 samples"
    )
    args = parser.parse_args(argv)
    for name in ("classifier_steps", "classifier_images"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for folder in args.model_dirs:
        if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
            parser.error(f"--model-dirs {folder!r} holds no lab model ({CONFIG_FILE})")
    models = {folder: load_model(folder) for folder in args.model_dirs}
    for folder, model in models.items():
        if not model.cfg.extra_tokens:
            parser.error(f"--model-dirs {folder!r} is not a lab v2 model (no class token)")
    torch.set_num_threads(1)
    settings = {**CLASSIFIER_T2, "steps": args.classifier_steps, "n_images": args.classifier_images}
    size = next(iter(models.values())).cfg.image_size
    classifier = train_kind_classifier(**settings, size=size)
    payload = {
        "command": "python -m examples.corruption_stage render-probe "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "classifier": settings,
        f"classifier_accuracy_seed_{HELD_OUT_SEED}": classifier_accuracy(classifier, HELD_OUT_SEED, size=size),
        "classes": list(CLASSES),
        "eval_seed": args.eval_seed,
        "render_rates": {
            folder: render_rates(model, classifier, seed=args.eval_seed) for folder, model in models.items()
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    print(json.dumps(payload["render_rates"], indent=1))
    return payload


if __name__ == "__main__":
    main()
