"""Training step time and peak memory: Bayesian LoRA (each estimator, each choice of Bayesian factors) vs plain LoRA.

Timing: one process, one UNet; every arm is its own module tree over the same frozen base weights (shared tensors),
with its own adapter (same targets, r, initial A) and its own AdamW. The arms run interleaved, one step each per
round (A, B, C, A, B, C, ...; the order rotated every round), after warm-up steps. Reported: median wall and CPU time
per step, the ratio of medians to plain LoRA, and the median of the per-round ratios (robust to slow load drift).

Memory (`--memory`): a fresh subprocess per arm (arms interleaved, `--memory-repeats` times), each building the UNet,
adding the adapter and running `--memory-steps` steps. Reported: lifetime peak RSS (`ru_maxrss`) and the peak RSS
sampled every 2 ms during the training steps, minus the RSS before the first step (the training increment).

Example (from the repository root): python -m benchmarks.bench_train_step --size small --rounds 20 --memory
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from benchmarks import common
from benchmarks.common import torch


DEFAULT_BATCH = {"tiny": 2, "small": 2, "sd15": 1}


def parse_args(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(common.UNET_CONFIGS))
    parser.add_argument("--batch", type=int, default=None, help="default: 2 (tiny, small), 1 (sd15)")
    parser.add_argument("--latent", type=int, default=32, help="latent height and width")
    parser.add_argument("--targets", default="attn", choices=sorted(common.TARGET_SETS))
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument(
        "--arms",
        default="all",
        help="comma list of arms (plain, weight_B, local_AB, ...) or 'all'",
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-kl", action="store_true", help="leave the KL term out of the Bayesian steps")
    parser.add_argument(
        "--optim",
        default="adamw",
        choices=("adamw", "adamw-foreach", "adamw-fused"),
        help="adamw: torch's default implementation (a per-tensor loop on CPU)",
    )
    parser.add_argument("--memory", action="store_true", help="also measure peak memory, one subprocess per arm")
    parser.add_argument("--memory-only", action="store_true", help="measure only peak memory")
    parser.add_argument("--memory-arms", default=None, help="arms for the memory runs (default: --arms)")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-repeats", type=int, default=1)
    parser.add_argument("--child-memory", default=None, help=argparse_hidden())
    args = parser.parse_args(argv)
    args.batch = args.batch or DEFAULT_BATCH[args.size]
    return args


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def arms_of(spec: str) -> list[str]:
    if spec == "all":
        arms = common.all_arms()
    else:
        arms = [a.strip() for a in spec.split(",") if a.strip()]
    for arm in arms:
        if arm != common.PLAIN:
            common.parse_arm(arm)
    if common.PLAIN not in arms:
        arms.insert(0, common.PLAIN)
    return arms


def make_trainer(base, arm: str, args, inputs) -> common.Trainer:
    unet = common.share_base_copy(base)
    common.add_adapter(unet, arm, common.TARGET_SETS[args.targets], r=args.r, seed=args.seed)
    return common.Trainer(unet, arm, inputs, include_kl=not args.no_kl, optim=args.optim)


def run_timing(args, arms: list[str]) -> dict:
    dtype = common.dtype_of(args.dtype)
    base = common.build_unet(args.size, args.seed).to(args.device, dtype)
    inputs = common.train_inputs(args.size, args.batch, args.latent, args.device, dtype, args.seed)
    trainers = {arm: make_trainer(base, arm, args, inputs) for arm in arms}
    params = {arm: common.count(t.params) for arm, t in trainers.items()}

    def report(r: int) -> None:
        print(f"  round {r + 1}/{args.rounds} done, load {common.os.getloadavg()[0]:.2f}", file=sys.stderr)

    times = common.interleaved(
        {arm: t.step for arm, t in trainers.items()}, args.rounds, args.warmup, args.device, on_round=report
    )
    summary = common.summarise(times, common.PLAIN)
    for arm in arms:
        summary[arm]["trainable_params"] = params[arm]
    return {"raw": times, "summary": summary, "base_params": common.count(list(base.parameters()))}


def memory_child(args) -> None:
    """Runs in a fresh process: build, add one arm's adapter, train a few steps; prints one JSON line."""
    arm = args.child_memory
    dtype = common.dtype_of(args.dtype)
    base = common.build_unet(args.size, args.seed).to(args.device, dtype)
    rss_build = common.current_rss()
    common.add_adapter(base, arm, common.TARGET_SETS[args.targets], r=args.r, seed=args.seed)
    inputs = common.train_inputs(args.size, args.batch, args.latent, args.device, dtype, args.seed)
    trainer = common.Trainer(base, arm, inputs, include_kl=not args.no_kl, optim=args.optim)
    rss_setup = common.current_rss()
    with common.RssSampler() as sampler:
        for _ in range(args.memory_steps):
            trainer.step()
    out = {
        "arm": arm,
        "rss_after_build": rss_build,
        "rss_before_steps": rss_setup,
        "peak_rss_during_steps": sampler.peak,
        "train_increment": sampler.peak - rss_setup,
        "ru_maxrss": common.max_rss(),
    }
    if args.device.startswith("cuda"):
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    print("MEMORY " + json.dumps(out))


def run_memory(args, arms: list[str]) -> dict:
    passthrough = (
        [
            f"--size={args.size}",
            f"--batch={args.batch}",
            f"--latent={args.latent}",
            f"--targets={args.targets}",
            f"--r={args.r}",
            f"--threads={args.threads}",
            f"--device={args.device}",
            f"--dtype={args.dtype}",
            f"--seed={args.seed}",
            f"--memory-steps={args.memory_steps}",
        ]
        + (["--no-kl"] if args.no_kl else [])
        + [f"--optim={args.optim}"]
    )
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat in range(args.memory_repeats):
        order = arms if repeat % 2 == 0 else arms[::-1]
        for arm in order:
            proc = subprocess.run(
                [sys.executable, "-m", __spec__.name, "--child-memory", arm, *passthrough],
                cwd=common.REPO_ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"memory child for {arm} failed:\n{proc.stderr[-3000:]}")
            runs[arm].append(json.loads(line[len("MEMORY ") :]))
            print(f"  memory {arm}: {runs[arm][-1]['ru_maxrss'] / 2**20:.0f} MiB", file=sys.stderr)
    summary = {}
    base = runs[common.PLAIN]
    for arm, rs in runs.items():
        med = {
            k: statistics.median(r[k] for r in rs) for k in ("ru_maxrss", "peak_rss_during_steps", "train_increment")
        }
        med_base = {k: statistics.median(r[k] for r in base) for k in med}
        summary[arm] = {
            **{f"{k}_mib": v / 2**20 for k, v in med.items()},
            "ratio_ru_maxrss": med["ru_maxrss"] / med_base["ru_maxrss"],
            "ratio_peak_during_steps": med["peak_rss_during_steps"] / med_base["peak_rss_during_steps"],
            "ratio_train_increment": med["train_increment"] / max(med_base["train_increment"], 1),
        }
    return {"raw": runs, "summary": summary}


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.setup(args)
    if args.child_memory:
        memory_child(args)
        return {}
    arms = arms_of(args.arms)
    payload = {"benchmark": "train_step", "machine": common.machine_info(args)}
    print(
        f"# Training step: {args.size} UNet, batch {args.batch}, {args.latent}x{args.latent} latents, "
        f"targets {args.targets}, r={args.r}, {args.dtype} on {args.device}, KL in step: {not args.no_kl}, "
        f"optimizer {args.optim}"
    )
    if not args.memory_only:
        payload["timing"] = run_timing(args, arms)
    if args.memory or args.memory_only:
        payload["memory"] = run_memory(args, arms_of(args.memory_arms or args.arms))
    path = common.write_json(payload, args.out, f"train_step_{args.size}_{args.targets}_t{args.threads}.json")
    print(common.load_line(payload["machine"]))
    if "timing" in payload:
        rows = [{"arm": arm, **s} for arm, s in payload["timing"]["summary"].items()]
        print(
            common.table(
                rows,
                [
                    ("arm", "arm", ""),
                    ("n", "n", "d"),
                    ("median_wall_s", "median wall s", ".4f"),
                    ("ratio_wall", "ratio (medians)", ".3f"),
                    ("paired_ratio_wall", "ratio (paired)", ".3f"),
                    ("median_cpu_s", "median CPU s", ".4f"),
                    ("ratio_cpu", "CPU ratio", ".3f"),
                    ("trainable_params", "trainable params", "d"),
                ],
            )
        )
    if "memory" in payload:
        rows = [{"arm": arm, **s} for arm, s in payload["memory"]["summary"].items()]
        print(
            common.table(
                rows,
                [
                    ("arm", "arm", ""),
                    ("ru_maxrss_mib", "process peak RSS MiB", ".1f"),
                    ("ratio_ru_maxrss", "ratio", ".4f"),
                    ("peak_rss_during_steps_mib", "peak RSS in steps MiB", ".1f"),
                    ("ratio_peak_during_steps", "ratio", ".4f"),
                    ("train_increment_mib", "step increment MiB", ".1f"),
                    ("ratio_train_increment", "ratio", ".3f"),
                ],
            )
        )
    print(f"JSON: {path}")
    return payload


if __name__ == "__main__":
    main()
