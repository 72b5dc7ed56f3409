"""Lab v2's subject kind (PLAN_V2.md, sixth session): the same checkered subject on a kind the base model draws."""

import pytest
import torch

from examples.corruption_stage.experiment_cli import parse_args
from examples.corruption_stage.model import data, models
from examples.corruption_stage.study import experiment, gate


def test_the_subject_kind_sets_the_images_the_prompt_and_the_clip_text():
    assert data.class_token("cross") == data.CLASS_TOKEN and data.v2_prompt() == (data.SUBJECT_TOKEN, data.CLASS_TOKEN)
    assert data.v2_prompt("ring") == (data.SUBJECT_TOKEN, data.KINDS.index("ring"))
    cross, circle = data.make_subject_set(3), data.make_subject_set(3, kind="circle")
    assert cross.shape == circle.shape == (3, 3, 32, 32) and not torch.equal(cross, circle)
    assert torch.equal(cross, data.make_subject_set(3, kind="cross"))  # the default is the cross, as before
    cfg = experiment.ExperimentConfig(subject_kind="ring", n_images=(2,))
    assert cfg.clip_prompt == "a photo of a red and yellow checkered ring"
    assert torch.equal(cfg.subject_set(32), data.make_subject_set(2, kind="ring"))
    assert experiment.ExperimentConfig(clip_prompt="a cross").clip_prompt == "a cross"
    with pytest.raises(ValueError, match="subject_kind must be one of .* got 'blob'"):
        data.make_subject_set(1, kind="blob")
    with pytest.raises(ValueError, match="subject_kind must be one of .* got 'blob'"):
        experiment.ExperimentConfig(subject_kind="blob")


def test_the_lab_command_prompts_the_subject_kind_and_needs_v2(capsys):
    cfg = parse_args(["--v2", "--subject-kind", "circle", "--out", "unused"]).config
    assert cfg.subject_kind == "circle" and cfg.prompt == (data.SUBJECT_TOKEN, data.KINDS.index("circle"))
    assert cfg.clip_prompt == "a photo of a red and yellow checkered circle"
    assert parse_args(["--v2", "--out", "unused"]).config.prompt == (data.SUBJECT_TOKEN, data.CLASS_TOKEN)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--subject-kind", "circle"])
    assert exit_info.value.code == 2
    assert "error: --subject-kind circle needs --v2" in capsys.readouterr().err


@pytest.mark.parametrize("kind, labels, hits", [("circle", ["circle", "ring"], 1), ("square", ["diamond"] * 2, 2)])
def test_gate_one_counts_samples_of_the_subject_kind_prompt(monkeypatch, kind, labels, hits):
    prompted = []

    def fake_sample_kinds(model, classifier, token, n, *rest):
        prompted.append(token)
        return torch.tensor([gate.CLASSES.index(label) for label in labels])

    monkeypatch.setattr(gate, "sample_kinds", fake_sample_kinds)

    def always(kind):  # a stand-in classifier that calls every image one kind
        return lambda images: torch.nn.functional.one_hot(
            torch.full((len(images),), gate.CLASSES.index(kind)), len(gate.CLASSES)
        ).float()

    model = models.new_model(models.LabModelConfig(extra_tokens=data.V2_EXTRA_TOKENS))
    cfg = experiment.ExperimentConfig(subject_kind=kind, n_eval=len(labels))
    result = gate.class_gate(model, cfg, always(kind))
    assert prompted == [data.class_token(kind)] and result["class_kind"] == kind
    assert result["class_samples_classified_as_class"] == hits and result["of"] == len(labels)
    assert result["classifier_subject_images_called_class"] == 5  # the stand-in calls every subject image `kind`
    held_out = result["classifier_accuracy_held_out_class"]
    assert held_out == result["classifier_accuracy_held_out_per_kind"]["square" if kind == "square" else kind] == 1.0
    assert not result["passed"]  # 2 samples can never reach 8 of 12
