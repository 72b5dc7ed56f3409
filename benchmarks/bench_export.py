"""Export speed and file size: `bayes_adapter.export_lora` of a Bayesian adapter (default: on an SD1.5-sized UNet).

The UNet is built from its config with random weights, the Bayesian adapter added with `add_adapter` (random
non-zero means). Arms, interleaved: the default export (PEFT + diffusers files) and each format alone, each call
into a fresh folder, from the in-memory model. Reported: median seconds per export, file sizes, and a check that
the diffusers file holds exactly the adapter's means.

Example (from the repository root): python -m benchmarks.bench_export --size sd15 --rounds 5
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

from benchmarks import common
from benchmarks.common import torch


FORMAT_ARMS = {"peft+diffusers": None, "diffusers": "diffusers", "peft": "peft", "kohya": "kohya"}


def parse_args(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", default="sd15", choices=sorted(common.UNET_CONFIGS))
    parser.add_argument("--targets", default="attn", choices=sorted(common.TARGET_SETS))
    parser.add_argument("--arm", default="weight_AB", help="the Bayesian adapter (estimator_factors)")
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from safetensors.torch import load_file

    import bayes_adapter

    args = parse_args(argv)
    common.setup(args)
    payload = {"benchmark": "export", "machine": common.machine_info(args)}
    unet = common.build_unet(args.size, args.seed).to(args.device, common.dtype_of(args.dtype))
    common.add_adapter(unet, args.arm, common.TARGET_SETS[args.targets], r=args.r, seed=args.seed)
    common.randomise_lora(unet, args.seed)
    n_layers = sum(1 for _ in bayes_adapter.bayes_layers(unet))
    adapter_params = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    counter = itertools.count()
    files: dict[str, dict[str, int]] = {}

    with tempfile.TemporaryDirectory() as tmp:
        bayes_adapter.export_lora(unet, Path(tmp) / "warm")  # imports and first-call costs out of the way

        def export(fmt):
            def run():
                out = Path(tmp) / f"out{next(counter)}"
                kwargs = {} if fmt is None else {"format": fmt}
                bayes_adapter.export_lora(unet, out, **kwargs)
                name = [k for k, v in FORMAT_ARMS.items() if v == fmt][0]
                files[name] = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
                if fmt is None:
                    payload["diffusers_file"] = str(out / "pytorch_lora_weights.safetensors")
                    check_means(unet, load_file(out / "pytorch_lora_weights.safetensors"), payload)
                shutil.rmtree(out)

            return run

        times = common.interleaved(
            {name: export(fmt) for name, fmt in FORMAT_ARMS.items()}, args.rounds, args.warmup, args.device
        )
    summary = common.summarise(times, "peft+diffusers")
    for name in summary:
        summary[name]["files"] = files.get(name, {})
        summary[name]["total_mib"] = sum(files.get(name, {}).values()) / 2**20
    payload.update(raw=times, summary=summary, bayes_layers=n_layers, adapter_params_incl_std=adapter_params)
    path = common.write_json(payload, args.out, f"export_{args.size}_t{args.threads}.json")
    print(
        f"# Export: {args.size} UNet, {args.arm}, {n_layers} LoRA layers ({args.targets}, r={args.r}), "
        f"{adapter_params} adapter parameters incl. posterior std"
    )
    print(common.load_line(payload["machine"]))
    print(f"diffusers file holds the means exactly: {payload['means_exact']} ({payload['tensors_checked']} tensors)")
    rows = [
        {"format": name, **s, "file sizes": ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in s["files"].items())}
        for name, s in summary.items()
    ]
    print(
        common.table(
            rows,
            [
                ("format", "format", ""),
                ("n", "n", "d"),
                ("median_wall_s", "median s", ".4f"),
                ("min_wall_s", "min s", ".4f"),
                ("median_cpu_s", "median CPU s", ".4f"),
                ("total_mib", "total MiB", ".2f"),
                ("file sizes", "files", ""),
            ],
        )
    )
    print(f"JSON: {path}")
    return payload


def check_means(unet, exported: dict, payload: dict) -> None:
    """Every exported lora_A / lora_B equals the adapter's mean, bit for bit."""
    state = {k: v for k, v in unet.state_dict().items() if ".lora_A.default." in k or ".lora_B.default." in k}
    exact, checked = True, 0
    for key, value in state.items():
        name = "unet." + key.replace(".default.", ".")
        checked += 1
        exact = exact and name in exported and torch.equal(exported[name], value)
    payload["means_exact"] = exact and checked == len(exported)
    payload["tensors_checked"] = checked


if __name__ == "__main__":
    main()
