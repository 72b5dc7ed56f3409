"""Runs a study's runs two (``workers``) at a time, one file per run, so that a study spans sessions: a finished
run (its ``<run>.json`` exists) is skipped, an unfinished one continues from its last checkpoint
(``<run>.resume.pt``, every 250 steps) or, without one, restarts from the start."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from bayes_adapter.stage import judge, read_monitor, verdict_sentence

from ..model.models import load_model
from .train import MODEL_DIR, RunSpec, train_run


RESUME_EVERY = 250


def run_file(out_dir: str, spec: RunSpec) -> str:
    return os.path.join(out_dir, f"{spec.name}.json")


def resume_file(out_dir: str, spec: RunSpec) -> str:
    """The unfinished run's checkpoint, removed once its run file is written."""
    return os.path.join(out_dir, f"{spec.name}.resume.pt")


def is_finished(out_dir: str, spec: RunSpec, model_dir: str = MODEL_DIR) -> bool:
    """Whether ``spec`` has its run file in ``out_dir``; one that fine-tuned another base model is refused, so that
    a study on a new base model never counts another model's runs as its own."""
    path = run_file(out_dir, spec)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        theirs = json.load(f).get("base_model", os.path.basename(MODEL_DIR))  # runs before the field: v2f
    mine = os.path.basename(os.path.normpath(model_dir))
    if theirs != mine:
        raise ValueError(f"{path} fine-tuned {theirs}, but this study fine-tunes {mine}; give the study its own --out")
    return True


def run_one(spec: RunSpec, out_dir: str, command: str, model_dir: str = MODEL_DIR) -> str:
    """Trains ``spec`` from its checkpoint, or from the start with its partial record files removed first, and writes
    ``<run>.json`` last; returns the primary records' verdict sentence."""
    torch.set_num_threads(1)  # one thread per run: two runs share the two cores
    checkpoint = resume_file(out_dir, spec)
    if not os.path.exists(checkpoint):
        for guidance, _ in spec.schedules:
            path = spec.record_path(out_dir, guidance)
            if os.path.exists(path):
                os.remove(path)
    start = time.time()
    result = train_run(load_model(model_dir), spec, out_dir, resume_path=checkpoint, resume_every=RESUME_EVERY)
    result.update(
        command=command,
        base_model=os.path.basename(os.path.normpath(model_dir)),
        seconds=round(time.time() - start + result.pop("seconds_before_resume"), 1),  # of the steps kept
        torch_threads=1,
    )
    tmp = run_file(out_dir, spec) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, run_file(out_dir, spec))
    if os.path.exists(checkpoint):
        os.remove(checkpoint)
    primary = read_monitor(spec.record_path(out_dir, spec.schedules[0][0]))
    return f"{spec.name}: {verdict_sentence(judge(primary))}"


def run_study(
    specs: list[RunSpec], out_dir: str, command: str, workers: int = 2, model_dir: str = MODEL_DIR
) -> list[str]:
    """Runs the unfinished ``specs`` into ``out_dir``: ``workers`` at a time in spawned one-thread processes, or in
    this process with ``workers=1``; a failed run is reported and stops no other."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    os.makedirs(out_dir, exist_ok=True)
    todo = [spec for spec in specs if not is_finished(out_dir, spec, model_dir)]
    skipped = len(specs) - len(todo)
    if skipped:
        print(f"{skipped} of {len(specs)} runs already finished in {out_dir}; skipped")
    with open(os.path.join(out_dir, "plan.json"), "w") as f:
        json.dump({"command": command, "runs": [asdict(spec) | {"name": spec.name} for spec in specs]}, f, indent=1)
    sentences = []
    with tqdm(total=len(todo), desc="runs", unit="run") as bar:

        def finished(name: str, job: Callable[[], str]) -> None:
            try:
                sentence = job()
            except Exception as error:  # one failed run (e.g. an arm this package cannot build) stops no other
                sentence = f"{name}: failed: {type(error).__name__}: {error}"
            sentences.append(sentence)
            tqdm.write(sentence)
            bar.update(1)

        if workers == 1:
            for spec in todo:
                finished(spec.name, functools.partial(run_one, spec, out_dir, command, model_dir))
            return sentences
        context = multiprocessing.get_context("spawn")  # fork would copy this process's torch threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(run_one, spec, out_dir, command, model_dir): spec for spec in todo}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future].name, future.result)
    return sentences
