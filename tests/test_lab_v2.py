"""Lab v2 (examples/corruption_stage/PLAN_V2.md): its data, prompts, measures, base-model recipe and gate."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import peft
import pytest
import torch

from examples.corruption_stage import autoencoder_pilot, data, experiment, gate, measures, models, pretrain, reproduce


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_v2_pretraining_set_has_the_class_and_photo_tokens():
    images, labels = data.make_v2_pretraining_set(40, seed=3)
    assert images.shape == (40, 3, 32, 32) and float(images.abs().max()) <= 1.0
    assert set(labels[:20].tolist()) <= set(range(len(data.KINDS))) | {data.CLASS_TOKEN}
    assert data.CLASS_TOKEN in labels[:20].tolist()
    assert labels[20:].tolist() == [data.PHOTO_TOKEN] * 20
    again, _ = data.make_v2_pretraining_set(40, seed=3)
    assert torch.equal(images, again)
    # v1's set is unchanged by the option: no class, the same draws
    v1_images, v1_labels = data.make_pretraining_set(20, seed=3)
    assert int(v1_labels.max()) < len(data.KINDS)
    assert torch.equal(v1_images, data.make_pretraining_set(20, seed=3, with_class=False)[0])
    # the new ids come after v1's whole vocabulary (tokens, START, END), so v1 models keep theirs
    assert data.CLASS_TOKEN == models.VOCAB and data.PHOTO_TOKEN == models.VOCAB + 1


def test_condition_embedding_takes_a_two_token_prompt():
    cond = models.ConditionEmbedding(8, 4, extra_tokens=data.V2_EXTRA_TOKENS)
    prompt = torch.tensor([[data.SUBJECT_TOKEN, data.CLASS_TOKEN]])
    ids = [models.START_TOKEN, data.SUBJECT_TOKEN, data.CLASS_TOKEN, models.END_TOKEN]
    with torch.no_grad():
        assert torch.equal(cond(prompt)[0], cond.tokens.weight[ids] + cond.positions)
        assert torch.equal(cond(torch.tensor([3]))[0, 1], cond.tokens.weight[3] + cond.positions[1])
    with pytest.raises(ValueError, match="at most 3 tokens, got 4"):
        cond(torch.zeros(1, 4, dtype=torch.long))
    assert models.ConditionEmbedding(8, 4).tokens.num_embeddings == models.VOCAB


def test_spectral_flatness_separates_white_noise_from_smooth_fields():
    g = torch.Generator().manual_seed(0)
    white = measures.spectral_flatness(torch.randn(16, 4, 16, 16, generator=g))
    assert 0.5 < float(white.mean()) < 0.62  # exp(-Euler's gamma) = 0.561 for a white Gaussian field
    ramp = torch.linspace(-1, 1, 16)
    smooth = (ramp[:, None] * ramp[None, :]).expand(2, 4, 16, 16)
    assert float(measures.spectral_flatness(smooth).max()) < 0.05


def test_structural_fidelity_is_one_for_the_training_images_and_lower_with_noise():
    g = torch.Generator().manual_seed(1)
    train = data.make_subject_set(3)
    assert measures.ssim_matrix(train, train).diagonal().tolist() == pytest.approx([1.0] * 3)
    assert measures.structural_fidelity(train.flip(0), train) == pytest.approx(1.0)  # nearest, not same index
    noisy = (train + 0.3 * torch.randn(train.shape, generator=g)).clamp(-1, 1)
    assert measures.structural_fidelity(noisy, train) < 0.8


def test_latent_residuals_use_the_nearest_training_latent():
    g = torch.Generator().manual_seed(2)
    train = torch.randn(3, 4, 8, 8, generator=g)
    ramp = torch.linspace(-0.2, 0.2, 8)
    smooth = (ramp[:, None] + ramp[None, :]).expand(4, 8, 8)
    samples = torch.stack([train[2], train[0] + smooth])
    residual = measures.latent_residuals(samples, train)
    variance = float(train.var(unbiased=False))
    expected = float(smooth.pow(2).mean()) / variance
    assert residual["energy"].tolist() == pytest.approx([0.0, expected], rel=1e-5)
    assert float(residual["whiteness"][1]) < 0.05


def _curves(fidelity, whiteness, energy, copies):
    return {
        "iteration": [100 * i for i in range(len(fidelity))],
        "ssim_fidelity": fidelity,
        "whiteness": whiteness,
        "latent_energy": energy,
        "latent_copy_rate": copies,
        "ssim_ceiling": [0.8] * len(fidelity),
    }


def test_stage_rule_needs_two_consecutive_corrupt_checkpoints_before_the_copies():
    stage = _curves(
        [0.3, 0.7, 0.6, 0.6, 0.75], [0.2, 0.2, 0.35, 0.4, 0.1], [2.0, 1.0, 0.5, 0.4, 0.01], [0, 0, 0, 0, 1]
    )
    judged = gate.judge_run(stage)
    assert judged["stage"] and judged["recovers"] and judged["stage_from_iteration"] == 200
    # the peak is the one before the copies, although the copies' fidelity exceeds it
    assert judged["peak_iteration"] == 100 and judged["first_copy_iteration"] == 400
    early = _curves([0.3, 0.7, 0.6, 0.6, 0.65], [0.2, 0.2, 0.35, 0.4, 0.1], [2.0, 1.0, 0.5, 0.4, 0.3], [0] * 5)
    assert gate.stage_rule(early) == {
        "stage": True,
        "stage_from_iteration": 200,
        "recovers": False,
        "peak_iteration": 100,
        "first_copy_iteration": None,
    }
    one = _curves([0.3, 0.7, 0.6, 0.7, 0.65], [0.2, 0.2, 0.35, 0.2, 0.1], [2.0, 1.0, 0.5, 0.4, 0.3], [0] * 5)
    assert not gate.stage_rule(one)["stage"]
    low_energy = _curves([0.3, 0.7, 0.6, 0.6], [0.2, 0.2, 0.35, 0.4], [2.0, 1.0, 0.2, 0.2], [0] * 4)
    assert not gate.stage_rule(low_energy)["stage"]


def test_gates_two_and_three_use_the_plan_thresholds():
    curves = _curves([0.5, 0.73, 0.7], [0.2] * 3, [1.0, 0.1, 0.05], [0.0, 0.4, 0.5])
    judged = gate.judge_run(curves)  # 0.73 >= 0.9 * 0.8, final copy rate 0.5 >= 0.5
    assert judged["learns_subject"] and judged["ends_in_copies"] and judged["max_ssim_fidelity_iteration"] == 100
    curves = _curves([0.5, 0.71, 0.7], [0.2] * 3, [1.0, 0.1, 0.05], [0.0, 0.5, 0.4])
    judged = gate.judge_run(curves)
    assert not judged["learns_subject"] and not judged["ends_in_copies"]


@pytest.mark.slow
def test_pretrain_v2_trains_the_autoencoder_pilot_2b_measured(tmp_path):
    chosen = autoencoder_pilot.CANDIDATES["half16_edge"]
    assert pretrain.V2_CONFIG.ae_channels == chosen["ae_channels"]
    assert pretrain.V2_CONFIG.latent_channels == chosen["latent_channels"]
    assert pretrain.V2_AUTOENCODER["edge_weight"] == autoencoder_pilot.TRAINING["half16_edge"]["edge_weight"]
    small = ["--steps", "2", "--n-images", "40", "--candidates", "half16_edge"]
    pilot = autoencoder_pilot.main([*small, "--out", str(tmp_path / "pilot.json")])["results"]["half16_edge"]
    model = pretrain.pretrain_v2(
        str(tmp_path / "v2"), n_images=16, unet_steps=2, unet_batch=4, autoencoder={"steps": 2, "n_images": 40}
    )
    scores = autoencoder_pilot.score(model.vae, autoencoder_pilot.held_out_sets())
    for key, value in scores.items():
        assert value == pytest.approx(pilot[key], rel=1e-5), key
    loaded = models.load_model(str(tmp_path / "v2"))
    assert loaded.cfg.extra_tokens == data.V2_EXTRA_TOKENS and loaded.cfg.latent_size == 16
    assert models.load_model(str(tmp_path / "v2" / "autoencoder")).cfg == loaded.cfg
    meta = json.loads((tmp_path / "v2" / models.CONFIG_FILE).read_text())
    assert meta["autoencoder_recipe"]["steps"] == 2 and "pretrain_v2" in meta["how_made"]


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
def test_gate_refuses_bad_arguments_before_any_work(tmp_path, extra, message):
    out = str(tmp_path / "gate.json")
    result = subprocess.run(
        [sys.executable, "-m", "examples.corruption_stage.gate", "--model-dir", "nowhere", "--out", out, *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(out)


@pytest.mark.slow
def test_the_lab_command_runs_v2_on_a_v2_model_and_refuses_a_mismatch(tmp_path, capsys):
    from examples.corruption_stage.__main__ import main

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


def test_gate_refuses_a_v1_model(tmp_path):
    shipped_v1 = os.path.join(ROOT, "examples", "corruption_stage", "base_model")
    out = str(tmp_path / "gate.json")
    result = subprocess.run(
        [sys.executable, "-m", "examples.corruption_stage.gate", "--model-dir", shipped_v1, "--out", out],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "not a lab v2 model" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(out)


def test_autoencoder_pilot_scores_a_saved_model_against_the_rule(tmp_path):
    shipped_v1 = os.path.join(ROOT, "examples", "corruption_stage", "base_model")
    out = tmp_path / "score.json"
    payload = autoencoder_pilot.main(["--score-model", shipped_v1, "--out", str(out)])
    assert payload["results"][shipped_v1] == payload["results"]["shipped_v1"]  # the same model, the same numbers
    assert payload["chosen"] is None  # v1's autoencoder blurs the subject's checker (texture ratio 0.02)
    assert json.loads(out.read_text())["args"]["score_model"] == shipped_v1


def test_v_prediction_loss_target_and_clean_latent_estimate():
    from examples.corruption_stage import diffusion

    model = models.new_model(models.LabModelConfig(extra_tokens=data.V2_EXTRA_TOKENS, prediction_type="v_prediction"))
    assert diffusion.build_scheduler(model.cfg).config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ab = 0.3
    noisy = ab**0.5 * x0 + (1 - ab) ** 0.5 * noise
    velocity = ab**0.5 * noise - (1 - ab) ** 0.5 * x0
    torch.testing.assert_close(diffusion.predicted_x0(model, noisy, velocity, ab), x0)
    epsilon_model = models.new_model(models.LabModelConfig(extra_tokens=data.V2_EXTRA_TOKENS))
    torch.testing.assert_close(diffusion.predicted_x0(epsilon_model, noisy, noise, ab), x0)
    # the loss's target is the velocity: a UNet that outputs it exactly has zero loss
    tokens = diffusion.condition_tokens(data.CLASS_TOKEN, 2)
    t = torch.tensor([100, 900])
    sched = diffusion.build_scheduler(model.cfg)
    expected_target = sched.get_velocity(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)), t)

    class Exact(torch.nn.Module):
        def forward(self, sample, timesteps, encoder_hidden_states):
            return type("Out", (), {"sample": expected_target})()

    model.unet = Exact()
    loss = diffusion.diffusion_loss(model, x0, tokens, generator=torch.Generator().manual_seed(3), timesteps=t)
    assert float(loss) < 1e-10
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction', got 'x0'"):
        models.LabModelConfig(prediction_type="x0")


def test_pretrain_v2_reuses_an_autoencoder_and_records_the_prediction_type(tmp_path):
    first = pretrain.pretrain_v2(
        str(tmp_path / "a"), n_images=16, unet_steps=1, unet_batch=4, autoencoder={"steps": 1, "n_images": 16}
    )
    pretrain.pretrain_v2(
        str(tmp_path / "b"), n_images=16, unet_steps=1, unet_batch=4, prediction_type="v_prediction",
        autoencoder_from=str(tmp_path / "a" / "autoencoder"),
    )  # fmt: skip
    loaded = models.load_model(str(tmp_path / "b"))
    assert (
        loaded.cfg.prediction_type == "v_prediction"
        and models.load_model(str(tmp_path / "a")).cfg.prediction_type == "epsilon"
    )
    for key, value in first.vae.state_dict().items():
        torch.testing.assert_close(loaded.vae.state_dict()[key], value.half().float())
    assert loaded.latent_scale == pytest.approx(first.latent_scale, rel=1e-3)
    meta = json.loads((tmp_path / "b" / models.CONFIG_FILE).read_text())
    assert meta["autoencoder_recipe"] == {"reused_from": str(tmp_path / "a" / "autoencoder")}
    with pytest.raises(ValueError, match="does not hold lab v2's autoencoder"):
        pretrain.pretrain_v2(
            str(tmp_path / "c"),
            n_images=16,
            unet_steps=1,
            autoencoder_from=os.path.join(ROOT, "examples", "corruption_stage", "base_model"),
        )


def _saved_v_prediction_model(directory: str) -> tuple[str, models.LabModel]:
    """A one-step v2 model saved to ``directory``, and it loaded back."""
    pretrain.pretrain_v2(
        directory, n_images=16, unet_steps=1, unet_batch=4, prediction_type="v_prediction",
        autoencoder={"steps": 1, "n_images": 16},
    )  # fmt: skip
    return directory, models.load_model(directory)


def test_pretrain_v2_continues_a_saved_denoiser_with_everything_else_kept(tmp_path):
    source, before = _saved_v_prediction_model(str(tmp_path / "a"))
    pretrain.pretrain_v2(str(tmp_path / "b"), n_images=16, unet_steps=2, unet_batch=4, denoiser_from=source)
    after = models.load_model(str(tmp_path / "b"))
    assert after.cfg == before.cfg and after.latent_scale == before.latent_scale
    assert all(torch.equal(v, before.vae.state_dict()[k]) for k, v in after.vae.state_dict().items())
    moved = [k for k, v in after.unet.state_dict().items() if not torch.equal(v, before.unet.state_dict()[k])]
    assert moved  # the denoiser was trained further
    meta = json.loads((tmp_path / "b" / models.CONFIG_FILE).read_text())
    assert meta["autoencoder_recipe"] == {"reused_from": source} and f"continued from {source}" in meta["how_made"]
    with pytest.raises(ValueError, match="is not a lab v2 model"):
        pretrain.pretrain_v2(
            str(tmp_path / "c"), n_images=16, unet_steps=1,
            denoiser_from=os.path.join(ROOT, "examples", "corruption_stage", "base_model"),
        )  # fmt: skip


def _tiny_v2_model(seed: int = 0) -> models.LabModel:
    return models.new_model(
        models.LabModelConfig(extra_tokens=data.V2_EXTRA_TOKENS, prediction_type="v_prediction"), seed
    )


def test_the_pooled_condition_path_starts_as_the_model_it_extends_and_then_learns():
    base = _tiny_v2_model()
    for p in base.unet.parameters():  # a trained-looking denoiser: no weight at a special value
        p.data.add_(torch.randn_like(p) * 0.05)
    pooled = models.add_pooled_condition(base)
    assert pooled.cfg.pooled_condition and not base.cfg.pooled_condition
    assert pooled.vae is base.vae and pooled.cond is base.cond and pooled.latent_scale == base.latent_scale
    new = {k for k in pooled.unet.state_dict()} - set(base.unet.state_dict())
    assert new and all(k.startswith("add_embedding.") for k in new)
    latents, t = torch.randn(4, 4, 8, 8), torch.tensor([10, 300, 600, 990])
    cond = base.cond(torch.tensor([0, 1, data.CLASS_TOKEN, data.NULL_TOKEN]))
    with torch.no_grad():
        torch.testing.assert_close(pooled.unet(latents, t, cond).sample, base.unet(latents, t, cond).sample)
    # the gain at zero still passes a gradient, so the path learns from the first step
    pooled.unet.requires_grad_(True)
    pooled.unet(latents, t, cond.detach()).sample.square().mean().backward()
    assert pooled.unet.add_embedding.norm2.weight.grad.abs().max() > 0
    # the kind now changes the output through the time embedding too
    with torch.no_grad():
        pooled.unet.add_embedding.norm2.weight.fill_(1.0)
        other = base.cond(torch.tensor([2, 3, 4, 5]))
        a = pooled.unet(latents, t, cond).sample - base.unet(latents, t, cond).sample
        b = pooled.unet(latents, t, other).sample - base.unet(latents, t, other).sample
    assert a.abs().max() > 1e-4 and (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="already takes the pooled condition"):
        models.add_pooled_condition(pooled)


def test_lora_fine_tuning_of_a_pooled_model_leaves_the_new_path_to_the_base(tmp_path):
    base = models.add_pooled_condition(_tiny_v2_model())
    models.save_model(base, str(tmp_path / "m"))
    base = models.load_model(str(tmp_path / "m"))
    assert base.cfg.pooled_condition and base.unet.config.addition_embed_type == "text"
    cfg = experiment.ExperimentConfig(
        arms=("bayes_kl",), steps=2, eval_every=2, n_eval=2, sample_steps=2, width_timesteps=(20,), lr=1e-2,
        prompt=(data.SUBJECT_TOKEN, data.CLASS_TOKEN), v2_measures=True,
    )  # fmt: skip
    train = data.make_subject_set(1)
    with torch.no_grad():
        recon = base.decode(base.encode(train))
    run = experiment.run_arm(base, "bayes_kl", train, 0, cfg, recon)
    assert run["curves"]["iteration"] == [0, 2] and run["curves"]["flicker"][-1] > 0
    adapted = peft.tuners.lora.LoraConfig(r=2, target_modules=experiment.TARGETS)
    unet = models.load_model(str(tmp_path / "m")).unet
    unet.add_adapter(adapted)
    assert not [n for n, _ in unet.named_modules() if n.startswith("add_embedding") and "lora" in n]


def test_pretrain_v2_adds_the_pooled_condition_to_a_continued_denoiser(tmp_path):
    source, before = _saved_v_prediction_model(str(tmp_path / "a"))
    pretrain.pretrain_v2(
        str(tmp_path / "b"), n_images=16, unet_steps=2, unet_batch=4, denoiser_from=source, pooled_condition=True
    )
    after = models.load_model(str(tmp_path / "b"))
    assert after.cfg == dataclasses.replace(before.cfg, pooled_condition=True)
    assert all(torch.equal(v, before.vae.state_dict()[k]) for k, v in after.vae.state_dict().items())
    assert after.unet.add_embedding.norm2.weight.abs().max() > 0  # trained away from its zero start
    meta = json.loads((tmp_path / "b" / models.CONFIG_FILE).read_text())
    assert "with the pooled condition in its time embedding" in meta["how_made"]


V1_MODEL = os.path.join(ROOT, "examples", "corruption_stage", "base_model")


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--prediction-type", "v_prediction"],
            "--autoencoder-from, --denoiser-from and --pooled-condition need --v2",
        ),
        (["--pooled-condition"], "--pooled-condition need --v2"),
        (["--v2", "--autoencoder-from", "nowhere"], "--autoencoder-from 'nowhere' holds no lab model"),
        (["--v2", "--denoiser-from", "nowhere"], "--denoiser-from 'nowhere' holds no lab model"),
        (
            ["--v2", "--denoiser-from", "x", "--prediction-type", "v_prediction"],
            "--denoiser-from takes its autoencoder and prediction type from that model",
        ),
        (["--v2", "--denoiser-from", V1_MODEL], "is not a lab v2 model"),
        (["--v2", "--autoencoder-from", V1_MODEL], "does not hold lab v2's autoencoder"),
        (["--v2", "--n-images", "0"], "--n-images must be positive, got 0"),
        (["--v2", "--unet-steps", "-1"], "--unet-steps must be positive, got -1"),
    ],
)
def test_pretrain_command_refuses_bad_arguments(tmp_path, extra, message):
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "examples.corruption_stage.pretrain", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_x0_probe_reports_every_timestep_and_writes_its_json(tmp_path):
    from examples.corruption_stage import x0_probe

    model_dir = str(tmp_path / "v2")
    pretrain.pretrain_v2(model_dir, n_images=16, unet_steps=2, unet_batch=4, autoencoder={"steps": 2, "n_images": 16})
    out = tmp_path / "probe.json"
    rows = x0_probe.main(["--model-dir", model_dir, "--steps", "2", "--every", "1", "--out", str(out)])
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(r[f"x0_error_t{t}"] >= 0 for r in rows for t in x0_probe.TIMESTEPS)
    assert rows[0]["x0_error_t961"] != rows[2]["x0_error_t961"]  # fine-tuning moved the denoiser
    assert json.loads(out.read_text())["rows"] == rows


def test_gate_figure_shows_the_early_checkpoints_where_fine_tuning_changes_fastest():
    from examples.corruption_stage.gate_report import doubling_checkpoints

    iterations = list(range(0, 3001, 100))
    assert [iterations[i] for i in doubling_checkpoints(iterations, 7)] == [0, 100, 200, 400, 700, 1500, 3000]
    assert doubling_checkpoints([0, 2, 4], 7) == [0, 1, 2]  # fewer checkpoints than asked: each once


def test_render_rates_score_each_kind_against_its_own_prompt():
    from examples.corruption_stage import render_probe

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


def test_render_probe_scores_every_kind_of_every_model(tmp_path):
    from examples.corruption_stage import render_probe

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
    result = subprocess.run(
        [sys.executable, "-m", "examples.corruption_stage.render_probe", "--model-dirs", "nowhere", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and "--model-dirs 'nowhere' holds no lab model" in result.stderr


def _quoted_commands(text: str) -> set[str]:
    found = re.finditer(r"`(python\s+-m\s+examples\.corruption_stage(?:\.[a-z0-9_]+)?\s[^`]*)`", text, re.S)
    return {" ".join(m.group(1).split()) for m in found}


def test_reproduce_lists_exactly_the_v2_commands_results_md_quotes():
    text = open(os.path.join(ROOT, "examples", "corruption_stage", "RESULTS.md")).read()
    v2_part = text.split("\n## v1")[0]
    assert "\n## v1" in text and len(v2_part) < len(text)
    steps = {step.quoted for step in reproduce.V2_STEPS}
    assert len(steps) == len(reproduce.V2_STEPS)
    assert _quoted_commands(v2_part) == steps
    for step in reproduce.V2_STEPS:  # each step's module exists and runs the command the report quotes
        path = os.path.join(ROOT, *step.module.split("."))
        assert os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__main__.py"))
        assert step.argv[:3] == [sys.executable, "-m", step.module]
        assert " ".join(["python", "-m", step.module, *step.argv[3:]]) == step.quoted


def test_a_reproduce_step_runs_a_submodule_or_the_lab_itself():
    lab = reproduce.Step("--v2 --seeds 0 --out x", 1)
    assert (lab.module, lab.quoted) == (
        "examples.corruption_stage",
        "python -m examples.corruption_stage --v2 --seeds 0 --out x",
    )
    assert lab.argv == [sys.executable, "-m", "examples.corruption_stage", "--v2", "--seeds", "0", "--out", "x"]
    gate_step = reproduce.Step("gate --seeds", 1)
    assert gate_step.argv == [sys.executable, "-m", "examples.corruption_stage.gate", "--seeds"]
    assert gate_step.quoted == "python -m examples.corruption_stage.gate --seeds"


def test_reproduce_runs_its_steps_in_order_and_stops_at_a_failure(capsys):
    listing = reproduce.Step("reproduce --list", 0)
    failing = reproduce.Step("reproduce --from 0", 0)
    reproduce.run((listing, listing), start=2)
    out = capsys.readouterr().out
    assert "[2/2] python -m examples.corruption_stage.reproduce --list" in out and "[1/2]" not in out
    with pytest.raises(subprocess.CalledProcessError):
        reproduce.run((failing, listing))
    assert "[2/2]" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="start must be in 1..2, got 3"):
        reproduce.run((listing, listing), start=3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-m", "examples.corruption_stage.reproduce", "--from", "0"], "--from must be in 1.."),
        (["-m", "examples.corruption_stage", "--v2", "--full", "--seeds", "1"], "it takes no --seeds"),
    ],
)
def test_reproduce_refuses_bad_arguments(argv, message):
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
