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
from examples.corruption_stage.study import arms, controls, driver, plan
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
    with pytest.raises(ValueError, match="--lr applies to study paper_recipe_arms only"):
        plan.study_runs("paper_recipe", lr=6e-3)
    assert plan.study_runs("paper_recipe_v3w") == plan.study_runs("paper_recipe")  # the same runs on another model


def test_each_study_names_the_base_model_it_fine_tunes():
    assert plan.study_model_dir("paper_recipe") == MODEL_DIR
    v3w = plan.study_model_dir("paper_recipe_v3w")
    assert os.path.dirname(v3w) == os.path.dirname(MODEL_DIR) and os.path.basename(v3w) == "base_model_v3w_d"


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
    v3w = plan.study_model_dir("paper_recipe_v3w")
    with pytest.raises(ValueError, match="fine-tuned base_model_v2f, but this study fine-tunes base_model_v3w_d"):
        driver.is_finished(str(tmp_path), spec, v3w)
    (tmp_path / f"{spec.name}.json").write_text(json.dumps({"base_model": "base_model_v3w_d"}))
    assert driver.is_finished(str(tmp_path), spec, v3w)


def test_the_v3w_study_waits_for_gate_1_on_its_base_model(tmp_path, monkeypatch):
    gate = tmp_path / "v3w_gate1.json"
    monkeypatch.setitem(plan.STUDY_GATES, "paper_recipe_v3w", str(gate))
    assert plan.gate_refusal("paper_recipe") is None  # v2f passed its gate in lab v2
    assert "v3w_gate1.json does not exist" in plan.gate_refusal("paper_recipe_v3w")
    gate.write_text(json.dumps({"gate1_class": {"passed": False, "hits": 5}}))
    assert "says passed=False" in plan.gate_refusal("paper_recipe_v3w")
    gate.write_text(json.dumps({"gate1_class": {"passed": True, "hits": 9}}))
    assert plan.gate_refusal("paper_recipe_v3w") is None
