"""Reads a lab v3 study (PLAN_V3.md) off its run files: every verdict from the package's judge, then the plan's
declared reading; writes ``summary.json``, ``summary.md`` and the study's figure.

    python -m examples.corruption_stage report paper_recipe
"""

from __future__ import annotations

import glob
import json
import math
import os

from bayes_adapter.stage import THRESHOLDS, judge, read_monitor, verdict_sentence

from ..study.plan import SEEDS
from ..study.train import format_lr


STAGE_SEEDS_NEEDED = 2  # of 3: "a stage appears" (PLAN_V3.md, study 1)
MATCHED_FIDELITY = 0.9  # x ceiling, the arms study's frontier level
FIT_FLOOR = 0.5  # issue 32's pass rule (a): no record after fit below this fidelity


def judge_file(path: str) -> dict:
    """The judge's verdict on one record file, with the plan's derived numbers (gap ratio, records between fit and
    first clean copy, fidelity after fit)."""
    records = read_monitor(path)
    verdict = judge(records)
    fit, copy = verdict.fit_step, verdict.first_copy_step
    after_fit = [r for r in records if fit is not None and r.step > fit]
    return {
        "file": os.path.basename(path),
        "verdict": verdict.to_dict(),
        "sentence": verdict_sentence(verdict),
        "gap_ratio": copy / fit if fit and copy is not None else None,
        "records_between_fit_and_copy": (
            sum(fit < r.step < copy for r in records) if fit is not None and copy is not None else None
        ),
        "max_fidelity": max(r.fidelity for r in records),
        "min_noise_energy": min(r.noise_energy for r in records),
        "max_noise_energy": max(r.noise_energy for r in records),
        "min_fidelity_after_fit": min((r.fidelity for r in after_fit), default=None),
        "loss_last_quarter": _mean_loss(r for r in records if r.step > 0.75 * records[-1].step),
        "final_fidelity": records[-1].fidelity,
        "final_copy_rate": records[-1].copy_rate,
        "records_after_fit_below_floor": sum(r.fidelity < FIT_FLOOR for r in after_fit),
        "at_best": next(
            ({"fidelity": r.fidelity, "copy_rate": r.copy_rate} for r in records if r.step == verdict.best_step), None
        ),
        "frontier_copy_rate": min(
            (r.copy_rate for r in records if r.fidelity >= MATCHED_FIDELITY * (r.fidelity_ceiling or 1.0)),
            default=None,
        ),
    }


def _mean_loss(records) -> float | None:
    """The mean of the records' losses (each the mean training loss since the file's previous record)."""
    losses = [r.loss for r in records if r.loss is not None]
    return sum(losses) / len(losses) if losses else None


def load_runs(runs_dir: str) -> list[dict]:
    """Every finished run in ``runs_dir`` (its ``<run>.json`` written), each guidance scale's file judged."""
    runs = []
    for path in sorted(glob.glob(os.path.join(runs_dir, "*.json"))):
        if os.path.basename(path) == "plan.json":
            continue
        with open(path) as f:
            run = json.load(f)
        spec = run["spec"]
        files = {}
        for guidance, _ in spec["schedules"]:
            files[f"{guidance:g}"] = judge_file(os.path.join(runs_dir, f"{run['name']}_g{guidance:g}.jsonl"))
        base_model = run.get("base_model", "base_model_v2f")  # runs before the field all fine-tuned v2f
        runs.append(
            {
                "name": run["name"],
                "spec": spec,
                "seconds": run.get("seconds"),
                "base_model": base_model,
                "judged": files,
            }
        )
    return runs


def primary(run: dict) -> dict:
    return run["judged"][f"{run['spec']['schedules'][0][0]:g}"]


def mean_std(values: list[float]) -> dict[str, float] | None:
    if not values or any(v is None for v in values):
        return None
    mean = sum(values) / len(values)
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), "n": len(values)}


def read_paper_recipe(runs: list[dict], seeds: int = 3) -> dict:
    """Study 1: per learning rate, the stage rate (primary records) and whether a stage appears (>= 2 of 3 seeds;
    undecided while fewer seeds have finished and the count could still change the answer)."""
    out = {}
    for lr in sorted({r["spec"]["lr"] for r in runs if r["spec"]["arm"] == "lora"}):
        group = [r for r in runs if r["spec"]["lr"] == lr and r["spec"]["arm"] == "lora"]
        flagged = sum(primary(r)["verdict"]["stage"] for r in group)
        if flagged >= STAGE_SEEDS_NEEDED:
            appears = True
        elif flagged + (seeds - len(group)) < STAGE_SEEDS_NEEDED:
            appears = False
        else:
            appears = None
        out[format_lr(lr)] = {"seeds_run": len(group), "seeds_with_stage": flagged, "stage_appears": appears}
    return out


def read_bounded_std(runs: list[dict]) -> dict:
    """Study 3 (issue 32): rule (a) on every bounded run, rule (b) at lr 3e-3, and the same comparison at 1e-2."""
    bounded = [r for r in runs if r["spec"]["arm"] == "bayes_default"]
    rule_a = {
        r["name"]: primary(r)["verdict"]["fit_step"] is not None and primary(r)["records_after_fit_below_floor"] == 0
        for r in bounded
    }
    comparison = {}
    for lr in sorted({r["spec"]["lr"] for r in runs}):
        per_arm = {}
        for arm in ("bayes_paper", "bayes_default"):
            group = [primary(r) for r in runs if r["spec"]["lr"] == lr and r["spec"]["arm"] == arm]
            per_arm[arm] = {
                k: mean_std([g[k] for g in group]) for k in ("max_fidelity", "final_fidelity", "final_copy_rate")
            }
        within = {}
        for key in ("max_fidelity", "final_fidelity", "final_copy_rate"):
            a, b = per_arm["bayes_paper"][key], per_arm["bayes_default"][key]
            within[key] = (
                None
                if a is None or b is None
                else abs(a["mean"] - b["mean"]) < 2 * max(a["std"], b["std"]) or a["mean"] == b["mean"]
            )
        comparison[format_lr(lr)] = {"arms": per_arm, "within_2_std": within}
    unbounded_low = {
        r["name"]: primary(r)["records_after_fit_below_floor"] for r in runs if r["spec"]["arm"] == "bayes_paper"
    }
    at_3e3 = comparison.get("3e-3", {})
    passed_b = at_3e3.get("within_2_std", {})
    complete_b = bool(at_3e3) and all(  # rule (b) compares three seeds per arm; undecided before
        stats is not None and stats["n"] == len(SEEDS) for arm in at_3e3["arms"].values() for stats in arm.values()
    )
    return {
        "rule_a_per_run": rule_a,
        "rule_a": all(rule_a.values()) if len(rule_a) == 6 else None,
        "rule_b": all(passed_b.values()) if complete_b and None not in passed_b.values() else None,
        "comparison": comparison,
        "unbounded_records_after_fit_below_0.5": unbounded_low,
    }


def read_memorise_probe(runs: list[dict]) -> dict:
    """The memorisation probe (PLAN_V3.md, amendment of 7 December): per run and guidance, whether the judge ever
    sees a clean copy, the first one, the fit step and the lowest latent residual energy (a clean copy needs < 0.02);
    then the declared outcome: "A" full fine-tuning reaches a clean copy and LoRA without prior preservation does
    not, "B" LoRA without prior preservation does, "C" neither does; None until both runs have finished."""
    per_run = {
        run["name"]: {
            guidance: {
                "reaches_clean_copy": j["verdict"]["first_copy_step"] is not None,
                "first_copy_step": j["verdict"]["first_copy_step"],
                "fit_step": j["verdict"]["fit_step"],
                "gap_ratio": j["gap_ratio"],
                "min_noise_energy": j["min_noise_energy"],
                "stage": j["verdict"]["stage"],
            }
            for guidance, j in run["judged"].items()
        }
        for run in runs
    }

    def copies(match) -> bool | None:
        found = [r for r in runs if match(r["spec"])]
        return any(g["reaches_clean_copy"] for g in per_run[found[0]["name"]].values()) if found else None

    full = copies(lambda spec: spec["arm"] == "full")
    no_prior = copies(lambda spec: spec["arm"] == "lora" and spec.get("variant") == "noprior")
    if full is None or no_prior is None:
        outcome = None
    else:
        outcome = "B" if no_prior else ("A" if full else "C")
    return {"runs": per_run, "outcome": outcome}


def read_paper_recipe_arms(runs: list[dict], plain_runs: list[dict]) -> dict:
    """Study 2: per arm (plain LoRA's runs from study 1 at the same rate), the stage rate, the frontier copy rate at
    0.9 x ceiling and the fidelity and copy rate at the judge's best step (mean and population std over seeds);
    whether the arm removes the stage and whether it copies less at matched fidelity (PLAN_V3.md's rules)."""
    lrs = {r["spec"]["lr"] for r in runs}
    groups = {"lora": [r for r in plain_runs if r["spec"]["arm"] == "lora" and r["spec"]["lr"] in lrs]}
    for run in runs:
        groups.setdefault(run["spec"]["arm"], []).append(run)
    out = {}
    for arm, group in groups.items():
        judged = [primary(r) for r in sorted(group, key=lambda r: r["spec"]["seed"])]
        frontier = [j["frontier_copy_rate"] for j in judged]
        out[arm] = {
            "seeds": [r["spec"]["seed"] for r in sorted(group, key=lambda r: r["spec"]["seed"])],
            "seeds_with_stage": sum(j["verdict"]["stage"] for j in judged),
            "frontier_copy_rate": mean_std(frontier),
            "reaches_matched_fidelity": all(f is not None for f in frontier),
            "fidelity_at_best": mean_std([j["at_best"]["fidelity"] for j in judged if j["at_best"]]),
            "copy_rate_at_best": mean_std([j["at_best"]["copy_rate"] for j in judged if j["at_best"]]),
        }
    out["early_stopping"] = {  # plain LoRA's record at the judge's best step, no training of its own
        "fidelity_at_best": out["lora"]["fidelity_at_best"],
        "copy_rate_at_best": out["lora"]["copy_rate_at_best"],
    }
    plain = out["lora"]
    plain_rate = plain["seeds_with_stage"] / len(plain["seeds"]) if plain["seeds"] else None
    for arm, entry in out.items():
        if arm in ("lora", "early_stopping"):
            continue
        rate = entry["seeds_with_stage"] / len(entry["seeds"])
        entry["removes_the_stage"] = plain_rate is not None and plain_rate >= 2 / 3 and rate <= 1 / 3
        a, b = entry["frontier_copy_rate"], plain["frontier_copy_rate"]
        entry["copies_less_at_matched_fidelity"] = (
            None if a is None or b is None else b["mean"] - a["mean"] > max(a["std"], b["std"])
        )
    return out


def summary_markdown(study: str, runs: list[dict], reading: dict) -> str:
    lines = [f"# Study `{study}` (PLAN_V3.md): {len(runs)} runs finished", ""]
    base_models = sorted({run["base_model"] for run in runs})
    if base_models:
        lines += [f"Base model: {', '.join(base_models)}", ""]
    lines += [
        "| run | guidance | stage | fit step | first clean copy | gap ratio | best step | max / final fidelity | final copy rate | verdict |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for guidance, j in run["judged"].items():
            v = j["verdict"]
            ratio = f"{j['gap_ratio']:.1f}" if j["gap_ratio"] is not None else "none"
            lines.append(
                f"| {run['name']} | {guidance} | {v['stage']} | {v['fit_step']} | {v['first_copy_step']} | {ratio} | "
                f"{v['best_step']} | {j['max_fidelity']:.3f} / {j['final_fidelity']:.3f} | {j['final_copy_rate']:.2f} | "
                f"{j['sentence']} |"
            )
    lines += ["", "Reading (PLAN_V3.md's rules):", "", "```json", json.dumps(reading, indent=1), "```", ""]
    return "\n".join(lines)


def make_study_figure(runs: list[dict], runs_dir: str, path: str) -> None:
    """Primary records of every run: fidelity against its ceiling, noise energy, whiteness and copy rate; a measure
    constant over every run is named in the title, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("fidelity", "fidelity (SSIM)"),
        ("noise_energy", "noise energy"),
        ("noise_whiteness", "whiteness"),
        ("copy_rate", "clean-copy rate"),
    )
    records = {run["name"]: read_monitor(os.path.join(runs_dir, primary(run)["file"])) for run in runs}
    values = {key: {getattr(r, key) for rs in records.values() for r in rs} for key, _ in panels}
    drawn = [(key, title) for key, title in panels if len(values[key]) > 1]
    dropped = [f"{key} constant at {next(iter(values[key])):.3g}" for key, _ in panels if len(values[key]) == 1]
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.5 * len(drawn), 4), squeeze=False)
    for i, (name, rs) in enumerate(records.items()):
        steps = [r.step for r in rs]
        for ax, (key, title) in zip(axes[0], drawn):
            ax.plot(steps, [getattr(r, key) for r in rs], color=f"C{i % 10}", lw=1, label=name)
            ax.set_title(title)
            ax.set_xlabel("step")
            if key == "noise_energy":  # spans a clean copy's < 0.02 to tens at a divergence
                ax.set_yscale("log")
                if i == 0:
                    copy_line = ax.axhline(THRESHOLDS["copy_energy"][0], color="black", ls=":", lw=0.8)
                    ax.legend([copy_line], ["clean copy below"], fontsize=6)
    ceiling = next(iter(records.values()))[-1].fidelity_ceiling
    if ceiling is not None and drawn and drawn[0][0] == "fidelity":
        axes[0][0].axhline(ceiling, color="black", ls="--", lw=0.8, label="autoencoder ceiling")
    axes[0][0].legend(fontsize=6)
    if dropped:
        fig.suptitle("not drawn: " + ", ".join(dropped), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_study_report(study: str, study_dir: str) -> dict:
    runs_dir = os.path.join(study_dir, "runs")
    runs = load_runs(runs_dir)
    if study in ("paper_recipe", "paper_recipe_v3w"):
        reading = read_paper_recipe(runs)
    elif study == "bounded_std":
        reading = read_bounded_std(runs)
    elif study == "memorise_probe":
        reading = read_memorise_probe(runs)
    else:
        plain_study = study.replace("_arms", "")  # study 1 on the same base model: paper_recipe(_v3w)
        plain_dir = os.path.join(os.path.dirname(os.path.abspath(study_dir)), plain_study, "runs")
        plain_runs = load_runs(plain_dir) if os.path.isdir(plain_dir) else []
        theirs = {run["base_model"] for run in plain_runs} - {run["base_model"] for run in runs}
        if runs and theirs:
            raise ValueError(f"{plain_dir} holds runs of {sorted(theirs)}, not the base model of {study_dir}'s runs")
        reading = read_paper_recipe_arms(runs, plain_runs)
    summary = {"study": study, "runs": runs, "reading": reading}
    with open(os.path.join(study_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(study_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(study, runs, reading))
    if runs:
        make_study_figure(runs, runs_dir, os.path.join(study_dir, f"{study}.png"))
    return summary


def rejudge_v2(v2_dir: str) -> dict:
    """Lab v2's gate, pilot and arms runs (their committed curves) judged again by the package's judge: written to
    ``<v2_dir>/rejudged_by_package_judge.json`` (`python -m examples.corruption_stage report v2`)."""
    from ..study.gate import stage_verdict

    rows = []
    names = sorted(glob.glob(os.path.join(v2_dir, "*gate*.json")) + glob.glob(os.path.join(v2_dir, "*pilot_*.json")))
    for path in names:
        with open(path) as f:
            result = json.load(f)
        for run in result.get("runs") or []:
            rows.append(
                {"file": os.path.basename(path), "arm": "gate", "seed": run["seed"], **stage_verdict(run["curves"])}
            )
    for path in sorted(glob.glob(os.path.join(v2_dir, "*_arms_seed*", "results.json"))):
        with open(path) as f:
            result = json.load(f)
        for run in result["runs"]:
            name = os.path.relpath(path, v2_dir)
            rows.append({"file": name, "arm": run["arm"], "seed": run["seed"], **stage_verdict(run["curves"])})
    summary = {
        "runs": len(rows),
        "with_stage": sum(r["stage"] for r in rows),
        "with_instability": sum(any(e["kind"] == "instability" for e in r["episodes"]) for r in rows),
        "with_clean_copy": sum(r["first_copy_step"] is not None for r in rows),
        "judged": rows,
    }
    with open(os.path.join(v2_dir, "rejudged_by_package_judge.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
