"""`python -m examples.corruption_stage reproduce`: every lab v2 command RESULTS.md quotes, in order."""

import os
import re
import subprocess
import sys

import pytest

from examples.corruption_stage import __main__ as lab_main
from examples.corruption_stage import reproduce


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quoted_commands(text: str) -> set[str]:
    found = re.finditer(r"`(python\s+-m\s+examples\.corruption_stage\s[^`]*)`", text, re.S)
    return {" ".join(m.group(1).split()) for m in found}


def test_reproduce_lists_exactly_the_v2_commands_results_md_quotes():
    text = open(os.path.join(ROOT, "examples", "corruption_stage", "RESULTS.md")).read()
    assert text.count("\n## History: lab v2") == 1 and text.count("\n## History: lab v1") == 1
    v2_part = text.split("\n## History: lab v2")[1].split("\n## History: lab v1")[0]
    steps = {step.quoted for step in reproduce.V2_STEPS}
    assert len(steps) == len(reproduce.V2_STEPS)
    assert _quoted_commands(v2_part) == steps
    subcommands = set(lab_main.SUBCOMMANDS)
    for step in reproduce.V2_STEPS:  # each step names a subcommand of the lab and runs what the report quotes
        assert step.command.split()[0] in subcommands
        assert step.argv[:3] == [sys.executable, "-m", "examples.corruption_stage"]
        assert " ".join(["python", "-m", "examples.corruption_stage", *step.argv[3:]]) == step.quoted


def test_a_reproduce_step_runs_a_subcommand_of_the_lab():
    step = reproduce.Step("gate --seeds 0 --out x", 1)
    assert step.quoted == "python -m examples.corruption_stage gate --seeds 0 --out x"
    assert step.argv == [sys.executable, "-m", "examples.corruption_stage", "gate", "--seeds", "0", "--out", "x"]


def test_reproduce_runs_its_steps_in_order_and_stops_at_a_failure(capsys):
    listing = reproduce.Step("reproduce --list", 0)
    failing = reproduce.Step("reproduce --from 0", 0)
    reproduce.run((listing, listing), start=2)
    out = capsys.readouterr().out
    assert "[2/2] python -m examples.corruption_stage reproduce --list" in out and "[1/2]" not in out
    with pytest.raises(subprocess.CalledProcessError):
        reproduce.run((failing, listing))
    assert "[2/2]" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="start must be in 1..2, got 3"):
        reproduce.run((listing, listing), start=3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "--from", "0"], "--from must be in 1.."),
        (["experiment", "--v2", "--full", "--seeds", "1"], "it takes no --seeds"),
    ],
)
def test_reproduce_refuses_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        lab_main.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
