"""The default run's figure: the record curves the judge reads (a measure that never moves is not drawn but named),
the judge's fit, first clean-copy and best steps and any episode, and the samples at a few records."""

from __future__ import annotations

import torch

from bayes_adapter.stage import MonitorRecord, StageVerdict


PANELS = (
    ("fidelity", "fidelity (SSIM to the training image)"),
    ("noise_energy", "latent noise energy"),
    ("noise_whiteness", "latent noise whiteness"),
    ("copy_rate", "clean-copy rate"),
    ("loss", "training loss"),
)


def drawn_panels(records: list[MonitorRecord]) -> tuple[list[tuple[str, str]], list[str]]:
    """The panels whose measure moves, and a note for each one that is constant or missing."""
    drawn, dropped = [], []
    for key, title in PANELS:
        values = [getattr(r, key) for r in records if getattr(r, key) is not None]
        if len(set(values)) > 1:
            drawn.append((key, title))
        else:
            dropped.append(f"{key} {'constant at ' + format(values[0], '.3g') if values else 'not measured'}")
    return drawn, dropped


def make_run_figure(
    records: list[MonitorRecord], verdict: StageVerdict, samples: torch.Tensor, path: str, title: str = ""
) -> None:
    """Writes the figure to ``path``; ``samples`` is (records, n, 3, H, W) uint8 as `study.train.train_run` keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn, dropped = drawn_panels(records)
    steps = [r.step for r in records]
    picks = sorted({round(i * (len(records) - 1) / 6) for i in range(7)})
    fig = plt.figure(figsize=(4 * max(len(drawn), 4), 8.5))
    grid = fig.add_gridspec(2, max(len(drawn), 1), height_ratios=[1, 1.1])
    for i, (key, label) in enumerate(drawn):
        ax = fig.add_subplot(grid[0, i])
        ax.plot(steps, [getattr(r, key) for r in records], color="tab:red", marker=".", ms=3)
        if key == "fidelity" and records[-1].fidelity_ceiling is not None:
            ax.axhline(records[-1].fidelity_ceiling, color="black", ls="--", lw=0.8, label="autoencoder ceiling")
            ax.legend(fontsize=7)
        for step, colour, name in (
            (verdict.fit_step, "tab:green", "fit"),
            (verdict.first_copy_step, "tab:purple", "first clean copy"),
            (verdict.best_step, "tab:blue", "best"),
        ):
            if step is not None:
                ax.axvline(step, color=colour, lw=0.8, ls=":", label=name if i == 0 else None)
        for episode in verdict.episodes:
            ax.axvspan(episode.start_step, episode.end_step, color="orange", alpha=0.2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        if i == 0:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, :])
    rows = [torch.cat(list(samples[j]), dim=2) for j in picks]  # each (3, H, n * W)
    strip = torch.cat(rows, dim=1)  # records stacked top to bottom
    ax.imshow(strip.permute(1, 2, 0).numpy())
    ax.set_yticks([(k + 0.5) * samples.shape[-2] for k in range(len(picks))])
    ax.set_yticklabels([f"step {steps[j]:,}" for j in picks], fontsize=8)
    ax.set_xticks([])
    ax.set_title("fixed-seed samples", fontsize=9)
    note = f"; not drawn: {', '.join(dropped)}" if dropped else ""
    fig.suptitle(f"{title}\n{verdict.num_records} records{note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
