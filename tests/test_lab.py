"""The corruption-stage lab (examples/corruption_stage): data, model I/O, the stage reading, a tiny smoke run."""

import json
import os
import subprocess
import sys

import pytest
import torch

# Importable because pyproject.toml puts the repository root on pytest's pythonpath: no sys.path edit here.
from examples.corruption_stage import data, experiment, models, report


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "examples", "corruption_stage", "base_model")


def test_the_readme_command_runs_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-m", "examples.corruption_stage", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--pretrain-only" in result.stdout


def test_data_is_deterministic_and_in_range():
    a, la = data.make_pretraining_set(8, seed=3)
    b, lb = data.make_pretraining_set(8, seed=3)
    c, _ = data.make_pretraining_set(8, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == (8, 3, 32, 32)
    assert a.min() >= -1 and a.max() <= 1
    assert int(la.max()) < len(data.KINDS)  # pretraining never uses the null or subject tokens


def test_subject_is_held_out_and_consistent():
    assert data.SUBJECT_KIND not in data.KINDS
    s = data.make_subject_set(4)
    assert s.shape == (4, 3, 32, 32)
    assert torch.equal(s, data.make_subject_set(4))
    # the same subject (colours, texture) in different poses: images differ
    assert (s[0] - s[1]).abs().mean() > 0.05
    with pytest.raises(ValueError, match="n must be positive"):
        data.make_subject_set(0)


def test_render_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        data.render(torch.Generator().manual_seed(0), "hexagon")


def test_model_round_trip(tmp_path):
    m = models.new_model(seed=0)
    m.latent_scale = 0.7
    models.save_model(m, str(tmp_path))
    n = models.load_model(str(tmp_path))
    assert n.latent_scale == pytest.approx(0.7)
    w0 = m.unet.conv_in.weight.to(torch.float16).float()
    assert torch.equal(n.unet.conv_in.weight, w0)
    x = torch.zeros(1, 3, 32, 32)
    assert n.encode(x).shape == (1, 4, 8, 8)
    with pytest.raises(FileNotFoundError, match="--pretrain"):
        models.load_model(str(tmp_path / "missing"))


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


def test_shipped_base_model_is_small_and_loads():
    path = os.path.join(SHIPPED, models.WEIGHTS_FILE)
    assert os.path.exists(path), f"the lab's base model must ship in the repository: {path}"
    assert os.path.getsize(path) < 6 * 2**20
    m = models.load_model(SHIPPED)
    meta = json.load(open(os.path.join(SHIPPED, models.CONFIG_FILE)))
    assert "how_made" in meta
    assert not any(p.requires_grad for p in m.unet.parameters())


def test_lab_smoke_run_end_to_end(tmp_path):
    """Pretrains a throwaway base model for a few steps, then runs the entry script's --tiny configuration with
    two arms and checks every output."""
    from examples.corruption_stage import __main__ as corruption_stage
    from examples.corruption_stage import pretrain

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


def test_natural_crops_come_from_bundled_photographs_deterministically():
    files = data.natural_image_files()
    assert len(files) == sum(len(names) for names in data.NATURAL_SOURCES.values())
    crops = data.make_natural_crops(8, seed=3)
    assert crops.shape == (8, 3, 32, 32) and crops.min() >= -1 and crops.max() <= 1
    assert torch.equal(crops, data.make_natural_crops(8, seed=3))
    assert not torch.equal(crops, data.make_natural_crops(8, seed=4))
    # Photographs have texture: more high-frequency energy than a blurred copy of themselves.
    from examples.corruption_stage.autoencoder_pilot import high_frequency_energy

    blurred = torch.nn.functional.avg_pool2d(crops, 3, stride=1, padding=1, count_include_pad=False)
    assert high_frequency_energy(crops).mean() > 2 * high_frequency_energy(blurred).mean()
    with pytest.raises(ValueError, match="n must be positive, got 0"):
        data.make_natural_crops(0)


def test_autoencoder_pilot_scores_candidates_and_applies_its_rule(tmp_path):
    from examples.corruption_stage import autoencoder_pilot

    out = tmp_path / "pilot.json"
    payload = autoencoder_pilot.main(["--steps", "2", "--n-images", "16", "--candidates", "half16", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == {"shipped_v1", "half16"}
    half16 = payload["results"]["half16"]
    assert half16["latent_numbers"] == 16 * 16 * 4 and 0 < half16["rmse_subject"] < 2
    # The rule: within the limits, the lowest subject RMSE wins; a blurry candidate (texture ratio < 0.5) never does.
    good = {"latent_numbers": 1024, "rmse_procedural": 0.1, "subject_texture_ratio": 0.8}
    results = {
        "v1_arch": {**good, "rmse_subject": 0.2},
        "half16": {**good, "rmse_subject": 0.1},
        "wide8": {**good, "rmse_subject": 0.05, "subject_texture_ratio": 0.3},
    }
    assert autoencoder_pilot.decide(results) == "half16"
    assert autoencoder_pilot.decide({"v1_arch": {**good, "rmse_subject": 0.1, "rmse_procedural": 0.2}}) is None


def test_lab_records_the_papers_metrics_with_models_given_by_path(tmp_path):
    from tiny_models import save_tiny_clip, save_tiny_dino

    from examples.corruption_stage import __main__ as corruption_stage
    from examples.corruption_stage import pretrain

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
def test_lab_command_refuses_bad_arguments_before_any_work(tmp_path, extra, message):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "examples.corruption_stage", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "error:" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
