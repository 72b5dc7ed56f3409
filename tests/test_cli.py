"""The `bayes-adapter` console command: export and push subcommands, their --help, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fake_hub import REPO, TOKEN
from huggingface_hub import constants
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import ADAPTER_V0_1_0, bayesian_unet

import bayes_adapter
from bayes_adapter.cli import main


@pytest.fixture
def saved_adapter(tmp_path):
    bayesian_unet("peft").save_pretrained(str(tmp_path / "bayes"))
    return tmp_path / "bayes"


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["push", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bayes-adapter")
    if argv[0] == "export":
        assert "--overwrite" in out and "kohya" in out
    if argv[0] == "push":
        assert "--include-bayesian" in out and "repo_id" in out


def test_console_script_help():
    script = os.path.join(os.path.dirname(sys.executable), "bayes-adapter")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "bayes_adapter.cli"]
    result = subprocess.run([*command, "export", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: bayes-adapter export" in result.stdout


def test_export_command(saved_adapter, tmp_path, capsys):
    out = tmp_path / "mean"
    assert main(["export", str(saved_adapter), str(out), "--format", "diffusers", "kohya"]) == 0
    assert sorted(os.listdir(out)) == [
        "bayes_lora_export.json",
        "lora_kohya.safetensors",
        "pytorch_lora_weights.safetensors",
    ]
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert all(k.startswith("unet.") and "rho" not in k for k in f.keys())
    assert str(out) in capsys.readouterr().out

    # Existing output: refused with the argument named, exit status 2, nothing changed.
    before = sorted(os.listdir(out))
    assert main(["export", str(saved_adapter), str(out)]) == 2
    err = capsys.readouterr().err
    # The message names the command's words (OUT, --overwrite), not the library's (out_dir=, overwrite=True).
    assert f"OUT={str(out)!r} already exists; pass --overwrite to replace it" in err and "overwrite=True" not in err
    assert sorted(os.listdir(out)) == before
    assert main(["export", str(saved_adapter), str(out), "--overwrite"]) == 0
    assert "adapter_config.json" in os.listdir(out)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_export_command_bad_input(saved_adapter, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "a")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["export", str(saved_adapter), str(tmp_path / "a"), "--adapter-name", "nope"]) == 2
    assert "--adapter-name='nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        main(["export", str(saved_adapter), str(tmp_path / "a"), "--format", "ckpt"])
    assert raised.value.code == 2
    assert not (tmp_path / "a").exists()


def test_push_command(hub, saved_adapter, tmp_path, capsys):
    argv = ["push", str(saved_adapter), REPO, "--token", TOKEN, "--include-bayesian", "--base-model", "org/base"]
    assert main([*argv, "--local-dir", str(tmp_path / "upload")]) == 0
    assert "bayesian/adapter_model.safetensors" in hub.files and "pytorch_lora_weights.safetensors" in hub.files
    out = capsys.readouterr()
    assert REPO in out.out and TOKEN not in out.out + out.err


def test_push_command_errors(hub, saved_adapter, tmp_path, capsys, monkeypatch):
    assert main(["push", str(saved_adapter), "not a repo"]) == 2
    assert "REPO_ID='not a repo'" in capsys.readouterr().err
    hub.fail["/commit/"] = 403
    assert main(["push", str(saved_adapter), REPO, "--token", TOKEN, "--local-dir", str(tmp_path / "up")]) == 1
    err = capsys.readouterr().err
    assert REPO in err and "403" in err and TOKEN not in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(saved_adapter), REPO]) == 1
    assert "offline mode" in capsys.readouterr().err


def test_export_command_corrupt_weights_exit_2(saved_adapter, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    assert main(["export", str(broken), str(tmp_path / "out")]) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_command_accepts_an_adapter_saved_by_v0_1_0(tmp_path, capsys):
    out = tmp_path / "mean"
    assert main(["export", str(ADAPTER_V0_1_0), str(out), "--format", "diffusers"]) == 0
    summary = json.loads((out / "bayes_lora_export.json").read_text())
    assert summary["bayesian"]["posterior_std_parametrisation"] == "softplus"
    reference = load_file(str(ADAPTER_V0_1_0 / "reference_v0_1_0.safetensors"))
    stds = torch.cat([v.flatten() for k, v in reference.items() if k.startswith("posterior_std.")])
    assert summary["posterior_std"]["count"] == stds.numel()
    assert summary["posterior_std"]["min"] == pytest.approx(stds.min().item(), rel=1e-6)
    assert summary["posterior_std"]["max"] == pytest.approx(stds.max().item(), rel=1e-6)
    assert summary["posterior_std"]["mean"] == pytest.approx(stds.double().mean().item(), rel=1e-5)
    saved = load_file(str(ADAPTER_V0_1_0 / "adapter_model.safetensors"))
    exported = load_file(str(out / "pytorch_lora_weights.safetensors"))
    means = {k: v for k, v in saved.items() if "posterior" not in k}
    assert len(exported) == len(means)
    assert sorted(torch.cat([v.flatten() for v in exported.values()]).tolist()) == sorted(
        torch.cat([v.flatten() for v in means.values()]).tolist()
    )


def test_export_command_full_disk_is_a_message_not_a_traceback(saved_adapter, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import bayes_adapter.export as export_module

    def full_disk(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    out = tmp_path / "mean"
    assert main(["export", str(saved_adapter), str(out)]) == 0
    before = sorted(os.listdir(out))
    monkeypatch.setattr(export_module, "save_file", full_disk)
    assert main(["export", str(saved_adapter), str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "failed: SafetensorError: No space left on device" in err and "Traceback" not in err
    assert sorted(os.listdir(out)) == before


def test_push_command_corrupt_export_summary(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    export = tmp_path / "export"
    bayes_adapter.export_lora(bayesian_unet(), export)
    (export / "bayes_lora_export.json").write_text("{not json")
    assert main(["push", str(export), REPO, "--token", TOKEN]) == 2
    assert "bayes_lora_export.json' is not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("bayesian_factors", "C", "bayesian_factors must be one of"),
        ("prior_std", -1, "prior_std must be a finite number > 0, got -1"),
        ("estimator", "mcmc", "estimator must be one of"),
    ],
)
def test_export_of_a_hand_edited_invalid_config_writes_nothing(saved_adapter, tmp_path, capsys, field, value, message):
    config_file = saved_adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config[field] = value
    config_file.write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["export", str(saved_adapter), str(out)]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json is invalid" in err and message in err and "Nothing was written" in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
