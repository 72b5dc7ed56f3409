"""Seeded pretraining of the lab's latent diffusion model: first the autoencoder, then the conditioned UNet on its
latents. ``python -m examples.corruption_stage pretrain --out DIR`` or ``python -m examples.corruption_stage
experiment --pretrain``. Deterministic for a given seed, torch version and thread count (one thread is used)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time

import torch
from tqdm.auto import tqdm

from . import data
from .diffusion import diffusion_loss, sample
from .models import CONFIG_FILE, LabModel, LabModelConfig, add_pooled_condition, load_model, new_model, save_model
from .resume import (
    UNET_RESUME_FILE,
    load_resume_state,
    restore_training,
    run_identity,
    save_resume_state,
    training_state,
)


logger = logging.getLogger("lab.pretrain")


def _cosine_lr(opt: torch.optim.Optimizer, total: int, warmup: int = 100) -> torch.optim.lr_scheduler.LambdaLR:
    import math

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.95 + 0.05

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _laplacian(images: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=images.dtype)
    return torch.nn.functional.conv2d(images, kernel.expand(images.shape[1], 1, 3, 3), groups=images.shape[1])


def train_autoencoder(
    model: LabModel, images: torch.Tensor, steps: int, batch: int, lr: float, seed: int, edge_weight: float = 0.0
) -> dict:
    """L1 + MSE + 1e-4 KL per dimension; `edge_weight` > 0 adds L1 between the Laplacians of the reconstruction and
    the input (lab v2: an L1/MSE autoencoder blurs fine textures away)."""
    g = torch.Generator().manual_seed(seed)
    vae = model.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _cosine_lr(opt, steps)
    hist = []
    bar = tqdm(range(steps), desc="autoencoder", mininterval=2.0)
    for step in bar:
        idx = torch.randint(images.shape[0], (batch,), generator=g)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + mse + 1e-4 * kl
        if edge_weight:
            loss = loss + edge_weight * (_laplacian(rec) - _laplacian(x)).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            l1, mse, kl = float(l1.detach()), float(mse.detach()), float(kl.detach())
            hist.append({"step": step, "l1": l1, "mse": mse, "kl": kl})
            bar.set_postfix(l1=f"{l1:.4f}")
            logger.info("ae step %d l1 %.4f mse %.4f kl %.3f", step, l1, mse, kl)
    vae.eval().requires_grad_(False)
    return {"history": hist}


@torch.no_grad()
def encode_all(model: LabModel, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model.vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


def train_unet(
    model: LabModel,
    latents: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    resume_path: str | None = None,
    resume_every: int = 250,
    run_note: dict | None = None,
) -> dict:
    """Trains the denoiser (and condition embedding) ``steps`` steps and leaves their EMA in the model.

    ``resume_path``: a checkpoint file written every ``resume_every`` steps; a rerun with the same arguments continues
    from it with the same weights, optimiser, schedule and batch order, so a cut-off stage loses at most
    ``resume_every`` steps. A checkpoint of another run (other settings, ``run_note``, starting weights or latents) is
    refused, naming both."""
    g = torch.Generator().manual_seed(seed)
    params = list(model.unet.parameters()) + list(model.cond.parameters())
    model.unet.train().requires_grad_(True)
    model.cond.train().requires_grad_(True)
    # The subject's rare token is never used in pretraining; its embedding stays at the random init.
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = _cosine_lr(opt, steps)
    hist, start, resumed_at = [], 0, []
    fingerprint = {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        **run_identity(model, latents, labels, params),
        **(run_note or {}),
    }
    state = load_resume_state(resume_path, fingerprint) if resume_path else None
    if state is not None:
        restore_training(state, model, ema, opt, sched, g)
        hist, start, resumed_at = state["history"], state["step"], [*state["resumed_at"], state["step"]]
        logger.info("unet resumed at step %d from %s", start, resume_path)
    bar = tqdm(range(start, steps), desc="latent unet", mininterval=2.0, initial=start, total=steps)
    for step in bar:
        idx = torch.randint(latents.shape[0], (batch,), generator=g)
        tok = labels[idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1
        tok[drop] = data.NULL_TOKEN
        loss = diffusion_loss(model, latents[idx], tok, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        if step % 50 == 0 or step == steps - 1:
            loss = float(loss.detach())
            hist.append({"step": step, "loss": loss})
            bar.set_postfix(loss=f"{loss:.4f}")
            logger.info("unet step %d loss %.4f", step, loss)
        if resume_path and (step + 1) % resume_every == 0 and step + 1 < steps:
            save_resume_state(
                resume_path,
                {
                    **training_state(model, ema, opt, sched, g),
                    "fingerprint": fingerprint,
                    "step": step + 1,
                    "history": hist,
                    "resumed_at": resumed_at,
                },
            )
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    model.unet.eval().requires_grad_(False)
    model.cond.eval().requires_grad_(False)
    return {"history": hist, "resumed_at": resumed_at}


def pretrain(
    out_dir: str,
    n_images: int = 12000,
    ae_steps: int = 2400,
    unet_steps: int = 5000,
    ae_batch: int = 32,
    unet_batch: int = 64,
    seed: int = 0,
    preview: str | None = None,
    cfg: LabModelConfig | None = None,
) -> LabModel:
    """Pretrains the autoencoder then the latent UNet and saves both (fp16 safetensors + a JSON note)."""
    torch.manual_seed(seed)
    t0 = time.time()
    images, labels = data.make_pretraining_set(n_images, seed=seed, size=(cfg or LabModelConfig()).image_size)
    model = new_model(cfg, seed=seed)
    ae = train_autoencoder(model, images, ae_steps, ae_batch, lr=2e-3, seed=seed + 1)
    raw = encode_all(model, images)
    model.latent_scale = float(1.0 / raw.std())
    latents = raw * model.latent_scale
    with torch.no_grad():
        held = data.make_pretraining_set(256, seed=seed + 999, size=model.cfg.image_size)[0]
        rec_rmse = float((model.decode(model.encode(held)) - held).pow(2).mean().sqrt())
    logger.info("autoencoder held-out RMSE %.4f, latent scale %.4f", rec_rmse, model.latent_scale)
    t_ae = time.time() - t0
    un = train_unet(model, latents, labels, unet_steps, unet_batch, lr=1e-3, seed=seed + 2)
    extra = {
        "how_made": (
            "python -m examples.corruption_stage experiment --pretrain (examples/corruption_stage/pretrain.py): "
            f"{n_images} procedural images (seed {seed}), AutoencoderKL {ae_steps} steps batch {ae_batch} "
            f"(L1 + MSE + 1e-4 KL/dim, AdamW 2e-3 cosine), then UNet2DConditionModel {unet_steps} steps batch "
            f"{unet_batch} (epsilon MSE, cosine schedule, 10% condition dropout, AdamW 1e-3 cosine, EMA 0.999), "
            "one CPU thread; weights stored in float16."
        ),
        "seed": seed,
        "torch": torch.__version__,
        "autoencoder_heldout_rmse": rec_rmse,
        "final_unet_loss_avg_last10": sum(h["loss"] for h in un["history"][-10:]) / len(un["history"][-10:]),
        "seconds": {"autoencoder": round(t_ae, 1), "total": round(time.time() - t0, 1)},
        "params": {
            "vae": sum(p.numel() for p in model.vae.parameters()),
            "unet": sum(p.numel() for p in model.unet.parameters()),
            "cond": sum(p.numel() for p in model.cond.parameters()),
        },
    }
    save_model(model, out_dir, extra)
    with open(f"{out_dir}/pretrain_history.json", "w") as f:
        json.dump({"autoencoder": ae["history"], "unet": un["history"]}, f)
    if preview:
        _save_preview(model, preview)
    return model


# Lab v2's autoencoder: the candidate chosen by pilot 2b (PLAN_V2.md, results/v2/v2_autoencoder_pilot2b.json), trained
# exactly as in that pilot (same data, seeds, steps, one thread), so it is the autoencoder that was measured.
V2_CONFIG = LabModelConfig(ae_channels=(32, 64), latent_channels=4, extra_tokens=data.V2_EXTRA_TOKENS)
V2_AUTOENCODER = {"n_images": 6000, "steps": 4000, "batch": 32, "lr": 2e-3, "seed": 0, "edge_weight": 1.0}


def pretrain_v2(
    out_dir: str,
    n_images: int = 12000,
    unet_steps: int = 5000,
    unet_batch: int = 64,
    seed: int = 0,
    unet_threads: int = 2,
    autoencoder: dict | None = None,
    prediction_type: str = "epsilon",
    autoencoder_from: str | None = None,
    denoiser_from: str | None = None,
    pooled_condition: bool = False,
    unet_channels: tuple[int, ...] | None = None,
    resume_every: int = 250,
) -> LabModel:
    """Lab v2's base model (PLAN_V2.md step 2): pilot 2b's autoencoder, then v1's denoiser recipe on its latents of
        ``data.make_v2_pretraining_set`` (procedural kinds with the cross as a class, and photo crops). The autoencoder
        alone is saved to ``<out_dir>/autoencoder`` first, so a cut-off run keeps it (not when continuing a model, which
    holds it already).

        ``autoencoder_from``: a saved model folder whose autoencoder is reused instead of trained (v2b reuses v2's);
        ``prediction_type``: what the denoiser predicts ("v_prediction" for v2b); ``denoiser_from``: a saved v2 model
        whose every part is loaded and whose denoiser is trained ``unet_steps`` more (v2c continues v2b), with its own
        prediction type and a new batch order; ``pooled_condition``: the denoiser also takes the pooled condition in its
        time embedding (``models.add_pooled_condition`` on a continued denoiser; v2d continues v2c so);
        ``unet_channels``: a new denoiser's block widths (default v2's (32, 64); PLAN_V3's outcome-C base model);
        ``resume_every``: the denoiser's checkpoint interval (``train_unet``; the autoencoder is trained again by a
        rerun, which only a stage that trains one does)."""
    ae = {**V2_AUTOENCODER, **(autoencoder or {})}
    t0 = time.time()
    threads = torch.get_num_threads()
    new_cfg = dataclasses.replace(V2_CONFIG, prediction_type=prediction_type, pooled_condition=pooled_condition)
    if unet_channels is not None:
        if denoiser_from is not None:
            raise ValueError("unet_channels builds a new denoiser; a continued one (denoiser_from) keeps its widths")
        if any(c <= 0 or c % 16 for c in unet_channels):  # the UNet's group norms take 16 groups
            raise ValueError(f"unet_channels must be positive multiples of 16, got {tuple(unet_channels)}")
        new_cfg = dataclasses.replace(new_cfg, unet_channels=tuple(unet_channels))
    if denoiser_from is not None:
        model = load_model(denoiser_from)
        if not model.cfg.extra_tokens:
            raise ValueError(f"denoiser_from {denoiser_from!r} is not a lab v2 model")
        prediction_type, ae, ae_hist = model.cfg.prediction_type, {"reused_from": denoiser_from}, []
        if pooled_condition and not model.cfg.pooled_condition:
            model = add_pooled_condition(model)
    elif autoencoder_from is not None:
        model = new_model(new_cfg, seed=ae["seed"])
        source = load_model(autoencoder_from)
        if source.cfg.ae_channels != V2_CONFIG.ae_channels or source.cfg.latent_channels != V2_CONFIG.latent_channels:
            raise ValueError(f"autoencoder_from {autoencoder_from!r} does not hold lab v2's autoencoder")
        model.vae.load_state_dict(source.vae.state_dict())
        ae, ae_hist = {"reused_from": autoencoder_from}, []
    else:
        model = new_model(new_cfg, seed=ae["seed"])
        half = ae["n_images"] // 2
        ae_images = torch.cat(
            [data.make_pretraining_set(half, seed=ae["seed"])[0], data.make_natural_crops(half, seed=ae["seed"] + 7)]
        )
        torch.set_num_threads(1)
        ae_hist = train_autoencoder(
            model, ae_images, ae["steps"], ae["batch"], ae["lr"], seed=ae["seed"] + 1, edge_weight=ae["edge_weight"]
        )["history"]
    torch.set_num_threads(unet_threads or threads)
    t_ae = time.time() - t0
    if denoiser_from is None:  # a continued model's autoencoder is already saved, in denoiser_from
        save_model(model, f"{out_dir}/autoencoder", {"stage": "autoencoder only", "autoencoder_recipe": ae})
    images, labels = data.make_v2_pretraining_set(n_images, seed=seed)
    raw = encode_all(model, images)
    if denoiser_from is None:
        model.latent_scale = float(1.0 / raw.std())
    # a continued denoiser keeps its latent scale and sees a new batch order
    batch_seed = seed + (3 if denoiser_from is not None else 2)
    os.makedirs(out_dir, exist_ok=True)
    resume_path = os.path.join(out_dir, UNET_RESUME_FILE)
    un = train_unet(
        model, raw * model.latent_scale, labels, unet_steps, unet_batch, lr=1e-3, seed=batch_seed,
        resume_path=resume_path, resume_every=resume_every,
        run_note={"denoiser_from": denoiser_from, "autoencoder_from": autoencoder_from, "n_images": n_images},
    )  # fmt: skip
    extra = {
        "how_made": (
            "python -m examples.corruption_stage pretrain --v2 (examples/corruption_stage/pretrain.py, "
            f"pretrain_v2): AutoencoderKL {V2_CONFIG.ae_channels} as lab v2 pilot 2b ({ae}), one thread; then "
            f"UNet2DConditionModel {model.cfg.unet_channels} ({prediction_type}) {unet_steps} steps batch {unet_batch}"
            + (f" continued from {denoiser_from}" if denoiser_from is not None else "")
            + (" with the pooled condition in its time embedding" if model.cfg.pooled_condition else "")
            + " on the latents of "
            f"{n_images} images "
            f"(make_v2_pretraining_set seed {seed}; v1's recipe), {unet_threads} threads; weights stored in float16."
        ),
        "seed": seed,
        "torch": torch.__version__,
        "autoencoder_recipe": ae,
        "final_unet_loss_avg_last10": sum(h["loss"] for h in un["history"][-10:]) / len(un["history"][-10:]),
        "seconds": {"autoencoder": round(t_ae, 1), "total": round(time.time() - t0, 1)},
        "unet_resumed_at_steps": un["resumed_at"],  # seconds then count only the last process's time
    }
    save_model(model, out_dir, extra)
    with open(f"{out_dir}/pretrain_history.json", "w") as f:
        json.dump({"autoencoder": ae_hist, "unet": un["history"]}, f)
    if os.path.exists(resume_path):  # the stage is saved whole; a rerun starts it over
        os.remove(resume_path)
    return model


def _save_preview(model: LabModel, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    tokens = list(range(len(data.KINDS))) + [data.SUBJECT_TOKEN]
    if model.cfg.extra_tokens:
        tokens += [data.CLASS_TOKEN, data.PHOTO_TOKEN]
    for tok in tokens:
        rows.append(sample(model, tok, 8, seed=0))
    fig, axs = plt.subplots(len(rows), 8, figsize=(8, len(rows)))
    for r, imgs in enumerate(rows):
        for c in range(8):
            axs[r, c].imshow(((imgs[c].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            axs[r, c].axis("off")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--n-images", type=int, default=12000)
    p.add_argument("--ae-steps", type=int, default=2400)
    p.add_argument("--unet-steps", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preview", default=None)
    p.add_argument("--v2", action="store_true", help="lab v2's base model (PLAN_V2.md; ignores --ae-steps)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon", help="with --v2")
    p.add_argument("--autoencoder-from", help="with --v2: reuse this model folder's autoencoder instead of training")
    p.add_argument(
        "--denoiser-from", help="with --v2: load this v2 model whole and train its denoiser --unet-steps more"
    )
    p.add_argument(
        "--pooled-condition", action="store_true", help="with --v2: the condition also enters the time embedding"
    )
    p.add_argument(
        "--unet-channels", type=int, nargs="+", help="with --v2: a new denoiser's block widths (default 32 64)"
    )
    a = p.parse_args()
    v2_only = (
        a.prediction_type != "epsilon",
        a.autoencoder_from,
        a.denoiser_from,
        a.pooled_condition,
        a.unet_channels,
    )
    if any(v2_only) and not a.v2:
        p.error(
            "--prediction-type, --autoencoder-from, --denoiser-from, --pooled-condition and --unet-channels need --v2"
        )
    if a.denoiser_from and (a.autoencoder_from or a.prediction_type != "epsilon"):
        p.error("--denoiser-from takes its autoencoder and prediction type from that model; drop the other two")
    if a.unet_channels and a.denoiser_from:
        p.error("--unet-channels builds a new denoiser; --denoiser-from keeps that model's widths: drop one of them")
    if a.unet_channels and any(c <= 0 or c % 16 for c in a.unet_channels):
        p.error(f"--unet-channels must be positive multiples of 16 (the UNet's group norms), got {a.unet_channels}")
    for name in ("n_images", "unet_steps"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    for name in ("autoencoder_from", "denoiser_from"):
        folder = getattr(a, name)
        if folder and not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
            p.error(f"--{name.replace('_', '-')} {folder!r} holds no lab model ({CONFIG_FILE})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.v2:
        try:  # a source model of the wrong kind is refused before any training or writing
            model = pretrain_v2(
                a.out, a.n_images, a.unet_steps, seed=a.seed, prediction_type=a.prediction_type,
                autoencoder_from=a.autoencoder_from, denoiser_from=a.denoiser_from, pooled_condition=a.pooled_condition,
                unet_channels=tuple(a.unet_channels) if a.unet_channels else None,
            )  # fmt: skip
        except ValueError as error:
            p.error(str(error))
        if a.preview:
            _save_preview(model, a.preview)
        return
    torch.set_num_threads(1)
    pretrain(a.out, a.n_images, a.ae_steps, a.unet_steps, seed=a.seed, preview=a.preview)


if __name__ == "__main__":
    main()
