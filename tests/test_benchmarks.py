"""Smoke runs of the benchmark scripts at the tiniest sizes: they run end to end and write their JSON.

The benchmarks themselves are not part of the test run; these only check that the scripts keep working.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import (  # noqa: E402
    bench_dit_train_step,
    bench_export,
    bench_inference,
    bench_kl,
    bench_quantized,
    bench_train_step,
    common,
    profile_step,
)


def _read(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert data["machine"]["torch_threads"] >= 1
    assert len(data["machine"]["loadavg_start"]) == 3
    return data


def test_train_step_timing(tmp_path):
    out = tmp_path / "train.json"
    bench_train_step.main(
        [
            "--size",
            "tiny",
            "--arms",
            "weight_B,local_A,flipout_AB",
            "--rounds",
            "2",
            "--warmup",
            "0",
            "--out",
            str(out),
        ]
    )
    summary = _read(out)["timing"]["summary"]
    assert set(summary) == {"plain", "weight_B", "local_A", "flipout_AB"}
    assert summary["plain"]["ratio_wall"] == 1.0
    assert summary["weight_B"]["trainable_params"] > summary["plain"]["trainable_params"]


def test_train_step_memory_in_subprocesses(tmp_path):
    out = tmp_path / "memory.json"
    bench_train_step.main(
        ["--size", "tiny", "--arms", "weight_B", "--memory-only", "--memory-steps", "1", "--out", str(out)]
    )
    summary = _read(out)["memory"]["summary"]
    assert summary["plain"]["ratio_ru_maxrss"] == 1.0
    assert summary["weight_B"]["ru_maxrss_mib"] > 0


def test_dit_train_step_timing_and_memory(tmp_path):
    out = tmp_path / "dit.json"
    argv = ["--size", "small", "--rounds", "2", "--warmup", "0", "--latent", "8", "--text_tokens", "4"]
    bench_dit_train_step.main([*argv, "--memory-steps", "1", "--out", str(out)])
    data = _read(out)
    summary = data["timing"]["summary"]
    assert set(summary) == {"plain", "weight_B"} and summary["plain"]["ratio_wall"] == 1.0
    assert summary["weight_B"]["trainable_params"] > summary["plain"]["trainable_params"]
    assert summary["weight_B"]["adapted_layers"] == summary["plain"]["adapted_layers"] > 0
    assert data["memory"]["summary"]["weight_B"]["ru_maxrss_mib"] > 0


def test_quantized_bases(tmp_path):
    out = tmp_path / "quantized.json"
    argv = ["--size", "small", "--rounds", "1", "--warmup", "0", "--latent", "8", "--text_tokens", "4"]
    bench_quantized.main([*argv, "--out", str(out)])
    data = _read(out)
    layers = {(row["base"], row["arm"]): row["layer"] for row in data["rows"]}
    assert layers[("bnb_nf4", "weight_B")] == "BayesLinear4bit" and layers[("bnb_nf4", "plain")] == "Linear4bit"
    assert layers[("torchao_int8", "weight_B")] == "BayesTorchaoLinear"
    memory = data["memory"]
    # 4-bit weights take well under a quarter of float32's bytes, int8 about a quarter (plus their scales).
    assert memory["bnb_nf4"]["target_bytes"] < 0.2 * memory["none"]["target_bytes"]
    assert memory["torchao_int8"]["target_bytes"] < 0.3 * memory["none"]["target_bytes"]


def test_kl(tmp_path):
    out = tmp_path / "kl.json"
    bench_kl.main(["--size", "tiny", "--rounds", "2", "--warmup", "0", "--out", str(out)])
    data = _read(out)
    assert data["kl_value"] > 0 and data["cache_experiment_rel_diff"] < 1e-5
    assert 0 < data["summary"]["kl_loss"]["fraction_of_step"] < 1


def test_inference(tmp_path):
    out = tmp_path / "inference.json"
    bench_inference.main(["--size", "tiny", "--steps", "1", "--rounds", "1", "--warmup", "0", "--out", str(out)])
    summary = _read(out)["summary"]
    assert summary["exported"]["max_abs_diff_vs_bayes_eval"] == 0
    assert summary["plain_lora"]["max_abs_diff_vs_bayes_eval"] == 0
    assert summary["fused"]["max_abs_diff_vs_bayes_eval"] < 1e-3


def test_export(tmp_path):
    out = tmp_path / "export.json"
    bench_export.main(["--size", "tiny", "--rounds", "1", "--warmup", "0", "--out", str(out)])
    data = _read(out)
    assert data["means_exact"] is True
    assert data["summary"]["peft+diffusers"]["total_mib"] > 0


def test_profile_step(tmp_path):
    out = tmp_path / "profile.json"
    profile_step.main(["--size", "tiny", "--arms", "weight_B", "--rounds", "1", "--out", str(out)])
    arms = _read(out)["arms"]
    assert arms["weight_B"]["forward"]["aten_ops"] > arms["plain"]["forward"]["aten_ops"]
    assert arms["plain"]["kl"]["aten_ops"] == 0


def test_unknown_arm_is_refused():
    with pytest.raises(ValueError, match="unknown arm"):
        common.parse_arm("weights_C")
    with pytest.raises(ValueError, match="unknown arm"):
        common.parse_arm("weight_B-cubic")
    with pytest.raises(ValueError, match="unknown arm"):
        common.parse_arm("weight_B+bounded")
    assert common.parse_arm("weight_B-softplus") == ("weight", "B", "softplus", True)  # bounded
    assert common.parse_arm("weight_B-softplus+unbounded") == ("weight", "B", "softplus", False)  # bounded
    assert common.lora_config("weight_AB-softplus", ["to_q"]).posterior_std_parametrisation == "softplus"


def test_count_outputs(tmp_path):
    out = tmp_path / "count.json"
    profile_step.main(["--size", "tiny", "--count-outputs", "--out", str(out)])
    data = _read(out)
    assert data["layers"] == 32 and data["elements"] > 0


def test_an_arm_without_the_std_bound():
    from benchmarks import common

    assert common.lora_config("weight_B", ["to_q"]).posterior_std_max == pytest.approx(0.1)
    assert common.lora_config("weight_B-softplus+unbounded", ["to_q"]).posterior_std_max is None
    with pytest.raises(ValueError, match=r"unknown arm 'weight_B\+bounded'"):
        common.parse_arm("weight_B+bounded")
