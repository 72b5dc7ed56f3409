"""The stage judge (bayes_adapter/stage.py): the declared controls, the rule's parts, the verdict sentence, and one
trajectory made from real samples of the lab model."""

import dataclasses
import json
import math

import pytest
import torch
from stage_controls import CEILING, CONTROLS, paper_order

from bayes_adapter import sample_measures
from bayes_adapter.stage import THRESHOLDS, MonitorRecord, check_thresholds, judge, verdict_sentence


@pytest.mark.parametrize("make", CONTROLS, ids=lambda make: make.__name__)
def test_each_control_gets_its_declared_verdict(make):
    control = make()
    verdict = judge(control.records)
    assert verdict.stage is control.stage
    assert [e.kind for e in verdict.episodes] == control.kinds
    assert [e.recovered for e in verdict.episodes] == control.recovered
    assert verdict.fit_step == control.fit_step
    assert verdict.best_step == control.best_step
    assert verdict.num_records == len(control.records)


def test_the_paper_order_episode_spans_the_noisy_records_and_recovers_at_the_first_clean_copy():
    verdict = judge(paper_order().records)
    (episode,) = verdict.episodes
    assert (episode.start_step, episode.end_step, episode.recovery_step) == (600, 900, 1000)
    assert verdict.first_copy_step == 1000
    assert verdict_sentence(verdict) == (
        "corruption stage from step 600 to 900, recovered at 1,000; best samples before it at step 400"
    )


def _trajectory(rows, ceiling=None):
    return [
        MonitorRecord(step=(i + 1) * 100, fidelity=f, noise_energy=e, noise_whiteness=w, fidelity_ceiling=ceiling)
        for i, (f, e, w) in enumerate(rows)
    ]


FIT = [(0.5, 0.3, 0.2), (0.9, 0.01, 0.3)]
NOISY = (0.6, 0.2, 0.55)
CLEAN = (0.95, 0.01, 0.4)


def test_an_episode_needs_min_records_consecutive_noisy_records():
    assert judge(_trajectory(FIT + [NOISY, NOISY, CLEAN, NOISY])).episodes == []
    assert len(judge(_trajectory(FIT + [NOISY] * 3)).episodes) == 1
    assert judge(_trajectory(FIT + [NOISY] * 3), min_records=4).episodes == []


@pytest.mark.parametrize(
    "record, why",
    [
        ((0.81, 0.2, 0.55), "fidelity within drop (0.10) of the running max 0.9"),
        ((0.6, 0.03, 0.55), "noise energy below energy_min"),
        ((0.6, 0.2, 0.40), "smooth residual: whiteness below whiteness_min"),
    ],
)
def test_each_episode_condition_is_needed(record, why):
    assert judge(_trajectory(FIT + [record] * 4)).episodes == [], why


def test_no_episode_before_fit_and_fit_scales_with_the_ceiling():
    noisy_start = [(0.6, 0.2, 0.55)] * 4 + [(0.2, 0.5, 0.55)] * 4
    assert judge(_trajectory(noisy_start)).episodes == []  # 0.6 < 0.75 x 1.0: never fit
    verdict = judge(_trajectory(noisy_start, ceiling=0.7))  # 0.6 >= 0.75 x 0.7: fit at once; then a drop of 0.4
    assert verdict.fit_step == 100 and verdict.stage and verdict.episodes[0].start_step == 500


def test_recovery_needs_min_records_clean_records_near_the_running_max():
    base = FIT + [NOISY] * 3
    assert not judge(_trajectory(base + [CLEAN, CLEAN])).episodes[0].recovered
    assert judge(_trajectory(base + [CLEAN] * 3)).episodes[0].recovery_step == 600
    assert not judge(_trajectory(base + [(0.85, 0.01, 0.4)] * 3)).episodes[0].recovered  # 0.85 < 0.9 - 0.03
    assert not judge(_trajectory(base + [(0.95, 0.03, 0.4)] * 3)).episodes[0].recovered  # energy >= 0.02


def test_a_loss_spike_just_before_the_episode_makes_it_an_instability_and_without_loss_it_is_corruption():
    records = _trajectory(FIT * 3 + [NOISY] * 3)
    assert judge(records).episodes[0].kind == "corruption"
    losses = [0.1] * 5 + [0.35] + [0.1] * 3  # the spike is on the record just before the episode starts
    with_loss = [dataclasses.replace(r, loss=loss) for r, loss in zip(records, losses)]
    verdict = judge(with_loss)
    assert verdict.episodes[0].kind == "instability" and not verdict.stage
    assert judge(with_loss, loss_spike=4.0).stage  # 0.35 < 4 x 0.1


def test_a_copy_is_copy_rate_when_recorded_else_fidelity_and_energy():
    near = (0.9, 0.01, 0.3)
    assert judge(_trajectory([(0.5, 0.3, 0.2), near])).first_copy_step is None  # 0.9 < ceiling 1.0 - 0.03
    records = _trajectory([(0.5, 0.3, 0.2), (0.98, 0.01, 0.3), (0.97, 0.01, 0.3)])
    assert judge(records).first_copy_step == 200
    with_rate = [dataclasses.replace(r, copy_rate=rate) for r, rate in zip(records, [0.0, 0.25, 0.5])]
    assert judge(with_rate).first_copy_step == 300
    assert judge(with_rate).best_step == 200  # the best record comes before the first copy


def test_best_step_comes_before_the_first_episode():
    records = _trajectory(FIT + [NOISY] * 3 + [(0.99, 0.01, 0.4)] * 3)
    verdict = judge(records)
    assert verdict.best_step == 200 and verdict.stage and verdict.episodes[0].recovered


def test_nan_measures_are_never_fit_corrupt_copy_or_best():
    nan = math.nan
    verdict = judge(_trajectory([(nan, nan, nan), (0.5, 0.3, 0.2), (nan, 0.2, 0.5)]))
    assert verdict.fit_step is None and verdict.best_step == 200 and verdict.first_copy_step is None
    only_nan = judge(_trajectory([(nan, nan, nan)] * 2))
    assert verdict_sentence(only_nan) == (
        "no corruption stage in 2 checkpoints (the samples never fit: fidelity stayed below 0.75 x the ceiling); "
        "no record with a finite fidelity"
    )
    copy_first = judge(_trajectory([(0.99, 0.01, 0.3), (0.5, 0.3, 0.2)]))
    assert verdict_sentence(copy_first).endswith("; no samples before the first clean copy (step 100)")


def test_judge_refuses_bad_thresholds_and_records():
    with pytest.raises(ValueError, match="unknown threshold 'dorp'"):
        check_thresholds(dorp=0.1)
    with pytest.raises(ValueError, match="min_records=0 is invalid; expected an integer >= 1"):
        judge(_trajectory(FIT), min_records=0)
    with pytest.raises(ValueError, match="fit_fraction=1.5"):
        judge(_trajectory(FIT), fit_fraction=1.5)
    with pytest.raises(ValueError, match="drop=-0.1"):
        judge(_trajectory(FIT), drop=-0.1)
    with pytest.raises(ValueError, match="records is empty"):
        judge([])
    with pytest.raises(ValueError, match="strictly increasing, got 200 then 200"):
        judge([*_trajectory(FIT), _trajectory(FIT)[1]])


def test_verdict_lists_thresholds_used_and_is_json_ready():
    verdict = judge(paper_order().records, drop=0.2)
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data["thresholds"] == {**{k: v[0] for k, v in THRESHOLDS.items()}, "drop": 0.2}
    assert {"stage", "episodes", "fit_step", "best_step"} <= set(data)
    assert set(data["episodes"][0]) >= {"kind", "start_step", "end_step", "recovered"}


def test_verdict_sentence_says_what_to_do():
    verdict = judge(paper_order().records)
    assert verdict_sentence(verdict, checkpoint_steps=[200, 400, 600]).endswith("at step 400, checkpoint-400")
    assert verdict_sentence(verdict, checkpoint_steps=[300, 500]).endswith(
        "at step 400 (no checkpoint there; the nearest before it is checkpoint-300)"
    )
    smooth = judge(_trajectory([(0.5 + 0.01 * i, 0.1, 0.2) for i in range(40)]))
    assert verdict_sentence(smooth) == "no corruption stage in 40 checkpoints; best samples at step 4,000"
    never = judge(_trajectory([(0.5, 0.1, 0.2)] * 2))
    assert verdict_sentence(never).startswith("no corruption stage in 2 checkpoints (the samples never fit")
    grainy = judge(_trajectory(FIT + [NOISY] * 3))
    assert "not recovered by the last record (step 500)" in verdict_sentence(grainy)
    spike = _trajectory(FIT * 3 + [NOISY] * 3)
    spike = [dataclasses.replace(r, loss=1.0 if r.step == 700 else 0.1) for r in spike]
    assert "only a loss-spike instability, from step 700 to 900)" in verdict_sentence(judge(spike))


# ---- one trajectory from real samples: the lab model's training latent plus white latent noise -------------------


@pytest.fixture(scope="module")
def lab_model_v2f():
    from examples.corruption_stage.model import data, models

    return models.load_model("examples/corruption_stage/model/base_model_v2f"), data.make_subject_set(1, kind="circle")


def test_real_samples_with_rising_then_falling_latent_noise_are_judged_a_recovered_stage(lab_model_v2f):
    """The training latent plus white latent noise of scale s x its std, decoded, re-encoded by the same VAE (as the
    DreamBooth script encodes its samples) and measured by the package's functions; s falls (fit), rises (the
    noisy stage), falls to 0 (clean copies). Measured on v2f: SSIM ceiling 0.924; s 0.3 -> SSIM 0.65, energy 0.06."""
    model, subject = lab_model_v2f
    scales = [0.6, 0.3, 0.15, 0.1, 0.3, 0.4, 0.5, 0.4, 0.0, 0.0, 0.0]
    with torch.no_grad():
        train_latents = model.encode(subject)
        ceiling = sample_measures.structural_fidelity(model.decode(train_latents), subject)
        records = []
        for i, scale in enumerate(scales):
            g = torch.Generator().manual_seed(i)
            noise = torch.randn((4, *train_latents.shape[1:]), generator=g)
            samples = model.decode(train_latents + scale * train_latents.std() * noise)
            measured = sample_measures.measure_samples(
                samples, subject, model.encode(samples), train_latents, fidelity_ceiling=ceiling
            )
            records.append(MonitorRecord(step=100 * (i + 1), fidelity_ceiling=ceiling, **measured))
    assert ceiling == pytest.approx(0.924, abs=0.005)
    verdict = judge(records)
    assert verdict.stage and [e.kind for e in verdict.episodes] == ["corruption"]
    (episode,) = verdict.episodes
    assert (episode.start_step, episode.end_step, episode.recovered, episode.recovery_step) == (500, 800, True, 900)
    assert verdict.best_step == 400 and verdict.first_copy_step == 900
    assert records[-1].copy_rate == 1.0 and records[4].copy_rate == 0.0
    assert CEILING == pytest.approx(ceiling, abs=0.01)  # the controls are shaped on this model's numbers
