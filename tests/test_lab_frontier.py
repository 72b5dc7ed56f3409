"""The lab's frontier (fidelity against copy rate and diversity over every checkpoint) and its full fine-tuning arm."""

import json
import math

import pytest
import torch

from examples.corruption_stage.model import data, models
from examples.corruption_stage.report import frontier
from examples.corruption_stage.study import experiment


def test_frontier_curve_takes_the_best_checkpoint_at_or_above_each_fidelity():
    fidelity = [0.1, 0.5, 0.4, 0.8]
    copies = [0.0, 0.2, 0.0, 0.6]
    assert frontier.frontier_curve(fidelity, copies, [0.0, 0.45, 0.8], "lower") == [0.0, 0.2, 0.6]
    diversity = [0.9, 0.3, 0.5, 0.1]
    assert frontier.frontier_curve(fidelity, diversity, [0.35, 0.5], "higher") == [0.5, 0.3]
    beyond = frontier.frontier_curve(fidelity, diversity, [0.81], "higher")
    assert math.isnan(beyond[0])  # no checkpoint reaches it
    with pytest.raises(ValueError, match="better must be 'lower' or 'higher', got 'up'"):
        frontier.frontier_curve(fidelity, copies, [0.1], "up")


def _run(arm, seed, fidelity, copies, diversity):
    curves = {"iteration": list(range(len(fidelity))), "fidelity": fidelity, "copy_rate": copies}
    return {"arm": arm, "seed": seed, "n_images": 1, "curves": {**curves, "diversity": diversity}}


def _result():
    return {
        "runs": [
            _run("lora", 0, [0.1, 0.6, 0.9], [0.0, 0.5, 1.0], [0.9, 0.4, 0.1]),
            _run("lora", 1, [0.1, 0.7, 0.8], [0.0, 0.3, 0.8], [0.9, 0.5, 0.2]),
            _run("bayes_kl", 0, [0.1, 0.65, 0.7], [0.0, 0.1, 0.2], [0.9, 0.7, 0.6]),
        ]
    }


def test_matched_fidelity_is_the_highest_level_every_run_reaches():
    entry = frontier.matched_fidelity(_result())[1]
    assert entry["fidelity_level"] == 0.7  # the Bayesian run never gets above 0.7
    lora = entry["arms"]["lora"]
    assert lora["seeds"] == 2
    # seed 0 reaches 0.7 only at its last checkpoint (copy rate 1.0), seed 1 at 0.7 (copy rate 0.3)
    assert lora["copy_rate"]["mean"] == pytest.approx(0.65) and lora["copy_rate"]["std"] == pytest.approx(0.35)
    assert lora["diversity"]["mean"] == pytest.approx(0.3)
    assert entry["arms"]["bayes_kl"]["copy_rate"] == {"mean": pytest.approx(0.2), "std": 0.0}
    table = frontier.matched_fidelity_markdown(_result())
    assert "fidelity >= 0.700" in table and "| plain LoRA | 2 | 0.650 ± 0.350 | 0.300 ± 0.200 |" in table


def test_early_stopping_is_plain_loras_checkpoint_of_highest_fidelity():
    stopped = frontier.matched_fidelity(_result())[1]["early_stopping"]
    # both LoRA seeds peak at their last checkpoint: copy rates 1.0 and 0.8, diversity 0.1 and 0.2
    assert stopped["seeds"] == 2 and stopped["iteration"] == {"mean": 2.0, "std": 0.0}
    assert stopped["fidelity"]["mean"] == pytest.approx(0.85) and stopped["fidelity"]["std"] == pytest.approx(0.05)
    assert stopped["copy_rate"]["mean"] == pytest.approx(0.9) and stopped["copy_rate"]["std"] == pytest.approx(0.1)
    assert stopped["diversity"]["mean"] == pytest.approx(0.15)
    table = frontier.matched_fidelity_markdown(_result())
    assert f"| {frontier.EARLY_STOPPING_LABEL} | 2 | 0.900 ± 0.100 | 0.150 ± 0.050 |" in table
    assert frontier.early_stopping([r for r in _result()["runs"] if r["arm"] != "lora"]) is None


def test_frontier_command_draws_the_figure_beside_the_results(tmp_path, run_lab):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_result()))
    result = run_lab("frontier", str(path))
    assert result.returncode == 0, result.stderr
    assert "Bayesian B + KL (ours)" in result.stdout
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    missing = run_lab("frontier", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "is not a file" in missing.stderr and "Traceback" not in missing.stderr


def _with_config(result: dict, **config) -> dict:
    return {**result, "config": {"lr": 3e-3, "steps": 2, "seeds": [], "arms": [], **config}}


def test_results_of_a_study_split_by_seed_merge_into_one(tmp_path, run_lab):
    runs = _result()["runs"]
    first = _with_config({"runs": runs[:1]}, seeds=[0], arms=["lora"])
    second = _with_config({"runs": runs[1:]}, seeds=[1, 0], arms=["lora", "bayes_kl"])
    merged = frontier.merge_results([first, second])
    assert merged["runs"] == runs and merged["config"]["seeds"] == [0, 1]
    assert merged["config"]["arms"] == ["lora", "bayes_kl"] and merged["config"]["lr"] == 3e-3
    assert frontier.matched_fidelity(merged) == frontier.matched_fidelity(_result())
    with pytest.raises(ValueError, match="result 1 differs from the first in lr, not only seeds or arms"):
        frontier.merge_results([first, _with_config({"runs": runs[1:]}, lr=1e-2)])
    with pytest.raises(ValueError, match=r"run \('lora', 1, 0\) appears in more than one result"):
        frontier.merge_results([first, _with_config({"runs": runs[:1]})])
    paths = []
    for name, result in (("a.json", first), ("b.json", second)):
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(result))
    command = ["frontier", *paths]
    refused = run_lab(*command)
    assert refused.returncode == 2 and "several results files need --out" in refused.stderr
    out = tmp_path / "merged" / "frontier.png"
    out.parent.mkdir()
    drawn = run_lab(*command, "--out", str(out))
    assert drawn.returncode == 0, drawn.stderr
    assert "Bayesian B + KL (ours)" in drawn.stdout and out.stat().st_size > 10_000


def test_full_fine_tuning_trains_every_unet_weight_of_a_copy():
    base = models.new_model(models.LabModelConfig(extra_tokens=data.V2_EXTRA_TOKENS))
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    cfg = experiment.ExperimentConfig(
        arms=("full",), steps=2, eval_every=2, n_eval=2, sample_steps=2, width_timesteps=(20,), lr=1e-2
    )
    train = data.make_subject_set(1)
    with torch.no_grad():
        recon = base.decode(base.encode(train))
    run = experiment.run_arm(base, "full", train, 0, cfg, recon)
    assert run["curves"]["iteration"] == [0, 2]
    assert all(torch.equal(v, before[k]) for k, v in base.unet.state_dict().items())  # the base is untouched
    assert run["curves"]["flicker"][-1] > 1e-3  # the samples moved: the copy's weights were trained
    assert math.isnan(run["curves"]["posterior_std"][-1])
    assert experiment.ARM_LABELS["full"] == "full fine-tuning" and "full" not in experiment.V1_ARMS


def _flat(curves: dict) -> list[float]:
    out = []
    for key in sorted(curves):
        for value in curves[key]:
            out.extend(value if isinstance(value, list) else [value])
    return out


@pytest.mark.slow  # tens of seconds on 2 cores (pretraining, classifier or worker processes)
def test_runs_in_worker_processes_match_runs_in_one_process():
    base = models.new_model(models.LabModelConfig(extra_tokens=data.V2_EXTRA_TOKENS))
    cfg = experiment.ExperimentConfig(
        arms=("lora", "bayes_kl"), seeds=(0, 1), steps=2, eval_every=2, n_eval=2, sample_steps=2,
        width_timesteps=(20,), grid_n=2, prompt=(data.SUBJECT_TOKEN, data.CLASS_TOKEN), v2_measures=True,
    )  # fmt: skip
    alone = experiment.run_experiment(base, cfg)
    pooled = experiment.run_experiment(base, cfg, workers=2)
    assert [(r["arm"], r["seed"]) for r in pooled["runs"]] == [(r["arm"], r["seed"]) for r in alone["runs"]]
    for a, b in zip(alone["runs"], pooled["runs"]):
        assert _flat(b["curves"]) == pytest.approx(_flat(a["curves"]), rel=1e-4, abs=1e-6, nan_ok=True)
    assert set(pooled["_grids"]) == {"lora/1", "bayes_kl/1"}
    for key, grid in alone["_grids"].items():  # uint8 images: float32 rounding may move a pixel by one level
        assert (grid.int() - pooled["_grids"][key].int()).abs().max() <= 1
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        experiment.run_experiment(base, cfg, workers=0)
