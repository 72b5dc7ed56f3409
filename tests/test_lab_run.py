"""Lab v3's commands (`python -m examples.corruption_stage [run|controls|study|report|...]`), the default run's
figure, and a study's reading off its run files (examples/corruption_stage/report/study_report.py)."""

import json
import os
import subprocess
import sys

import pytest

from bayes_adapter.stage import MonitorRecord, append_monitor_record, read_monitor
from examples.corruption_stage import __main__ as lab
from examples.corruption_stage.report import study_report
from examples.corruption_stage.report.run_figure import drawn_panels
from examples.corruption_stage.study import plan
from examples.corruption_stage.study.train import RunSpec


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lab(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "examples.corruption_stage", *argv], cwd=ROOT, capture_output=True, text=True, env=env
    )


def test_the_lab_lists_its_subcommands_and_refuses_an_unknown_one():
    listing = _lab("--help")
    assert listing.returncode == 0
    assert all(name in listing.stdout for name in ("run", "controls", "study", "report", "gate", "reproduce"))
    unknown = _lab("frobnicate")
    assert unknown.returncode == 2 and "error: unknown subcommand 'frobnicate'" in unknown.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--steps", "0"], "--steps must be positive, got 0"),
        (["--lr", "-1"], "--lr must be positive, got -1.0"),  # no subcommand: `run`
        (["run", "--samples", "1"], "--samples must be >= 2, got 1"),
        (["run", "--guidance", "0.5"], "--guidance must be >= 1, got 0.5"),
        (["run", "--model-dir", "nowhere"], "error: --model-dir 'nowhere'"),
        (["study", "nope"], "invalid choice: 'nope'"),
        (["study", "paper_recipe_arms"], "needs the learning rate study 1's rule chose"),
        (["study", "paper_recipe_arms_v3w"], "study paper_recipe_arms_v3w needs the learning rate"),
        (["study", "paper_recipe", "--workers", "0"], "--workers must be positive, got 0"),
        (["report", "paper_recipe", "--dir", "nowhere"], "holds no runs/ folder"),
    ],
)
def test_the_commands_refuse_bad_arguments_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:  # in process: a subprocess per case would cost seconds of imports
        lab.main([*argv, *(["--out", str(tmp_path / "out")] if argv[0] in ("run", "--lr") else [])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert message in err and "error:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_study_whose_base_model_is_not_built_yet_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(plan.STUDY_BASE_MODELS, "paper_recipe_v3w", (("base_model_not_built", "no_gate1.json"),))
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["study", "paper_recipe_v3w", "--list", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "base_model_not_built, which holds no lab model yet" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_the_default_run_writes_records_the_verdict_and_a_figure(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--steps", "2", "--every", "1", "--samples", "2", "--sample-steps", "2"]
    result = lab.main([*argv, "--out", str(out)])
    records = read_monitor(result["records"])
    assert [r.step for r in records] == [0, 1, 2] and result["records"].endswith("lora_lr1e-2_seed0_g3.jsonl")
    printed = capsys.readouterr().out
    assert "best samples at step" in printed and "bayes-adapter stage" in printed
    assert os.path.getsize(result["figure"]) > 10_000
    assert result["verdict"]["num_records"] == 3


def test_the_figure_names_a_measure_that_never_moves_instead_of_drawing_it():
    records = [MonitorRecord(step=s, fidelity=0.1 * s, noise_energy=1.0 - 0.1 * s, noise_whiteness=0.3, copy_rate=0.0)
               for s in range(4)]  # fmt: skip
    drawn, dropped = drawn_panels(records)
    assert [key for key, _ in drawn] == ["fidelity", "noise_energy"]
    assert dropped == ["noise_whiteness constant at 0.3", "copy_rate constant at 0", "loss not measured"]


def _write_run(
    runs_dir, spec: RunSpec, fidelity: list[float], energy=None, whiteness=None, copies=None, base_model=None
):
    """A finished run: its primary record file (one record per 100 steps) and its run file (``base_model`` recorded
    as runs since the v3w studies record it)."""
    n = len(fidelity)
    energy, whiteness, copies = energy or [0.01] * n, whiteness or [0.3] * n, copies or [0.0] * n
    guidance = spec.schedules[0][0]
    for i in range(n):
        record = MonitorRecord(
            i * 100, fidelity[i], energy[i], whiteness[i], copy_rate=copies[i], fidelity_ceiling=1.0
        )
        append_monitor_record(spec.record_path(str(runs_dir), guidance), record)
    run = {"name": spec.name, "spec": {**spec.__dict__}, **({"base_model": base_model} if base_model else {})}
    (runs_dir / f"{spec.name}.json").write_text(json.dumps(run))


STAGE = dict(
    fidelity=[0.0, 0.9, 0.5, 0.5, 0.5, 0.99, 0.99, 0.99],
    energy=[2.0, 0.2, 0.5, 0.5, 0.5, 0.01, 0.01, 0.01],
    whiteness=[0.3, 0.3, 0.55, 0.55, 0.55, 0.3, 0.3, 0.3],
    copies=[0.0] * 5 + [1.0] * 3,
)


def test_the_paper_recipe_reading_counts_seeds_per_learning_rate(tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    spec = dict(arm="lora", steps=700, batch=1, schedules=((7.5, 100),))
    _write_run(runs_dir, RunSpec(lr=3e-3, seed=0, **spec), **STAGE)
    _write_run(runs_dir, RunSpec(lr=3e-3, seed=1, **spec), **STAGE)
    _write_run(runs_dir, RunSpec(lr=6e-3, seed=0, **spec), [0.0, 0.8, 0.9, 0.99], copies=[0, 0, 0, 1.0])
    summary = study_report.write_study_report("paper_recipe", str(tmp_path))
    reading = summary["reading"]
    assert reading["3e-3"] == {"seeds_run": 2, "seeds_with_stage": 2, "stage_appears": True}
    assert reading["6e-3"] == {"seeds_run": 1, "seeds_with_stage": 0, "stage_appears": None}  # 2 seeds to come
    run = next(r for r in summary["runs"] if r["name"] == "lora_lr3e-3_seed0")
    judged = study_report.primary(run)
    assert judged["verdict"]["fit_step"] == 100 and judged["verdict"]["first_copy_step"] == 500
    assert judged["gap_ratio"] == 5.0 and judged["records_between_fit_and_copy"] == 3
    assert judged["max_noise_energy"] == pytest.approx(2.0) and judged["min_fidelity_after_fit"] == pytest.approx(0.5)
    assert "| lora_lr3e-3_seed0 | 7.5 | True | 100 | 500 | 5.0 |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "paper_recipe.png").stat().st_size > 10_000


def test_the_bounded_std_reading_applies_issue_32s_pass_rule(tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    spec = dict(steps=300, batch=4, schedules=((3.0, 100),))
    for seed in range(3):
        for lr in (1e-2, 3e-3):
            _write_run(runs_dir, RunSpec("bayes_default", lr, seed, **spec), [0.0, 0.8, 0.8 + 0.01 * seed, 0.8])
            collapse = [0.0, 0.8, 0.3, 0.8] if lr == 1e-2 else [0.0, 0.8, 0.8 + 0.01 * seed, 0.8]
            _write_run(runs_dir, RunSpec("bayes_paper", lr, seed, **spec), collapse)
    summary = study_report.write_study_report("bounded_std", str(tmp_path))
    reading = summary["reading"]
    assert reading["rule_a"] is True and reading["rule_b"] is True  # equal means at 3e-3 pass
    assert reading["unbounded_records_after_fit_below_0.5"]["bayes_paper_lr1e-2_seed0"] == 1
    collapsed = next(r for r in summary["runs"] if r["name"] == "bayes_paper_lr1e-2_seed0")
    assert study_report.primary(collapsed)["min_fidelity_after_fit"] == pytest.approx(0.3)
    assert reading["comparison"]["1e-2"]["within_2_std"]["final_fidelity"] is True
    assert reading["comparison"]["1e-2"]["arms"]["bayes_paper"]["max_fidelity"]["mean"] == pytest.approx(0.8)
    (runs_dir / "bayes_paper_lr3e-3_seed2.json").unlink()  # one seed short: rule (b) is undecided, not failed
    assert study_report.write_study_report("bounded_std", str(tmp_path))["reading"]["rule_b"] is None


def test_the_memorise_probe_reading_derives_the_declared_outcome(tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    spec = dict(lr=1e-3, seed=0, steps=700, batch=1, schedules=((7.5, 100),))
    never = [0.0, 0.8, 0.85, 0.85]
    _write_run(runs_dir, RunSpec("full", **spec), **STAGE)  # reaches a clean copy at 500
    reading = study_report.write_study_report("memorise_probe", str(tmp_path))["reading"]
    assert reading["outcome"] is None  # the LoRA run has not finished
    assert reading["runs"]["full_lr1e-3_seed0"]["7.5"]["first_copy_step"] == 500
    no_prior = RunSpec("lora", variant="noprior", **spec)
    _write_run(runs_dir, no_prior, never, energy=[2.0, 0.2, 0.1, 0.1])
    assert study_report.write_study_report("memorise_probe", str(tmp_path))["reading"]["outcome"] == "A"
    (runs_dir / "full_lr1e-3_seed0.json").unlink()
    _write_run(runs_dir, RunSpec("full", **{**spec, "seed": 1}), never)
    assert study_report.write_study_report("memorise_probe", str(tmp_path))["reading"]["outcome"] == "C"
    for path in runs_dir.glob(f"{no_prior.name}*"):
        path.unlink()
    _write_run(runs_dir, no_prior, **STAGE)
    assert study_report.write_study_report("memorise_probe", str(tmp_path))["reading"]["outcome"] == "B"


@pytest.mark.parametrize(
    "plain, arms, base_model",
    [("paper_recipe", "paper_recipe_arms", None), ("paper_recipe_v3w", "paper_recipe_arms_v3w", "base_model_v3w_d")],
)
def test_the_arms_reading_compares_each_arm_with_plain_lora_of_study_one(tmp_path, plain, arms, base_model):
    spec = dict(steps=700, batch=1, schedules=((7.5, 100),))
    for study in ("paper_recipe", plain, arms):
        (tmp_path / study / "runs").mkdir(parents=True, exist_ok=True)
    for seed in range(3):
        _write_run(tmp_path / plain / "runs", RunSpec("lora", 6e-3, seed, **spec), **STAGE, base_model=base_model)
        l2 = RunSpec("l2", 6e-3, seed, **spec)
        _write_run(tmp_path / arms / "runs", l2, [0.0, 0.8, 0.92, 0.93], base_model=base_model)
        never = [0.0, 0.8, 0.85 if seed == 1 else 0.92, 0.85]  # seed 1 never reaches 0.9 x the ceiling
        _write_run(tmp_path / arms / "runs", RunSpec("bayes_paper", 6e-3, seed, **spec), never, base_model=base_model)
    if plain != "paper_recipe":  # v2f's study 1 beside it is not the one compared with
        _write_run(tmp_path / "paper_recipe" / "runs", RunSpec("lora", 6e-3, 0, **spec), [0.0, 0.1, 0.1, 0.1])
    reading = study_report.write_study_report(arms, str(tmp_path / arms))["reading"]
    assert reading["lora"]["seeds_with_stage"] == 3 and reading["lora"]["seeds"] == [0, 1, 2]
    assert reading["l2"]["removes_the_stage"] and reading["l2"]["copies_less_at_matched_fidelity"] is False
    assert reading["l2"]["fidelity_at_best"]["mean"] == pytest.approx(0.93)
    assert not reading["bayes_paper"]["reaches_matched_fidelity"]
    assert reading["bayes_paper"]["copies_less_at_matched_fidelity"] is None
    assert reading["early_stopping"]["fidelity_at_best"]["mean"] == pytest.approx(0.9)  # plain LoRA's best record
    if base_model:  # plain-LoRA runs of another base model are refused, not compared
        for path in (tmp_path / plain / "runs").glob("*.json"):
            path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "base_model"}))
        with pytest.raises(ValueError, match=r"holds runs of \['base_model_v2f'\], not the base model"):
            study_report.write_study_report(arms, str(tmp_path / arms))
