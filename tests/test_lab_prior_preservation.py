"""The lab's DreamBooth prior preservation (PLAN_V2.md step 4's sweep): class images drawn by the base model."""

import pytest

from examples.corruption_stage.experiment_cli import parse_args
from examples.corruption_stage.model import data, models
from examples.corruption_stage.study import experiment


REAL_SAMPLE = experiment.sample  # captured once: a second monkeypatch must not wrap the first one's recorder


def _run(monkeypatch, prior_loss_weight: float) -> tuple[dict, list]:
    calls = []

    def recording_sample(model, token, n, *args, **kwargs):
        calls.append((token, n, args[:1], model is base))
        return REAL_SAMPLE(model, token, n, *args, **kwargs)

    monkeypatch.setattr(experiment, "sample", recording_sample)
    base = models.new_model(models.LabModelConfig(extra_tokens=data.V2_EXTRA_TOKENS))
    cfg = experiment.ExperimentConfig(
        arms=("lora",), steps=2, eval_every=1, n_eval=2, sample_steps=2, width_timesteps=(20,),
        prompt=data.v2_prompt("circle"), subject_kind="circle", v2_measures=True,
        prior_loss_weight=prior_loss_weight, num_class_images=3,
    )  # fmt: skip
    train = cfg.subject_set(base.cfg.image_size)
    recon = base.decode(base.encode(train)).detach()
    return experiment.run_arm(base, "lora", train, 0, cfg, recon)["curves"], calls


def test_prior_preservation_trains_on_the_base_models_class_samples(monkeypatch):
    plain, plain_calls = _run(monkeypatch, 0.0)
    prior, prior_calls = _run(monkeypatch, 1.0)
    class_token = data.KINDS.index("circle")
    assert prior_calls[0] == (class_token, 3, (30_000,), True)  # first, from the class seed, by the base model
    assert not any(is_base for *_, is_base in prior_calls[1:])  # the evaluations sample the fine-tuned model
    assert all(token != class_token for token, *_ in plain_calls)
    assert prior["loss"][1] == plain["loss"][1]  # the subject's loss of the first step: same batch, same weights
    assert prior["loss"][2] != plain["loss"][2]  # the class loss changed the update


def test_prior_preservation_needs_a_class_token_and_sane_values(capsys):
    with pytest.raises(ValueError, match="prior_loss_weight needs a v2 prompt"):
        experiment.ExperimentConfig(prior_loss_weight=1.0)
    with pytest.raises(ValueError, match="prior_loss_weight must be >= 0 and num_class_images >= 1, got -1.0 and 32"):
        experiment.ExperimentConfig(prior_loss_weight=-1.0, prompt=data.v2_prompt())
    cfg = parse_args(["--v2", "--prior-loss-weight", "0.5", "--num-class-images", "4", "--out", "unused"]).config
    assert (cfg.prior_loss_weight, cfg.num_class_images) == (0.5, 4)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--prior-loss-weight", "1"])
    assert exit_info.value.code == 2 and "error: prior_loss_weight needs a v2 prompt" in capsys.readouterr().err
