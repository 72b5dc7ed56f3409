"""The KL term's cost as a fraction of a training step.

One Bayesian UNet; interleaved per round: (1) a training step without the KL term, (2) `bayes_adapter.kl_loss`
forward + backward alone (the closed form evaluated once per (prior std, kl_weight) group over the concatenated
means and rhos, the modules walked on every call), (3) an experiment, not library code: "what a cache would save",
the same closed form over tensor lists gathered once before timing (`CachedKLExperiment`; a library cache would need
invalidating when adapters are added, deleted or switched). Reported: medians, and KL / (step without KL + KL).

Example (from the repository root): python -m benchmarks.bench_kl --size small --rounds 20
"""

from __future__ import annotations

import statistics

from benchmarks import common
from benchmarks.common import torch


class CachedKLExperiment:
    """What a cache would save: `kl_loss`'s math over mean / rho lists gathered once (the walk taken out of the call).

    An experiment for the KL-cost table only; its value is checked against `bayes_adapter.kl_loss`.
    """

    def __init__(self, model: torch.nn.Module):
        import bayes_adapter

        self.groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for layer in bayes_adapter.bayes_layers(model):
            for name in layer.active_adapters:
                settings = layer.bayes_settings[name]
                if not layer.is_bayesian(name) or not settings.kl_weight:
                    continue
                key = (
                    settings.prior_std,
                    settings.kl_weight,
                    settings.posterior_std_parametrisation,
                    settings.posterior_std_init,
                )
                means, rhos = self.groups.setdefault(key, ([], []))
                for factor in settings.factors:
                    means.append(layer.factor_mean(factor, name))
                    rhos.append(getattr(layer, f"lora_posterior_rho_{factor}")[name])

    def __call__(self, num_examples: int = 1) -> torch.Tensor:
        from bayes_adapter.bayes import gaussian_kl, posterior_log_std, posterior_std

        total = torch.zeros(())
        for (prior_std, weight, parametrisation, std_init), (means, rhos) in self.groups.items():
            mean = torch.cat([t.reshape(-1) for t in means])
            rho = torch.cat([t.reshape(-1) for t in rhos])
            std = posterior_std(rho, parametrisation, std_init)
            log_std = posterior_log_std(rho, parametrisation, std_init)
            kl = gaussian_kl(mean, std, prior_std, log_std=log_std)
            total = total + (kl if weight == 1.0 else weight * kl)
        return total / num_examples


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

    cached = CachedKLExperiment(unet)
    with torch.no_grad():
        reference, experiment = bayes_adapter.kl_loss(unet, num_examples=1), cached()
    payload["kl_value"] = float(reference)
    payload["cache_experiment_rel_diff"] = float((reference - experiment).abs() / reference.abs().clamp_min(1e-30))
    times = common.interleaved(
        {
            "step_without_kl": trainer.step,
            "kl_loss": kl_step(lambda m: bayes_adapter.kl_loss(m, num_examples=1)),
            "experiment_kl_if_cached": kl_step(lambda m: cached()),
        },
        args.rounds,
        args.warmup,
        args.device,
    )
    summary = common.summarise(times, "step_without_kl")
    step = summary["step_without_kl"]["median_wall_s"]
    for name in ("kl_loss", "experiment_kl_if_cached"):
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
    print(
        f"KL value {payload['kl_value']:.6g}; cache experiment relative difference "
        f"{payload['cache_experiment_rel_diff']:.2e}"
    )
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
