"""The arms study's declared reading (PLAN_V2.md): frontier at 0.9 x the SSIM ceiling, comparison, stage counts."""

import json
import math

import pytest

from examples.corruption_stage.report import reading


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


def _result(runs: list[dict], **config) -> dict:
    return {"config": {"seeds": sorted({r["seed"] for r in runs}), **config}, "runs": runs}


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
    assert "copies_less_than_plain_lora" not in arms["early_stopping"]  # never better by construction


@pytest.mark.parametrize(
    ("arm_copies", "plain_copies", "copies_less"),
    [
        ([0.1, 0.1, 0.9], [1.0, 1.0, 1.0], True),  # gain 0.633 > the arm's std 0.377
        ([0.5, 0.5, 0.5], [1.0, 1.0, 0.0], False),  # gain -0.167: plain LoRA copies less
        ([0.2, 0.2, 0.2], [1.0, 1.0, 0.0], False),  # gain 0.467 < plain LoRA's std 0.471: the larger std decides
        ([0.2, 0.2, 0.2], [1.0, 1.0, 0.1], True),  # gain 0.5 > plain LoRA's std 0.424
    ],
)
def test_the_margin_is_the_larger_seed_std(arm_copies, plain_copies, copies_less):
    runs = [_run("lora", s, [0.0, 0.95], [0.0, c]) for s, c in enumerate(plain_copies)]
    runs += [_run("bayes_kl", s, [0.0, 0.95], [0.0, c]) for s, c in enumerate(arm_copies)]
    assert reading.read_arms(_result(runs))["arms"]["bayes_kl"]["copies_less_than_plain_lora"] is copies_less


def test_per_seed_values_follow_the_seeds_in_any_order():
    runs = [_run("lora", s, [0.0, 0.95], [0.0, float(s == 2)]) for s in (2, 0, 1)]
    lora = reading.read_arms(_result(runs))["arms"]["lora"]
    assert (lora["seeds"], lora["latent_copy_rate"]["per_seed"]) == ([0, 1, 2], [0.0, 0.0, 1.0])


def test_what_the_reading_refuses():
    plain = [_run("lora", s, [0.0, 0.95], [0.0, 1.0]) for s in range(3)]
    with pytest.raises(ValueError, match=r"arm l2 has seeds \[0, 1\], plain LoRA \[0, 1, 2\]"):
        reading.read_arms(_result(plain + [_run("l2", s, [0.0, 0.95], [0.0, 1.0]) for s in range(2)]))
    with pytest.raises(ValueError, match="without prior preservation, got prior_loss_weight 1.0"):
        reading.read_arms(_result(plain, prior_loss_weight=1.0))
    assert reading.read_arms(_result(plain[:2]))["arms"]["lora"]["stage_appears"] is None  # 2 seeds decide nothing


def test_an_arm_below_the_level_on_one_seed_is_not_matched():
    runs = [_run("lora", s, [0.0, 0.95], [0.0, 1.0]) for s in range(3)]
    runs += [_run("fixed_noise", s, [0.0, 0.95 if s else 0.5], [0.0, 0.0]) for s in range(3)]
    arms = reading.read_arms(_result(runs))["arms"]
    assert not arms["fixed_noise"]["reaches_level"]
    assert math.isnan(arms["fixed_noise"]["latent_copy_rate"]["per_seed"][0])
    assert arms["fixed_noise"]["copies_less_than_plain_lora"] is False


def test_the_package_judge_counts_the_seeds_with_a_stage():
    # three records after fit, 0.4 below the peak, with white residuals of energy 0.5, then clean copies
    dip = _run("lora", 0, [0.0, 0.9, 0.5, 0.5, 0.5, 0.99, 0.99, 0.99], [0.0] * 5 + [1.0] * 3)
    dip["curves"]["whiteness"] = [0.3, 0.3, 0.55, 0.55, 0.55, 0.3, 0.3, 0.3]
    dip["curves"]["latent_energy"] = [2.0, 0.2, 0.5, 0.5, 0.5, 0.01, 0.01, 0.01]
    smooth = _run("lora", 2, [0.0, 0.9, 0.5, 0.5, 0.5, 0.99, 0.99, 0.99], [0.0] * 5 + [1.0] * 3)  # whiteness 0.3
    lora = reading.read_arms(_result([dip, {**dip, "seed": 1}, smooth]))["arms"]["lora"]
    assert (lora["stage_seeds"], lora["stage_appears"]) == (2, True)
    # the judge's clean copy (fidelity within 0.03 of the ceiling, energy < 0.02), not v2's latent copy rate
    assert lora["first_copy_iterations"] == [500, 500, None]


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
