"""The corruption-stage experiment: few-shot LoRA fine-tuning of the lab model on an unseen subject, one arm per
regulariser, with the monitor's metrics measured every ``eval_every`` iterations from fixed sampling seeds."""

from __future__ import annotations

import concurrent.futures
import copy
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import peft
import torch
from tqdm.auto import tqdm

import bayes_adapter
from bayes_adapter import BayesLoraConfig, kl_divergence, kl_loss
from bayes_adapter.training_monitor import copy_rate, corruption_report, nearest_reference_distance

from ..model import data
from ..model.diffusion import condition_tokens, diffusion_loss, learned_width, sample
from ..model.models import LabModel
from .measures import latent_residuals, paper_metrics, structural_fidelity


TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]

V1_ARMS = ("lora", "bayes_paper", "bayes_kl", "fixed_noise", "lora_dropout", "l2")
ARMS = (*V1_ARMS, "full")  # "full": DreamBooth, every UNet weight trained, no adapter (lab v2)
ARM_LABELS = {
    "lora": "plain LoRA",
    "bayes_paper": "Bayesian B, KL weight 0 (paper)",
    "bayes_kl": "Bayesian B + KL (ours)",
    "fixed_noise": "fixed-sigma weight noise",
    "lora_dropout": "LoRA dropout 0.1",
    "l2": "L2 pull to pretrained",
    "full": "full fine-tuning",
}
ARM_COLOURS = {
    "lora": "tab:red",
    "bayes_paper": "tab:orange",
    "bayes_kl": "tab:blue",
    "fixed_noise": "tab:purple",
    "lora_dropout": "tab:green",
    "l2": "tab:gray",
    "full": "black",
}


@dataclass
class ExperimentConfig:
    arms: tuple[str, ...] = ("lora", "bayes_paper", "bayes_kl")
    n_images: tuple[int, ...] = (1,)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 600
    eval_every: int = 50
    lr: float = 3e-3
    batch: int = 4
    rank: int = 4
    sigma: float = 0.01  # posterior std init (all Bayesian arms) and prior std
    kl_weight: float | None = None  # None: 2 / (latent dims * T), see kl_weight_default
    # Learning rate of the posterior stds' free parameters (bayes_adapter.param_groups); None: the same as `lr`.
    posterior_std_lr: float | None = None
    dropout: float = 0.1
    n_eval: int = 12  # samples per evaluation (fixed seeds)
    sample_steps: int = 25
    guidance: float = 3.0
    width_timesteps: tuple[int, ...] = (20, 100, 250, 500, 750)
    # A sample is a copy when its RMS pixel distance to the nearest *decoded* training latent (the autoencoder's
    # reconstruction of a training image: the best copy a latent model can produce) is below this.
    copy_threshold: float = 0.1
    subject_seed: int = 1234
    # The subject's kind (lab v2, PLAN_V2.md sixth session): the held-out cross, or a pretraining kind; v2's prompt
    # is then the rare token and this kind's class token (`data.v2_prompt`).
    subject_kind: str = data.SUBJECT_KIND
    eval_seed: int = 10_000
    grid_seed: int = 0  # the training seed whose samples are kept for the figure's grids
    grid_n: int = 6
    # Lab v2 (PLAN_V2.md): the training and sampling prompt (v2: subject then class token, "sks cross") and the v2
    # measures at every evaluation (SSIM fidelity; latent residual energy, whiteness and copy rate).
    prompt: tuple[int, ...] = (data.SUBJECT_TOKEN,)
    v2_measures: bool = False
    latent_copy_energy: float = 0.1  # v2 copy: residual energy below this fraction of the training latents' variance
    # The paper's metrics (CLIP-I, CLIP-T, DINO, DINO diversity) at every evaluation, with real models by name or
    # local path (`bayes_adapter.evaluation`); None leaves them out (the CPU default has no such models).
    clip_model: str | None = None
    dino_model: str | None = None
    clip_prompt: str | None = None  # None: "a photo of a red and yellow checkered <subject_kind>"
    # DreamBooth's prior preservation (step 4's sweep): this weight on the loss of `num_class_images` images that the
    # base model draws for the class prompt (v2's class token) before fine-tuning, from `class_seed`; 0: none.
    prior_loss_weight: float = 0.0
    num_class_images: int = 32
    class_seed: int = 30_000
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ValueError(f"arms must be among {ARMS}, got {bad}")
        if not self.n_images or any(n < 1 or n > 5 for n in self.n_images):
            raise ValueError(f"n_images must be values in 1..5, got {self.n_images}")
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError(f"steps and eval_every must be positive, got {self.steps} and {self.eval_every}")
        if self.n_eval < 2:
            raise ValueError(f"n_eval must be >= 2 (diversity needs pairs), got {self.n_eval}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.subject_kind not in data.SUBJECT_KINDS:
            raise ValueError(f"subject_kind must be one of {data.SUBJECT_KINDS}, got {self.subject_kind!r}")
        if not self.prior_loss_weight >= 0 or self.num_class_images < 1:  # "not >=": a nan weight is refused too
            raise ValueError(
                f"prior_loss_weight must be >= 0 and num_class_images >= 1, got {self.prior_loss_weight} and "
                f"{self.num_class_images}"
            )
        if self.prior_loss_weight and len(self.prompt) < 2:
            raise ValueError(f"prior_loss_weight needs a v2 prompt (subject and class tokens), got {self.prompt}")
        if self.clip_prompt is None:
            self.clip_prompt = f"a photo of a red and yellow checkered {self.subject_kind}"

    def subject_set(self, size: int) -> torch.Tensor:
        """The subject's images (as many as the largest training set), from ``subject_seed``."""
        return data.make_subject_set(max(self.n_images), seed=self.subject_seed, size=size, kind=self.subject_kind)


def kl_weight_default(model: LabModel) -> float:
    """``2 / (D * T)``: the weight that makes ``mse + w * KL / N`` proportional to the negative ELBO when the
    simple loss is read as a unit-variance Gaussian likelihood of the noise, summed over the D latent numbers and
    the T timesteps of the variational bound. Chosen a priori, not tuned on the lab's results."""
    c = model.cfg
    d = c.latent_channels * c.latent_size**2
    return 2.0 / (d * c.num_train_timesteps)


def make_adapter_config(arm: str, cfg: ExperimentConfig, kl_weight: float):
    common = {"r": cfg.rank, "lora_alpha": cfg.rank, "target_modules": TARGETS}
    if arm in ("lora", "l2"):
        return peft.LoraConfig(**common)
    if arm == "lora_dropout":
        return peft.LoraConfig(lora_dropout=cfg.dropout, **common)
    bayes = {
        "bayesian_factors": "B",
        "posterior_std_init": cfg.sigma,
        "prior_std": cfg.sigma,
        "estimator": "weight",
        "sample_at_inference": False,
        # Unbounded stds, as the paper and every recorded run of these arms (before the package's default bound).
        "posterior_std_max": None,
    }
    if arm == "bayes_paper":
        return BayesLoraConfig(train_posterior_std=True, kl_weight=0.0, **bayes, **common)
    if arm == "bayes_kl":
        return BayesLoraConfig(train_posterior_std=True, kl_weight=kl_weight, **bayes, **common)
    if arm == "fixed_noise":
        return BayesLoraConfig(train_posterior_std=False, kl_weight=0.0, **bayes, **common)
    raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")


def _lora_b_params(unet: torch.nn.Module) -> list[torch.Tensor]:
    return [p for n, p in unet.named_parameters() if "lora_B" in n and p.requires_grad]


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def run_arm(
    base: LabModel,
    arm: str,
    train_images: torch.Tensor,
    seed: int,
    cfg: ExperimentConfig,
    recon: torch.Tensor,
    keep_samples: bool = False,
    progress: Callable[[int], None] | None = None,
    tensorboard_dir: str | None = None,
) -> dict:
    """Fine-tunes one adapter and returns its measured curves (and, if asked, the evaluation samples).

    With `tensorboard_dir`, the run also logs its loss, fidelity, corruption score and the posterior std's mean, min,
    max and histogram there (one sub-folder per arm, training-set size and seed).
    """
    n_img = train_images.shape[0]
    kl_w = cfg.kl_weight if cfg.kl_weight is not None else kl_weight_default(base)
    model = copy.copy(base)
    model.unet = copy.deepcopy(base.unet)
    torch.manual_seed(seed)
    if arm == "full":
        model.unet.requires_grad_(True)
    else:
        model.unet.add_adapter(make_adapter_config(arm, cfg, kl_w))
    opt = torch.optim.AdamW(
        bayes_adapter.param_groups(model.unet, posterior_std_lr=cfg.posterior_std_lr), lr=cfg.lr, weight_decay=0.0
    )
    with torch.no_grad():
        latents = model.encode(train_images)
    g = torch.Generator().manual_seed(seed)
    prompt = cfg.prompt[0] if len(cfg.prompt) == 1 else cfg.prompt
    token = condition_tokens(prompt, cfg.batch)
    ssim_ceiling = structural_fidelity(recon, train_images) if cfg.v2_measures else None
    # L2 control: the KL's own pull on the means of B (its mu^2 / 2 prior^2 term), without the noise.
    l2_coef = kl_w / (2 * cfg.sigma**2 * n_img)

    class_latents = None
    if cfg.prior_loss_weight:  # drawn by the base model, before any fine-tuning, as DreamBooth's class images are
        class_token = data.class_token(cfg.subject_kind)
        _, class_latents = sample(
            base,
            class_token,
            cfg.num_class_images,
            cfg.class_seed,
            cfg.sample_steps,
            cfg.guidance,
            return_latents=True,
        )
        class_tokens = condition_tokens(class_token, cfg.batch)

    bayesian = arm.startswith("bayes") or arm == "fixed_noise"
    curve_names = ("iteration", "loss", "posterior_std", "posterior_std_min", "posterior_std_max", "kl", "flicker")
    curves: dict[str, list] = {k: [] for k in (*curve_names, "width")}
    writer = None
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(tensorboard_dir, f"{arm}_n{n_img}_seed{seed}"))
    samples_kept = []
    prev = None
    run_loss, run_n = 0.0, 0

    def evaluate(it: int) -> None:
        nonlocal prev, run_loss, run_n
        model.unet.eval()
        imgs, sample_latents = sample(
            model,
            prompt,
            cfg.n_eval,
            seed=cfg.eval_seed,
            steps=cfg.sample_steps,
            guidance=cfg.guidance,
            return_latents=True,
        )
        rep = corruption_report(imgs, train_images, copy_threshold=cfg.copy_threshold)
        rep["copy_rate"] = float(copy_rate(imgs, recon, cfg.copy_threshold))
        rep["nn_distance_recon"] = float(nearest_reference_distance(imgs, recon).mean())
        if cfg.v2_measures:
            rep.update(_v2_measures(imgs, sample_latents, train_images, latents, cfg.latent_copy_energy))
            rep["ssim_ceiling"] = ssim_ceiling
        if cfg.clip_model or cfg.dino_model:
            rep.update(paper_metrics(imgs, train_images, cfg.clip_prompt, cfg.clip_model, cfg.dino_model))
        for k, v in rep.items():
            curves.setdefault(k, []).append(v)
        curves["iteration"].append(it)
        curves["loss"].append(run_loss / run_n if run_n else float("nan"))
        run_loss, run_n = 0.0, 0
        curves["flicker"].append(float((imgs - prev).pow(2).mean().sqrt()) if prev is not None else float("nan"))
        prev = imgs
        curves["width"].append(learned_width(model, latents, prompt, list(cfg.width_timesteps)))
        if bayesian:
            stats = bayes_adapter.posterior_std_stats(model.unet)
            for key in ("mean", "min", "max"):
                curves["posterior_std" if key == "mean" else f"posterior_std_{key}"].append(stats[key])
            curves["kl"].append(float(kl_divergence(model.unet).detach()))
        else:
            for key in ("posterior_std", "posterior_std_min", "posterior_std_max", "kl"):
                curves[key].append(float("nan"))
        if writer is not None:
            for key in ("loss", "fidelity", "corruption", "copy_rate", "posterior_std", "kl"):
                if not math.isnan(curves[key][-1]):
                    writer.add_scalar(f"lab/{key}", curves[key][-1], it)
            if bayesian:
                writer.add_scalar("posterior_std/min", stats["min"], it)
                writer.add_scalar("posterior_std/max", stats["max"], it)
                writer.add_histogram("posterior_std/values", bayes_adapter.posterior_stds(model.unet), it)
        if keep_samples:
            samples_kept.append(_to_uint8(imgs[: cfg.grid_n]))
        model.unet.train()

    evaluate(0)
    for it in range(1, cfg.steps + 1):
        idx = torch.randint(n_img, (cfg.batch,), generator=g)
        loss = diffusion_loss(model, latents[idx], token, generator=g)
        total = loss
        if class_latents is not None:
            class_idx = torch.randint(len(class_latents), (cfg.batch,), generator=g)
            prior = diffusion_loss(model, class_latents[class_idx], class_tokens, generator=g)
            total = total + cfg.prior_loss_weight * prior
        if arm == "bayes_kl":
            total = total + kl_loss(model.unet, n_img)  # the config carries kl_weight=kl_w
        elif arm == "l2":
            total = total + l2_coef * sum(p.pow(2).sum() for p in _lora_b_params(model.unet))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        run_loss += float(loss.detach())
        run_n += 1
        if it % cfg.eval_every == 0 or it == cfg.steps:
            evaluate(it)
        if progress:
            progress(1)
    if writer is not None:
        writer.close()
    out = {
        "arm": arm,
        "seed": seed,
        "n_images": n_img,
        "kl_weight": kl_w if arm == "bayes_kl" else 0.0,
        "l2_coef": l2_coef if arm == "l2" else 0.0,
        "curves": curves,
    }
    if keep_samples:
        out["samples"] = torch.stack(samples_kept)  # (n_evals, grid_n, 3, H, W) uint8
    return out


def _v2_measures(
    images: torch.Tensor, sample_latents: torch.Tensor, train_images: torch.Tensor, latents: torch.Tensor, copy: float
) -> dict[str, float]:
    residual = latent_residuals(sample_latents, latents)
    return {
        "ssim_fidelity": structural_fidelity(images, train_images),
        "latent_energy": float(residual["energy"].median()),
        "whiteness": float(residual["whiteness"].median()),
        "latent_copy_rate": float((residual["energy"] < copy).double().mean()),
    }


def _run_in_worker(kwargs: dict) -> dict:
    torch.set_num_threads(1)  # one thread per worker: the workers share the cores
    return run_arm(**kwargs)


def run_experiment(
    base: LabModel, cfg: ExperimentConfig, tensorboard_dir: str | None = None, workers: int = 1
) -> dict:
    """Every arm x training-set size x seed; returns a JSON-ready dict (samples for the grids kept aside).

    With `tensorboard_dir`, each run logs its curves and posterior-std histograms there (see `run_arm`). With
    `workers` > 1, that many runs go at once in spawned processes of one thread each; every run is seeded on its
    own, so the numbers are those of `workers=1` to float32 rounding."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.time()
    subject = cfg.subject_set(base.cfg.image_size)
    with torch.no_grad():
        recon = base.decode(base.encode(subject))
    recon_rmse = (recon - subject).pow(2).flatten(1).mean(1).sqrt()
    kl_w = cfg.kl_weight if cfg.kl_weight is not None else kl_weight_default(base)
    jobs = [
        {
            "base": base,
            "arm": arm,
            "train_images": subject[:n_img],
            "seed": seed,
            "cfg": cfg,
            "recon": recon[:n_img],
            "keep_samples": seed == cfg.grid_seed,
            "tensorboard_dir": tensorboard_dir,
        }
        for n_img in cfg.n_images
        for arm in cfg.arms
        for seed in cfg.seeds
    ]
    with tqdm(total=len(jobs) * cfg.steps, desc="fine-tuning", mininterval=2.0) as bar:
        if workers == 1:
            results = []
            for job in jobs:
                bar.set_postfix(arm=job["arm"], n=len(job["train_images"]), seed=job["seed"])
                results.append(run_arm(**job, progress=bar.update))
        else:
            context = multiprocessing.get_context("spawn")  # fork would copy this process's torch threads
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = [pool.submit(_run_in_worker, job) for job in jobs]
                for _done in concurrent.futures.as_completed(futures):
                    bar.update(cfg.steps)
                results = [future.result() for future in futures]
    runs, grids = [], {}
    for job, r in zip(jobs, results):
        if job["keep_samples"]:
            grids[f"{job['arm']}/{len(job['train_images'])}"] = r.pop("samples")
        runs.append(r)
    refs = {}
    for n_img in cfg.n_images:
        train = subject[:n_img]
        rep = corruption_report(recon[:n_img].repeat(2, 1, 1, 1), train, copy_threshold=cfg.copy_threshold)
        refs[f"autoencoder_reconstruction/{n_img}"] = rep
    return {
        "config": {**asdict(cfg), "kl_weight_used": kl_w, "copy_threshold_used": cfg.copy_threshold},
        "subject_reconstruction_rmse": [float(v) for v in recon_rmse],
        "references": refs,
        "runs": runs,
        "seconds": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "_grids": grids,
        "_subject": _to_uint8(subject),
    }
