"""The `bayes-adapter` console command: `export` a Bayesian adapter to its mean LoRA, `push` it to the Hub,
`evaluate` generated images with the paper's metrics, judge a run's `monitor.jsonl` for the corruption `stage`."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence


EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


MONITOR_HELP = (
    "The run's monitor.jsonl: its corruption-stage verdict (stage, best step) goes into the export summary and the "
    "model card."
)


def _parser() -> argparse.ArgumentParser:
    from .adapter import COMPONENTS
    from .export import DEFAULT_FORMATS, FORMATS
    from .stage import THRESHOLDS

    parser = argparse.ArgumentParser(
        prog="bayes-adapter",
        description="Bayesian LoRA for PEFT: export a trained Bayesian adapter to a plain (mean) LoRA, push it to the "
        "Hugging Face Hub.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,push,evaluate,stage}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--adapter-name", default="default", help="Adapter to export (default: %(default)s).")
    common.add_argument(
        "--component",
        choices=COMPONENTS,
        default=None,
        help="Pipeline component the adapter belongs to (sets the diffusers key prefix); inferred by default.",
    )

    export = commands.add_parser(
        "export",
        parents=[common],
        help="Write the mean of a saved Bayesian adapter as a plain LoRA.",
        description="Collapse a Bayesian LoRA adapter (a folder saved with save_pretrained) to its mean: a plain LoRA "
        "(peft_type LORA, no posterior stds) that loads with PeftModel.from_pretrained and "
        "pipe.load_lora_weights on machines without bayes-adapter.",
    )
    export.add_argument("src", help="Folder of the saved Bayesian adapter (adapter_config.json + safetensors).")
    export.add_argument("out", help="Output folder; must not exist unless --overwrite.")
    export.add_argument(
        "--format",
        nargs="+",
        choices=FORMATS,
        default=list(DEFAULT_FORMATS),
        help="Formats to write (default: %(default)s). kohya: lora_unet_*/lora_te_* keys for ComfyUI and A1111.",
    )
    export.add_argument("--overwrite", action="store_true", help="Replace OUT if it exists.")
    export.add_argument("--monitor", default=None, metavar="PATH", help=MONITOR_HELP)

    push = commands.add_parser(
        "push",
        parents=[common],
        help="Push the mean LoRA and a model card to a Hub repo.",
        description="Export the mean LoRA of a Bayesian adapter (or take an existing export folder) and upload it to "
        "a Hub model repo with a model card, so that pipe.load_lora_weights(REPO_ID) loads it. The token is read "
        "from the stored login or HF_TOKEN; prefer those to --token, which other users can see in the process list.",
    )
    push.add_argument("src", help="Saved Bayesian adapter folder, or a folder written by `bayes-adapter export`.")
    push.add_argument("repo_id", help="Hub repo id, 'user/name' (created if missing).")
    push.add_argument("--token", default=None, help="Hub token with write access (default: stored login / HF_TOKEN).")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None, help="Create it private.")
    visibility.add_argument("--public", dest="private", action="store_false", help="Create it public.")
    push.add_argument(
        "--include-bayesian",
        action="store_true",
        help="Also upload the full Bayesian adapter (with posterior stds) to bayesian/, to resume training.",
    )
    push.add_argument("--base-model", default=None, help="Base model Hub id, for the model card.")
    push.add_argument("--instance-prompt", default=None, help="Prompt the adapter was trained with, for the card.")
    push.add_argument(
        "--validation-image",
        action="append",
        default=None,
        dest="validation_images",
        metavar="PATH",
        help="Image to upload and show in the card's widget (repeatable).",
    )
    push.add_argument("--commit-message", default=None, help="Commit message.")
    push.add_argument("--local-dir", default=None, help="Where to keep the uploaded files (default: a temp folder).")
    push.add_argument("--monitor", default=None, metavar="PATH", help=MONITOR_HELP)

    from .evaluation import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL

    evaluate = commands.add_parser(
        "evaluate",
        help="Score generated images against the subject: CLIP-I, CLIP-T, DINO, DINO diversity (and LPIPS).",
        description="The paper's metrics with real models: CLIP-I and DINO (subject fidelity: mean cosine over all "
        "reference x generated pairs), CLIP-T (prompt fidelity) and DINO diversity (mean 1 - cosine between "
        "generated images). Models are Hub ids or local folders; offline, download them once elsewhere "
        "(`hf download ID`) and pass the folder.",
    )
    evaluate.add_argument("--generated", required=True, help="Folder of generated images.")
    evaluate.add_argument("--reference", required=True, help="Folder of the subject's real images.")
    evaluate.add_argument("--prompt", required=True, help="The prompt the images were generated from (CLIP-T).")
    evaluate.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="CLIP model (default: %(default)s).")
    evaluate.add_argument("--dino-model", default=DEFAULT_DINO_MODEL, help="DINO ViT (default: %(default)s).")
    evaluate.add_argument(
        "--lpips",
        action="store_true",
        help="Also compute LPIPS (AlexNet, v0.1): mean pairwise LPIPS between the generated images (diversity) and "
        "the mean LPIPS from each to its nearest reference. Reads local files only: --lpips-backbone and the "
        "linear weights of the installed lpips package (`pip install --no-deps lpips`).",
    )
    evaluate.add_argument(
        "--lpips-backbone",
        default=None,
        metavar="PATH",
        help="AlexNet's ImageNet weights (torchvision's alexnet-owt-7be5be79.pth); default: torch's hub cache copy.",
    )
    evaluate.add_argument(
        "--lpips-linear-weights",
        default=None,
        metavar="PATH",
        help="LPIPS v0.1 linear weights (lpips/weights/v0.1/alex.pth); default: the installed lpips package's file.",
    )
    evaluate.add_argument("--device", default="cpu", help="Where the models run (default: %(default)s).")
    evaluate.add_argument("--batch-size", type=int, default=8, help="Images per forward pass (default: 8).")
    evaluate.add_argument("--json", default=None, help="Also write the numbers to this JSON file.")

    stage = commands.add_parser(
        "stage",
        help="Did a fine-tuning run go through the corruption stage, and when were its samples best?",
        description="Judge a run's monitor.jsonl (one JSON record per monitored step, as the DreamBooth script "
        "writes; see the README) and print one verdict sentence, then the episodes. Exit 0 whatever the verdict; 2 "
        "for a bad file or threshold.",
    )
    stage.add_argument("path", help="The monitor.jsonl file.")
    stage.add_argument("--json", action="store_true", help="Print the verdict as JSON instead.")
    stage.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Change one of the judge's thresholds (repeatable): "
        + "; ".join(f"{name} (default {default})" for name, (default, _, _) in THRESHOLDS.items())
        + ".",
    )
    return parser


def _export(args: argparse.Namespace) -> int:
    from .export import export_lora

    out = export_lora(
        args.src,
        args.out,
        adapter_name=args.adapter_name,
        component=args.component,
        format=args.format,
        overwrite=args.overwrite,
        monitor=args.monitor,
    )
    print(f"Exported the mean LoRA of {args.src!r} (adapter {args.adapter_name!r}) to {str(out)!r}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import DEFAULT_COMMIT_MESSAGE, push_to_hub

    url = push_to_hub(
        args.src,
        args.repo_id,
        token=args.token,
        private=args.private,
        include_bayesian=args.include_bayesian,
        base_model=args.base_model,
        instance_prompt=args.instance_prompt,
        validation_images=args.validation_images,
        commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
        adapter_name=args.adapter_name,
        component=args.component,
        local_dir=args.local_dir,
        monitor=args.monitor,
    )
    print(f"Pushed to {args.repo_id}: {url}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json
    import os

    from . import evaluation

    generated = evaluation.load_images(args.generated, "--generated")
    reference = evaluation.load_images(args.reference, "--reference")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} is invalid; expected an integer >= 1")
    if args.json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json={args.json!r}: its folder does not exist")
    lpips_model, lpips_files = None, {}
    if args.lpips:
        # LPIPS first: its files are local, so a missing one is reported before the large models load.
        from .lpips import default_backbone_path, find_linear_weights, load_lpips

        lpips_model = load_lpips(args.lpips_backbone, args.lpips_linear_weights, args.device)
        lpips_files = {
            "lpips_backbone": str(args.lpips_backbone or default_backbone_path()),
            "lpips_linear_weights": str(args.lpips_linear_weights or find_linear_weights()),
        }
    elif args.lpips_backbone is not None or args.lpips_linear_weights is not None:
        raise ValueError("--lpips-backbone and --lpips-linear-weights are used only with --lpips; add --lpips")
    result = evaluation.evaluate(
        generated,
        reference,
        args.prompt,
        clip=evaluation.load_clip(args.clip_model, args.device),
        dino_model=evaluation.load_dino(args.dino_model, args.device),
        batch_size=args.batch_size,
        lpips_model=lpips_model,
    )
    result = {**result, "clip_model": args.clip_model, "dino_model": args.dino_model, **lpips_files}
    result["prompt"] = args.prompt
    print("| metric | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


def _parse_thresholds(items: Sequence[str]) -> dict[str, float | int]:
    from .stage import THRESHOLDS, check_thresholds

    thresholds: dict[str, float | int] = {}
    for item in items:
        name, equals, text = item.partition("=")
        name = name.strip()
        if not equals or name not in THRESHOLDS:
            raise ValueError(f"--threshold {item!r}: expected NAME=VALUE with NAME one of {', '.join(THRESHOLDS)}")
        kind = THRESHOLDS[name][1]
        try:
            thresholds[name] = kind(text.strip())
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise ValueError(f"--threshold {item!r}: {text.strip()!r} is not {expected}") from None
    try:
        return check_thresholds(**thresholds)
    except ValueError as error:
        raise ValueError(f"--threshold: {error}") from None


def _stage(args: argparse.Namespace) -> int:
    import json
    import os
    import warnings

    from .stage import judge, read_monitor, saved_checkpoint_steps, verdict_sentence

    thresholds = _parse_thresholds(args.threshold)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_monitor(args.path)
    for warning in caught:
        print(f"bayes-adapter stage: warning: {warning.message}", file=sys.stderr)
    verdict = judge(records, **thresholds)
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=2))
        return 0
    checkpoints = saved_checkpoint_steps(os.path.dirname(os.path.abspath(args.path))) or None  # a run's output folder?
    print(verdict_sentence(verdict, checkpoints))
    for i, episode in enumerate(verdict.episodes, 1):
        outcome = f"recovered at {episode.recovery_step:,}" if episode.recovered else "not recovered"
        cause = " (the loss spiked with it)" if episode.kind == "instability" else ""
        print(f"  episode {i}: {episode.kind}{cause}, steps {episode.start_step:,} to {episode.end_step:,}, {outcome}")
    return 0


# The library's parameter names as this command spells them, for the messages its users read.
_CLI_WORDS = {
    "overwrite=True": "--overwrite",
    "include_bayesian=True": "--include-bayesian",
    "format='kohya'": "--format kohya",
    "adapter_name=": "--adapter-name=",
    "component=": "--component=",
    "model_or_export_dir=": "SRC=",
    "source=": "SRC=",
    "out_dir=": "OUT=",
    "repo_id=": "REPO_ID=",
}
_CLI_WORDS_PATTERN = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, _CLI_WORDS)) + ")")


def cli_words(message: str) -> str:
    """A library message with its Python parameter names replaced by this command's arguments and flags."""
    return _CLI_WORDS_PATTERN.sub(lambda match: _CLI_WORDS[match.group(1)], message)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `bayes-adapter` command.

    Args:
        argv: The arguments (without the program name); `sys.argv[1:]` by default.

    Returns:
        The exit status: 0 on success, 2 for bad input (nothing written), 1 for a failure while working.
    """
    args = _parser().parse_args(argv)
    handler = {"export": _export, "push": _push, "evaluate": _evaluate, "stage": _stage}[args.command]
    try:
        return handler(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as error:
        print(f"bayes-adapter {args.command}: error: {cli_words(str(error))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RuntimeError, OSError) as error:
        print(f"bayes-adapter {args.command}: failed: {cli_words(str(error))}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:  # e.g. safetensors' SafetensorError on a full disk: a message, not a traceback
        print(f"bayes-adapter {args.command}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
