"""The gate's figure: plain fine-tuning's curves per seed (structural fidelity against its ceiling, latent copy rate,
residual energy and whiteness) and one seed's samples at evenly spread checkpoints, so the three phases (learning,
any corruption, copies) can be seen."""

from __future__ import annotations

import torch

from .experiment_report import _grid_image


PANELS = (
    ("ssim_fidelity", "structural fidelity (SSIM to nearest training image)"),
    ("latent_copy_rate", "copy rate (latent residual energy < 0.1)"),
    ("latent_energy", "median latent residual energy"),
    ("whiteness", "median residual whiteness (spectral flatness)"),
)


def doubling_checkpoints(iterations: list[int], n: int) -> list[int]:
    """Indices of ``n`` checkpoints: the first, then the ones nearest to the last iteration halved again and again
    (e.g. 0, 100, 200, 400, 800, 1500, 3000): fine-tuning changes fastest at the start."""
    last = iterations[-1]
    targets = [last / 2 ** (n - 2 - k) for k in range(n - 1)]
    picks = [0] + [min(range(len(iterations)), key=lambda i, t=t: abs(iterations[i] - t)) for t in targets]
    return sorted(set(picks))


def make_gate_figure(
    runs: list[dict],
    samples: torch.Tensor | None,
    path: str,
    fidelity_of_ceiling: float,
    n_checkpoints: int = 7,
    prompt_text: str = "sks cross",
) -> None:
    """``runs``: the gate's runs (``seed``, ``curves``, ``judged``); ``samples``: ``(n_evals, k, 3, H, W)`` uint8 of
    the first run, or None; ``fidelity_of_ceiling``: gate 2's fraction of the ceiling, drawn as a line;
    ``prompt_text``: the fine-tuning prompt, as the sample panel's title names it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(3.3 * len(PANELS), 6.2 if samples is not None else 3.0), layout="constrained")
    gs = fig.add_gridspec(
        2 if samples is not None else 1, len(PANELS), height_ratios=[3, 3.2][: 1 + (samples is not None)]
    )
    for col, (key, title) in enumerate(PANELS):
        ax = fig.add_subplot(gs[0, col])
        for run in runs:
            ax.plot(run["curves"]["iteration"], run["curves"][key], lw=1.3, label=f"seed {run['seed']}")
        if key == "ssim_fidelity":
            ceiling = runs[0]["judged"]["ssim_ceiling"]
            ax.axhline(ceiling, color="k", ls="--", lw=0.8, label="autoencoder ceiling")
            threshold = fidelity_of_ceiling * ceiling
            ax.axhline(threshold, color="k", ls=":", lw=0.8, label=f"gate: {fidelity_of_ceiling} x ceiling")
        if key == "latent_energy":
            ax.set_yscale("log")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        if col == 0:
            ax.legend(fontsize=6)
    if samples is not None:
        its = runs[0]["curves"]["iteration"]
        keys = doubling_checkpoints(its, n_checkpoints)
        ax = fig.add_subplot(gs[1, :])
        grid = torch.cat([_grid_image(samples[i], 1) for i in keys], dim=1)
        ax.imshow(grid.numpy(), interpolation="nearest")
        ax.set_xticks([(i + 0.5) * grid.shape[1] / len(keys) for i in range(len(keys))])
        ax.set_xticklabels([f"it {its[i]}" for i in keys], fontsize=7)
        ax.set_yticks([])
        ax.set_title(f"seed {runs[0]['seed']}: samples of '{prompt_text}' (fixed seeds) per checkpoint", fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
