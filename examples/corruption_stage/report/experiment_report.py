"""Writes the lab's outputs: one PNG figure (curves with mean and spread over seeds, sample grids at key
iterations), a JSON of every number, and a short markdown summary."""

from __future__ import annotations

import json
import math
import os

import torch

from ..study.experiment import ARM_COLOURS as COLOURS
from ..study.experiment import ARM_LABELS
from .frontier import default_fidelity_key, make_frontier_figure, matched_fidelity, matched_fidelity_markdown
from .summary import fidelity_drawdown, summarise


# A pre-declared reading of the curves (fixed before the first real run): a seed "shows a corruption stage" when
# its fidelity falls by at least DIP below its running maximum (the deepest such fall), while the corruption score
# at the dip is at least NOISE above its value at that peak. "Recovers" = the final fidelity climbs back by at least RECOVER above the dip.
DIP = 0.03
NOISE = 0.2
RECOVER = 0.02


def stage_flags(result: dict) -> dict[str, dict]:
    flags: dict[str, dict] = {}
    for r in result["runs"]:
        c = r["curves"]
        f, k = c["fidelity"], c["corruption"]
        ip, jd = fidelity_drawdown(f)
        dip = f[ip] - f[jd] >= DIP and k[jd] - k[ip] >= NOISE
        rec = dip and f[-1] - f[jd] >= RECOVER
        e = flags.setdefault(f"{r['arm']}/{r['n_images']}", {"seeds": 0, "dip_with_noise": 0, "recovered": 0})
        e["seeds"] += 1
        e["dip_with_noise"] += int(dip)
        e["recovered"] += int(rec)
    return flags


def _grid_image(samples: torch.Tensor, cols: int) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> (H', W', 3) uint8, ``cols`` per row, 1-pixel white gaps."""
    n, _, h, w = samples.shape
    rows = math.ceil(n / cols)
    out = torch.full((rows * (h + 1) - 1, cols * (w + 1) - 1, 3), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = samples[i].permute(1, 2, 0)
    return out


def key_iterations(iterations: list[int], n: int = 5) -> list[int]:
    """Indices of ``n`` evaluation points spread over the run (always the first and the last)."""
    if len(iterations) <= n:
        return list(range(len(iterations)))
    return sorted({round(i * (len(iterations) - 1) / (n - 1)) for i in range(n)})


def make_figure(result: dict, summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    arms, sizes = list(cfg["arms"]), list(cfg["n_images"])
    panels = [
        ("fidelity", "fidelity (feature cosine to training images)", False),
        ("corruption", "corruption score (log HF energy vs training)", False),
        ("diversity", "diversity (mean pairwise feature distance)", False),
        ("copy_rate", "copy rate", False),
        ("posterior_std", "posterior std (mean; dotted: min, max)", True),
        ("width_small", f"learned width at t={cfg['width_timesteps'][0]} (latent units)", True),
        ("width_mid", f"learned width at t={cfg['width_timesteps'][len(cfg['width_timesteps']) // 2]}", True),
    ]
    grids = result.get("_grids", {})
    n_key = 5
    fig = plt.figure(figsize=(3.2 * len(panels), 2.6 * len(sizes) + 1.1 * len(arms) * len(sizes) + 1.2))
    heights = [2.6] * len(sizes) + [1.1 * len(arms)] * len(sizes)
    gs = fig.add_gridspec(len(heights), 1, height_ratios=heights, hspace=0.45)
    for row, n_img in enumerate(sizes):
        sub = gs[row].subgridspec(1, len(panels), wspace=0.5)
        for col, (key, title, logy) in enumerate(panels):
            ax = fig.add_subplot(sub[col])
            positive = False  # a log axis needs a positive value (plain LoRA alone has no posterior std)
            for arm in arms:
                s = summary.get(f"{arm}/{n_img}")
                if s is None:
                    continue
                x = s["iteration"]
                if key.startswith("width"):
                    ti = 0 if key == "width_small" else len(cfg["width_timesteps"]) // 2
                    m = [v[ti] for v in s["width"]["mean"]]
                    sd = [v[ti] for v in s["width"]["std"]]
                else:
                    m, sd = s[key]["mean"], s[key]["std"]
                positive = positive or any(v > 0 for v in m if not math.isnan(v))
                lo = [a - b for a, b in zip(m, sd)]
                hi = [a + b for a, b in zip(m, sd)]
                ax.plot(x, m, color=COLOURS[arm], label=ARM_LABELS[arm], lw=1.5)
                ax.fill_between(x, lo, hi, color=COLOURS[arm], alpha=0.15, lw=0)
                if key == "posterior_std" and "posterior_std_min" in s:
                    for bound in ("posterior_std_min", "posterior_std_max"):
                        ax.plot(x, s[bound]["mean"], color=COLOURS[arm], ls=":", lw=1.0)
            ref = result.get("references", {}).get(f"autoencoder_reconstruction/{n_img}", {})
            if key in ("fidelity", "corruption") and key in ref:
                ax.axhline(ref[key], color="k", ls="--", lw=0.8, label="AE reconstruction of training images")
            if logy and positive:
                ax.set_yscale("log")
            elif logy:
                ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            ax.set_title(f"{title}\n{n_img} training image(s)", fontsize=8)
            ax.set_xlabel("iteration", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == 0 and col == 0:
                handles, labels = ax.get_legend_handles_labels()
                fig.legend(handles, labels, fontsize=7, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 0.985))
    for g_row, n_img in enumerate(sizes):
        avail = [a for a in arms if f"{a}/{n_img}" in grids]
        if not avail:
            continue
        its = summary[f"{avail[0]}/{n_img}"]["iteration"]
        keys = key_iterations(its, n_key)
        sub = gs[len(sizes) + g_row].subgridspec(len(avail), len(keys) + 1, wspace=0.05, hspace=0.15)
        subject = result["_subject"][:n_img]
        for r, arm in enumerate(avail):
            ax = fig.add_subplot(sub[r, 0])
            if r == 0:
                ax.imshow(_grid_image(subject, 3).numpy())
                ax.set_title(f"training image(s), n={n_img}", fontsize=7)
            ax.axis("off")
            for c, ki in enumerate(keys):
                ax = fig.add_subplot(sub[r, c + 1])
                smp = grids[f"{arm}/{n_img}"][ki]
                ax.imshow(_grid_image(smp, len(smp)).numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"iteration {its[ki]}", fontsize=7)
                if c == 0:
                    ax.set_ylabel(ARM_LABELS[arm], fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(
        f"Corruption-stage lab: LoRA r={cfg['rank']}, lr {cfg['lr']}, batch {cfg['batch']}, "
        f"{len(cfg['seeds'])} seed(s) (mean +- std); samples: DDIM {cfg['sample_steps']} steps, CFG {cfg['guidance']}, "
        f"fixed seeds, training seed {cfg['grid_seed']}",
        fontsize=9,
        y=1.0,
    )
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _fmt(vals: list[float], digits: int = 3) -> str:
    v = [x for x in vals if not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return "n/a"
    t = torch.tensor(v, dtype=torch.float64)
    if len(v) == 1:
        return f"{float(t[0]):.{digits}f}"
    return f"{float(t.mean()):.{digits}f} ± {float(t.std(unbiased=False)):.{digits}f}"


def markdown_summary(result: dict, summary: dict, command: str) -> str:
    cfg = result["config"]
    flags = stage_flags(result)
    lines = [
        "# Corruption-stage lab: summary (written by the script)",
        "",
        f"Command: `{command}`",
        "",
        f"Arms: {', '.join(cfg['arms'])}; training images: {cfg['n_images']}; seeds: {cfg['seeds']}; "
        f"{cfg['steps']} steps at lr {cfg['lr']}, batch {cfg['batch']}, LoRA r={cfg['rank']}; evaluation every "
        f"{cfg['eval_every']} iterations on {cfg['n_eval']} fixed-seed samples (DDIM {cfg['sample_steps']}, "
        f"CFG {cfg['guidance']}). Bayesian sigma init = prior std = {cfg['sigma']}; KL weight (bayes_kl) = "
        f"{cfg['kl_weight_used']:.3g}; copy = RMS pixel distance to a decoded training latent < {cfg['copy_threshold_used']:.3f}. "
        f"Wall time {result['seconds']:.0f} s on {result['torch_threads']} torch thread(s).",
        "",
        "Values are mean ± std over seeds. 'dip depth' = the deepest fall of fidelity below its running maximum "
        f"(the peak before it); 'stage' counts seeds whose fidelity fell >= {DIP} that way while the corruption score rose >= {NOISE} (pre-declared), "
        f"'recovered' those that then climbed back >= {RECOVER}.",
        "",
    ]
    for n_img in cfg["n_images"]:
        ref = result["references"].get(f"autoencoder_reconstruction/{n_img}", {})
        lines += [
            f"## {n_img} training image(s)",
            "",
            f"Reference: the autoencoder's reconstructions of the training images score fidelity "
            f"{ref.get('fidelity', float('nan')):.3f}, corruption {ref.get('corruption', float('nan')):.3f}.",
            "",
            "| arm | max fidelity (iter) | peak before dip (iter) | dip depth | final fidelity | max corruption (iter) | final "
            "corruption | final copy rate | final diversity | flicker | final sigma | stage / recovered |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm in cfg["arms"]:
            s = summary.get(f"{arm}/{n_img}")
            if s is None:
                continue
            ps = s["per_seed"]
            sig = s["posterior_std"]["mean"][-1]
            fl = flags[f"{arm}/{n_img}"]
            lines.append(
                f"| {ARM_LABELS[arm]} | {_fmt([p['max_fidelity'] for p in ps])} "
                f"({_fmt([p['max_fidelity_iteration'] for p in ps], 0)}) | {_fmt([p['peak_fidelity'] for p in ps])} "
                f"({_fmt([p['peak_iteration'] for p in ps], 0)}) | {_fmt([p['dip_depth'] for p in ps])} | "
                f"{_fmt([p['final_fidelity'] for p in ps])} | {_fmt([p['max_corruption'] for p in ps])} "
                f"({_fmt([p['max_corruption_iteration'] for p in ps], 0)}) | "
                f"{_fmt([p['final_corruption'] for p in ps])} | {_fmt([p['final_copy_rate'] for p in ps], 2)} | "
                f"{_fmt([p['final_diversity'] for p in ps])} | {_fmt([p['mean_flicker'] for p in ps])} | "
                f"{'n/a' if math.isnan(sig) else f'{sig:.4f}'} | "
                f"{fl['dip_with_noise']}/{fl['seeds']} / {fl['recovered']}/{fl['seeds']} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: str, command: str, figure_name: str = "corruption_stage.png") -> dict:
    """Writes ``results.json``, ``summary.md``, the figure and the frontier figure (``frontier.png``) into
    ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarise(result)
    fidelity_key = default_fidelity_key(result)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    public["summary"] = summary
    public["stage_flags"] = stage_flags(result)
    public["matched_fidelity"] = matched_fidelity(result, fidelity_key)
    public["command"] = command
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "summary": os.path.join(out_dir, "summary.md"),
        "figure": os.path.join(out_dir, figure_name),
        "frontier": os.path.join(out_dir, "frontier.png"),
    }
    with open(paths["json"], "w") as f:
        json.dump(public, f, indent=1, default=float)
    with open(paths["summary"], "w") as f:
        f.write(markdown_summary(result, summary, command) + "\n" + matched_fidelity_markdown(result, fidelity_key))
    make_figure(result, summary, paths["figure"])
    make_frontier_figure(result, paths["frontier"], fidelity_key)
    return paths
