"""Lab v1/v2's arms experiment (the history in RESULTS.md): `python -m examples.corruption_stage experiment [options]`.

Fine-tunes a lab base model on the subject with the v1/v2 arms (plain LoRA, Bayesian LoRA and the skeptics' controls),
measures v1's fidelity proxy, corruption score, diversity and copy rate (with --v2 also SSIM fidelity and the latent
residual measures) every few iterations, and writes a figure, a JSON of every number and a markdown summary. Lab v3
(`run`, `study`) judges with the package's stage judge instead.

    python -m examples.corruption_stage experiment --pretrain    # v1: regenerate its base model (~25 min), then run
    python -m examples.corruption_stage experiment --full        # v1: all arms, 1 and 3 images, 3 seeds
    python -m examples.corruption_stage experiment --v2 --full   # every lab v2 number in RESULTS.md (reproduce, ~15 h)
    python -m examples.corruption_stage experiment --v2 --subject-kind circle --lr 1e-2 --arms lora bayes_paper
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time

import torch

from . import reproduce
from .model import data, models, pretrain
from .report import experiment_report as report
from .study import experiment, measures


# v1's base model is no longer shipped: `experiment --pretrain` regenerates it into this folder (RESULTS.md, v1)
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model", "base_model")
V2_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model", "base_model_v2f")


def build_config(args: argparse.Namespace) -> experiment.ExperimentConfig:
    if args.tiny:
        cfg = experiment.ExperimentConfig(
            arms=tuple(args.arms or ("lora", "bayes_kl")),
            n_images=(1,),
            seeds=(0,),
            steps=4,
            eval_every=2,
            n_eval=2,
            sample_steps=2,
            width_timesteps=(20, 500),
            grid_n=2,
        )
    elif args.full:
        cfg = experiment.ExperimentConfig(arms=experiment.V1_ARMS, n_images=(1, 3), seeds=(0, 1, 2))
    else:
        cfg = experiment.ExperimentConfig()
    over = {}
    names = ("steps", "eval_every", "lr", "posterior_std_lr", "n_eval", "kl_weight", "sigma", "batch", "guidance")
    names += ("prior_loss_weight", "num_class_images")
    for name in (*names, "sample_steps"):
        v = getattr(args, name)
        if v is not None:
            over[name] = v
    if args.arms:
        over["arms"] = tuple(args.arms)
    if args.n_images:
        over["n_images"] = tuple(args.n_images)
    if args.seeds:
        over["seeds"] = tuple(args.seeds)
    if args.v2:
        over.update(prompt=data.v2_prompt(args.subject_kind), v2_measures=True, subject_kind=args.subject_kind)
    for name in ("clip_model", "dino_model", "clip_prompt"):
        if getattr(args, name) is not None:
            over[name] = getattr(args, name)
    if over:
        # clip_prompt None: derived again from the subject's kind, which `over` may change
        cfg = experiment.ExperimentConfig(**{**cfg.__dict__, "clip_prompt": None, **over})
    return cfg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("outputs", "corruption_stage"), help="output folder")
    p.add_argument(
        "--model-dir",
        default=None,
        help="base model folder (read, or written by --pretrain); default: the shipped one",
    )
    p.add_argument("--v2", action="store_true", help="lab v2 (PLAN_V2.md): its base model, 'sks cross', v2 measures")
    p.add_argument(
        "--full",
        action="store_true",
        help="the full study: all arms, 1 and 3 images, 3 seeds; with --v2, every v2 command of RESULTS.md in order",
    )
    p.add_argument("--pretrain", action="store_true", help="retrain the base model into --model-dir first")
    p.add_argument("--pretrain-only", action="store_true", help="retrain the base model and stop")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests, CI)")
    p.add_argument("--arms", nargs="+", choices=experiment.ARMS)
    p.add_argument("--n-images", nargs="+", type=int)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--posterior-std-lr", type=float, help="learning rate of the posterior stds (default: --lr)")
    p.add_argument("--batch", type=int)
    p.add_argument("--n-eval", type=int)
    p.add_argument("--kl-weight", type=float)
    p.add_argument("--sigma", type=float)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale of the evaluation samples")
    p.add_argument("--sample-steps", type=int, help="DDIM steps of the evaluation samples")
    p.add_argument(
        "--prior-loss-weight", type=float, help="with --v2: DreamBooth's prior preservation at this weight (default 0)"
    )
    p.add_argument("--num-class-images", type=int, help="class images for prior preservation (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--workers", type=int, default=1, help="fine-tuning runs at once, one thread each (default 1)")
    p.add_argument("--clip-model", help="the paper's CLIP-I/CLIP-T at every evaluation: a Hub id or local folder")
    p.add_argument("--dino-model", help="the paper's DINO and DINO diversity: a Hub id or local folder")
    p.add_argument("--clip-prompt", help="CLIP-T's text (default: a photo of a red and yellow checkered <kind>)")
    p.add_argument(
        "--subject-kind",
        choices=data.SUBJECT_KINDS,
        default=data.SUBJECT_KIND,
        help="with --v2: the subject's kind, prompted 'sks <kind>' (default: cross)",
    )
    args = p.parse_args(argv)
    if args.v2 and args.full:
        defaults = vars(p.parse_args([]))
        given = [
            "--" + k.replace("_", "-") for k, v in vars(args).items() if k not in ("v2", "full") and v != defaults[k]
        ]
        if given:
            p.error(f"--v2 --full runs RESULTS.md's commands as they are; it takes no {', '.join(given)}")
    if args.subject_kind != data.SUBJECT_KIND and not args.v2:
        p.error(f"--subject-kind {args.subject_kind} needs --v2 (lab v1's subject is the cross)")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.model_dir is None:
        args.model_dir = V2_MODEL_DIR if args.v2 else DEFAULT_MODEL_DIR
    try:
        args.config = build_config(args)
    except ValueError as error:
        p.error(str(error))
    if args.clip_model or args.dino_model:
        try:  # before any work: a model that does not load stops the run here
            measures.load_paper_models(args.clip_model, args.dino_model)
        except (OSError, ValueError) as error:
            p.error(f"--clip-model {args.clip_model!r} / --dino-model {args.dino_model!r} did not load: {error}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    command = "python -m examples.corruption_stage experiment " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    t0 = time.time()
    if args.v2 and args.full:
        reproduce.main([])
        return {}
    if args.pretrain or args.pretrain_only:
        if args.v2:
            pretrain.pretrain_v2(args.model_dir, unet_threads=args.threads)
        else:
            pretrain.pretrain(args.model_dir)
        if args.pretrain_only:
            return {}
    base = models.load_model(args.model_dir)
    if args.v2 != bool(base.cfg.extra_tokens):
        kind = "a lab v2" if base.cfg.extra_tokens else "a v1"
        print(
            f"error: --model-dir {args.model_dir} holds {kind} model; pass --v2 exactly for a v2 model",
            file=sys.stderr,
        )
        raise SystemExit(2)
    cfg = args.config
    result = experiment.run_experiment(
        base, cfg, tensorboard_dir=os.path.join(args.out, "tensorboard"), workers=args.workers
    )
    paths = report.write_outputs(result, args.out, command.strip())
    print(open(paths["summary"]).read())
    print(f"wrote {paths['figure']}, {paths['json']}, {paths['summary']} in {time.time() - t0:.0f} s")
    return paths


if __name__ == "__main__":
    main()
