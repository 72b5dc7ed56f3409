"""Lab v2, step 1 (PLAN_V2.md): which autoencoder keeps the subject's texture? Trains each candidate for the same
budget on procedural images mixed 50/50 with crops of bundled photographs, and scores reconstructions on held-out
sets, with the pre-registered decision rule.

    python -m examples.corruption_stage autoencoder-pilot --steps 1500 --out examples/corruption_stage/results/v2/v2_autoencoder_pilot.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from . import data
from .models import LabModelConfig, load_model, new_model
from .pretrain import train_autoencoder


CANDIDATES = {
    "v1_arch": dict(ae_channels=(16, 32, 64), latent_channels=4),
    "wide8": dict(ae_channels=(16, 32, 64), latent_channels=12),
    "half16": dict(ae_channels=(32, 64), latent_channels=4),
    "half16_edge": dict(ae_channels=(32, 64), latent_channels=4),  # + the edge loss (TRAINING below)
}
TRAINING = {"half16_edge": {"edge_weight": 1.0}}
# The decision rule of PLAN_V2.md, step 1.
MAX_NUMBERS, MAX_PROCEDURAL_RMSE, MIN_TEXTURE_RATIO = 1024, 0.17, 0.5
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base_model")


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared 3x3 Laplacian per image (the texture a blurry decoder loses)."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).expand(3, 1, 3, 3)
    return torch.nn.functional.conv2d(images, kernel, groups=3).pow(2).mean(dim=(1, 2, 3))


@torch.no_grad()
def score(vae, sets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Reconstruction RMSE per held-out set, and the subject's texture ratio HF(reconstruction) / HF(original)."""

    def reconstruct(x):
        return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)

    out = {}
    for name, images in sets.items():
        rec = torch.cat([reconstruct(images[i : i + 64]) for i in range(0, len(images), 64)])
        out[f"rmse_{name}"] = float((rec - images).pow(2).mean().sqrt())
        if name == "subject":
            out["subject_texture_ratio"] = float((high_frequency_energy(rec) / high_frequency_energy(images)).mean())
    return out


@torch.no_grad()
def save_preview(vae, subject: torch.Tensor, path: str) -> None:
    """The subject images (top row) and their reconstructions (bottom row), 4x enlarged."""
    from PIL import Image

    rec = vae.decode(vae.encode(subject).latent_dist.mean).sample.clamp(-1, 1)
    rows = [torch.cat(list(images), dim=-1) for images in (subject, rec)]
    grid = ((torch.cat(rows, dim=-2) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def held_out_sets() -> dict[str, torch.Tensor]:
    return {
        "procedural": data.make_pretraining_set(256, seed=999)[0],
        "natural": data.make_natural_crops(256, seed=4321),
        "subject": data.make_subject_set(5),
    }


def decide(results: dict[str, dict], candidates: set[str] | None = None) -> str | None:
    """PLAN_V2.md's rule: the lowest subject RMSE among `candidates` (default: `CANDIDATES`) within the limits, or
    None."""
    candidates = set(CANDIDATES) if candidates is None else candidates
    ok = [
        name
        for name, r in results.items()
        if name in candidates
        and r["latent_numbers"] <= MAX_NUMBERS
        and r["rmse_procedural"] <= MAX_PROCEDURAL_RMSE
        and r["subject_texture_ratio"] >= MIN_TEXTURE_RATIO
    ]
    return min(ok, key=lambda name: results[name]["rmse_subject"]) if ok else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n-images", type=int, default=6000, help="training images (half procedural, half crops)")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--preview", action="store_true", help="also write <out>_<candidate>.png (subject, rows)")
    parser.add_argument(
        "--score-model", default=None, help="score this saved lab model's autoencoder against the rule, train nothing"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sets = held_out_sets()
    results: dict[str, dict] = {"shipped_v1": {"latent_numbers": 256, **score(load_model(SHIPPED).vae, sets)}}
    if args.score_model:
        saved = load_model(args.score_model)
        numbers = saved.cfg.latent_channels * saved.cfg.latent_size**2
        results[args.score_model] = {"latent_numbers": numbers, **score(saved.vae, sets)}
        args.candidates = []  # nothing is trained; the JSON's args say so
    else:
        half = args.n_images // 2
        images = torch.cat(
            [data.make_pretraining_set(half, seed=args.seed)[0], data.make_natural_crops(half, seed=args.seed + 7)]
        )
    for name in args.candidates:
        cfg = LabModelConfig(**CANDIDATES[name])
        model = new_model(cfg, seed=args.seed)
        start = time.time()
        history = train_autoencoder(
            model, images, args.steps, args.batch, lr=2e-3, seed=args.seed + 1, **TRAINING.get(name, {})
        )["history"]
        numbers = cfg.latent_channels * cfg.latent_size**2
        results[name] = {
            "latent_numbers": numbers,
            "params": sum(p.numel() for p in model.vae.parameters()),
            "seconds": round(time.time() - start, 1),
            "final_l1": history[-1]["l1"],
            **score(model.vae, sets),
        }
        logging.info("%s: %s", name, results[name])
        if args.preview:
            save_preview(model.vae, sets["subject"], f"{os.path.splitext(args.out)[0]}_{name}.png")
    chosen = decide(results, {args.score_model} if args.score_model else None)
    payload = {
        "command": "python -m examples.corruption_stage autoencoder-pilot "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "rule": {
            "max_latent_numbers": MAX_NUMBERS,
            "max_procedural_rmse": MAX_PROCEDURAL_RMSE,
            "min_subject_texture_ratio": MIN_TEXTURE_RATIO,
        },
        "results": results,
        "chosen": chosen,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    print("| candidate | numbers | RMSE procedural | RMSE natural | RMSE subject | subject texture ratio |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['latent_numbers']} | {r['rmse_procedural']:.3f} | {r['rmse_natural']:.3f} | "
            f"{r['rmse_subject']:.3f} | {r['subject_texture_ratio']:.2f} |"
        )
    print(f"chosen by the rule: {chosen}")
    return payload


if __name__ == "__main__":
    main()
