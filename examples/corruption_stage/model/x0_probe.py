"""A diagnostic probe of lab v2 (PLAN_V2.md, v2b's reason): while plain full fine-tuning runs on one subject image,
how well does the denoiser recover the clean training latent at the noise levels sampling goes through?

    python -m examples.corruption_stage x0-probe --model-dir examples/corruption_stage/model/base_model_v2 \\
        --steps 600 --out examples/corruption_stage/results/v2/v2_x0_probe.json

Every ``--every`` steps: for 12 fixed noises, the clean-latent error ``mean((x0_hat - x0)^2) / var(x0)`` at each
timestep (t = 961 is where the evaluation's 25-step DDIM starts), and the median latent residual energy and copy
count of the evaluation's samples at guidance 1 and 3. Not a gate result: it decides nothing in the plan.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

from ..study.measures import latent_residuals
from . import data
from .diffusion import condition_tokens, diffusion_loss, predicted_x0, sample
from .models import CONFIG_FILE, build_scheduler, load_model


TIMESTEPS = (999, 961, 800, 500, 200)


@torch.no_grad()
def _probe(model, latents: torch.Tensor, prompt: tuple[int, ...], iteration: int) -> dict:
    sched = build_scheduler(model.cfg)
    g = torch.Generator().manual_seed(5)
    cond = model.cond(condition_tokens(prompt, 12))
    out: dict = {"iteration": iteration}
    for t in TIMESTEPS:
        ab = sched.alphas_cumprod[t]
        noise = torch.randn((12, *latents.shape[1:]), generator=g)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        x0 = predicted_x0(model, noisy, model.unet(noisy, t, cond).sample, float(ab))
        out[f"x0_error_t{t}"] = float((x0 - latents).pow(2).mean() / latents.var())
    for guidance in (1.0, 3.0):
        _, z = sample(model, prompt, 12, seed=10_000, steps=25, guidance=guidance, return_latents=True)
        energy = latent_residuals(z, latents)["energy"]
        out[f"energy_guidance{guidance:g}"] = float(energy.median())
        out[f"copies_guidance{guidance:g}"] = int((energy < 0.1).sum())
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    for name in ("steps", "every", "lr"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if not os.path.isfile(os.path.join(args.model_dir, CONFIG_FILE)):
        parser.error(f"--model-dir {args.model_dir!r} holds no lab model")
    torch.set_num_threads(1)
    base = load_model(args.model_dir)
    if not base.cfg.extra_tokens:
        parser.error(f"--model-dir {args.model_dir} is not a lab v2 model (no class token)")
    train = data.make_subject_set(1, seed=1234, size=base.cfg.image_size)
    model = copy.copy(base)
    model.unet = copy.deepcopy(base.unet).requires_grad_(True)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=args.lr, weight_decay=0.0)
    with torch.no_grad():
        latents = model.encode(train)
    prompt = (data.SUBJECT_TOKEN, data.CLASS_TOKEN)
    tokens, g = condition_tokens(prompt, 4), torch.Generator().manual_seed(0)
    model.unet.eval()
    rows = [_probe(model, latents, prompt, 0)]
    print(json.dumps(rows[-1]), flush=True)
    model.unet.train()
    for it in range(1, args.steps + 1):
        loss = diffusion_loss(model, latents[torch.zeros(4, dtype=torch.long)], tokens, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % args.every == 0:
            model.unet.eval()
            rows.append(_probe(model, latents, prompt, it))
            print(json.dumps(rows[-1]), flush=True)
            model.unet.train()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        command = "python -m examples.corruption_stage x0-probe " + " ".join(sys.argv[1:] if argv is None else argv)
        json.dump({"command": command, "args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
