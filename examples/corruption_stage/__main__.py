"""The corruption-stage lab: `python -m examples.corruption_stage [SUBCOMMAND] [options]` from the repository root.

    run        (default) plain LoRA on the v2f base model and the circle subject, judged by the package (~6 min)
    controls   the judge's positive and negative controls on the lab's measured records (PLAN_V3.md step 0)
    study      a PLAN_V3.md study (paper_recipe, bounded_std, paper_recipe_arms, memorise_probe, and studies 1-2 on
               v3w: paper_recipe_v3w, paper_recipe_arms_v3w), two runs at a time, resumable within a run
    report     a study's verdicts, declared reading, summary and figure, from its run files
    gate       lab v2's reachability gate (PLAN_V2.md)
    reproduce  every lab v2 number in RESULTS.md, in order (~15 h)
    experiment lab v1/v2's arms experiment (RESULTS.md history)
    pretrain, autoencoder-pilot, render-probe, x0-probe, frontier, reading: lab v2's base models, probes, readings

`python -m examples.corruption_stage SUBCOMMAND --help` for each one's options.
"""

from __future__ import annotations

import importlib
import sys


SUBCOMMANDS = {
    "run": "examples.corruption_stage.run",
    "controls": "examples.corruption_stage.run",
    "study": "examples.corruption_stage.run",
    "report": "examples.corruption_stage.run",
    "gate": "examples.corruption_stage.study.gate",
    "reproduce": "examples.corruption_stage.reproduce",
    "experiment": "examples.corruption_stage.experiment_cli",
    "pretrain": "examples.corruption_stage.model.pretrain",
    "autoencoder-pilot": "examples.corruption_stage.model.autoencoder_pilot",
    "render-probe": "examples.corruption_stage.model.render_probe",
    "x0-probe": "examples.corruption_stage.model.x0_probe",
    "frontier": "examples.corruption_stage.report.frontier",
    "reading": "examples.corruption_stage.report.reading",
}
V3_SUBCOMMANDS = ("run", "controls", "study", "report")


def main(argv: list[str] | None = None) -> object:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    name = argv.pop(0) if argv and not argv[0].startswith("-") else "run"
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}; expected one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    saved, sys.argv = sys.argv, [f"python -m examples.corruption_stage {name}", *argv]  # argparse's prog
    try:
        module = importlib.import_module(SUBCOMMANDS[name])
        if name in V3_SUBCOMMANDS:
            return module.main(name, argv)
        return module.main() if name == "pretrain" else module.main(argv)  # pretrain reads sys.argv
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
