"""Lab v3's studies (examples/corruption_stage/study): the arms, one run's records in the package's format, the
driver that skips finished runs, the declared run lists, and the judge's controls on the lab's own records."""

import json
import os

import peft
import pytest
import torch

from bayes_adapter import BayesLoraConfig
from bayes_adapter.stage import read_monitor
from examples.corruption_stage.model import models
from examples.corruption_stage.study import arms, controls, driver, plan, train
from examples.corruption_stage.study.train import MODEL_DIR, RunSpec, format_lr, train_run


def _tiny_spec(arm: str = "lora", **changes) -> RunSpec:
    settings = dict(lr=1e-2, seed=0, steps=2, batch=1, schedules=((7.5, 1), (3.0, 2)), n_samples=2, sample_steps=2)
    return RunSpec(arm=arm, **{**settings, "num_class_images": 2, **changes})


@pytest.fixture(scope="module")
def v2f_model_dir() -> str:
    """The shipped v2f model: a random one has a negative SSIM ceiling, which a monitor record refuses."""
    return MODEL_DIR


def test_run_names_spell_the_arm_learning_rate_and_seed():
    assert [format_lr(lr) for lr in (3e-3, 6e-3, 1.2e-2, 1e-2)] == ["3e-3", "6e-3", "1.2e-2", "1e-2"]
    spec = _tiny_spec("bayes_paper")
    assert spec.name == "bayes_paper_lr1e-2_seed0"
    assert spec.record_path("out", 7.5) == os.path.join("out", "bayes_paper_lr1e-2_seed0_g7.5.jsonl")
    with pytest.raises(ValueError, match="arm must be one of"):
        _tiny_spec("ensemble")
    with pytest.raises(ValueError, match="schedules must be"):
        _tiny_spec(schedules=((0.5, 10),))


def test_the_declared_studies_list_their_runs_in_the_plans_order():
    paper = plan.study_runs("paper_recipe", seeds=(0,))
    assert [s.name for s in paper] == ["lora_lr3e-3_seed0", "lora_lr6e-3_seed0", "lora_lr1.2e-2_seed0"]
    assert all(
        (s.batch, s.prior_loss_weight, s.num_class_images, s.steps, s.schedules)
        == (1, 1.0, 32, 4000, ((7.5, 50), (3.0, 200)))
        for s in paper
    )
    bounded = plan.study_runs("bounded_std")
    assert len(bounded) == 12 and {s.arm for s in bounded} == {"bayes_paper", "bayes_default"}
    assert {s.lr for s in bounded} == {1e-2, 3e-3} and all(s.schedules == ((3.0, 100),) for s in bounded)
    assert all((s.batch, s.steps, s.prior_loss_weight) == (4, 3000, 0.0) for s in bounded)
    with pytest.raises(ValueError, match="needs the learning rate"):
        plan.study_runs("paper_recipe_arms")
    assert len(plan.study_runs("paper_recipe_arms", lr=6e-3)) == 18
    probe = plan.study_runs("memorise_probe")
    assert [s.name for s in probe] == ["full_lr1e-3_seed0", "lora_noprior_lr6e-3_seed0"]
    assert [s.prior_loss_weight for s in probe] == [1.0, 0.0] and all(s.steps == 4000 for s in probe)
    with pytest.raises(ValueError, match="--seeds does not apply"):
        plan.study_runs("memorise_probe", seeds=(1,))
    with pytest.raises(ValueError, match="--lr applies to the studies"):
        plan.study_runs("paper_recipe", lr=6e-3)
    assert plan.study_runs("paper_recipe_v3w") == plan.study_runs("paper_recipe")  # the same runs on another model
    assert plan.study_runs("paper_recipe_arms_v3w", lr=6e-3) == plan.study_runs("paper_recipe_arms", lr=6e-3)
    with pytest.raises(ValueError, match="study paper_recipe_arms_v3w needs the learning rate"):
        plan.study_runs("paper_recipe_arms_v3w")


def test_the_v3w_studies_fine_tune_the_first_v3w_stage_that_passed_gate_1(tmp_path, monkeypatch):
    assert plan.study_model_dir("paper_recipe") == MODEL_DIR and plan.gate_refusal("paper_recipe") is None  # lab v2
    declared = [model for model, _ in plan.STUDY_BASE_MODELS["paper_recipe_v3w"]]
    assert declared == ["base_model_v3w_d", "base_model_v3w_e"]  # PLAN_V3: stage d, else one more stage e
    assert plan.STUDY_BASE_MODELS["paper_recipe_arms_v3w"] == plan.STUDY_BASE_MODELS["paper_recipe_v3w"]
    d_gate, e_gate = tmp_path / "d_gate1.json", tmp_path / "e_gate1.json"
    candidates = (("base_model_v3w_d", str(d_gate)), ("base_model_v3w_e", str(e_gate)))
    monkeypatch.setitem(plan.STUDY_BASE_MODELS, "paper_recipe_v3w", candidates)

    def chosen() -> str:
        folder = plan.study_model_dir("paper_recipe_v3w")
        assert os.path.dirname(folder) == os.path.dirname(MODEL_DIR)
        return os.path.basename(folder)

    def gate(path, passed: bool) -> None:
        path.write_text(json.dumps({"gate1_class": {"passed": passed, "hits": 9 if passed else 5}}))

    assert chosen() == "base_model_v3w_d" and "d_gate1.json does not exist" in plan.gate_refusal("paper_recipe_v3w")
    gate(e_gate, True)  # e counts only once d has failed
    assert chosen() == "base_model_v3w_d" and "for base_model_v3w_d" in plan.gate_refusal("paper_recipe_v3w")
    e_gate.unlink()
    d_gate.write_text(json.dumps({"gate1_class": {"hits": 5}}))  # no verdict: quoted, not read as a pass
    assert "d_gate1.json says passed=None" in plan.gate_refusal("paper_recipe_v3w")
    gate(d_gate, False)
    assert chosen() == "base_model_v3w_e" and "e_gate1.json does not exist" in plan.gate_refusal("paper_recipe_v3w")
    gate(e_gate, False)
    assert chosen() == "base_model_v3w_e" and "e_gate1.json says passed=False" in plan.gate_refusal("paper_recipe_v3w")
    gate(e_gate, True)
    assert chosen() == "base_model_v3w_e" and plan.gate_refusal("paper_recipe_v3w") is None
    gate(d_gate, True)
    assert chosen() == "base_model_v3w_d" and plan.gate_refusal("paper_recipe_v3w") is None


def test_each_arm_builds_its_adapter_config():
    assert type(arms.adapter_config("lora")) is peft.LoraConfig
    assert arms.adapter_config("lora_dropout").lora_dropout == 0.1
    paper = arms.adapter_config("bayes_paper")
    assert isinstance(paper, BayesLoraConfig) and paper.kl_weight == 0.0 and paper.train_posterior_std
    assert not arms.adapter_config("fixed_noise").train_posterior_std
    if arms.has_std_bound():  # issue 32 landed: the paper's arm stays unbounded, our default keeps the bound
        assert paper.posterior_std_max is None
        assert arms.adapter_config("bayes_default").posterior_std_max is not None
        assert arms.adapter_config("bayes_kl", kl_weight=0.5).kl_weight == 0.5
    else:
        with pytest.raises(ValueError, match="needs BayesLoraConfig.posterior_std_max"):
            arms.adapter_config("bayes_default")


def test_a_run_writes_one_record_file_per_guidance_that_the_package_reads(v2f_model_dir, tmp_path):
    base = models.load_model(v2f_model_dir)
    spec = _tiny_spec(prior_loss_weight=1.0)
    result = train_run(base, spec, str(tmp_path), keep_samples=2)
    primary, secondary = (read_monitor(spec.record_path(str(tmp_path), g)) for g in (7.5, 3.0))
    assert [r.step for r in primary] == [0, 1, 2] and [r.step for r in secondary] == [0, 2]
    assert primary[0].loss is None and all(r.loss > 0 for r in primary[1:])
    assert secondary[1].loss == pytest.approx((primary[1].loss + primary[2].loss) / 2)  # the steps since its last
    assert {r.fidelity_ceiling for r in primary + secondary} == {result["fidelity_ceiling"]}
    assert all(0.0 <= r.copy_rate <= 1.0 and r.noise_energy > 0 for r in primary)
    assert primary[0].fidelity != primary[2].fidelity  # fine-tuning changed the samples
    assert result["samples"].shape == (3, 2, 3, 32, 32) and result["posterior_std"] == []
    bayes = train_run(base, _tiny_spec("bayes_paper", schedules=((3.0, 2),)), str(tmp_path / "b"))
    assert [s["step"] for s in bayes["posterior_std"]] == [0, 2]
    assert bayes["posterior_std"][0]["max"] == pytest.approx(0.01, rel=1e-3)


class _CutOff(Exception):
    pass


def test_a_cut_off_run_continues_from_its_checkpoint_to_the_uninterrupted_runs_records(
    v2f_model_dir, tmp_path, monkeypatch
):
    base = models.load_model(v2f_model_dir)
    # weight noise: the global RNG matters; guidance 3 records only at 0 and 5, so the checkpoint holds loss sums
    spec = _tiny_spec("bayes_paper", steps=5, schedules=((7.5, 1), (3.0, 5)))
    straight_dir, out = str(tmp_path / "straight"), str(tmp_path / "cut")
    straight = train_run(base, spec, straight_dir)
    checkpoint = driver.resume_file(out, spec)
    loss, calls = train.diffusion_loss, []

    def cut_off_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # after step 3's records, past the checkpoint of step 2
            raise _CutOff
        return loss(*args, **kwargs)

    monkeypatch.setattr(train, "diffusion_loss", cut_off_at_step_4)
    with pytest.raises(_CutOff):
        train_run(base, spec, out, resume_path=checkpoint, resume_every=2)
    monkeypatch.setattr(train, "diffusion_loss", loss)
    assert [r.step for r in read_monitor(spec.record_path(out, 7.5))] == [0, 1, 2, 3]
    other = _tiny_spec("bayes_paper", lr=2e-2, steps=5, schedules=((7.5, 1), (3.0, 5)))
    with pytest.raises(ValueError, match="resume checkpoint .* was written by another run"):
        train_run(base, other, out, resume_path=checkpoint, resume_every=2)
    secondary = spec.record_path(out, 3.0)
    os.rename(secondary, secondary + ".away")
    with pytest.raises(ValueError, match=r"is at step 2, but .*_g3.jsonl holds records at steps \[\] \(0 of the 1"):
        train_run(base, spec, out, resume_path=checkpoint, resume_every=2)
    os.rename(secondary + ".away", secondary)

    monkeypatch.setattr(driver, "RESUME_EVERY", 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # run_one's 1 thread would reorder float sums
    driver.run_study([spec], out, "cmd", workers=1, model_dir=v2f_model_dir)  # in a new process it would be the same
    run = json.loads((tmp_path / "cut" / f"{spec.name}.json").read_text())
    assert run["resumed_at"] == [2] and straight["resumed_at"] == [] and not os.path.exists(checkpoint)
    for guidance in (7.5, 3.0):
        resumed, expected = (read_monitor(spec.record_path(d, guidance)) for d in (out, straight_dir))
        assert [r.step for r in resumed] == [r.step for r in expected]
        for got, want in zip(resumed, expected):
            assert (got.loss is None) == (want.loss is None)  # no loss before the first step
            for field in ("fidelity", "noise_energy", "noise_whiteness", "loss", "copy_rate"):
                if getattr(want, field) is not None:
                    assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-4, abs=1e-6), field
    assert [s["step"] for s in run["posterior_std"]] == [s["step"] for s in straight["posterior_std"]]
    assert run["posterior_std"][-1]["max"] == pytest.approx(straight["posterior_std"][-1]["max"], rel=1e-4)
    assert run["posterior_std"][-1]["max"] != straight["posterior_std"][0]["max"]  # the stds moved: a real check


def test_the_full_fine_tuning_arm_trains_every_unet_weight_and_no_adapter(v2f_model_dir, tmp_path):
    base = models.load_model(v2f_model_dir)
    before = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    spec = _tiny_spec("full", lr=1e-3, schedules=((3.0, 2),))
    train_run(base, spec, str(tmp_path))
    assert all(torch.equal(p, before[n]) for n, p in base.unet.named_parameters())  # the base model is untouched
    records = read_monitor(spec.record_path(str(tmp_path), 3.0))
    assert records[0].fidelity != records[-1].fidelity
    with pytest.raises(ValueError, match="adapter arms"):
        arms.adapter_config("full")


def test_the_driver_skips_finished_runs_and_restarts_unfinished_ones(v2f_model_dir, tmp_path):
    spec = _tiny_spec(schedules=((3.0, 1),))
    partial = spec.record_path(str(tmp_path), 3.0)
    with open(partial, "w") as f:
        f.write("a line a cut-off run left\n")
    sentences = driver.run_study([spec], str(tmp_path), "cmd", workers=1, model_dir=v2f_model_dir)
    assert sentences[0].startswith(f"{spec.name}: ") and "failed" not in sentences[0]
    assert [r.step for r in read_monitor(partial)] == [0, 1, 2]  # restarted from the start
    run = json.loads((tmp_path / f"{spec.name}.json").read_text())
    assert run["command"] == "cmd" and run["spec"]["arm"] == "lora" and run["seconds"] >= 0
    assert run["base_model"] == "base_model_v2f"
    assert driver.run_study([spec], str(tmp_path), "cmd", workers=1, model_dir=v2f_model_dir) == []
    other = _tiny_spec(seed=1, schedules=((3.0, 1),))
    failing = driver.run_study([other], str(tmp_path), "cmd", workers=1, model_dir=str(tmp_path / "nowhere"))
    assert "failed: FileNotFoundError" in failing[0]  # reported; the study goes on
    with pytest.raises(ValueError, match="workers must be >= 1"):
        driver.run_study([spec], str(tmp_path), "cmd", workers=0)


def test_the_controls_give_their_declared_answers_on_the_lab_model(tmp_path):
    summary = controls.run_controls(models.load_model(MODEL_DIR), str(tmp_path), "cmd")
    assert summary["required_controls_pass"]
    positive = summary["controls"]["positive"]["verdict"]
    assert positive["stage"] and [e["kind"] for e in positive["episodes"]] == ["corruption"]
    assert positive["episodes"][0]["recovered"]
    assert not summary["controls"]["negative_smooth"]["verdict"]["stage"]
    assert not summary["controls"]["negative_white"]["verdict"]["stage"]
    smooth = read_monitor(tmp_path / "negative_smooth.jsonl")
    assert max(r.noise_whiteness for r in smooth if r.noise_energy > 0) < 0.1  # smooth noise is not white
    assert json.loads((tmp_path / "summary.json").read_text())["required_controls_pass"]


def test_a_run_file_of_another_base_model_is_not_counted_as_finished(tmp_path):
    spec = _tiny_spec()
    assert not driver.is_finished(str(tmp_path), spec)
    (tmp_path / f"{spec.name}.json").write_text(json.dumps({"spec": {}}))  # written before base_model was recorded
    assert driver.is_finished(str(tmp_path), spec)  # a v2f run
    v3w = os.path.join(os.path.dirname(MODEL_DIR), "base_model_v3w_d")
    with pytest.raises(ValueError, match="fine-tuned base_model_v2f, but this study fine-tunes base_model_v3w_d"):
        driver.is_finished(str(tmp_path), spec, v3w)
    (tmp_path / f"{spec.name}.json").write_text(json.dumps({"base_model": "base_model_v3w_d"}))
    assert driver.is_finished(str(tmp_path), spec, v3w)
