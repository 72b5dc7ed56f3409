"""Lab v2's reachability gate (examples/corruption_stage/study/gate.py), judged by the package's stage judge, and its
probes' figures."""

import json
import os

import pytest
import torch

from examples.corruption_stage.model import data, models, pretrain
from examples.corruption_stage.study import gate


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _curves(fidelity, whiteness, energy, copies):
    return {
        "iteration": [100 * i for i in range(len(fidelity))],
        "ssim_fidelity": fidelity,
        "whiteness": whiteness,
        "latent_energy": energy,
        "latent_copy_rate": copies,
        "ssim_ceiling": [0.8] * len(fidelity),
    }


def test_the_gate_judges_its_runs_with_the_package_judge():
    curves = _curves(
        [0.0, 0.75, 0.4, 0.4, 0.4, 0.79, 0.79, 0.79], [0.3, 0.3, 0.55, 0.55, 0.55, 0.3, 0.3, 0.3],
        [2.0, 0.1, 0.5, 0.5, 0.5, 0.01, 0.01, 0.01], [0.0] * 8,
    )  # fmt: skip
    verdict = gate.judge_run(curves)["verdict"]
    assert verdict["stage"] and verdict["fit_step"] == 100 and verdict["first_copy_step"] == 500
    episode = verdict["episodes"][0]
    assert (episode["kind"], episode["start_step"], episode["end_step"], episode["recovered"]) == (
        "corruption",
        200,
        400,
        True,
    )
    assert verdict["sentence"].startswith("corruption stage from step 200 to 400")
    smooth = _curves([0.0, 0.75, 0.4, 0.4, 0.4, 0.79], [0.3] * 6, [2.0, 0.1, 0.5, 0.5, 0.5, 0.01], [0.0] * 6)
    assert not gate.judge_run(smooth)["verdict"]["stage"]  # a dip without white noise is no corruption stage


def test_gates_two_and_three_use_the_plan_thresholds():
    curves = _curves([0.5, 0.73, 0.7], [0.2] * 3, [1.0, 0.1, 0.05], [0.0, 0.4, 0.5])
    judged = gate.judge_run(curves)  # 0.73 >= 0.9 * 0.8, final copy rate 0.5 >= 0.5
    assert judged["learns_subject"] and judged["ends_in_copies"] and judged["max_ssim_fidelity_iteration"] == 100
    curves = _curves([0.5, 0.71, 0.7], [0.2] * 3, [1.0, 0.1, 0.05], [0.0, 0.5, 0.4])
    judged = gate.judge_run(curves)
    assert not judged["learns_subject"] and not judged["ends_in_copies"]


@pytest.mark.slow
def test_gate_runs_end_to_end_on_a_tiny_v2_model(tmp_path):
    model = pretrain.pretrain_v2(
        str(tmp_path / "v2"), n_images=16, unet_steps=2, unet_batch=4, autoencoder={"steps": 2, "n_images": 16}
    )
    assert model.cfg.extra_tokens
    out = tmp_path / "gate.json"
    args = ["--model-dir", str(tmp_path / "v2"), "--out", str(out), "--seeds", "0", "1", "--steps", "2"]
    payload = gate.main([*args, "--eval-every", "1", "--workers", "2", "--classifier-steps", "2"])
    assert json.loads(out.read_text())["passed"] == payload["passed"] is False  # an untrained model fails
    gate1 = payload["gate1_class"]
    assert gate1["of"] == 12 and len(gate1["class_sample_kinds"]) == 12
    assert set(gate1["class_sample_kinds"]) <= set(gate.CLASSES)
    assert [r["seed"] for r in payload["runs"]] == [0, 1]
    curves = payload["runs"][0]["curves"]
    assert curves["iteration"] == [0, 1, 2] and len(curves["latent_energy"]) == 3
    assert payload["runs"][0]["curves"]["loss"][1:] != payload["runs"][1]["curves"]["loss"][1:]
    assert (tmp_path / "gate.png").stat().st_size > 0  # the figure of the three phases
    assert list(payload["config"]["prompt"]) == [data.SUBJECT_TOKEN, data.CLASS_TOKEN]
    # a 2-step classifier is no measure: gate 1 is then unmeasurable, never passed
    assert gate1["classifier_accuracy_held_out_all_kinds"] < 0.9 and not gate1["measurable"]


@pytest.mark.slow
def test_gate_measures_its_parts_alone_and_tunes_the_classifier_on_its_own_seed(tmp_path):
    model_dir = str(tmp_path / "v2")
    pretrain.pretrain_v2(model_dir, n_images=16, unet_steps=2, unet_batch=4, autoencoder={"steps": 2, "n_images": 16})
    common = ["--model-dir", model_dir, "--steps", "2", "--eval-every", "2", "--workers", "1"]
    runs_only = gate.main(
        [*common, "--out", str(tmp_path / "full.json"), "--seeds", "0", "--arm", "full"]
        + ["--lr", "1e-3", "--classifier-steps", "0", "--subject-kind", "circle"]
    )
    assert runs_only["config"]["subject_kind"] == "circle"
    assert list(runs_only["config"]["prompt"]) == [data.SUBJECT_TOKEN, data.KINDS.index("circle")]
    assert runs_only["gate1_class"] is None and runs_only["passed"] is None
    assert list(runs_only["config"]["arms"]) == ["full"] and runs_only["config"]["lr"] == 1e-3
    assert runs_only["gates_2_and_3_passed"] is False and (tmp_path / "full.png").exists()
    gate1_only = gate.main([*common, "--out", str(tmp_path / "g1.json"), "--seeds", "--classifier-steps", "2"])
    assert gate1_only["runs"] == [] and gate1_only["passed"] is None and gate1_only["gates_2_and_3_passed"] is None
    assert gate1_only["gate1_class"]["class_kind"] == "cross"
    assert gate1_only["gate1_class"]["classifier"] == {"n_images": 14000, "steps": 2, "width": 64, "cosine": False}
    assert set(gate1_only["gate1_class"]["classifier_accuracy_held_out_per_kind"]) == {
        "circle", "square", "triangle", "ring", "star", "cross", "all_kinds"
    }  # fmt: skip
    tuned = gate.main(
        [*common, "--out", str(tmp_path / "t.json"), "--tune-classifier", "--classifier-steps", "2"]
        + ["--classifier-images", "70", "--classifier-width", "16", "--classifier-cosine"]
    )
    assert set(tuned) == {"command", "classifier", f"accuracy_seed_{gate.TUNING_SEED}"}
    assert gate.TUNING_SEED != gate.HELD_OUT_SEED


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "0"], "--lr must be positive, got 0.0"),
        (["--classifier-steps", "0", "--seeds"], "--classifier-steps must be positive here, got 0"),
        (["--arm", "bayes_kl"], "invalid choice: 'bayes_kl'"),
        (["--guidance", "0.5"], "--guidance must be >= 1, got 0.5"),
        (["--prior-loss-weight", "-1"], "prior_loss_weight must be >= 0 and num_class_images >= 1, got -1.0"),
    ],
)
def test_gate_refuses_bad_arguments_before_any_work(tmp_path, extra, message, run_lab):
    out = str(tmp_path / "gate.json")
    result = run_lab("gate", "--model-dir", "nowhere", "--out", out, *extra)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(out)


def test_gate_refuses_a_v1_model(tmp_path, lab_v1_model_dir, run_lab):
    shipped_v1 = lab_v1_model_dir
    out = str(tmp_path / "gate.json")
    result = run_lab("gate", "--model-dir", shipped_v1, "--out", out)
    assert result.returncode == 2
    assert "not a lab v2 model" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(out)


def test_gate_figure_shows_the_early_checkpoints_where_fine_tuning_changes_fastest():
    from examples.corruption_stage.report.gate_figure import doubling_checkpoints

    iterations = list(range(0, 3001, 100))
    assert [iterations[i] for i in doubling_checkpoints(iterations, 7)] == [0, 100, 200, 400, 700, 1500, 3000]
    assert doubling_checkpoints([0, 2, 4], 7) == [0, 1, 2]  # fewer checkpoints than asked: each once


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining, classifier or worker processes)
def test_render_rates_score_each_kind_against_its_own_prompt():
    from examples.corruption_stage.model import render_probe

    model = models.new_model(models.LabModelConfig(extra_tokens=data.V2_EXTRA_TOKENS))

    def always(kind):  # a stand-in classifier that calls every image one kind
        return lambda images: torch.nn.functional.one_hot(
            torch.full((len(images),), gate.CLASSES.index(kind)), len(gate.CLASSES)
        ).float()

    rates = render_probe.render_rates(model, always("ring"), n=2, steps=2)
    assert rates == {kind: float(kind == "ring") for kind in gate.ALL_KINDS}
    rates = render_probe.render_rates(model, always("diamond"), n=2, steps=2)
    assert rates == {kind: float(kind in ("square", "diamond")) for kind in gate.ALL_KINDS}  # one shape
    assert render_probe.render_rates(model, always("cross"), n=2, steps=2)["cross"] == 1.0  # the class prompt


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining, classifier or worker processes)
def test_render_probe_scores_every_kind_of_every_model(tmp_path, run_lab):
    from examples.corruption_stage.model import render_probe

    model_dir = str(tmp_path / "v2")
    pretrain.pretrain_v2(model_dir, n_images=16, unet_steps=1, unet_batch=4, autoencoder={"steps": 1, "n_images": 16})
    out = tmp_path / "probe.json"
    args = ["--model-dirs", model_dir, "--classifier-steps", "2", "--classifier-images", "70", "--out", str(out)]
    payload = render_probe.main([*args, "--eval-seed", "5"])
    assert payload["eval_seed"] == 5
    rates = payload["render_rates"][model_dir]
    assert set(rates) == set(gate.ALL_KINDS) and all(
        0.0 <= r <= 1.0 and r * 12 == round(r * 12) for r in rates.values()
    )
    assert json.loads(out.read_text())["render_rates"] == payload["render_rates"]
    result = run_lab("render-probe", "--model-dirs", "nowhere", "--out", str(out))  # fmt: skip
    assert result.returncode == 2 and "--model-dirs 'nowhere' holds no lab model" in result.stderr
