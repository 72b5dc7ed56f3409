"""The DreamBooth script's command line: --help, defaults, and bad input refused before any model loads."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from tiny_models import (
    DREAMBOOTH_SCRIPT,
    dreambooth_args,
    write_images,
)

from bayes_adapter import BayesLoraConfig
from examples.dreambooth import adapters
from examples.dreambooth.settings import parse_args


SCRIPT = DREAMBOOTH_SCRIPT
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_help_lists_every_bayesian_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    # Every field BayesLoraConfig adds to LoraConfig has its flag (train_posterior_std=False is --fixed_posterior_std).
    from bayes_adapter.adapter import BAYESIAN_CONFIG_FIELDS

    assert set(BAYESIAN_CONFIG_FIELDS) == {
        "bayesian_factors",
        "embedding_bayesian_factors",
        "posterior_std_init",
        "prior_std",
        "estimator",
        "sample_at_inference",
        "train_posterior_std",
        "kl_weight",
        "posterior_std_parametrisation",
        "posterior_std_max",
    }
    for field in BAYESIAN_CONFIG_FIELDS:
        assert ("--fixed_posterior_std" if field == "train_posterior_std" else f"--{field}") in text
    for flag in (
        "--kl_scaling",
        "--rank",
        "--train_text_encoder",
        "--with_prior_preservation",
        "--resume_from_checkpoint",
        "--push_to_hub",
    ):
        assert flag in text


def test_help_runs_as_a_script():
    process = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert "--posterior_std_init" in process.stdout and "--instance_data_dir" in process.stdout


def test_help_of_hub_model_id_and_scale_lr(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "required with --push_to_hub" in text and "default: the output folder name" not in text
    assert "Multiply --learning_rate (and --posterior_std_learning_rate when given)" in text
    assert "Multiplied like --learning_rate with --scale_lr" in text


def test_defaults_are_the_papers_and_flags_reach_the_config(tmp_path, instance_dir):
    args = parse_args(dreambooth_args("no/such/model", instance_dir, tmp_path / "out"))
    config = adapters.lora_config(args, args.unet_target_modules, args.kl_weight)
    defaults = BayesLoraConfig()
    for field in ("bayesian_factors", "posterior_std_init", "prior_std", "estimator", "kl_weight"):
        assert getattr(config, field) == getattr(defaults, field)
    assert (config.r, config.lora_alpha, args.learning_rate) == (4, 4, 1e-4)

    args = parse_args(
        dreambooth_args(
            "no/such/model",
            instance_dir,
            tmp_path / "out",
            "--bayesian_factors",
            "AB",
            "--posterior_std_init",
            "0.02",
            "--prior_std",
            "0.5",
            "--estimator",
            "flipout",
            "--kl_weight",
            "0.1",
            "--fixed_posterior_std",
            "--sample_at_inference",
            "--rank",
            "8",
            "--lora_alpha",
            "16",
        )
    )
    config = adapters.lora_config(args, "to_q,to_v", args.kl_weight)
    assert (config.bayesian_factors, config.posterior_std_init, config.prior_std) == ("AB", 0.02, 0.5)
    assert (config.estimator, config.kl_weight, config.train_posterior_std) == ("flipout", 0.1, False)
    assert (config.sample_at_inference, config.r, config.lora_alpha) == (True, 8, 16)
    assert set(config.target_modules) == {"to_q", "to_v"}


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing", [], r"--instance_data_dir='.*missing' is not an existing folder"),
        ("empty", [], r"--instance_data_dir='.*empty' is empty; expected at least one image"),
        ("unreadable", [], r"--instance_data_dir: '.*broken\.png' is not a readable image"),
        ("ok", ["--resolution", "36"], r"--resolution=36 is invalid; expected a positive multiple of 8"),
        ("ok", ["--with_prior_preservation", "--class_data_dir", "cls"], r"--with_prior_preservation needs --class_"),
        ("ok", ["--with_prior_preservation", "--class_prompt", "a dog"], r"needs --class_data_dir"),
        ("ok", ["--posterior_std_init", "-1"], r"posterior_std_init must be a finite number > 0, got -1"),
        ("ok", ["--kl_weight", "-0.5"], r"kl_weight must be a finite number >= 0, got -0.5"),
        ("ok", ["--posterior_std_learning_rate", "0"], r"--posterior_std_learning_rate=0.0 is invalid; expected a"),
        ("ok", ["--max_train_steps", "0"], r"--max_train_steps=0 is invalid; expected an integer >= 1"),
        ("ok", ["--learning_rate", "nan"], r"--learning_rate=nan is invalid; expected a finite number >= 0"),
        ("ok", ["--max_grad_norm", "inf"], r"--max_grad_norm=inf is invalid; expected a finite number >= 0"),
        ("ok", ["--posterior_std_learning_rate", "inf"], r"--posterior_std_learning_rate=inf is invalid; expected a"),
        ("ok", ["--resume_from_checkpoint", "checkpoint-7"], r"--resume_from_checkpoint='checkpoint-7' is not"),
        ("ok", ["--push_to_hub"], r"--push_to_hub needs --hub_model_id as 'user/name', got None"),
        ("ok", ["--push_to_hub", "--hub_model_id", "me/dog"], r"--push_to_hub cannot upload in offline mode"),
    ],
)
def test_bad_arguments_fail_before_any_model_loads(tmp_path, monkeypatch, case, extra, message):
    from diffusers import UNet2DConditionModel

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_loading)
    folder = tmp_path / case
    if case == "empty":
        folder.mkdir()
    elif case == "unreadable":
        write_images(folder, 1)
        (folder / "broken.png").write_bytes(b"not an image")
    elif case == "ok":
        write_images(folder, 1)
    with pytest.raises(ValueError, match=message):
        parse_args(dreambooth_args("no/such/model", folder, tmp_path / "out", *extra))


def test_kl_weight_must_be_a_number_or_elbo(tmp_path, instance_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(dreambooth_args("no/such/model", instance_dir, tmp_path / "out", "--kl_weight", "big"))
    assert exit_info.value.code == 2
    assert "expected a number >= 0 or 'elbo', got 'big'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "30"], "--resolution=30 is invalid; expected a positive multiple of 8"),
        (["--learning_rate", "nan"], "--learning_rate=nan is invalid"),
        (["--with_prior_preservation"], "--with_prior_preservation needs --class_"),
        (["--lr_scheduler", "warmup_cosine"], "argument --lr_scheduler: invalid choice: 'warmup_cosine'"),
    ],
)
def test_the_script_reports_bad_input_without_a_traceback(tmp_path, instance_dir, extra, message):
    argv = dreambooth_args("no/such/model", instance_dir, tmp_path / "out", *extra)
    process = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120)
    assert process.returncode == 2, process.stderr
    assert "error: " in process.stderr and message in process.stderr
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        ("empty_caption", [], r"--caption_extension: '.*0\.txt' is empty"),
        ("ok", ["--caption_dropout", "1.0"], r"--caption_dropout=1.0 is invalid; expected a number in \[0, 1\)"),
        ("ok", ["--repeats", "0"], "--repeats=0 is invalid; expected an integer >= 1"),
    ],
)
def test_bad_caption_arguments(tmp_path, setup, extra, message):
    folder = write_images(tmp_path / "imgs", 1)
    if setup == "empty_caption":
        next(folder.iterdir()).with_suffix(".txt").write_text("  \n")
    with pytest.raises(ValueError, match=message):
        parse_args(dreambooth_args("no/such/model", folder, tmp_path / "out", *extra))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--optimizer", "prodigy"], "--optimizer prodigy needs the prodigyopt package, which is not installed"),
        (["--use_8bit_adam"], "--use_8bit_adam needs the bitsandbytes package, which is not installed"),
    ],
)
def test_optional_optimizers_are_refused_clearly_when_absent(tmp_path, instance_dir, monkeypatch, extra, message):

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("prodigyopt", "bitsandbytes") else real_find_spec(name, *a),
    )
    with pytest.raises(ValueError, match=message):
        parse_args(dreambooth_args("no/such/model", instance_dir, tmp_path / "out", *extra))


def test_every_option_has_help_text_and_shows_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    options = text[text.index("options:") :]
    # One block per option: it starts at a line "  --flag ..." and runs to the next such line or heading.
    blocks = re.split(r"\n(?=  -)|\n\n", options)
    checked = 0
    for block in blocks:
        if not block.startswith("  --") or block.startswith("  -h"):
            continue
        flag = block.split()[0]
        words = " ".join(block.split())
        described = words.split(" ", 1)[1] if " " in words else ""
        assert re.search(r"[a-z]{3}", described.replace(flag.upper().lstrip("-"), "")), f"{flag} has no help text"
        assert re.search(r"default|\(required\)", words, re.I), f"{flag} does not show its default: {words}"
        checked += 1
    assert checked >= 80, checked
    assert "--rank RANK LoRA rank r. (default: 4)" in " ".join(text.split())
    assert "--center_crop Centre-crop instead of random-crop. (off by default)" in " ".join(text.split())


def test_bayesian_config_errors_name_the_flags(tmp_path, instance_dir):
    with pytest.raises(ValueError, match=r"Invalid Bayesian LoRA settings: --prior_std must be a finite number > 0"):
        parse_args(dreambooth_args("no/such/model", instance_dir, tmp_path / "out", "--prior_std", "-1"))
