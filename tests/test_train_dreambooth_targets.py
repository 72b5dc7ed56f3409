"""The DreamBooth script's LoRA target names, checked against the model before any weights load."""

from __future__ import annotations

import pytest
from tiny_models import dreambooth_args

from examples.dreambooth import training
from examples.dreambooth.settings import parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def no_weights(monkeypatch):
    """Fails any weight loading: the checks must run on the configs alone."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the target names were checked")

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize(
    "family, extra, message",
    [
        (
            "sd",
            ["--unet_target_modules", "to_qq"],
            r"--unet_target_modules: 'to_qq' names no layer of the unet of "
            r"SD 1\.x/2\.x .*closest valid names: to_q",
        ),
        # A partial list is refused too: to_v exists, to_qq does not.
        ("sd", ["--unet_target_modules", "to_qq,to_v"], r"'to_qq' names no layer"),
        ("sd", ["--unet_target_modules", "to_v, ,"], None),  # blanks are dropped, to_v exists
        ("sd", ["--unet_target_modules", " , "], r"--unet_target_modules=' , ' names no module"),
        (
            "sd",
            ["--train_text_encoder", "--text_encoder_target_modules", "q_proj,k_projj"],
            r"--text_encoder_target_modules: 'k_projj' names no layer of the text_encoder .*closest valid names: k_proj",
        ),
        ("sd", ["--text_encoder_target_modules", "k_projj"], None),  # no --train_text_encoder: not used
        (
            "sd",
            ["--transformer_target_modules", "attn.to_q"],
            r"--transformer_target_modules applies to flow-matching",
        ),
        (
            "flux",
            ["--transformer_target_modules", "attn.to_q,ff.net.3"],
            r"--transformer_target_modules: 'ff\.net\.3' "
            r"names no layer of the transformer of Flux\.1.*closest valid names: .*ff\.net\.2",
        ),
        ("sd3", ["--transformer_target_modules", "attn.to_q,attn.add_q_proj"], None),
        ("flux", ["--train_text_encoder", "--text_encoder_target_modules", "q_proj,v_proj"], None),
    ],
)
def test_target_names_are_checked_before_any_weights_load(
    request, tmp_path, instance_dir, no_weights, family, extra, message
):
    model = request.getfixturevalue(f"tiny_{family}")
    argv = dreambooth_args(model, instance_dir, tmp_path / "out", *extra)
    if message is None:
        parse_args(argv)
    else:
        with pytest.raises(ValueError, match=message):
            parse_args(argv)


def test_the_command_line_reports_an_unknown_target_in_one_line(tmp_path, tiny_sd, instance_dir, capsys):
    status = training.run_command(
        dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", "--unet_target_modules", "to_k,to_qq")
    )
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "error: --unet_target_modules: 'to_qq'" in err and "to_q" in err
    assert not (tmp_path / "out").exists()
