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
    model, latents, labels = _tiny_model_and_latents()
    checkpoint = str(tmp_path / "resume.pt")
    pretrain.train_unet(
        model, latents, labels, steps=3, batch=2, lr=1e-3, seed=0, resume_path=checkpoint, resume_every=2
    )
    with pytest.raises(ValueError, match="resume checkpoint .*resume.pt.* was written by another run"):
        pretrain.train_unet(model, latents, labels, steps=3, batch=4, lr=1e-3, seed=0, resume_path=checkpoint)


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining data and an autoencoder step)
def test_pretrain_v2_removes_its_checkpoint_once_the_stage_is_saved(tmp_path):
    out = tmp_path / "stage"
    pretrain.pretrain_v2(
        str(out), n_images=16, unet_steps=2, unet_batch=4, autoencoder={"n_images": 8, "steps": 1, "batch": 4}
    )
    assert not (out / pretrain.UNET_RESUME_FILE).exists()
    assert json.loads((out / models.CONFIG_FILE).read_text())["unet_resumed_at_steps"] == []
