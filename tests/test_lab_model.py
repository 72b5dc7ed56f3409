"""The lab's base model (examples/corruption_stage/model): data, the model's I/O, pretraining, the autoencoder pilot and
the probes."""

import dataclasses
import json
import os

import peft
import pytest
import torch

from examples.corruption_stage.model import autoencoder_pilot, data, models, pretrain
from examples.corruption_stage.study import experiment


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2F = os.path.join(ROOT, "examples", "corruption_stage", "model", "base_model_v2f")


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


def test_natural_crops_come_from_bundled_photographs_deterministically():
    files = data.natural_image_files()
    assert len(files) == sum(len(names) for names in data.NATURAL_SOURCES.values())
    crops = data.make_natural_crops(8, seed=3)
    assert crops.shape == (8, 3, 32, 32) and crops.min() >= -1 and crops.max() <= 1
    assert torch.equal(crops, data.make_natural_crops(8, seed=3))
    assert not torch.equal(crops, data.make_natural_crops(8, seed=4))
    # Photographs have texture: more high-frequency energy than a blurred copy of themselves.
    from examples.corruption_stage.model.autoencoder_pilot import high_frequency_energy

    blurred = torch.nn.functional.avg_pool2d(crops, 3, stride=1, padding=1, count_include_pad=False)
    assert high_frequency_energy(crops).mean() > 2 * high_frequency_energy(blurred).mean()
    with pytest.raises(ValueError, match="n must be positive, got 0"):
        data.make_natural_crops(0)


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining, classifier or worker processes)
def test_autoencoder_pilot_scores_candidates_and_applies_its_rule(tmp_path):
    from examples.corruption_stage.model import autoencoder_pilot

    out = tmp_path / "pilot.json"
    payload = autoencoder_pilot.main(["--steps", "2", "--n-images", "16", "--candidates", "half16", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == {"half16"}  # v1's model is no longer shipped
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


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining, classifier or worker processes)
def test_autoencoder_pilot_scores_a_saved_model_against_the_rule(tmp_path):
    out = tmp_path / "score.json"
    payload = autoencoder_pilot.main(["--score-model", V2F, "--out", str(out)])
    # v2f's autoencoder is pilot 2b's (half16_edge), stored in fp16: it meets the rule, just (RESULTS.md, step 2)
    assert payload["results"][V2F]["subject_texture_ratio"] == pytest.approx(0.518, abs=0.01)
    assert payload["chosen"] == V2F
    assert json.loads(out.read_text())["args"]["score_model"] == V2F


def test_v_prediction_loss_target_and_clean_latent_estimate():
    from examples.corruption_stage.model import diffusion

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


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining, classifier or worker processes)
def test_pretrain_v2_reuses_an_autoencoder_and_records_the_prediction_type(tmp_path, lab_v1_model_dir):
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
            autoencoder_from=lab_v1_model_dir,
        )


def _saved_v_prediction_model(directory: str) -> tuple[str, models.LabModel]:
    """A one-step v2 model saved to ``directory``, and it loaded back."""
    pretrain.pretrain_v2(
        directory, n_images=16, unet_steps=1, unet_batch=4, prediction_type="v_prediction",
        autoencoder={"steps": 1, "n_images": 16},
    )  # fmt: skip
    return directory, models.load_model(directory)


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining, classifier or worker processes)
def test_pretrain_v2_continues_a_saved_denoiser_with_everything_else_kept(tmp_path, lab_v1_model_dir):
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
            denoiser_from=lab_v1_model_dir,
        )  # fmt: skip


def _tiny_v2_model(seed: int = 0) -> models.LabModel:
    return models.new_model(
        models.LabModelConfig(extra_tokens=data.V2_EXTRA_TOKENS, prediction_type="v_prediction"), seed
    )


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining, classifier or worker processes)
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


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining, classifier or worker processes)
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


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining, classifier or worker processes)
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


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--prediction-type", "v_prediction"],
            "--autoencoder-from, --denoiser-from, --pooled-condition and --unet-channels need --v2",
        ),
        (["--pooled-condition"], "--pooled-condition and --unet-channels need --v2"),
        (["--unet-channels", "64", "128"], "--unet-channels need --v2"),
        (["--v2", "--unet-channels", "40", "80"], "--unet-channels must be positive multiples of 16"),
        (
            ["--v2", "--unet-channels", "64", "128", "--denoiser-from", "x"],
            "--denoiser-from keeps that model's widths",
        ),
        (["--v2", "--autoencoder-from", "nowhere"], "--autoencoder-from 'nowhere' holds no lab model"),
        (["--v2", "--denoiser-from", "nowhere"], "--denoiser-from 'nowhere' holds no lab model"),
        (
            ["--v2", "--denoiser-from", "x", "--prediction-type", "v_prediction"],
            "--denoiser-from takes its autoencoder and prediction type from that model",
        ),
        (["--v2", "--denoiser-from", "V1"], "is not a lab v2 model"),
        (["--v2", "--autoencoder-from", "V1"], "does not hold lab v2's autoencoder"),
        (["--v2", "--n-images", "0"], "--n-images must be positive, got 0"),
        (["--v2", "--unet-steps", "-1"], "--unet-steps must be positive, got -1"),
    ],
)
def test_pretrain_command_refuses_bad_arguments(tmp_path, lab_v1_model_dir, extra, message, run_lab):
    extra = [lab_v1_model_dir if a == "V1" else a for a in extra]  # a v1 model
    out = tmp_path / "model"
    result = run_lab("pretrain", "--out", str(out), *extra)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_x0_probe_reports_every_timestep_and_writes_its_json(tmp_path):
    from examples.corruption_stage.model import x0_probe

    model_dir = str(tmp_path / "v2")
    pretrain.pretrain_v2(model_dir, n_images=16, unet_steps=2, unet_batch=4, autoencoder={"steps": 2, "n_images": 16})
    out = tmp_path / "probe.json"
    rows = x0_probe.main(["--model-dir", model_dir, "--steps", "2", "--every", "1", "--out", str(out)])
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(r[f"x0_error_t{t}"] >= 0 for r in rows for t in x0_probe.TIMESTEPS)
    assert rows[0]["x0_error_t961"] != rows[2]["x0_error_t961"]  # fine-tuning moved the denoiser
    assert json.loads(out.read_text())["rows"] == rows


def test_pretrain_v2_builds_a_wider_denoiser_and_refuses_widths_it_cannot_build(tmp_path):
    from examples.corruption_stage.study.train import MODEL_DIR

    wider = pretrain.pretrain_v2(
        str(tmp_path / "w"), n_images=16, unet_steps=1, unet_batch=4, prediction_type="v_prediction",
        autoencoder_from=MODEL_DIR, pooled_condition=True, unet_channels=(48, 96),
    )  # fmt: skip
    loaded = models.load_model(str(tmp_path / "w"))
    assert loaded.cfg.unet_channels == (48, 96) and loaded.unet.config.block_out_channels == (48, 96)
    assert (
        loaded.cfg.pooled_condition
        and "(48, 96)" in json.loads((tmp_path / "w" / models.CONFIG_FILE).read_text())["how_made"]
    )
    assert sum(p.numel() for p in wider.unet.parameters()) > 2 * sum(
        p.numel() for p in models.load_model(MODEL_DIR).unet.parameters()
    )
    with pytest.raises(ValueError, match="multiples of 16"):
        pretrain.pretrain_v2(str(tmp_path / "x"), n_images=16, unet_steps=1, unet_channels=(40, 80))
    with pytest.raises(ValueError, match="keeps its widths"):
        pretrain.pretrain_v2(
            str(tmp_path / "y"), n_images=16, unet_steps=1, denoiser_from=MODEL_DIR, unet_channels=(64, 128)
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before any training or writing
