"""Lab v1/v2's arms experiment (`python -m examples.corruption_stage experiment`): config, a tiny run, its refusals."""

import json
import os

import pytest

from examples.corruption_stage.model import data, models, pretrain
from examples.corruption_stage.report import experiment_report as report
from examples.corruption_stage.study import experiment


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_experiment_config_validation():
    with pytest.raises(ValueError, match="arms"):
        experiment.ExperimentConfig(arms=("lora", "ensemble"))
    with pytest.raises(ValueError, match="n_images"):
        experiment.ExperimentConfig(n_images=(0,))
    with pytest.raises(ValueError, match="n_eval"):
        experiment.ExperimentConfig(n_eval=1)


def test_kl_weight_default_is_two_over_dims_times_timesteps():
    m = models.new_model()
    assert experiment.kl_weight_default(m) == pytest.approx(2 / (4 * 8 * 8 * 1000))


def _fake_result(fid: list[float], cor: list[float]) -> dict:
    return {"runs": [{"arm": "lora", "n_images": 1, "curves": {"fidelity": fid, "corruption": cor}}]}


def test_stage_flags_on_constructed_curves():
    rise_dip_recover = report.stage_flags(_fake_result([0.5, 0.8, 0.6, 0.7, 0.85], [-1, -1, -0.5, -0.8, -1]))
    assert rise_dip_recover["lora/1"] == {"seeds": 1, "dip_with_noise": 1, "recovered": 1}
    monotone = report.stage_flags(_fake_result([0.5, 0.6, 0.7, 0.8, 0.85], [-1, -0.5, -0.5, -0.5, -0.5]))
    assert monotone["lora/1"]["dip_with_noise"] == 0
    clean_dip = report.stage_flags(_fake_result([0.5, 0.8, 0.6, 0.7], [-1, -1, -1, -1]))  # dip without noise
    assert clean_dip["lora/1"]["dip_with_noise"] == 0


def test_lab_smoke_run_end_to_end(tmp_path):
    """Pretrains a throwaway base model for a few steps, then runs the entry script's --tiny configuration with
    two arms and checks every output."""
    from examples.corruption_stage import experiment_cli as corruption_stage
    from examples.corruption_stage.model import pretrain

    model_dir = tmp_path / "base"
    pretrain.pretrain(str(model_dir), n_images=32, ae_steps=2, unet_steps=2, ae_batch=4, unet_batch=4)
    out = tmp_path / "out"
    paths = corruption_stage.main(
        ["--tiny", "--model-dir", str(model_dir), "--out", str(out), "--arms", "lora", "bayes_kl", "l2"]
    )
    res = json.load(open(paths["json"]))
    assert {r["arm"] for r in res["runs"]} == {"lora", "bayes_kl", "l2"}
    for r in res["runs"]:
        c = r["curves"]
        assert c["iteration"] == [0, 2, 4]
        for key in ("fidelity", "corruption", "diversity", "copy_rate", "loss", "width"):
            assert len(c[key]) == 3, key
        assert len(c["width"][0]) == 2  # two timesteps in the tiny configuration
    kl_run = next(r for r in res["runs"] if r["arm"] == "bayes_kl")
    assert kl_run["kl_weight"] > 0 and kl_run["curves"]["posterior_std"][0] == pytest.approx(0.01, rel=1e-3)
    assert os.path.getsize(paths["figure"]) > 10_000
    assert os.path.getsize(paths["frontier"]) > 10_000
    summary = open(paths["summary"]).read()
    assert "plain LoRA" in summary and "Bayesian B + KL" in summary
    assert "At matched fidelity, 1 training image(s)" in summary
    assert set(res["matched_fidelity"]["1"]["arms"]) == {"lora", "bayes_kl", "l2"}


def test_lab_records_the_papers_metrics_with_models_given_by_path(tmp_path):
    from tiny_models import save_tiny_clip, save_tiny_dino

    from examples.corruption_stage import experiment_cli as corruption_stage
    from examples.corruption_stage.model import pretrain

    model_dir = tmp_path / "base"
    pretrain.pretrain(str(model_dir), n_images=32, ae_steps=2, unet_steps=2, ae_batch=4, unet_batch=4)
    clip, dino = save_tiny_clip(tmp_path / "clip"), save_tiny_dino(tmp_path / "dino")
    paths = corruption_stage.main(
        ["--tiny", "--model-dir", str(model_dir), "--out", str(tmp_path / "out"), "--arms", "lora"]
        + ["--clip-model", clip, "--dino-model", dino, "--clip-prompt", "a cross"]
    )
    res = json.load(open(paths["json"]))
    assert res["config"]["clip_model"] == clip and res["config"]["clip_prompt"] == "a cross"
    curves = res["runs"][0]["curves"]
    for key in ("clip_i", "clip_t", "dino", "dino_diversity"):
        assert len(curves[key]) == len(curves["iteration"]) == 3, key
        assert all(-1.0 <= v <= 2.0 for v in curves[key]), key
    assert curves["dino"][0] != curves["dino"][-1]  # the tiny ViT tells the samples of the two checkpoints apart


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--n-images", "7"], "n_images must be values in 1..5, got (7,)"),
        (["--lr", "-1"], "lr must be positive, got -1.0"),
        (["--clip-model", "no/such-model-here"], "--clip-model 'no/such-model-here' / --dino-model None did not load"),
    ],
)
def test_lab_command_refuses_bad_arguments_before_any_work(tmp_path, extra, message, run_lab):
    out = tmp_path / "out"
    result = run_lab("experiment", "--out", str(out), *extra)  # conftest keeps the Hub offline
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "error:" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_the_lab_command_runs_v2_on_a_v2_model_and_refuses_a_mismatch(tmp_path, capsys):
    from examples.corruption_stage.experiment_cli import main

    model_dir = str(tmp_path / "v2")
    pretrain.pretrain_v2(model_dir, n_images=16, unet_steps=2, unet_batch=4, autoencoder={"steps": 2, "n_images": 16})
    paths = main(["--tiny", "--v2", "--model-dir", model_dir, "--out", str(tmp_path / "out"), "--arms", "lora"])
    result = json.loads(open(paths["json"]).read())
    assert result["config"]["prompt"] == [data.SUBJECT_TOKEN, data.CLASS_TOKEN]
    curves = result["runs"][0]["curves"]
    assert len(curves["ssim_fidelity"]) == len(curves["iteration"]) == len(curves["whiteness"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--tiny", "--model-dir", model_dir, "--out", str(tmp_path / "out2")])
    assert exit_info.value.code == 2
    assert "holds a lab v2 model; pass --v2" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out2")
