"""`bayes-adapter stage` on monitor.jsonl files, and `export` / `push --monitor` putting its verdict in the card."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fake_hub import REPO, TOKEN
from huggingface_hub import ModelCard
from stage_controls import CONTROLS, grainy_end, paper_order
from tiny_models import bayesian_unet

from bayes_adapter import export_lora, push_to_hub
from bayes_adapter.cli import main
from bayes_adapter.stage import append_monitor_record


def _write(path, records):
    for record in records:
        append_monitor_record(path, record)
    return path


@pytest.mark.parametrize("make", CONTROLS, ids=lambda make: make.__name__)
def test_each_control_gets_its_declared_verdict_from_the_command(make, tmp_path, capsys):
    control = make()
    path = _write(tmp_path / "monitor.jsonl", control.records)
    assert main(["stage", str(path), "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["stage"] is control.stage
    assert [e["kind"] for e in verdict["episodes"]] == control.kinds
    assert [e["recovered"] for e in verdict["episodes"]] == control.recovered
    assert (verdict["fit_step"], verdict["best_step"]) == (control.fit_step, control.best_step)
    assert all({"start_step", "end_step"} <= set(e) for e in verdict["episodes"])

    assert main(["stage", str(path)]) == 0  # exit 0 whatever the verdict
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("corruption stage from" if control.stage else "no corruption stage in")
    assert len(lines) == 1 + len(control.kinds)


def test_the_sentence_names_the_checkpoint_to_go_back_to_and_the_episodes_follow(tmp_path, capsys):
    path = _write(tmp_path / "monitor.jsonl", paper_order().records)
    for step in (200, 400, 600):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert main(["stage", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "corruption stage from step 600 to 900, recovered at 1,000; best samples before it at step 400, "
        "checkpoint-400",
        "  episode 1: corruption, steps 600 to 900, recovered at 1,000",
    ]
    (tmp_path / "grainy").mkdir()
    path = _write(tmp_path / "grainy" / "monitor.jsonl", grainy_end().records)
    assert main(["stage", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "  episode 1: corruption, steps 600 to 1,100, not recovered"


def test_thresholds_change_the_verdict_and_are_reported(tmp_path, capsys):
    path = _write(tmp_path / "monitor.jsonl", paper_order().records)
    argv = ["stage", str(path), "--json", "--threshold", "whiteness_min=0.6", "--threshold", "min_records=2"]
    assert main(argv) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["stage"] is False and verdict["episodes"] == []
    assert verdict["thresholds"]["whiteness_min"] == 0.6 and verdict["thresholds"]["min_records"] == 2


@pytest.mark.parametrize(
    "threshold, message",
    [
        ("whiteness=0.5", "--threshold 'whiteness=0.5': expected NAME=VALUE with NAME one of fit_fraction, drop"),
        ("drop", "--threshold 'drop': expected NAME=VALUE"),
        ("drop=lots", "--threshold 'drop=lots': 'lots' is not a number"),
        ("min_records=2.5", "--threshold 'min_records=2.5': '2.5' is not an integer"),
        ("drop=-1", "--threshold: threshold drop=-1.0 is invalid; expected a finite number >= 0"),
        ("drop=nan", "--threshold: threshold drop=nan is invalid"),
        ("fit_fraction=2", "fit_fraction=2.0 is invalid; expected a number in (0, 1]"),
    ],
)
def test_a_bad_threshold_is_exit_2_and_one_error_line(threshold, message, tmp_path, capsys):
    path = _write(tmp_path / "monitor.jsonl", paper_order().records)
    assert main(["stage", str(path), "--threshold", threshold]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("bayes-adapter stage: error: ") and message in captured.err


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "monitor.jsonl: empty"),
        ('{"step": 1, "fidelity": 0.5, "noise_energy": 0.1}\n', "line 1: missing required field 'noise_whiteness'"),
        ('{"step": 1, "fidelity": 0.5, "noise_energy": 0.1, "noise_whiteness": "white"}\n', "line 1: field"),
        ("not json\n", "line 1: not JSON"),
    ],
)
def test_a_bad_file_is_exit_2_and_one_error_line(content, message, tmp_path, capsys):
    path = tmp_path / "monitor.jsonl"
    path.write_text(content)
    assert main(["stage", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err
    assert main(["stage", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl: no such file" in capsys.readouterr().err


def test_a_truncated_last_line_is_a_warning_and_the_rest_is_judged(tmp_path, capsys):
    path = _write(tmp_path / "monitor.jsonl", paper_order().records)
    with open(path, "a") as f:
        f.write('{"step": 1400, "fidel')
    assert main(["stage", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_records"] == len(paper_order().records)
    assert (
        captured.err
        == f"bayes-adapter stage: warning: {path}, line 14: skipped the truncated last line (a run still writing?)\n"
    )


def test_stage_help_lists_every_threshold_with_its_default(capsys):
    from bayes_adapter.stage import THRESHOLDS

    with pytest.raises(SystemExit) as raised:
        main(["stage", "--help"])
    assert raised.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: bayes-adapter stage") and "--json" in out
    for name, (default, _, _) in THRESHOLDS.items():
        assert f"{name} (default {default})" in out


def test_the_console_script_runs_the_stage_command(tmp_path):
    path = _write(tmp_path / "monitor.jsonl", paper_order().records)
    script = os.path.join(os.path.dirname(sys.executable), "bayes-adapter")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "bayes_adapter.cli"]
    result = subprocess.run([*command, "stage", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("corruption stage from step 600 to 900")


def test_export_with_monitor_writes_the_verdict_into_the_summary_and_push_into_the_card(hub, tmp_path, capsys):
    monitor = _write(tmp_path / "monitor.jsonl", paper_order().records)
    saved = tmp_path / "bayes"
    bayesian_unet("peft").save_pretrained(str(saved))
    assert main(["export", str(saved), str(tmp_path / "mean"), "--monitor", str(monitor)]) == 0
    stage = json.loads((tmp_path / "mean" / "bayes_lora_export.json").read_text())["stage"]
    assert (stage["stage"], stage["best_step"], stage["fit_step"]) == (True, 400, 300)
    assert stage["sentence"].startswith("corruption stage from step 600 to 900, recovered at 1,000")

    push_to_hub(tmp_path / "mean", REPO, token=TOKEN)  # the export's verdict reaches the card without --monitor
    (tmp_path / "README.md").write_bytes(hub.files["README.md"])
    card = ModelCard.load(tmp_path / "README.md").text
    assert "## Corruption stage" in card
    assert "| yes | 400 | 300 | 1,000 | corruption 600-900, recovered at 1,000 |" in card
    assert json.loads(hub.files["bayes_lora_export.json"])["stage"] == stage


def test_push_with_monitor_puts_the_verdict_in_the_card(hub, tmp_path, capsys):
    monitor = _write(tmp_path / "monitor.jsonl", grainy_end().records)
    saved = tmp_path / "bayes"
    bayesian_unet("peft").save_pretrained(str(saved))
    argv = ["push", str(saved), REPO, "--token", TOKEN, "--monitor", str(monitor)]
    assert main([*argv, "--local-dir", str(tmp_path / "upload")]) == 0
    card = hub.files["README.md"].decode()
    assert "not recovered by the last record (step 1,100)" in card
    assert "| yes | 400 | 300 | none | corruption 600-1,100, not recovered |" in card
    assert json.loads(hub.files["bayes_lora_export.json"])["stage"]["best_step"] == 400


def test_export_and_push_refuse_a_bad_monitor_before_any_work(hub, tmp_path, capsys):
    bad = tmp_path / "monitor.jsonl"
    bad.write_text("not json\n")
    saved = tmp_path / "bayes"
    bayesian_unet("peft").save_pretrained(str(saved))
    assert main(["export", str(saved), str(tmp_path / "mean"), "--monitor", str(bad)]) == 2
    assert "line 1: not JSON" in capsys.readouterr().err and not (tmp_path / "mean").exists()
    assert main(["push", str(saved), REPO, "--token", TOKEN, "--monitor", str(bad)]) == 2
    assert "line 1: not JSON" in capsys.readouterr().err and hub.requests == []
    with pytest.raises(ValueError, match="monitor must be the path of a monitor.jsonl file or None, got 3"):
        export_lora(saved, tmp_path / "mean", monitor=3)
