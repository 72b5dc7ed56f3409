"""The arms study's declared reading (PLAN_V2.md, seventh session), as code: per arm, the frontier at gate 2's
fidelity level, the comparison with plain LoRA, early stopping, and the package's stage judge on every seed
(lab v3; the committed v2 reading holds v2's own rule's counts).

    python -m examples.corruption_stage reading results/a/results.json results/b/results.json --out reading.json

An arm "copies less" (or "is more diverse") at matched fidelity when its mean frontier is better than plain LoRA's by
more than the larger of the two seed stds; a stage "appears" for an arm when the rule flags at least
``STAGE_MIN_SEEDS`` of its seeds.
"""

from __future__ import annotations

import argparse
import json
import math

from ..study.experiment import ARM_LABELS
from ..study.gate import FIDELITY_OF_CEILING, stage_verdict
from .frontier import MEASURES, best_checkpoint, frontier_curve, load_results, mean_std


FIDELITY_KEY = "ssim_fidelity"
STAGE_MIN_SEEDS = 2
STAGE_SEEDS = 3  # "at least 2 of its 3 seeds": fewer seeds decide nothing


def compare(arm: dict[str, float], plain: dict[str, float], better: str) -> bool:
    """Whether ``arm`` (mean, std over seeds, population std as the frontier's) beats ``plain`` by more than the
    larger of the two stds; False when either is nan."""
    margin = max(arm["std"], plain["std"])
    gain = arm["mean"] - plain["mean"] if better == "higher" else plain["mean"] - arm["mean"]
    return not math.isnan(gain) and gain > margin


def _highest(values: list[float]) -> float:
    """The largest of ``values`` that is a number (a nan checkpoint never decides)."""
    return max((v for v in values if not math.isnan(v)), default=math.nan)


def _check_readable(result: dict) -> dict[str, list[dict]]:
    runs = result["runs"]
    if not runs or FIDELITY_KEY not in runs[0]["curves"]:
        raise ValueError("the reading needs a lab v2 result (runs with ssim_fidelity curves)")
    sizes = sorted({r["n_images"] for r in runs})
    arms = dict.fromkeys(r["arm"] for r in runs)
    by_arm = {arm: sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"]) for arm in arms}
    if len(sizes) != 1 or "lora" not in by_arm:
        raise ValueError(f"the reading needs plain LoRA runs and one training-set size, got arms {list(by_arm)} and "
                         f"sizes {sizes}")  # fmt: skip
    prior = result.get("config", {}).get("prior_loss_weight", 0.0)
    if prior:  # prior preservation is a setting, not an arm: its runs would be read as plain LoRA
        raise ValueError(f"the reading compares arms without prior preservation, got prior_loss_weight {prior}")
    seeds = [r["seed"] for r in by_arm["lora"]]
    for arm, rs in by_arm.items():
        if [r["seed"] for r in rs] != seeds:
            raise ValueError(f"arm {arm} has seeds {[r['seed'] for r in rs]}, plain LoRA {seeds}: read them together")
    ceilings = {r["curves"]["ssim_ceiling"][0] for r in runs}
    if len(ceilings) != 1:
        raise ValueError(f"the runs have different SSIM ceilings {sorted(ceilings)}: not one subject")
    return by_arm


def read_arms(result: dict) -> dict:
    """The declared reading of a v2 lab result: every arm with plain LoRA's seeds, one training-set size, no prior
    preservation. ``stage_appears`` is None below ``STAGE_SEEDS`` seeds."""
    by_arm = _check_readable(result)
    level = FIDELITY_OF_CEILING * result["runs"][0]["curves"]["ssim_ceiling"][0]
    arms: dict[str, dict] = {}
    for arm, rs in by_arm.items():
        entry: dict = {"seeds": [r["seed"] for r in rs]}
        entry["reaches_level"] = all(_highest(r["curves"][FIDELITY_KEY]) >= level for r in rs)
        for measure, better in MEASURES[FIDELITY_KEY].items():
            per_seed = [
                frontier_curve(r["curves"][FIDELITY_KEY], r["curves"][measure], [level], better)[0] for r in rs
            ]
            entry[measure] = {**mean_std(per_seed), "per_seed": per_seed}
        stages = [stage_verdict(r["curves"]) for r in rs]
        entry["stage_seeds"] = sum(s["stage"] for s in stages)
        entry["stage_appears"] = entry["stage_seeds"] >= STAGE_MIN_SEEDS if len(rs) >= STAGE_SEEDS else None
        entry["first_copy_iterations"] = [s["first_copy_step"] for s in stages]
        entry["max_fidelity"] = mean_std([_highest(r["curves"][FIDELITY_KEY]) for r in rs])
        entry["final_copy_rate"] = mean_std([r["curves"]["latent_copy_rate"][-1] for r in rs])
        arms[arm] = entry
    for arm, entry in arms.items():
        if arm == "lora":
            continue
        for measure, better in MEASURES[FIDELITY_KEY].items():
            name = f"{'copies_less' if better == 'lower' else 'more_diverse'}_than_plain_lora"
            if arms["lora"]["reaches_level"]:
                entry[name] = entry["reaches_level"] and compare(entry[measure], arms["lora"][measure], better)
            else:  # plain LoRA misses the level on a seed: nothing to compare with
                entry[name] = None
    # Early stopping's checkpoint is one its frontier chooses from, so it never beats plain LoRA there by
    # construction; it is reported beside the arms, not compared.
    plain = by_arm["lora"]
    best = [best_checkpoint(r, FIDELITY_KEY) for r in plain]
    arms["early_stopping"] = {
        "seeds": [r["seed"] for r in plain],
        "reaches_level": all(r["curves"][FIDELITY_KEY][i] >= level for r, i in zip(plain, best)),
        **{
            k: mean_std([r["curves"][k][i] for r, i in zip(plain, best)])
            for k in ("iteration", FIDELITY_KEY, *MEASURES[FIDELITY_KEY])
        },
    }
    return {"fidelity_level": level, "arms": arms}


def reading_markdown(reading: dict) -> str:
    """The reading as a markdown table, one row per arm."""
    label = {**ARM_LABELS, "early_stopping": "early stopping (plain LoRA's best checkpoint)"}
    lines = [
        f"At structural fidelity >= {reading['fidelity_level']:.3f} (0.9 x the SSIM ceiling); mean ± std over seeds.",
        "",
        "| arm | seeds | reaches the level | copy rate (frontier) | diversity (frontier) | copies less | more diverse "
        "| stage (seeds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in reading["arms"].items():
        copy, div = a["latent_copy_rate"], a["diversity"]
        stage = f"{a['stage_seeds']} of {len(a['seeds'])}" if "stage_seeds" in a else "-"
        less = a.get("copies_less_than_plain_lora", "-")
        more = a.get("more_diverse_than_plain_lora", "-")
        lines.append(
            f"| {label.get(arm, arm)} | {len(a['seeds'])} | {a['reaches_level']} | {copy['mean']:.3f} ± {copy['std']:.3f} | "
            f"{div['mean']:.3f} ± {div['std']:.3f} | {less} | {more} | {stage} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Reads one or several (merged) lab ``results.json``; prints the table, writes the reading to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files written by the lab (several: merged)")
    parser.add_argument("--out", required=True, help="the reading's JSON")
    args = parser.parse_args(argv)
    result = load_results(parser, args.results)
    try:
        reading = read_arms(result)
    except ValueError as error:
        parser.error(str(error))
    with open(args.out, "w") as f:
        json.dump({"results": args.results, **reading}, f, indent=2)
    print(reading_markdown(reading))
    return reading


if __name__ == "__main__":
    main()
