"""The lab's headline question, asked of every checkpoint: at matched subject fidelity, which arm copies less and
is more diverse? (Issue 16, item 6.)

Each run's *frontier* at a fidelity level f is the best value of a measure (the lowest copy rate, the highest
diversity) among its checkpoints whose fidelity is at least f: what a user who stops at the right checkpoint gets
for that fidelity. Frontiers are averaged over seeds at levels every seed of the arm reaches.

*Early stopping* is what a user gets without that oracle: plain LoRA stopped at its checkpoint of highest fidelity.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from ..study.experiment import ARM_COLOURS, ARM_LABELS


# (curve, better) per measure; v1 and v2 name their curves differently.
MEASURES = {
    "fidelity": {"copy_rate": "lower", "diversity": "higher"},
    "ssim_fidelity": {"latent_copy_rate": "lower", "diversity": "higher"},
}
MEASURE_LABELS = {
    "copy_rate": "copy rate (pixel)",
    "latent_copy_rate": "copy rate (latent residual)",
    "diversity": "diversity",
}


EARLY_STOPPING_LABEL = "early stopping (plain LoRA's best checkpoint by fidelity)"


def default_fidelity_key(result: dict) -> str:
    """v2 runs judge fidelity structurally (``ssim_fidelity``), v1 runs by feature cosine (``fidelity``)."""
    return "ssim_fidelity" if "ssim_fidelity" in result["runs"][0]["curves"] else "fidelity"


def frontier_curve(fidelity: list[float], values: list[float], levels: list[float], better: str) -> list[float]:
    """The best of ``values`` over the checkpoints whose fidelity is at least each level (nan where none is)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    pick = min if better == "lower" else max
    out = []
    for level in levels:
        reached = [v for f, v in zip(fidelity, values) if f >= level and not math.isnan(v)]
        out.append(pick(reached) if reached else math.nan)
    return out


def _groups(result: dict) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in result["runs"]:
        groups.setdefault((run["arm"], run["n_images"]), []).append(run)
    return groups


def mean_std(values: list[float]) -> dict[str, float]:
    vals = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(vals.mean()), "std": float(vals.std(unbiased=False))}


def best_checkpoint(run: dict, fidelity_key: str = "fidelity") -> int:
    """The index of a run's checkpoint of highest fidelity (the first, on ties): where early stopping stops."""
    fidelity = run["curves"][fidelity_key]  # a nan checkpoint (no measure) is never the best
    return max(range(len(fidelity)), key=lambda i: -math.inf if math.isnan(fidelity[i]) else fidelity[i])


def early_stopping(runs: list[dict], fidelity_key: str = "fidelity") -> dict | None:
    """Plain LoRA stopped at each run's checkpoint of highest fidelity: that checkpoint's iteration, fidelity and
    measures (mean and std over the runs); None without plain LoRA runs."""
    runs = [r for r in runs if r["arm"] == "lora"]
    if not runs:
        return None
    best = [best_checkpoint(r, fidelity_key) for r in runs]
    keys = ("iteration", fidelity_key, *MEASURES[fidelity_key])
    return {"seeds": len(runs), **{k: mean_std([r["curves"][k][i] for r, i in zip(runs, best)]) for k in keys}}


def matched_fidelity(result: dict, fidelity_key: str = "fidelity") -> dict[int, dict]:
    """Per training-set size: the highest fidelity level that every run of every arm reaches at some checkpoint,
    and each arm's frontier there (mean and std over seeds) for every measure of ``MEASURES[fidelity_key]``; and
    `early_stopping` (its checkpoints reach that level by construction)."""
    out: dict[int, dict] = {}
    groups = _groups(result)
    for n_img in sorted({n for _, n in groups}):
        runs = [r for (_, n), rs in groups.items() if n == n_img for r in rs]
        level = min(max(r["curves"][fidelity_key]) for r in runs)
        arms = {}
        for (arm, n), rs in groups.items():
            if n != n_img:
                continue
            entry = {"seeds": len(rs)}
            for measure, better in MEASURES[fidelity_key].items():
                entry[measure] = mean_std(
                    [frontier_curve(r["curves"][fidelity_key], r["curves"][measure], [level], better)[0] for r in rs]
                )
            arms[arm] = entry
        out[n_img] = {"fidelity_level": level, "arms": arms, "early_stopping": early_stopping(runs, fidelity_key)}
    return out


def matched_fidelity_markdown(result: dict, fidelity_key: str = "fidelity") -> str:
    """A markdown table of `matched_fidelity`, one section per training-set size."""
    measures = list(MEASURES[fidelity_key])
    lines = []
    for n_img, entry in matched_fidelity(result, fidelity_key).items():
        lines += [
            f"### At matched fidelity, {n_img} training image(s)",
            "",
            f"The best each arm reaches among its checkpoints with {fidelity_key} >= {entry['fidelity_level']:.3f} "
            "(the highest level every run of every arm reaches); mean ± std over seeds.",
            "",
            "| arm | seeds | "
            + " | ".join(f"{MEASURE_LABELS[m]} ({MEASURES[fidelity_key][m]} is better)" for m in measures)
            + " |",
            "|---|---|" + "---|" * len(measures),
        ]
        for arm, a in entry["arms"].items():
            cells = " | ".join(f"{a[m]['mean']:.3f} ± {a[m]['std']:.3f}" for m in measures)
            lines.append(f"| {ARM_LABELS[arm]} | {a['seeds']} | {cells} |")
        stopped = entry["early_stopping"]
        if stopped is not None:
            cells = " | ".join(f"{stopped[m]['mean']:.3f} ± {stopped[m]['std']:.3f}" for m in measures)
            lines.append(f"| {EARLY_STOPPING_LABEL} | {stopped['seeds']} | {cells} |")
            lines += [
                "",
                f"Early stopping's checkpoints: iteration {stopped['iteration']['mean']:.0f} ± "
                f"{stopped['iteration']['std']:.0f}, {fidelity_key} {stopped[fidelity_key]['mean']:.3f} ± "
                f"{stopped[fidelity_key]['std']:.3f}.",
            ]
        lines.append("")
    return "\n".join(lines)


def make_frontier_figure(result: dict, path: str, fidelity_key: str = "fidelity") -> None:
    """Every checkpoint of every run as a faint point (fidelity against each measure), and each arm's frontier:
    the mean over seeds as a line, the seed spread (± std) as a band, where every seed of the arm reaches the
    level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = MEASURES[fidelity_key]
    groups = _groups(result)
    sizes = sorted({n for _, n in groups})
    fig, axes = plt.subplots(len(sizes), len(measures), figsize=(4.6 * len(measures), 3.6 * len(sizes)), squeeze=False)
    for row, n_img in enumerate(sizes):
        for col, (measure, better) in enumerate(measures.items()):
            ax = axes[row][col]
            for (arm, n), rs in groups.items():
                if n != n_img:
                    continue
                colour = ARM_COLOURS[arm]
                for r in rs:
                    ax.scatter(r["curves"][fidelity_key], r["curves"][measure], s=5, color=colour, alpha=0.25, lw=0)
                top = min(max(r["curves"][fidelity_key]) for r in rs)
                bottom = min(min(r["curves"][fidelity_key]) for r in rs)
                levels = [bottom + (top - bottom) * i / 49 for i in range(50)]
                fronts = torch.tensor(
                    [frontier_curve(r["curves"][fidelity_key], r["curves"][measure], levels, better) for r in rs],
                    dtype=torch.float64,
                )
                mean, std = fronts.mean(0), fronts.std(0, unbiased=False)
                label = f"{ARM_LABELS[arm]} ({len(rs)} seeds)"
                ax.plot(levels, mean.tolist(), color=colour, lw=1.6, label=label)
                ax.fill_between(levels, (mean - std).tolist(), (mean + std).tolist(), color=colour, alpha=0.15, lw=0)
            stopped = [r for r in result["runs"] if r["arm"] == "lora" and r["n_images"] == n_img]
            for i, r in enumerate(stopped):
                best = best_checkpoint(r, fidelity_key)
                x, y = r["curves"][fidelity_key][best], r["curves"][measure][best]
                label = EARLY_STOPPING_LABEL if i == 0 else None
                ax.scatter([x], [y], marker="*", s=70, color=ARM_COLOURS["lora"], edgecolor="k", lw=0.5, label=label)
            ax.set_xlabel(f"{fidelity_key} (higher: more like the subject)", fontsize=8)
            ax.set_ylabel(f"{MEASURE_LABELS[measure]} ({better} is better)", fontsize=8)
            ax.set_title(f"{n_img} training image(s): best {MEASURE_LABELS[measure]} at >= this fidelity", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
    fig.suptitle("Frontier over every checkpoint (points); lines: mean over seeds, bands: ± std", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def merge_results(results: list[dict]) -> dict:
    """One result from lab runs that differ only in their seeds or arms (a study split across sessions): their runs
    together, each (arm, training-set size, seed) once, under the first run's config with every seed and arm."""
    if not results:
        raise ValueError("no results to merge")
    if len(results) == 1:
        return results[0]
    first = results[0].get("config", {})
    ignore = ("seeds", "arms", "grid_seed")
    seen = set()
    runs = []
    for number, result in enumerate(results):
        config = result.get("config", {})
        keys = set(first) | set(config)  # a key only one of them has differs too (results of older code)
        differing = sorted(k for k in keys if k not in ignore and config.get(k) != first.get(k))
        if differing:
            raise ValueError(
                f"result {number} differs from the first in {', '.join(differing)}, not only seeds or arms"
            )
        for run in result["runs"]:
            key = (run["arm"], run["n_images"], run["seed"])
            if key in seen:
                raise ValueError(f"run {key} appears in more than one result")
            seen.add(key)
            runs.append(run)
    seeds = sorted({run["seed"] for run in runs})
    arms = list(dict.fromkeys(run["arm"] for run in runs))
    return {**results[0], "config": {**first, "seeds": seeds, "arms": arms}, "runs": runs}


def load_results(parser: argparse.ArgumentParser, paths: list[str]) -> dict:
    """The lab ``results.json`` files at ``paths``, merged by `merge_results`; a path that is no file, holds no runs
    or does not merge ends in ``parser.error`` (exit 2) before any work."""
    loaded = []
    for path in paths:
        if not os.path.isfile(path):
            parser.error(f"results {path!r} is not a file")
        with open(path) as f:
            loaded.append(json.load(f))
        if not loaded[-1].get("runs"):
            parser.error(f"results {path!r} holds no runs")
    try:
        return merge_results(loaded)
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> None:
    """Draws the frontier figure of one lab ``results.json`` (beside it) or of several merged (``--out``), and prints
    the matched-fidelity table."""
    parser = argparse.ArgumentParser(description="The frontier figure and matched-fidelity table of a lab run.")
    parser.add_argument("results", nargs="+", help="results.json files written by the lab (several: merged)")
    parser.add_argument("--fidelity", choices=tuple(MEASURES), help="default: ssim_fidelity if the runs have it")
    parser.add_argument("--out", help="the figure's path (default: frontier.png beside a single results file)")
    args = parser.parse_args(argv)
    if len(args.results) > 1 and args.out is None:
        parser.error("several results files need --out for the merged figure")
    result = load_results(parser, args.results)
    fidelity_key = args.fidelity or default_fidelity_key(result)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.results[0])), "frontier.png")
    make_frontier_figure(result, out, fidelity_key)
    print(matched_fidelity_markdown(result, fidelity_key))


if __name__ == "__main__":
    main()
