"""Lab v3's commands (PLAN_V3.md): ``run`` (the default), ``controls``, ``study`` and ``report``; dispatched by
``python -m examples.corruption_stage``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch
from tqdm.auto import tqdm

from bayes_adapter.stage import judge, read_monitor, verdict_sentence

from .model.models import CONFIG_FILE, load_model
from .report.run_figure import make_run_figure
from .report.study_report import rejudge_v2, write_study_report
from .study.controls import run_controls
from .study.driver import is_finished, run_study
from .study.plan import SEEDS, STUDIES, gate_refusal, study_model_dir, study_runs
from .study.train import MODEL_DIR, RunSpec, train_run


LAB_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(LAB_DIR, "results")


def _positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def _parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m examples.corruption_stage {name}", description=__doc__)
    if name == "run":
        p.description = (
            "Plain LoRA on the v2f base model and the circle subject: records every --every steps (JSONL, the "
            "package's monitor format), the package judge's verdict, and a figure."
        )
        p.add_argument("--out", default=os.path.join("outputs", "corruption_stage"), help="output folder")
        p.add_argument("--steps", type=int, default=1200)
        p.add_argument("--every", type=int, default=50, help="a record every N steps")
        p.add_argument("--lr", type=float, default=1e-2)
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance of the samples")
        p.add_argument("--samples", type=int, default=12, help="fixed-seed samples per record (default 12)")
        p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per sample (default 25)")
        p.add_argument("--model-dir", default=MODEL_DIR, help="the base model (default: the shipped v2f)")
        p.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch threads (default 1: on a shared machine more threads run slower)",
        )
    elif name == "controls":
        p.add_argument("--out", default=os.path.join(RESULTS_DIR, "controls"))
    elif name == "study":
        p.add_argument("study", choices=STUDIES)
        p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
        p.add_argument("--lr", type=float, help="paper_recipe_arms(_v3w): the learning rate study 1's rule chose")
        p.add_argument("--workers", type=int, default=2, help="runs at once, one thread each (default 2)")
        p.add_argument("--out", help="the study's folder (default results/<study>); runs go to <out>/runs")
        p.add_argument("--list", action="store_true", help="print the runs and whether each is finished, and stop")
    elif name == "report":
        p.add_argument("study", choices=(*STUDIES, "v2"), help="a v3 study, or v2: lab v2's runs judged again")
        p.add_argument("--dir", help="the study's folder (default results/<study>)")
    return p


def main(name: str, argv: list[str]) -> dict:
    parser = _parser(name)
    args = parser.parse_args(argv)
    command = f"python -m examples.corruption_stage {name} " + " ".join(shlex.quote(a) for a in argv)
    if name == "run":
        _positive(parser, args, "steps", "every", "lr", "batch", "threads", "sample_steps")
        if args.samples < 2:
            parser.error(f"--samples must be >= 2, got {args.samples}")
        if not args.guidance >= 1:
            parser.error(f"--guidance must be >= 1, got {args.guidance}")
        return default_run(args, command.strip())
    if name == "controls":
        summary = run_controls(load_model(MODEL_DIR), args.out, command.strip())
        for control, result in summary["controls"].items():
            print(
                f"{control}: {result['sentence']} (declared stage {result['declared_stage']}; as declared: "
                f"{result['as_declared']})"
            )
        return summary
    if name == "study":
        _positive(parser, args, "workers", "lr")
        try:
            specs = study_runs(args.study, tuple(args.seeds), args.lr)
        except ValueError as error:
            parser.error(str(error))
        model_dir = study_model_dir(args.study)
        if not os.path.isfile(os.path.join(model_dir, CONFIG_FILE)):
            parser.error(
                f"study {args.study} fine-tunes {model_dir}, which holds no lab model yet (PLAN_V3.md: pretrain it "
                "and pass gate 1 first)"
            )
        out = os.path.join(args.out or os.path.join(RESULTS_DIR, args.study), "runs")
        try:
            finished = {spec.name: is_finished(out, spec, model_dir) for spec in specs}
        except ValueError as error:
            parser.error(str(error))
        if args.list:
            for spec in specs:
                print(f"{spec.name}: {'finished' if finished[spec.name] else 'to run'}")
            return {}
        refusal = gate_refusal(args.study)
        if refusal:
            parser.error(refusal)
        return {"sentences": run_study(specs, out, command.strip(), workers=args.workers, model_dir=model_dir)}
    study_dir = args.dir or os.path.join(RESULTS_DIR, args.study)
    if args.study == "v2":
        summary = rejudge_v2(study_dir)
        for row in summary["judged"]:
            print(f"{row['file']} {row['arm']} seed {row['seed']}: {row['sentence']}")
        print(
            f"{summary['with_stage']} of {summary['runs']} runs with a corruption stage; "
            f"{summary['with_instability']} with an instability; {summary['with_clean_copy']} reach a clean copy"
        )
        return summary
    if not os.path.isdir(os.path.join(study_dir, "runs")):
        parser.error(f"--dir {study_dir!r} holds no runs/ folder (run `study {args.study}` first)")
    try:
        summary = write_study_report(args.study, study_dir)
    except ValueError as error:
        parser.error(str(error))
    print(open(os.path.join(study_dir, "summary.md")).read())
    return summary


def default_run(args: argparse.Namespace, command: str) -> dict:
    torch.set_num_threads(args.threads)
    start = time.time()
    spec = RunSpec(
        arm="lora",
        lr=args.lr,
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        schedules=((args.guidance, args.every),),
        n_samples=args.samples,
        sample_steps=args.sample_steps,
    )
    try:
        base = load_model(args.model_dir)
    except FileNotFoundError as error:
        print(f"error: --model-dir {args.model_dir!r}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    path = spec.record_path(args.out, args.guidance)
    if os.path.exists(path):
        os.remove(path)
    with tqdm(total=spec.steps, desc="fine-tuning (plain LoRA, v2f circle)", mininterval=2.0) as bar:
        result = train_run(base, spec, args.out, progress=bar.update, keep_samples=6)
    records = read_monitor(path)
    verdict = judge(records)
    figure = os.path.join(args.out, "corruption_stage.png")
    make_run_figure(records, verdict, result["samples"], figure, title=f"{command}")
    print(verdict_sentence(verdict))
    print(
        f"records: {path} (read it with `bayes-adapter stage {path}`); figure: {figure}; {time.time() - start:.0f} s"
    )
    return {"records": path, "figure": figure, "verdict": verdict.to_dict(), "seconds": time.time() - start}
