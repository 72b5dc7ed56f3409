"""Training step time and peak memory of an SD3-medium-sized DiT: Bayesian LoRA (weight_B) vs plain LoRA (issue 14).

The model is a `diffusers.SD3Transformer2DModel` built from SD3-medium's published transformer config with random
weights (nothing from the Hub). Adapters: diffusers' `train_dreambooth_lora_sd3.py` default targets, r=4; the base
weights are in `--dtype`, the adapter parameters in float32 (as the training scripts cast them).

Timing: one process, one set of frozen base weights; every arm is its own module tree over those very tensors
(`common.share_base_copy`), with its own adapter (same seed) and its own AdamW. The arms run interleaved, one step
each per round, the order rotated every round, after warm-up steps. A step: forward on random latents, text tokens,
pooled projections and timestep; MSE to a random target (+ `bayes_adapter.kl_loss(model, 1)` with kl_weight=1 for
Bayesian arms); backward; AdamW step; zero_grad. Reported: median wall / CPU time, the ratio of medians to plain
LoRA and the median of the per-round ratios.

Memory: a fresh subprocess per arm (as bench_train_step.py): lifetime peak RSS and the peak RSS sampled during
`--memory-steps` steps. The model is built directly in `--dtype`, so the lifetime peak is not a float32 transient.

Example (from the repository root): python -m benchmarks.bench_dit_train_step --size small --rounds 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from benchmarks import common
from benchmarks.common import torch


# SD3 medium's transformer: the config.json of stabilityai/stable-diffusion-3-medium-diffusers, folder "transformer"
# (diffusers 0.29 release; ~2.03B parameters). "small": the same architecture, 2 layers, narrow, for a smoke test.
DIT_CONFIGS: dict[str, dict[str, Any]] = {
    "sd3_medium": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    ),
    "small": dict(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=32,
    ),
}
# diffusers examples/dreambooth/train_dreambooth_lora_sd3.py: the default `--lora_layers` (attention projections of
# both streams; the last block is context_pre_only and has no to_add_out).
DIT_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TIME_TARGET, MEMORY_TARGET = 1.03, 1.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.base_parser(__doc__.splitlines()[0])
    for action in parser._actions:  # common's --dtype, also spelt fp32 / bf16 / fp16
        if action.dest == "dtype":
            action.choices = (*action.choices, *DTYPE_ALIASES)
    parser.add_argument("--size", default="sd3_medium", choices=sorted(DIT_CONFIGS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=32, help="latent height and width (16 channels)")
    parser.add_argument(
        "--text_tokens",
        "--text-tokens",
        type=int,
        default=77,
        help="text tokens of encoder_hidden_states (SD3 uses 77 CLIP + up to 256 T5; default 77)",
    )
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--arms", default="plain,weight_B", help="comma list of arms (plain is always included)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-arm memory subprocesses")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    return args


def arms_of(spec: str) -> list[str]:
    arms = [a.strip() for a in spec.split(",") if a.strip()]
    for arm in arms:
        if arm != common.PLAIN:
            common.parse_arm(arm)
    return arms if common.PLAIN in arms else [common.PLAIN, *arms]


def build_dit(size: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """The transformer with random weights, created directly in `dtype` (no float32 copy for bf16)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = SD3Transformer2DModel(**DIT_CONFIGS[size])
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    return model.to(device, dtype)  # buffers (the sin-cos position table) too


@dataclass
class DiTInputs:
    latents: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def dit_inputs(args: argparse.Namespace, dtype: torch.dtype) -> DiTInputs:
    cfg = DIT_CONFIGS[args.size]
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, cfg["in_channels"], args.latent, args.latent)

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(s, generator=g).to(args.device, dtype)

    return DiTInputs(
        latents=randn(*shape),
        text=randn(args.batch, args.text_tokens, cfg["joint_attention_dim"]),
        pooled=randn(args.batch, cfg["pooled_projection_dim"]),
        timesteps=(torch.rand(args.batch, generator=g) * 1000).to(args.device),  # SD3: sigma * 1000, float
        target=randn(*shape),
    )


class DiTTrainer(common.Trainer):
    """`common.Trainer` (AdamW, backward, step, zero_grad; KL for Bayesian arms) with the SD3 transformer's call."""

    def loss(self) -> torch.Tensor:
        i = self.inputs
        prediction = self.unet(
            hidden_states=i.latents, encoder_hidden_states=i.text, pooled_projections=i.pooled, timestep=i.timesteps
        ).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), i.target.float())
        if self.include_kl:
            import bayes_adapter

            loss = loss + bayes_adapter.kl_loss(self.unet, num_examples=1)
        return loss


def make_trainer(model: torch.nn.Module, arm: str, args: argparse.Namespace, inputs: DiTInputs) -> DiTTrainer:
    """Adds the arm's adapter (kl_weight 1 for Bayesian arms) and casts the adapter parameters to float32."""
    import bayes_adapter

    common.add_adapter(model, arm, DIT_TARGETS, r=args.r, seed=args.seed, kl_weight=1.0)
    bayes_adapter.cast_adapter_params(model, torch.float32)
    return DiTTrainer(model, arm, inputs)


def adapted_layers(model: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def run_timing(args: argparse.Namespace, arms: list[str]) -> dict[str, Any]:
    dtype = common.dtype_of(args.dtype)
    base = build_dit(args.size, dtype, args.device, args.seed)
    rss_base = common.current_rss()
    n_base = common.count(list(base.parameters()))
    print(f"  base parameters: {n_base:,} ({n_base / 1e9:.3f}B); RSS {rss_base / 2**30:.2f} GiB", file=sys.stderr)
    inputs = dit_inputs(args, dtype)
    trainers = {arm: make_trainer(common.share_base_copy(base), arm, args, inputs) for arm in arms}
    rss_trees = common.current_rss()
    print(f"  RSS with {len(arms)} adapted trees: {rss_trees / 2**30:.2f} GiB (shared base)", file=sys.stderr)
    info = {
        arm: {
            "trainable_params": common.count(t.params),
            "adapted_layers": adapted_layers(t.unet),
            "adapter_dtypes": sorted({str(p.dtype) for p in t.params}),
        }
        for arm, t in trainers.items()
    }

    def report(r: int) -> None:
        print(f"  round {r + 1}/{args.rounds} done, load {common.os.getloadavg()[0]:.2f}", file=sys.stderr)

    times = common.interleaved(
        {arm: t.step for arm, t in trainers.items()}, args.rounds, args.warmup, args.device, on_round=report
    )
    summary = common.summarise(times, common.PLAIN)
    for arm in arms:
        summary[arm].update(info[arm])
    return {
        "raw": times,
        "summary": summary,
        "base_params": n_base,
        "rss_base_gib": rss_base / 2**30,
        "rss_with_trees_gib": rss_trees / 2**30,
    }


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: build, add one arm's adapter, train a few steps; prints one JSON line."""
    arm = args.child_memory
    dtype = common.dtype_of(args.dtype)
    model = build_dit(args.size, dtype, args.device, args.seed)
    rss_build = common.current_rss()
    trainer = make_trainer(model, arm, args, dit_inputs(args, dtype))
    rss_setup = common.current_rss()
    with common.RssSampler(interval=0.01) as sampler:
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


def run_memory(args: argparse.Namespace, arms: list[str]) -> dict[str, Any]:
    passthrough = [
        f"--size={args.size}",
        f"--batch={args.batch}",
        f"--latent={args.latent}",
        f"--text_tokens={args.text_tokens}",
        f"--r={args.r}",
        f"--threads={args.threads}",
        f"--device={args.device}",
        f"--dtype={args.dtype}",
        f"--seed={args.seed}",
        f"--memory-steps={args.memory_steps}",
    ]
    runs: dict[str, dict[str, Any]] = {}
    for arm in arms:
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
        runs[arm] = json.loads(line[len("MEMORY ") :])
        print(f"  memory {arm}: peak RSS {runs[arm]['ru_maxrss'] / 2**30:.2f} GiB", file=sys.stderr)
    base = runs[common.PLAIN]
    keys = ("ru_maxrss", "peak_rss_during_steps", "train_increment")
    summary = {
        arm: {
            **{f"{k}_mib": r[k] / 2**20 for k in keys},
            "ratio_ru_maxrss": r["ru_maxrss"] / base["ru_maxrss"],
            "ratio_peak_during_steps": r["peak_rss_during_steps"] / base["peak_rss_during_steps"],
            "ratio_train_increment": r["train_increment"] / max(base["train_increment"], 1),
        }
        for arm, r in runs.items()
    }
    return {"raw": runs, "summary": summary}


def verdicts(payload: dict[str, Any]) -> list[str]:
    """One line per Bayesian arm and target: time <= 1.03x and peak memory <= 1.02x of plain LoRA."""
    lines = []
    for arm, s in payload.get("timing", {}).get("summary", {}).items():
        if arm != common.PLAIN:
            ok = max(s["ratio_wall"], s["paired_ratio_wall"]) <= TIME_TARGET
            lines.append(
                f"{arm}: step time {s['ratio_wall']:.3f}x (paired {s['paired_ratio_wall']:.3f}, CPU "
                f"{s['ratio_cpu']:.3f}) vs target <= {TIME_TARGET}: {'met' if ok else 'MISSED'}"
            )
    for arm, s in payload.get("memory", {}).get("summary", {}).items():
        if arm != common.PLAIN:
            ratio = max(s["ratio_ru_maxrss"], s["ratio_peak_during_steps"])
            lines.append(
                f"{arm}: peak memory {s['ratio_peak_during_steps']:.4f}x during steps, {s['ratio_ru_maxrss']:.4f}x "
                f"process peak vs target <= {MEMORY_TARGET}: {'met' if ratio <= MEMORY_TARGET else 'MISSED'}"
            )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.setup(args)
    if args.child_memory:
        memory_child(args)
        return {}
    arms = arms_of(args.arms)
    payload: dict[str, Any] = {"benchmark": "dit_train_step", "machine": common.machine_info(args)}
    payload["config"] = {"transformer": DIT_CONFIGS[args.size], "targets": list(DIT_TARGETS), "r": args.r}
    print(
        f"# DiT training step: {args.size} SD3Transformer2DModel, batch {args.batch}, {args.latent}x{args.latent}x16 "
        f"latents, {args.text_tokens} text tokens, r={args.r}, base {args.dtype} (adapters float32) on {args.device}, "
        f"KL (kl_weight 1) in Bayesian steps"
    )
    payload["timing"] = run_timing(args, arms)
    if not args.no_memory:
        payload["memory"] = run_memory(args, arms)
    path = common.write_json(payload, args.out, f"dit_train_step_{args.size}_{args.dtype}_t{args.threads}.json")
    print(f"base parameters: {payload['timing']['base_params']:,}")
    print(common.load_line(payload["machine"]))
    rows = [{"arm": arm, **s} for arm, s in payload["timing"]["summary"].items()]
    print(
        common.table(
            rows,
            [
                ("arm", "arm", ""),
                ("n", "n", "d"),
                ("median_wall_s", "median wall s", ".3f"),
                ("ratio_wall", "ratio (medians)", ".3f"),
                ("paired_ratio_wall", "ratio (paired)", ".3f"),
                ("median_cpu_s", "median CPU s", ".3f"),
                ("ratio_cpu", "CPU ratio", ".3f"),
                ("trainable_params", "trainable params", "d"),
                ("adapted_layers", "adapted layers", "d"),
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
    for line in verdicts(payload):
        print(line)
    print(f"JSON: {path}")
    return payload


if __name__ == "__main__":
    main()
