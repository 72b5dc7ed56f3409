"""Quantised bases: base-weight memory and training step time, Bayesian LoRA against plain PEFT LoRA on the same base.

The model is `SD3Transformer2DModel` (`bench_dit_train_step.DIT_CONFIGS`, random weights, float32). Bases: "none"
(unquantised), "bnb_nf4" (bitsandbytes 4-bit NormalFloat) and "torchao_int8" (torchao int8 weight-only), each
applied by `bayes_adapter.quantization.quantize_linears` to the adapter's targets (diffusers' SD3 DreamBooth LoRA
targets, `bench_dit_train_step.DIT_TARGETS`). On every base two adapters, r=4: "plain" (PEFT's LoraConfig, which
dispatches to PEFT's own quantised LoRA layers) and "weight_B" (BayesLoraConfig, KL weight 1).

Memory: the bytes of the base's parameters and buffers as stored (a quantised tensor at its packed size: bitsandbytes'
uint8 / int8 data and its quantisation statistics, torchao's int8 data and scales), for the whole transformer and for
the targeted layers alone. Timing: one process, each base built once and shared by its two arms
(`common.share_base_copy`), every arm one step per round, the order rotated each round, after warm-up steps; a step
is forward, MSE to a random target (+ the KL for weight_B), backward, AdamW step, zero_grad.

Example: python -m benchmarks.bench_quantized --size small --rounds 5 --warmup 1
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from benchmarks import common
from benchmarks.bench_dit_train_step import DIT_CONFIGS, DIT_TARGETS, build_dit, dit_inputs, make_trainer
from benchmarks.common import torch


BASES = ("none", "bnb_nf4", "torchao_int8")
ARMS = (common.PLAIN, "weight_B")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(DIT_CONFIGS))
    parser.add_argument("--bases", default=",".join(BASES), help=f"comma list of {BASES}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=32, help="latent height and width")
    parser.add_argument("--text_tokens", type=int, default=77)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    args.base_list = [b.strip() for b in args.bases.split(",") if b.strip()]
    unknown = [b for b in args.base_list if b not in BASES]
    if unknown or not args.base_list:
        parser.error(f"--bases: expected a comma list of {BASES}, got {args.bases!r}")
    return args


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor as stored: a tensor subclass (torchao) by its inner tensors, bitsandbytes' 4-bit weight
    with its quantisation state."""
    if hasattr(tensor, "__tensor_flatten__") and not isinstance(tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    inner = getattr(tensor, "data", tensor)
    if hasattr(inner, "__tensor_flatten__") and type(inner) is not torch.Tensor:
        return stored_bytes(inner)
    size = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        size += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values() if torch.is_tensor(v))
    scales = getattr(tensor, "SCB", None)
    if torch.is_tensor(scales):
        size += scales.numel() * scales.element_size()
    return size


def base_bytes(model: torch.nn.Module, targets_only: bool) -> int:
    """Stored bytes of the base weights (adapters excluded), of the whole model or of the targeted layers only."""
    total = 0
    for name, module in model.named_modules():
        if targets_only and not any(name == t or name.endswith("." + t) for t in DIT_TARGETS):
            continue
        for tensor_name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if "lora_" not in f"{name}.{tensor_name}":
                total += stored_bytes(tensor)
    return total


def build_base(args: argparse.Namespace, base: str) -> torch.nn.Module:
    model = build_dit(args.size, torch.float32, args.device, args.seed)
    if base != "none":
        from bayes_adapter.quantization import quantize_linears

        quantize_linears(model, base, DIT_TARGETS)
    return model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bitsandbytes' kernel download on some CPUs
    args = parse_args(argv)
    common.setup(args)
    machine = common.machine_info(args)
    inputs = dit_inputs(args, torch.float32)
    memory, steps, layer_types = {}, {}, {}
    for base in args.base_list:
        model = build_base(args, base)
        memory[base] = {"base_bytes": base_bytes(model, False), "target_bytes": base_bytes(model, True)}
        for arm in ARMS:
            trainer = make_trainer(common.share_base_copy(model), arm, args, inputs)
            layer = trainer.unet.transformer_blocks[0].attn.to_q
            layer_types[f"{base}/{arm}"] = type(layer).__name__
            steps[f"{base}/{arm}"] = trainer.step
    times = common.interleaved(steps, args.rounds, args.warmup, args.device)
    summary = common.summarise(times, f"{args.base_list[0]}/{common.PLAIN}")
    rows = []
    for key, stats in summary.items():
        base, arm = key.split("/")
        plain = summary[f"{base}/{common.PLAIN}"]
        rows.append(
            {
                "base": base,
                "arm": arm,
                "layer": layer_types[key],
                "base_mib": memory[base]["base_bytes"] / 2**20,
                "target_mib": memory[base]["target_bytes"] / 2**20,
                "step_s": stats["median_wall_s"],
                "vs_plain_same_base": stats["median_wall_s"] / plain["median_wall_s"],
                "vs_unquantised_same_arm": stats["median_wall_s"]
                / summary[f"{args.base_list[0]}/{arm}"]["median_wall_s"],
            }
        )
    columns = [
        ("base", "base", ""),
        ("arm", "adapter", ""),
        ("layer", "LoRA layer", ""),
        ("base_mib", "base weights MiB", ".2f"),
        ("target_mib", "targeted layers MiB", ".2f"),
        ("step_s", "step s (median)", ".4f"),
        ("vs_plain_same_base", "vs plain LoRA, same base", ".3f"),
        ("vs_unquantised_same_arm", f"vs {args.base_list[0]} base, same adapter", ".3f"),
    ]
    print(common.table(rows, columns))
    payload = {"machine": machine, "memory": memory, "summary": summary, "rows": rows, "times": times}
    path = common.write_json(payload, args.out, f"quantized_{args.size}_t{args.threads}.json")
    print(common.load_line(payload["machine"]), file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
