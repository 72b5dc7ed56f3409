"""Inference: the exported mean LoRA vs a plain LoRA of the same shape vs the fused model, in a diffusers pipeline.

One StableDiffusionPipeline (a UNet built from a config with random weights, a small CLIP text encoder of the
UNet's cross-attention width, a tiny VAE, DDIM). Every arm is its own UNet module tree over the same frozen base
weights, in its own pipeline sharing the other components:

- `bayes_eval`: the Bayesian adapter itself (random non-zero means, posterior std 0.01), in eval mode.
- `exported`: `bayes_adapter.export_lora` of that adapter, loaded with `pipe.load_lora_weights` (diffusers file).
- `plain_lora`: a plain PEFT LoRA (same targets, r, alpha) holding the same A and B, added with `add_adapter`.
- `plain_lora_again`: a second, identical plain LoRA: its ratio to `plain_lora` is the noise floor (A/A test).
- `fused`: the exported LoRA fused into a private copy of the base weights (`fuse_lora` + `unload_lora_weights`).
- `base`: the UNet without any adapter (what LoRA itself costs).

Arms are interleaved (one pipeline call each per round, order rotated). Reported: median latency, ratios to
`plain_lora`, and the max abs difference of the output images (float, before any uint8 rounding) to `bayes_eval`.

Example (from the repository root): python -m benchmarks.bench_inference --size small --steps 4 --rounds 10
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from benchmarks import common
from benchmarks.common import torch


PROMPT = "a photo of sks dog"


def build_components(size: str, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny_models import tiny_scheduler, tiny_tokenizer, tiny_vae

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    width = common.UNET_CONFIGS[size]["cross_attention_dim"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=max(1, width // 64) if width >= 64 else 2,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
        )
    )
    scheduler = tiny_scheduler()
    return dict(
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def pipeline(components: dict, unet):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(unet=unet, **components)


def parse_args(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(common.UNET_CONFIGS))
    parser.add_argument("--latent", type=int, default=32, help="latent height and width")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per pipeline call")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale (> 1 doubles the UNet batch)")
    parser.add_argument("--targets", default="attn", choices=sorted(common.TARGET_SETS))
    parser.add_argument("--arm", default="weight_B", help="the Bayesian adapter (estimator_factors)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    import bayes_adapter

    args = parse_args(argv)
    common.setup(args)
    payload = {"benchmark": "inference", "machine": common.machine_info(args)}
    dtype = common.dtype_of(args.dtype)
    targets = common.TARGET_SETS[args.targets]
    components = build_components(args.size, args.seed)
    for name in ("vae", "text_encoder"):
        components[name].to(args.device, dtype)
    base = common.build_unet(args.size, args.seed).to(args.device, dtype).eval()

    bayes = common.add_adapter(common.share_base_copy(base), args.arm, targets, seed=args.seed)
    common.randomise_lora(bayes, args.seed)
    bayes.eval()
    plain = common.add_adapter(common.share_base_copy(base), common.PLAIN, targets, seed=args.seed)
    plain.load_state_dict(
        {k: v for k, v in bayes.state_dict().items() if ".lora_A." in k or ".lora_B." in k}, strict=False
    )
    plain.eval()

    plain_again = common.add_adapter(common.share_base_copy(base), common.PLAIN, targets, seed=args.seed)
    plain_again.load_state_dict(plain.state_dict(), strict=False)
    plain_again.eval()
    pipes = {
        "bayes_eval": pipeline(components, bayes),
        "plain_lora": pipeline(components, plain),
        "plain_lora_again": pipeline(components, plain_again),
    }
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = Path(tmp) / "export"
        bayes_adapter.export_lora(bayes, export_dir)
        pipes["exported"] = pipeline(components, common.share_base_copy(base))
        pipes["exported"].load_lora_weights(str(export_dir))
        pipes["fused"] = pipeline(components, copy.deepcopy(base))  # private weights: fusing rewrites them
        pipes["fused"].load_lora_weights(str(export_dir))
    pipes["fused"].fuse_lora(components=["unet"])
    pipes["fused"].unload_lora_weights()
    pipes["base"] = pipeline(components, base)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)

    size_px = args.latent * pipes["base"].vae_scale_factor
    outputs = {}

    def call(name):
        def run():
            generator = torch.Generator(device="cpu").manual_seed(args.seed)
            with torch.inference_mode():
                image = pipes[name](
                    PROMPT,
                    height=size_px,
                    width=size_px,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    generator=generator,
                    output_type="np",
                ).images
            outputs[name] = image
            return image

        return run

    times = common.interleaved({name: call(name) for name in pipes}, args.rounds, args.warmup, args.device)
    summary = common.summarise(times, "plain_lora")
    reference = torch.from_numpy(outputs["bayes_eval"])
    for name in pipes:
        summary[name]["max_abs_diff_vs_bayes_eval"] = float((torch.from_numpy(outputs[name]) - reference).abs().max())
    n_lora = sum(1 for _ in bayes_adapter.bayes_layers(bayes))
    payload.update(raw=times, summary=summary, lora_layers=n_lora, image_px=size_px)
    path = common.write_json(payload, args.out, f"inference_{args.size}_t{args.threads}.json")
    print(
        f"# Inference: {args.size} UNet, {n_lora} LoRA layers ({args.targets}, r=4), {args.latent}x{args.latent} "
        f"latents, {args.steps} DDIM steps, CFG {args.guidance}, {args.dtype} on {args.device}"
    )
    print(common.load_line(payload["machine"]))
    rows = [{"arm": name, **s} for name, s in summary.items()]
    print(
        common.table(
            rows,
            [
                ("arm", "arm", ""),
                ("n", "n", "d"),
                ("median_wall_s", "median s / call", ".4f"),
                ("ratio_wall", "ratio to plain LoRA (medians)", ".3f"),
                ("paired_ratio_wall", "ratio (paired)", ".3f"),
                ("ratio_cpu", "CPU ratio", ".3f"),
                ("max_abs_diff_vs_bayes_eval", "max abs diff vs bayes_eval", ".3g"),
            ],
        )
    )
    print(f"JSON: {path}")
    return payload


if __name__ == "__main__":
    main()
