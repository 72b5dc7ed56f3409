"""Every lab v2 number in RESULTS.md, recomputed: the commands that produced them, in the order they ran.

    python -m examples.corruption_stage reproduce --list      # the steps, their outputs and rough times
    python -m examples.corruption_stage reproduce             # all of them (~15 h on 2 cores)
    python -m examples.corruption_stage reproduce --from 9    # resume at step 9

Each step runs as its own process from the repository root and overwrites the file it names; a base model's later
steps read the folder the earlier step wrote, so run them in order. RESULTS.md quotes exactly these commands (a test
checks both ways). Each JSON records the settings it ran with; a step rerun with today's code on another CPU agrees
with the committed file to float32 rounding at best (training over thousands of steps amplifies rounding).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass


LAB = "examples/corruption_stage"
MODELS = f"{LAB}/model"
RESULTS = f"{LAB}/results/v2"
CIRCLE = f"{RESULTS}/v2f_circle"  # lab v2's subject after the class change: the checker on a circle
CIRCLE_ARMS = " ".join(f"{CIRCLE}_lr1e-2_arms_seed{seed}/results.json" for seed in (0, 1, 2))
T2 = "--classifier-steps 12000 --classifier-images 28000 --classifier-cosine"


@dataclass(frozen=True)
class Step:
    command: str  # a subcommand of `python -m examples.corruption_stage` and its options
    minutes: int  # on the 2-core machine the results came from, rounded

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "examples.corruption_stage", *shlex.split(self.command)]

    @property
    def quoted(self) -> str:
        """The step as RESULTS.md quotes it."""
        return f"python -m examples.corruption_stage {self.command}"


V2_STEPS = (
    Step(f"autoencoder-pilot --steps 1500 --out {RESULTS}/v2_autoencoder_pilot.json", 60),
    Step(f"pretrain --v2 --out {MODELS}/base_model_v2 --preview {RESULTS}/v2_base_model_preview.png", 125),
    Step(
        f"autoencoder-pilot --score-model {MODELS}/base_model_v2/autoencoder --out {RESULTS}/v2_autoencoder_rescore.json",
        1,
    ),
    Step(f"gate --model-dir {MODELS}/base_model_v2 --out {RESULTS}/v2_gate.json", 35),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2 --arm full --lr 1e-3 --classifier-steps 0 --workers 2 "
        f"--out {RESULTS}/v2_gate_full.json",
        30,
    ),
    Step(f"x0-probe --model-dir {MODELS}/base_model_v2 --steps 600 --out {RESULTS}/v2_x0_probe.json", 5),
    Step(
        f"pretrain --v2 --unet-steps 3000 --prediction-type v_prediction --autoencoder-from "
        f"{MODELS}/base_model_v2/autoencoder --out {MODELS}/base_model_v2b --preview {RESULTS}/v2b_base_model_preview.png",
        45,
    ),
    Step(f"x0-probe --model-dir {MODELS}/base_model_v2b --steps 600 --out {RESULTS}/v2b_x0_probe.json", 5),
    Step(f"gate --model-dir {MODELS}/base_model_v2b {T2} --workers 2 --out {RESULTS}/v2b_gate.json", 25),
    Step(
        f"pretrain --v2 --unet-steps 3000 --denoiser-from {MODELS}/base_model_v2b --out {MODELS}/base_model_v2c "
        f"--preview {RESULTS}/v2c_base_model_preview.png",
        45,
    ),
    Step(f"gate --model-dir {MODELS}/base_model_v2c --seeds {T2} --out {RESULTS}/v2c_gate1.json", 15),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2c --classifier-steps 0 --workers 2 --out {RESULTS}/v2c_gate23.json",
        25,
    ),
    Step(
        f"render-probe --model-dirs {MODELS}/base_model_v2 {MODELS}/base_model_v2b {MODELS}/base_model_v2c "
        f"--out {RESULTS}/v2_render_probe.json",
        15,
    ),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2c --steps 600 --eval-every 25 --classifier-steps 0 --workers 2 "
        f"--out {RESULTS}/v2c_early_probe.json",
        10,
    ),
    Step(
        f"pretrain --v2 --unet-steps 3000 --denoiser-from {MODELS}/base_model_v2c --pooled-condition --out "
        f"{MODELS}/base_model_v2d --preview {RESULTS}/v2d_base_model_preview.png",
        47,
    ),
    Step(f"gate --model-dir {MODELS}/base_model_v2d --seeds {T2} --out {RESULTS}/v2d_gate1.json", 20),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2d --classifier-steps 0 --workers 2 --out {RESULTS}/v2d_gate23.json",
        25,
    ),
    Step(
        f"render-probe --model-dirs {MODELS}/base_model_v2c {MODELS}/base_model_v2d --out {RESULTS}/v2d_render_probe.json",
        15,
    ),
    Step(
        f"pretrain --v2 --unet-steps 3000 --denoiser-from {MODELS}/base_model_v2d --out {MODELS}/base_model_v2e "
        f"--preview {RESULTS}/v2e_base_model_preview.png",
        61,
    ),
    Step(f"gate --model-dir {MODELS}/base_model_v2e --seeds {T2} --out {RESULTS}/v2e_gate1.json", 13),
    Step(
        f"pretrain --v2 --unet-steps 3000 --denoiser-from {MODELS}/base_model_v2e --out {MODELS}/base_model_v2f "
        f"--preview {RESULTS}/v2f_base_model_preview.png",
        45,
    ),
    Step(f"gate --model-dir {MODELS}/base_model_v2f --seeds {T2} --out {RESULTS}/v2f_gate1.json", 14),
    Step(
        f"render-probe --model-dirs {MODELS}/base_model_v2f --eval-seed 20000 "
        f"--out {RESULTS}/v2f_render_probe_seed20000.json",
        15,
    ),
    Step(f"gate --model-dir {MODELS}/base_model_v2f --subject-kind circle --seeds {T2} --out {CIRCLE}_gate1.json", 14),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2f --subject-kind circle --classifier-steps 0 --workers 2 "
        f"--out {CIRCLE}_gate23.json",
        24,
    ),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2f --subject-kind circle --lr 1e-2 --classifier-steps 0 --workers 2 "
        f"--out {CIRCLE}_gate23_lr1e-2.json",
        16,
    ),
    *(
        Step(
            f"experiment --v2 --model-dir {MODELS}/base_model_v2f --subject-kind circle --lr 1e-2 --arms lora bayes_paper bayes_kl "
            f"fixed_noise lora_dropout l2 --seeds {seed} --steps 3000 --eval-every 100 --workers 2 "
            f"--out {CIRCLE}_lr1e-2_arms_seed{seed}",
            24,
        )
        for seed in (0, 1, 2)
    ),
    Step(f"frontier {CIRCLE_ARMS} --out {CIRCLE}_lr1e-2_arms_frontier.png", 1),
    Step(f"reading {CIRCLE_ARMS} --out {CIRCLE}_lr1e-2_arms_reading.json", 1),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2f --subject-kind circle --arm full --lr 1e-3 --steps 600 --eval-every 25 "
        f"--classifier-steps 0 --workers 2 --out {CIRCLE}_gate23_full.json",
        6,
    ),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2f --subject-kind circle --seeds 0 --classifier-steps 0 --workers 1 "
        f"--lr 3e-2 --out {CIRCLE}_pilot_lr3e-2.json",
        8,
    ),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2f --subject-kind circle --seeds 0 --classifier-steps 0 --workers 1 "
        f"--lr 1e-2 --rank 16 --out {CIRCLE}_pilot_rank16.json",
        8,
    ),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2f --subject-kind circle --seeds 0 --classifier-steps 0 --workers 1 "
        f"--lr 1e-2 --guidance 1 --out {CIRCLE}_pilot_guidance1.json",
        7,
    ),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2f --subject-kind circle --seeds 0 --classifier-steps 0 --workers 1 "
        f"--lr 1e-2 --guidance 7.5 --out {CIRCLE}_pilot_guidance7.5.json",
        7,
    ),
    Step(
        f"gate --model-dir {MODELS}/base_model_v2f --subject-kind circle --seeds 0 --classifier-steps 0 --workers 1 "
        f"--lr 1e-2 --prior-loss-weight 1 --out {CIRCLE}_pilot_prior1.json",
        11,
    ),
)


def run(steps: tuple[Step, ...] = V2_STEPS, start: int = 1) -> None:
    """Runs ``steps[start - 1:]`` in order, each as a child process; stops at the first that fails."""
    if not 1 <= start <= len(steps):
        raise ValueError(f"start must be in 1..{len(steps)}, got {start}")
    for number, step in enumerate(steps[start - 1 :], start):
        print(f"[{number}/{len(steps)}] {step.quoted} (~{step.minutes} min)", flush=True)
        t0 = time.time()
        subprocess.run(step.argv, check=True)
        print(f"[{number}/{len(steps)}] done in {time.time() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the steps and stop")
    parser.add_argument("--from", dest="start", type=int, default=1, help="first step to run (1-based)")
    args = parser.parse_args(argv)
    if not 1 <= args.start <= len(V2_STEPS):
        parser.error(f"--from must be in 1..{len(V2_STEPS)}, got {args.start}")
    if args.list:
        for number, step in enumerate(V2_STEPS, 1):
            print(f"{number:2d}. ~{step.minutes:3d} min  {step.quoted}")
        print(f"in all ~{sum(s.minutes for s in V2_STEPS) / 60:.1f} h")
        return
    try:
        run(start=args.start)
    except subprocess.CalledProcessError as error:
        print(f"error: step {' '.join(error.cmd[2:])} exited with {error.returncode}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
