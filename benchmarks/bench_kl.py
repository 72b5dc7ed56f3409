"""The KL term's cost as a fraction of a training step.

One Bayesian UNet; interleaved per round: (1) a training step without the KL term, (2) `bayes_adapter.kl_loss`
forward + backward alone, (3) the same KL computed by `prototypes.kl_loss_flat`, which concatenates every factor's
mean and rho and evaluates the closed form once (a proposed change to `bayes_adapter.kl_divergence` / `kl_loss`),
forward + backward, with its tensor list cached per model, (4) the same gathering the tensors on every call
(`kl_flat_uncached`). Reported: medians, and KL / (step without KL + KL). The prototype's value is checked against
`kl_loss`.

Example: python benchmarks/bench_kl.py --size small --rounds 20
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import torch  # noqa: E402


def kl_flat(model: torch.nn.Module) -> torch.Tensor:
    """The prototype (benchmarks/prototypes.py): one closed-form evaluation over the concatenated factors."""
    from benchmarks import prototypes

    return prototypes.kl_loss_flat(model, num_examples=1)


def kl_flat_uncached(model: torch.nn.Module) -> torch.Tensor:
    from benchmarks import prototypes

    return prototypes.kl_loss_flat(model, num_examples=1, cache=False)


def parse_args(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(common.UNET_CONFIGS))
    parser.add_argument("--batch", type=int, default=None, help="default: 2 (tiny, small), 1 (sd15)")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--targets", default="attn", choices=sorted(common.TARGET_SETS))
    parser.add_argument("--arm", default="weight_B", help="the Bayesian arm (estimator_factors)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    args.batch = args.batch or (1 if args.size == "sd15" else 2)
    return args


def main(argv=None) -> dict:
    import bayes_adapter

    args = parse_args(argv)
    common.setup(args)
    common.parse_arm(args.arm)
    payload = {"benchmark": "kl", "machine": common.machine_info(args)}
    dtype = common.dtype_of(args.dtype)
    unet = common.build_unet(args.size, args.seed).to(args.device, dtype)
    common.add_adapter(unet, args.arm, common.TARGET_SETS[args.targets], seed=args.seed)
    common.randomise_lora(unet, args.seed)
    inputs = common.train_inputs(args.size, args.batch, args.latent, args.device, dtype, args.seed)
    trainer = common.Trainer(unet, args.arm, inputs, include_kl=False)
    n_layers = sum(1 for _ in bayes_adapter.bayes_layers(unet))

    def kl_step(fn):
        def run():
            kl = fn(unet)
            kl.backward()
            trainer.optimizer.zero_grad(set_to_none=True)
            return kl

        return run

    with torch.no_grad():
        reference, flat = bayes_adapter.kl_loss(unet, num_examples=1), kl_flat(unet)
    payload["kl_value"] = float(reference)
    payload["kl_flat_value"] = float(flat)
    payload["kl_flat_max_rel_diff"] = float((reference - flat).abs() / reference.abs().clamp_min(1e-30))
    times = common.interleaved(
        {
            "step_without_kl": trainer.step,
            "kl_loss": kl_step(lambda m: bayes_adapter.kl_loss(m, num_examples=1)),
            "kl_flat_prototype": kl_step(kl_flat),
            "kl_flat_uncached": kl_step(kl_flat_uncached),
        },
        args.rounds,
        args.warmup,
        args.device,
    )
    summary = common.summarise(times, "step_without_kl")
    step = summary["step_without_kl"]["median_wall_s"]
    for name in ("kl_loss", "kl_flat_prototype", "kl_flat_uncached"):
        kl_t = summary[name]["median_wall_s"]
        summary[name]["fraction_of_step"] = kl_t / (step + kl_t)
        paired = [k / (s + k) for k, s in zip(times[name]["wall"], times["step_without_kl"]["wall"])]
        summary[name]["paired_fraction_of_step"] = statistics.median(paired)
    payload.update(raw=times, summary=summary, bayes_layers=n_layers, arm=args.arm)
    path = common.write_json(payload, args.out, f"kl_{args.size}_{args.arm}_t{args.threads}.json")
    print(
        f"# KL cost: {args.size} UNet, arm {args.arm}, {n_layers} Bayesian layers, batch {args.batch}, "
        f"{args.latent}x{args.latent} latents"
    )
    print(common.load_line(payload["machine"]))
    print(f"KL value {payload['kl_value']:.6g}; prototype relative difference {payload['kl_flat_max_rel_diff']:.2e}")
    rows = [{"what": name, **s} for name, s in summary.items()]
    print(
        common.table(
            rows,
            [
                ("what", "what", ""),
                ("n", "n", "d"),
                ("median_wall_s", "median wall s", ".5f"),
                ("median_cpu_s", "median CPU s", ".5f"),
                ("fraction_of_step", "fraction of step", ".4f"),
                ("paired_fraction_of_step", "fraction (paired)", ".4f"),
            ],
        )
    )
    print(f"JSON: {path}")
    return payload


if __name__ == "__main__":
    main()
