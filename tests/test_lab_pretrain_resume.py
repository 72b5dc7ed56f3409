"""Pretraining a lab denoiser stage resumes within the stage (examples/corruption_stage/model/pretrain.py)."""

import json

import pytest
import torch

from examples.corruption_stage.model import data, models, pretrain


def _tiny_model_and_latents():
    model = models.new_model(
        models.LabModelConfig(extra_tokens=data.V2_EXTRA_TOKENS, prediction_type="v_prediction"), seed=0
    )
    images, labels = data.make_v2_pretraining_set(8, seed=0)
    with torch.no_grad():
        latents = pretrain.encode_all(model, images)
    return model, latents, labels


class _CutOff(Exception):
    pass


@pytest.mark.slow  # tens of seconds on 2 cores (three tiny models trained)
def test_a_cut_off_denoiser_stage_resumes_where_its_checkpoint_left_it(tmp_path, monkeypatch):
    steps = dict(steps=6, batch=2, lr=1e-3, seed=5)
    straight, latents, labels = _tiny_model_and_latents()
    expected = pretrain.train_unet(straight, latents, labels, **steps)

    cut, _, _ = _tiny_model_and_latents()
    checkpoint = str(tmp_path / "resume.pt")
    loss, calls = pretrain.diffusion_loss, []

    def cut_off_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # step index 4: after the checkpoint written at step 4
            raise _CutOff
        return loss(*args, **kwargs)

    monkeypatch.setattr(pretrain, "diffusion_loss", cut_off_at_step_4)
    with pytest.raises(_CutOff):
        pretrain.train_unet(cut, latents, labels, **steps, resume_path=checkpoint, resume_every=2)
    monkeypatch.setattr(pretrain, "diffusion_loss", loss)

    resumed, _, _ = _tiny_model_and_latents()  # a new process would build its model afresh
    result = pretrain.train_unet(resumed, latents, labels, **steps, resume_path=checkpoint, resume_every=2)
    assert result["resumed_at"] == [4] and expected["resumed_at"] == []
    assert [h["step"] for h in result["history"]] == [h["step"] for h in expected["history"]]
    for name, value in straight.unet.state_dict().items():
        torch.testing.assert_close(resumed.unet.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    for name, value in straight.cond.state_dict().items():
        torch.testing.assert_close(resumed.cond.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    moved = [k for k, v in straight.unet.state_dict().items() if not torch.equal(v, cut.unet.state_dict()[k])]
    assert moved  # the comparison could fail: the cut-off run's weights are not the finished ones


def test_a_checkpoint_of_another_run_is_refused_by_name(tmp_path):
    checkpoint = str(tmp_path / "resume.pt")
    settings = dict(steps=3, batch=2, lr=1e-3, seed=0, resume_path=checkpoint, resume_every=2)
    model, latents, labels = _tiny_model_and_latents()
    pretrain.train_unet(model, latents, labels, **settings, run_note={"denoiser_from": "a"})
    refused = "resume checkpoint .*resume.pt.* was written by another run"
    for changes in ({"batch": 4}, {"run_note": {"denoiser_from": "b"}}):  # other settings; another source model
        fresh, _, _ = _tiny_model_and_latents()
        with pytest.raises(ValueError, match=refused):
            pretrain.train_unet(fresh, latents, labels, **{**settings, "run_note": {"denoiser_from": "a"}, **changes})
    other_start = models.new_model(fresh.cfg, seed=1)  # same settings, other starting weights
    with pytest.raises(ValueError, match=refused):
        pretrain.train_unet(other_start, latents, labels, **settings, run_note={"denoiser_from": "a"})
    fresh, _, _ = _tiny_model_and_latents()  # the same run resumes
    result = pretrain.train_unet(fresh, latents, labels, **settings, run_note={"denoiser_from": "a"})
    assert result["resumed_at"] == [2]


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining data and an autoencoder step, three times)
def test_pretrain_v2_resumes_a_cut_off_stage_and_removes_its_checkpoint_once_saved(tmp_path, monkeypatch):
    out = tmp_path / "stage"
    stage = dict(n_images=16, unet_steps=3, unet_batch=4, autoencoder={"n_images": 8, "steps": 1, "batch": 4})
    loss, calls = pretrain.diffusion_loss, []

    def cut_off_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise _CutOff
        return loss(*args, **kwargs)

    monkeypatch.setattr(pretrain, "diffusion_loss", cut_off_at_step_2)
    with pytest.raises(_CutOff):
        pretrain.pretrain_v2(str(out), **stage, resume_every=1)
    monkeypatch.setattr(pretrain, "diffusion_loss", loss)
    assert (out / pretrain.UNET_RESUME_FILE).exists() and not (out / models.CONFIG_FILE).exists()
    with pytest.raises(ValueError, match="was written by another run"):  # another stage into the same folder
        pretrain.pretrain_v2(str(out), **{**stage, "n_images": 12}, resume_every=1)
    pretrain.pretrain_v2(str(out), **stage, resume_every=1)
    assert not (out / pretrain.UNET_RESUME_FILE).exists()
    assert json.loads((out / models.CONFIG_FILE).read_text())["unet_resumed_at_steps"] == [2]
