"""The DreamBooth script's --posterior_std_max: parsed, saved with the adapter, shown in the export summary and the
model card, logged, and warned about once when many stds sit at the bound."""

from __future__ import annotations

import json
import logging

import pytest
from tiny_models import dreambooth_args, tensorboard_scalars

from bayes_adapter.hub import build_model_card
from examples.dreambooth import adapters, training
from examples.dreambooth.settings import parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.parametrize(
    "extra, expected",
    [([], 0.1), (["--posterior_std_max", "none"], None), (["--posterior_std_max", "0.05"], 0.05)],
)
def test_posterior_std_max_is_a_number_none_or_ten_times_the_initial_std(tmp_path, instance_dir, extra, expected):
    settings = parse_args(dreambooth_args("no/such/model", instance_dir, tmp_path / "out", *extra))
    config = adapters.lora_config(settings, settings.unet_target_modules, 0.0)
    assert config.posterior_std_max == pytest.approx(expected) if expected else config.posterior_std_max is None
    scaled = parse_args(
        dreambooth_args("no/such/model", instance_dir, tmp_path / "out", "--posterior_std_init", "0.002", *extra)
    )
    if not extra:  # 'auto' follows --posterior_std_init
        assert adapters.lora_config(scaled, "to_q", 0.0).posterior_std_max == pytest.approx(0.02)


def test_a_bad_posterior_std_max_is_refused_before_any_work(tmp_path, instance_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(dreambooth_args("no/such/model", instance_dir, tmp_path / "out", "--posterior_std_max", "big"))
    assert exit_info.value.code == 2
    assert "expected a number > --posterior_std_init, 'auto' or 'none', got 'big'" in capsys.readouterr().err
    with pytest.raises(
        ValueError, match=r"--posterior_std_max must be a finite number > --posterior_std_init \(0.01\)"
    ):
        parse_args(dreambooth_args("no/such/model", instance_dir, tmp_path / "out", "--posterior_std_max", "0.01"))
    assert not (tmp_path / "out").exists()


def test_the_bound_is_saved_exported_logged_and_warned_about_once(tmp_path, tiny_sd, instance_dir, caplog):
    out = tmp_path / "out"
    # A bound just above the initial std: every std starts within 5% of it.
    extra = ["--posterior_std_max", "0.0101", "--max_train_steps", "3", "--report_to", "tensorboard"]
    with caplog.at_level(logging.WARNING):
        training.main(parse_args(dreambooth_args(tiny_sd, instance_dir, out, *extra)))
    warnings = [r.getMessage() for r in caplog.records if "within 5% of their bound" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "step 1: 100% of the unet's posterior stds" in warnings[0] and "lower --learning_rate" in warnings[0]
    saved = json.loads((out / "bayesian_adapter" / "unet" / "adapter_config.json").read_text())
    assert saved["posterior_std_max"] == 0.0101
    summary = json.loads((out / "export" / "unet" / "bayes_lora_export.json").read_text())
    assert summary["bayesian"]["posterior_std_max"] == 0.0101
    assert summary["posterior_std"]["max"] < 0.0101 and summary["posterior_std"]["near_bound_fraction"] > 0.1
    fraction = tensorboard_scalars(out / "logs", "sigma_near_bound_fraction")
    assert sorted(fraction) == [1, 2, 3] and fraction[1] == 1.0


def test_the_model_card_shows_the_bound_and_the_stds_near_it():
    summary = {
        "component": "unet",
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["to_q"],
        "bayesian": {"posterior_std_init": 0.01, "posterior_std_max": 0.1},
        "posterior_std": {"mean": 0.05, "min": 0.01, "max": 0.099, "count": 8, "near_bound_fraction": 0.25},
    }
    card = str(build_model_card(summary, "me/dog"))
    assert "| posterior std bound (posterior_std_max) | 0.1 |" in card
    assert "| posterior stds within 5% of the bound | 25.0% |" in card
    # A summary exported before the bound existed (or with posterior_std_max=None): unbounded.
    del summary["bayesian"]["posterior_std_max"], summary["posterior_std"]["near_bound_fraction"]
    card = str(build_model_card(summary, "me/dog"))
    assert "| posterior std bound (posterior_std_max) | none (unbounded) |" in card
    assert "within 5% of the bound" not in card
