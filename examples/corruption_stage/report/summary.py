"""Per-arm summaries of an experiment's runs over seeds (means, spreads and the stage statistics the report reads)."""

from __future__ import annotations

import math

import torch


def summarise(result: dict) -> dict:
    """Per arm and training-set size: mean/std over seeds of each curve, plus the stage statistics used in the
    report (peak fidelity and when, the deepest later dip, final values, peak corruption)."""
    out: dict = {}
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in result["runs"]:
        groups.setdefault((r["arm"], r["n_images"]), []).append(r)
    for (arm, n_img), rs in groups.items():
        its = rs[0]["curves"]["iteration"]
        entry: dict = {"iteration": its, "n_seeds": len(rs)}
        for key in (
            "fidelity",
            "corruption",
            "diversity",
            "copy_rate",
            "nn_distance",
            "nn_distance_recon",
            "flicker",
            "loss",
            "posterior_std",
            "posterior_std_min",
            "posterior_std_max",
        ):
            m = torch.tensor([r["curves"][key] for r in rs], dtype=torch.float64)
            entry[key] = {"mean": m.mean(0).tolist(), "std": m.std(0, unbiased=False).tolist()}
        w = torch.tensor([r["curves"]["width"] for r in rs], dtype=torch.float64)  # seeds x evals x timesteps
        entry["width"] = {"mean": w.mean(0).tolist(), "std": w.std(0, unbiased=False).tolist()}
        stages = []
        for r in rs:
            f = r["curves"]["fidelity"]
            c = r["curves"]["corruption"]
            ip, jd = fidelity_drawdown(f)
            stages.append(
                {
                    "seed": r["seed"],
                    "max_fidelity": max(f),
                    "max_fidelity_iteration": its[max(range(len(f)), key=lambda i: f[i])],
                    "peak_fidelity": f[ip],
                    "peak_iteration": its[ip],
                    "dip_fidelity": f[jd],
                    "dip_iteration": its[jd],
                    "dip_depth": f[ip] - f[jd],
                    "final_fidelity": f[-1],
                    "final_corruption": c[-1],
                    "max_corruption": max(c),
                    "max_corruption_iteration": its[max(range(len(c)), key=lambda i: c[i])],
                    "final_copy_rate": r["curves"]["copy_rate"][-1],
                    "final_diversity": r["curves"]["diversity"][-1],
                    "mean_flicker": _nanmean(r["curves"]["flicker"]),
                }
            )
        entry["per_seed"] = stages
        out[f"{arm}/{n_img}"] = entry
    return out


def fidelity_drawdown(f: list[float]) -> tuple[int, int]:
    """The deepest fall of a curve below its running maximum: (index of the peak before it, index of the dip).
    Catches a dip even when the curve later recovers above the earlier peak (the paper's shape)."""
    best, ip, jd, run = 0.0, 0, 0, 0
    for j in range(len(f)):
        if f[j] > f[run]:
            run = j
        if f[run] - f[j] > best:
            best, ip, jd = f[run] - f[j], run, j
    return ip, jd


def _nanmean(xs: list[float]) -> float:
    v = [x for x in xs if not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")
