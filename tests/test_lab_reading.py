"""The arms study's declared reading (PLAN_V2.md): frontier at 0.9 x the SSIM ceiling, comparison, stage counts."""

import json
import math

import pytest

from examples.corruption_stage import reading


def _run(arm: str, seed: int, fidelity: list[float], copies: list[float], diversity: list[float] | None = None):
    n = len(fidelity)
    return {
        "arm": arm,
        "seed": seed,
        "n_images": 1,
        "curves": {
            "iteration": [100 * i for i in range(n)],
            "ssim_fidelity": fidelity,
            "ssim_ceiling": [1.0] * n,
            "latent_copy_rate": copies,
            "diversity": diversity or [0.1] * n,
            "whiteness": [0.3] * n,
            "latent_energy": [0.1] * n,
        },
    }


def _result(runs: list[dict]) -> dict:
    return {"config": {"seeds": sorted({r["seed"] for r in runs})}, "runs": runs}


def test_an_arm_copies_less_only_by_more_than_the_seed_spread():
    runs = [_run("lora", s, [0.0, 0.95, 0.95], [0.0, 1.0, 1.0]) for s in range(3)]
    runs += [_run("bayes_kl", s, [0.0, 0.91, 0.95], [0.0, 0.0, 1.0], [0.1, 0.3, 0.2]) for s in range(3)]
    runs += [_run("l2", s, [0.0, 0.91, 0.95], [0.0, 0.5 * (s == 0), 1.0]) for s in range(3)]
    out = reading.read_arms(_result(runs))
    assert out["fidelity_level"] == pytest.approx(0.9)
    arms = out["arms"]
    assert arms["lora"]["latent_copy_rate"]["mean"] == 1.0
    assert arms["bayes_kl"]["latent_copy_rate"]["per_seed"] == [0.0, 0.0, 0.0]
    assert arms["bayes_kl"]["copies_less_than_plain_lora"] and arms["bayes_kl"]["more_diverse_than_plain_lora"]
    # l2: frontier copy rates 0.5, 0, 0 -> mean 1/6 below plain LoRA's 1.0, std 0.24: still less
    assert arms["l2"]["copies_less_than_plain_lora"] and not arms["l2"]["more_diverse_than_plain_lora"]
    assert arms["early_stopping"]["iteration"]["mean"] == 100.0  # the first of the tied best checkpoints
    assert "copies_less_than_plain_lora" not in arms["lora"]


def test_an_arm_below_the_level_on_one_seed_is_not_matched():
    runs = [_run("lora", s, [0.0, 0.95], [0.0, 1.0]) for s in range(3)]
    runs += [_run("fixed_noise", s, [0.0, 0.95 if s else 0.5], [0.0, 0.0]) for s in range(3)]
    arms = reading.read_arms(_result(runs))["arms"]
    assert not arms["fixed_noise"]["reaches_level"]
    assert math.isnan(arms["fixed_noise"]["latent_copy_rate"]["per_seed"][0])
    assert arms["fixed_noise"]["copies_less_than_plain_lora"] is False


def test_the_stage_rule_counts_seeds():
    # a dip after the peak, with whiter and larger residuals, on two consecutive checkpoints before the copies
    dip = _run("lora", 0, [0.0, 0.9, 0.5, 0.5, 0.95], [0.0, 0.0, 0.0, 0.0, 1.0])
    dip["curves"]["whiteness"] = [0.3, 0.3, 0.5, 0.5, 0.3]
    dip["curves"]["latent_energy"] = [2.0, 0.2, 0.5, 0.5, 0.05]
    runs = [dip, {**dip, "seed": 1}, _run("lora", 2, [0.0, 0.9, 0.5, 0.5, 0.95], [0.0, 0.0, 0.0, 0.0, 1.0])]
    lora = reading.read_arms(_result(runs))["arms"]["lora"]
    assert (lora["stage_seeds"], lora["stage_appears"]) == (2, True)
    assert lora["first_copy_iterations"] == [400, 400, 400]


def test_main_writes_the_reading_and_refuses_what_it_cannot_read(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_result([_run("lora", s, [0.0, 0.95], [0.0, 1.0]) for s in range(3)])))
    reading.main([str(path), "--out", str(tmp_path / "reading.json")])
    assert "| plain LoRA | 3 | True | 1.000 ± 0.000 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "reading.json").read_text())["arms"]["lora"]["seeds"] == [0, 1, 2]
    path.write_text(json.dumps(_result([_run("bayes_kl", 0, [0.0, 0.95], [0.0, 1.0])])))
    with pytest.raises(SystemExit) as exit_info:
        reading.main([str(path), "--out", str(tmp_path / "reading.json")])
    assert exit_info.value.code == 2 and "error: the reading needs plain LoRA runs" in capsys.readouterr().err
