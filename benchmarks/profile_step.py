"""Where a Bayesian training step spends its extra time: per-phase CPU time and torch.profiler op counts vs plain LoRA.

For each arm (one model tree over shared base weights, as in bench_train_step.py): the median process CPU time of
the forward (incl. loss), backward, optimizer step and KL (forward + backward), interleaved over `--rounds`; then
one profiled step per phase, counting aten ops and autograd nodes. Op counts do not depend on the machine's load,
so they are the robust evidence on a shared machine; the extra ops per layer tell what a change must remove.

Example (from the repository root): python -m benchmarks.profile_step --size small --arms weight_B,local_B,flipout_B
"""

from __future__ import annotations

import statistics
import time

from benchmarks import common
from benchmarks.common import torch


PHASES = ("forward", "backward", "optimizer", "kl")


def parse_args(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(common.UNET_CONFIGS))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--targets", default="attn", choices=sorted(common.TARGET_SETS))
    parser.add_argument("--arms", default="weight_B,local_B,flipout_B")
    parser.add_argument("--optim", default="adamw", choices=("adamw", "adamw-foreach", "adamw-fused"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--top", type=int, default=12, help="extra ops listed per phase")
    parser.add_argument(
        "--count-outputs",
        action="store_true",
        help="only count the output elements of the targeted layers in one forward (meta device, no compute)",
    )
    args = parser.parse_args(argv)
    args.batch = args.batch or (1 if args.size == "sd15" else 2)
    return args


def kl_term(trainer: common.Trainer) -> torch.Tensor | None:
    if trainer.arm == common.PLAIN:
        return None
    import bayes_adapter

    return bayes_adapter.kl_loss(trainer.unet, num_examples=1)


def phases(trainer: common.Trainer) -> dict:
    """The four phases of a step as callables run in order (the KL on its own graph, as bench_kl.py)."""
    state = {}

    def forward():
        state["loss"] = trainer.loss()

    def backward():
        state["loss"].backward()

    def optimizer():
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def kl():
        term = kl_term(trainer)
        if term is not None:
            term.backward()
            trainer.optimizer.zero_grad(set_to_none=True)

    return dict(zip(PHASES, (forward, backward, optimizer, kl)))


def op_counts(fn) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


def aten_total(counts: dict[str, int]) -> int:
    return sum(n for key, n in counts.items() if key.startswith("aten::"))


def count_outputs(args) -> dict:
    """Output elements of the targeted layers in one forward: what "local" and "flipout" add full-size work on."""
    with torch.device("meta"):
        unet = common.build_unet(args.size, args.seed)
    inputs = common.train_inputs(args.size, args.batch, args.latent, device="meta")
    counted = {"elements": 0, "layers": 0}

    def hook(module, inp, out):
        counted["elements"] += out.numel()
        counted["layers"] += 1

    targets = common.TARGET_SETS[args.targets]
    for name, module in unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            module.register_forward_hook(hook)
    with torch.no_grad():
        unet(inputs.noisy, inputs.timesteps, encoder_hidden_states=inputs.text)
    payload = {"benchmark": "count_outputs", "machine": common.machine_info(args), **counted}
    path = common.write_json(payload, args.out, f"count_outputs_{args.size}_{args.targets}.json")
    print(
        f"{args.size} UNet, batch {args.batch}, {args.latent}x{args.latent} latents, targets {args.targets}: "
        f"{counted['layers']} layers, {counted['elements']} output elements per forward"
    )
    print(f"JSON: {path}")
    return payload


def main(argv=None) -> dict:
    import bayes_adapter

    args = parse_args(argv)
    common.setup(args)
    if args.count_outputs:
        return count_outputs(args)
    arms = [common.PLAIN] + [a.strip() for a in args.arms.split(",") if a.strip() and a.strip() != common.PLAIN]
    base = common.build_unet(args.size, args.seed)
    inputs = common.train_inputs(args.size, args.batch, args.latent, seed=args.seed)
    trainers = {}
    for arm in arms:
        unet = common.add_adapter(common.share_base_copy(base), arm, common.TARGET_SETS[args.targets], seed=args.seed)
        trainers[arm] = common.Trainer(unet, arm, inputs, include_kl=False, optim=args.optim)
    steps = {arm: phases(t) for arm, t in trainers.items()}
    for arm in arms:  # warm-up
        for fn in steps[arm].values():
            fn()
    cpu = {arm: {p: [] for p in PHASES} for arm in arms}
    for r in range(args.rounds):
        for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
            for phase, fn in steps[arm].items():
                t0 = time.process_time()
                fn()
                cpu[arm][phase].append(time.process_time() - t0)
    counts = {arm: {phase: op_counts(fn) for phase, fn in steps[arm].items()} for arm in arms}
    n_layers = sum(1 for _ in bayes_adapter.bayes_layers(trainers[arms[-1]].unet)) if len(arms) > 1 else 0

    payload = {"benchmark": "profile_step", "machine": common.machine_info(args), "bayes_layers": n_layers, "arms": {}}
    for arm in arms:
        payload["arms"][arm] = {
            phase: {
                "median_cpu_ms": 1000 * statistics.median(cpu[arm][phase]),
                "aten_ops": aten_total(counts[arm][phase]),
                "extra_ops_vs_plain": {
                    key: n - counts[common.PLAIN][phase].get(key, 0)
                    for key, n in counts[arm][phase].items()
                    if n != counts[common.PLAIN][phase].get(key, 0) and not key.startswith("autograd::engine")
                },
            }
            for phase in PHASES
        }
    path = common.write_json(payload, args.out, f"profile_{args.size}_{args.optim}_t{args.threads}.json")
    print(
        f"# Step profile: {args.size} UNet, batch {args.batch}, {args.latent}x{args.latent} latents, targets "
        f"{args.targets} ({n_layers} Bayesian layers), optimizer {args.optim}; CPU ms median of {args.rounds}"
    )
    print(common.load_line(payload["machine"]))
    rows = []
    for arm in arms:
        row = {"arm": arm}
        for phase in PHASES:
            row[f"{phase}_ms"] = payload["arms"][arm][phase]["median_cpu_ms"]
            row[f"{phase}_ops"] = payload["arms"][arm][phase]["aten_ops"]
        row["total_ms"] = sum(row[f"{p}_ms"] for p in PHASES)
        rows.append(row)
    columns = [("arm", "arm", "")]
    for phase in PHASES:
        columns += [(f"{phase}_ms", f"{phase} ms", ".2f"), (f"{phase}_ops", "aten ops", "d")]
    print(common.table(rows, columns + [("total_ms", "total ms", ".2f")]))
    for arm in arms[1:]:
        for phase in PHASES:
            extra = sorted(payload["arms"][arm][phase]["extra_ops_vs_plain"].items(), key=lambda kv: -abs(kv[1]))
            listed = ", ".join(f"{k} {v:+d}" for k, v in extra[: args.top])
            print(f"{arm} {phase} extra ops per step vs plain: {listed or 'none'}")
    print(f"JSON: {path}")
    return payload


if __name__ == "__main__":
    main()
