"""Tests of examples/train_dreambooth_bayes_lora.py on tiny pipelines built and saved locally (no Hub)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import (
    assert_same_numerics,
    dreambooth_args,
    load_example,
    reset_accelerate_state,
    run_unet,
    save_tiny_pipeline,
    tiny_sdxl_pipeline,
    tiny_unet,
    unet_inputs,
    write_images,
)

import bayes_adapter
from bayes_adapter import BayesLoraConfig


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_dreambooth_bayes_lora.py"
train = load_example("train_dreambooth_bayes_lora")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    save_tiny_pipeline(path)
    return path


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    return write_images(tmp_path / "instance", 2)


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """The TensorBoard scalars `tag` written under `log_dir`, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return values


def histogram_steps(log_dir: Path, tag: str) -> list[int]:
    """The steps at which the TensorBoard histogram `tag` was written under `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"histograms": 0})  # 0: keep every step
        accumulator.Reload()
        if tag in accumulator.Tags().get("histograms", []):
            steps += [event.step for event in accumulator.Histograms(tag)]
    return sorted(steps)


# --- arguments ----------------------------------------------------------------------------------------------------


def test_help_lists_every_bayesian_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
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


def test_defaults_are_the_papers_and_flags_reach_the_config(tmp_path, instance_dir):
    args = train.parse_args(dreambooth_args("no/such/model", instance_dir, tmp_path / "out"))
    config = train.lora_config(args, args.unet_target_modules, args.kl_weight)
    defaults = BayesLoraConfig()
    for field in ("bayesian_factors", "posterior_std_init", "prior_std", "estimator", "kl_weight"):
        assert getattr(config, field) == getattr(defaults, field)
    assert (config.r, config.lora_alpha, args.learning_rate) == (4, 4, 1e-4)

    args = train.parse_args(
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
    config = train.lora_config(args, "to_q,to_v", args.kl_weight)
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
        train.parse_args(dreambooth_args("no/such/model", folder, tmp_path / "out", *extra))


def test_load_image_crops_resizes_and_records_sdxl_time_ids(tmp_path):
    write_images(tmp_path, 1)
    pixels, time_ids = train.load_image(tmp_path / "0.png", 32, center_crop=True)
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    # 40x48 (h x w) -> 32x38, centre crop: 3 px from the left.
    assert time_ids.tolist() == [40, 48, 0, 3, 32, 32]


# --- end to end ---------------------------------------------------------------------------------------------------


def test_help_runs_as_a_script():
    process = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert "--posterior_std_init" in process.stdout and "--instance_data_dir" in process.stdout


def test_train_checkpoint_resume_and_export(tmp_path, tiny_sd, instance_dir, monkeypatch):
    """4 steps with checkpoints at 2 and 4; a run resumed from checkpoint-2 ends where the uninterrupted one did."""
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import constants
    from peft import get_peft_model_state_dict

    pushed = []
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(bayes_adapter, "push_to_hub", lambda *args, **kwargs: pushed.append((args, kwargs)))

    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--kl_weight", "1.0"]
    out = tmp_path / "full"
    result = train.main(
        train.parse_args(
            dreambooth_args(
                tiny_sd,
                instance_dir,
                out,
                *common,
                "--validation_prompt",
                "a photo of sks dog",
                "--validation_steps",
                "2",
                "--num_validation_images",
                "2",
                "--validation_inference_steps",
                "2",
                "--push_to_hub",
                "--hub_model_id",
                "me/bayes-dog",
            )
        )
    )
    assert result["global_step"] == 4
    unet = result["unet"]
    final = {k: v.clone() for k, v in get_peft_model_state_dict(unet).items()}
    assert any("lora_posterior_rho_B" in key for key in final)
    assert all(final[k].abs().sum() > 0 for k in final if ".lora_B." in k), "B never moved: nothing was trained"

    # Checkpoints hold the whole Bayesian adapter, not the base model.
    for step in (2, 4):
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert files == {
            "unet",
            "optimizer.bin",
            "scheduler.bin",
            "random_states_0.pkl",
            "pytorch_lora_weights.safetensors",  # every checkpoint is a loadable LoRA too
        }
    saved = load_file(str(out / "checkpoint-4" / "unet" / "adapter_model.safetensors"))
    saved = {k.removeprefix("base_model.model."): v for k, v in saved.items()}  # PEFT's save_pretrained layout
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in final)
    config = json.loads((out / "checkpoint-4" / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BAYES_LORA" and config["kl_weight"] == 1.0

    # TensorBoard: loss, KL and sigma every step; validation (with the monitor) at 2 and 4, the export's at the end.
    assert sorted(scalars(out / "logs", "loss")) == [1, 2, 3, 4]
    kl = scalars(out / "logs", "kl")
    assert all(value > 0 for value in kl.values())
    sigma = scalars(out / "logs", "sigma_mean")
    assert sigma[1] == pytest.approx(0.01, rel=0.05) and sigma[4] != sigma[1]
    assert scalars(out / "logs", "sigma_min")[4] < sigma[4] < scalars(out / "logs", "sigma_max")[4]
    assert histogram_steps(out / "logs", "posterior_std/unet") == [1, 2, 4]
    assert sorted(scalars(out / "logs", "validation/monitor_corruption")) == [2, 4]
    assert sorted(scalars(out / "logs", "test/monitor_corruption")) == [4]

    # The export loads with plain load_lora_weights and gives the trained model's eval (mean) output.
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(out))
    unet.eval()
    with torch.no_grad():
        expected = run_unet(unet, unet_inputs(batch_size=2))
        got = run_unet(pipe.unet, unet_inputs(batch_size=2))
        base = run_unet(StableDiffusionPipeline.from_pretrained(str(tiny_sd)).unet, unet_inputs(batch_size=2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base, expected, atol=1e-6), "the adapter does not change the output"
    for name in ("adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        assert (out / "export" / "unet" / name).is_file()
    # The last checkpoint, loaded as a plain LoRA, is the final model (checkpoint-4 was saved after step 4).
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(out / "checkpoint-4"))
    assert_same_numerics(run_unet(pipe.unet, unet_inputs(batch_size=2)), expected)

    # --push_to_hub hands the trained UNet to bayes_adapter.push_to_hub, with the final validation images.
    assert len(pushed) == 1
    (model, repo_id), kwargs = pushed[0]
    assert model is unet and repo_id == "me/bayes-dog" and kwargs["component"] == "unet"
    assert len(kwargs["validation_images"]) == 2 and kwargs["validation_images"][0].size == (32, 32)

    # Resume: a fresh output folder holding only checkpoint-2; the run continues at step 3 and ends as the full one.
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed_out / "checkpoint-2")
    reset_accelerate_state()
    resumed = train.main(
        train.parse_args(
            dreambooth_args(tiny_sd, instance_dir, resumed_out, *common, "--resume_from_checkpoint", "latest")
        )
    )
    assert resumed["global_step"] == 4
    assert sorted(scalars(resumed_out / "logs", "loss")) == [3, 4]
    assert (resumed_out / "checkpoint-4").is_dir()
    state = get_peft_model_state_dict(resumed["unet"])
    for key, value in final.items():
        # The resumed run's forwards ran on weights loaded from the checkpoint: equal to float32 rounding.
        assert_same_numerics(state[key], value, msg=f"{key} differs after resuming")


def test_prior_preservation_bf16_and_gradient_accumulation(tmp_path, tiny_sd, instance_dir, monkeypatch):
    class_dir = write_images(tmp_path / "class", 1, seed=1)  # one class image there, one to generate
    batches = []
    collate = train.collate
    monkeypatch.setattr(
        train, "collate", lambda examples, prior: batches.append(collate(examples, prior)) or batches[-1]
    )
    args = train.parse_args(
        dreambooth_args(
            tiny_sd,
            instance_dir,
            tmp_path / "out",
            "--with_prior_preservation",
            "--class_data_dir",
            str(class_dir),
            "--class_prompt",
            "a photo of dog",
            "--num_class_images",
            "2",
            "--num_class_inference_steps",
            "2",
            "--sample_batch_size",
            "2",
            "--max_train_steps",
            "2",
            "--mixed_precision",
            "bf16",
            "--gradient_accumulation_steps",
            "2",
            "--posterior_std_learning_rate",
            "5e-3",
            "--report_to",
            "none",
        )
    )
    result = train.main(args)
    # Each step at 5e-3 moves an exp_linear std (init 0.01) by up to 0.005 upwards or a factor e^-0.5 downwards.
    stats = bayes_adapter.posterior_std_stats(result["unet"])
    assert stats["max"] / stats["min"] > 2
    # 2 instance and 2 class images: 2 batches per epoch, each one instance image then one class image; 2 optimizer
    # steps of 2 accumulated batches.
    assert len(batches) == 4
    assert all(b["prompts"] == ["a photo of sks dog", "a photo of dog"] for b in batches)
    assert all(b["pixels"].shape == (2, 3, 32, 32) for b in batches)
    generated = sorted(p.name for p in class_dir.iterdir())
    assert len(generated) == 2 and "0.png" in generated
    assert all(Image.open(class_dir / name).size == (32, 32) for name in generated if name != "0.png")
    assert result["global_step"] == 2
    unet = result["unet"]
    assert unet.conv_in.weight.dtype == torch.bfloat16, "the frozen base is not in the mixed-precision dtype"
    adapter = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    assert adapter and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in adapter.values())
    assert all(p.abs().sum() > 0 for n, p in adapter.items() if ".lora_B." in n)


@pytest.mark.slow
def test_sdxl_with_bayesian_text_encoders(tmp_path, instance_dir):
    from diffusers import StableDiffusionXLPipeline

    model = tmp_path / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(str(model))
    out = tmp_path / "out"
    extra = [
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--train_text_encoder",
        "--bayesian_factors",
        "AB",
    ]
    extra += ["--estimator", "local", "--validation_prompt", "a photo of sks dog", "--validation_steps", "2"]
    extra += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    result = train.main(train.parse_args(dreambooth_args(model, instance_dir, out, *extra)))
    assert {p.name for p in (out / "checkpoint-2").iterdir()} >= {"unet", "text_encoder", "text_encoder_2"}
    assert len(result["text_encoders"]) == 2
    assert bayes_adapter.posterior_std_stats(result["text_encoders"][1])["count"] > 0

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(out))
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    for trained, loaded in zip(result["text_encoders"], (pipe.text_encoder, pipe.text_encoder_2)):
        trained.eval()
        with torch.no_grad():
            expected = trained(ids, output_hidden_states=True).hidden_states[-2]
            torch.testing.assert_close(loaded(ids, output_hidden_states=True).hidden_states[-2], expected)
    inputs = unet_inputs(batch_size=2, cross_attention_dim=16)
    latents, timesteps, hidden = inputs["x"], inputs["t"], inputs["enc"]
    added = {"text_embeds": torch.randn(2, 8), "time_ids": torch.tensor([[40.0, 48, 0, 3, 32, 32]] * 2)}
    result["unet"].eval()
    with torch.no_grad():
        expected = result["unet"](latents, timesteps, hidden, added_cond_kwargs=added).sample
        torch.testing.assert_close(pipe.unet(latents, timesteps, hidden, added_cond_kwargs=added).sample, expected)
        # checkpoint-2 (saved after the last step) is the same LoRA, UNet and both text encoders in one file.
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(out / "checkpoint-2"))
        assert_same_numerics(pipe.unet(latents, timesteps, hidden, added_cond_kwargs=added).sample, expected)
        trained = result["text_encoders"][1]
        expected = trained(ids, output_hidden_states=True).hidden_states[-2]
        assert_same_numerics(pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2], expected)


DISTRIBUTED_RUNNER = """
import importlib.util, json, os, sys

written = []
watched = os.path.realpath(os.environ["WATCHED_DIR"])


def audit(event, args):
    # Every file opened for writing and every folder made, by this process, under the watched folder.
    if event == "open" and isinstance(args[0], str) and args[2] is not None:
        if args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and os.path.realpath(args[0]).startswith(watched):
            written.append(os.path.realpath(args[0]))
    elif event == "os.mkdir" and os.path.realpath(os.fsdecode(args[0])).startswith(watched):
        written.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(audit)
spec = importlib.util.spec_from_file_location("train_script", os.environ["TRAIN_SCRIPT"])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
result = train.main(train.parse_args())
rank = int(os.environ["RANK"])
watching = written[:]
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

dump = os.environ["DUMP_DIR"]
state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(result["unet"]).items()}
save_file(state, os.path.join(dump, f"rank{rank}.safetensors"))
with open(os.path.join(dump, f"rank{rank}.json"), "w") as f:
    json.dump({"global_step": result["global_step"], "written": watching}, f)
"""


@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_launch(tmp_path, tiny_sd, instance_dir):
    """DDP over gloo: both ranks train 2 steps, end with the same adapter, and only rank 0 writes files."""
    import socket

    runner = tmp_path / "runner.py"
    runner.write_text(DISTRIBUTED_RUNNER)
    dump, out = tmp_path / "dump", tmp_path / "out"
    dump.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WATCHED_DIR": str(out),
        "TRAIN_SCRIPT": str(SCRIPT),
        "DUMP_DIR": str(dump),
    }
    # accelerate 1.15 only spawns several CPU processes for `--cpu` through mpirun (not installed here): its torchrun
    # launcher (`--multi_gpu`) with ACCELERATE_USE_CPU=1 gives the same DDP-over-gloo setup (MULTI_CPU).
    env["ACCELERATE_USE_CPU"] = "1"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(port)]
    command += [
        str(runner),
        *dreambooth_args(tiny_sd, instance_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1"),
    ]
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]
    assert "Distributed environment: DistributedType.MULTI_CPU" in process.stderr
    assert "Num processes: 2" in process.stderr and "Backend: gloo" in process.stderr

    reports = [json.loads((dump / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [report["global_step"] for report in reports] == [2, 2]
    states = [load_file(str(dump / f"rank{rank}.safetensors")) for rank in (0, 1)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert_same_numerics(states[0][key], states[1][key], msg=f"{key} differs between the ranks")
    assert all(states[0][k].abs().sum() > 0 for k in states[0] if ".lora_B." in k), "nothing was trained"
    # Logged by the main process only, once per optimizer step.
    assert sorted(scalars(out / "logs", "loss")) == [1, 2]

    assert reports[1]["written"] == [], f"rank 1 wrote {reports[1]['written']}"
    # The hook sees Python-level opens and mkdirs (not files torch or safetensors write from C++): enough to see
    # rank 0 write every part of the output, and rank 1 none.
    written = {Path(p).relative_to(out.resolve()).parts[:1] for p in reports[0]["written"]}
    written = {parts[0] for parts in written if parts}
    assert {"checkpoint-1", "checkpoint-2", "bayesian_adapter", "export", "logs"} <= written
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    saved = load_file(str(out / "bayesian_adapter" / "unet" / "adapter_model.safetensors"))
    saved = {k.removeprefix("base_model.model."): v for k, v in saved.items()}  # PEFT's save_pretrained layout
    assert saved.keys() == states[0].keys() and all(torch.equal(saved[k], states[0][k]) for k in saved)


def test_push_to_hub_calls_the_library_with_accepted_arguments(tmp_path, instance_dir, monkeypatch):
    """The real bayes_adapter.push_to_hub accepts the script's arguments and images; offline, it stops before any
    request (the e2e test checks what the script passes)."""
    from huggingface_hub import constants
    from tiny_models import tiny_unet

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    args = train.parse_args(
        dreambooth_args("no/such/model", instance_dir, tmp_path, "--push_to_hub", "--hub_model_id", "me/dog")
    )
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    unet = tiny_unet()
    unet.add_adapter(train.lora_config(args, args.unet_target_modules, args.kl_weight))
    images = np.zeros((2, 32, 32, 3), dtype=np.float32)
    with pytest.raises(RuntimeError, match="offline mode"):
        train.push_to_hub(args, tmp_path, {"unet": unet}, images)


# --- review fixes: atomic writes, one read per adapter, fp32 frozen rho, --scale_lr, finite numbers ----------------


def _tiny_unet_with_adapter(tmp_path, *extra):
    args = train.parse_args(
        dreambooth_args("no/such/model", write_images(tmp_path / "img", 1), tmp_path / "out", *extra)
    )
    unet = tiny_unet()
    config = train.lora_config(args, args.unet_target_modules, args.kl_weight)
    unet.add_adapter(config)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    return unet, config


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*tmp-*")) + sorted(p.name for p in folder.rglob(".*old-*"))


def test_save_bayes_adapters_is_atomic_and_loads_back(tmp_path, monkeypatch):
    from peft import PeftModel, get_peft_model_state_dict

    import bayes_adapter.adapter as adapter_module

    unet, config = _tiny_unet_with_adapter(tmp_path)
    out = tmp_path / "ckpt"
    train.save_bayes_adapters(out, {"unet": unet})
    saved = load_file(str(out / "unet" / "adapter_model.safetensors"))
    # PEFT's save_pretrained layout: PeftModel.from_pretrained reads it.
    assert saved.keys() == {"base_model.model." + k for k in get_peft_model_state_dict(unet)}
    assert json.loads((out / "unet" / "adapter_config.json").read_text())["peft_type"] == "BAYES_LORA"
    PeftModel.from_pretrained(tiny_unet(), str(out / "unet"))

    # A save that fails after the config is written leaves the previous folder as it was, and no temporary folder.
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_B." in name:
                param.add_(1.0)

    def failing_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        train.save_bayes_adapters(out, {"unet": unet})
    after = load_file(str(out / "unet" / "adapter_model.safetensors"))
    assert all(torch.equal(after[k], saved[k]) for k in saved)
    assert (out / "unet" / "adapter_config.json").is_file()
    assert _leftovers(out) == []
    # A first save that fails leaves no folder at all.
    with pytest.raises(OSError, match="disk full"):
        train.save_bayes_adapters(tmp_path / "fresh", {"unet": unet})
    assert not (tmp_path / "fresh" / "unet").exists() and _leftovers(tmp_path / "fresh") == []
    monkeypatch.undo()

    # What was saved loads back into a fresh model holding the same adapter.
    fresh, _ = _tiny_unet_with_adapter(tmp_path / "other")
    train.load_bayes_adapters(out, {"unet": fresh})
    state = get_peft_model_state_dict(fresh)
    assert all(torch.equal(state[k], saved["base_model.model." + k]) for k in state)
    # ... and is refused, naming the file, by a model holding a different adapter (another rank).
    other, _ = _tiny_unet_with_adapter(tmp_path / "r2", "--rank", "2")
    with pytest.raises(ValueError, match=r"has shape \(4, 8\), adapter .default. of the model has \(2, 8\)"):
        train.load_bayes_adapters(out, {"unet": other})


def _file_content(path: Path):
    """A comparable view of an export file: tensors and parsed metadata, or parsed JSON."""
    from safetensors import safe_open

    if path.suffix == ".json":
        return json.loads(path.read_text())
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: json.loads(v) if k == "lora_adapter_metadata" else v for k, v in (f.metadata() or {}).items()}
        return metadata, {k: f.get_tensor(k).tolist() for k in sorted(f.keys())}


def test_export_mean_lora_reads_each_adapter_once_and_writes_atomically(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    unet, _ = _tiny_unet_with_adapter(tmp_path)
    reference = bayes_adapter.export_lora(unet, tmp_path / "reference", component="unet")
    reads = []
    load = bayes_adapter.export.load_bayesian_adapter
    monkeypatch.setattr(
        bayes_adapter.export, "load_bayesian_adapter", lambda *a, **k: reads.append(a) or load(*a, **k)
    )
    monkeypatch.setattr(bayes_adapter, "export_lora", lambda *a, **k: pytest.fail("export_lora reads the adapter"))
    out = tmp_path / "out"
    train.export_mean_lora(out, {"unet": unet}, StableDiffusionPipeline)
    assert len(reads) == 1
    # The per-component export holds what export_lora writes: the same files, tensors, metadata and configs.
    files = sorted(p.name for p in reference.iterdir())
    assert files == sorted(p.name for p in (out / "export" / "unet").iterdir())
    for name in files:
        assert _file_content(out / "export" / "unet" / name) == _file_content(reference / name), name
    combined = out / "pytorch_lora_weights.safetensors"
    before = combined.read_bytes()
    assert any(key.startswith("unet.") for key in load_file(str(combined)))
    assert _leftovers(out) == []

    # A failing save_lora_weights (after writing part of its file) leaves the previous file and no temporary folder.
    class FailingPipeline(StableDiffusionPipeline):
        @classmethod
        def save_lora_weights(cls, save_directory, **kwargs):
            Path(save_directory, "pytorch_lora_weights.safetensors").write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        train.export_mean_lora(out, {"unet": unet}, FailingPipeline)
    assert combined.read_bytes() == before
    assert _leftovers(out) == []

    # A failing per-component export leaves the previous export folder as it was.
    exported = {p.name: p.read_bytes() for p in (out / "export" / "unet").iterdir()}

    def failing_write_export(adapter, folder, *args, **kwargs):
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(bayes_adapter.export, "write_export", failing_write_export)
    with pytest.raises(OSError, match="disk full"):
        train.export_mean_lora(out, {"unet": unet}, StableDiffusionPipeline)
    assert {p.name: p.read_bytes() for p in (out / "export" / "unet").iterdir()} == exported
    assert _leftovers(out) == []


def test_fixed_posterior_std_rho_is_fp32_under_bf16(tmp_path, tiny_sd, instance_dir):
    args = train.parse_args(
        dreambooth_args(
            tiny_sd,
            instance_dir,
            tmp_path / "out",
            "--fixed_posterior_std",
            "--mixed_precision",
            "bf16",
            "--max_train_steps",
            "1",
            "--report_to",
            "none",
        )
    )
    unet = train.main(args)["unet"]
    assert unet.conv_in.weight.dtype == torch.bfloat16
    rho = {n: p for n, p in unet.named_parameters() if "lora_posterior_rho" in n}
    assert rho and all(not p.requires_grad for p in rho.values()), "the posterior std is not frozen"
    assert {p.dtype for p in rho.values()} == {torch.float32}
    assert {p.dtype for n, p in unet.named_parameters() if "lora_" in n} == {torch.float32}


def test_scale_lr_scales_both_learning_rates(tmp_path, tiny_sd, instance_dir, monkeypatch):
    groups = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            groups.extend({"lr": g["lr"], "size": len(g["params"])} for g in self.param_groups)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    extra = ["--scale_lr", "--train_batch_size", "2", "--gradient_accumulation_steps", "3", "--max_train_steps", "1"]
    extra += ["--learning_rate", "1e-4", "--posterior_std_learning_rate", "0.01", "--report_to", "none"]
    train.main(train.parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", *extra)))
    # One process: factor 3 x 2 x 1 = 6. The means' group, then the posterior stds' group.
    assert len(groups) == 2 and all(g["size"] > 0 for g in groups)
    assert groups[0]["lr"] == pytest.approx(6e-4) and groups[1]["lr"] == pytest.approx(0.06)


def test_help_of_hub_model_id_and_scale_lr(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "required with --push_to_hub" in text and "default: the output folder name" not in text
    assert "Multiply --learning_rate (and --posterior_std_learning_rate when given)" in text
    assert "Multiplied like --learning_rate with --scale_lr" in text


def test_kl_weight_elbo_is_computed_from_the_latents_and_the_scheduler(tmp_path, tiny_sd, instance_dir):
    from bayes_adapter import elbo_kl_weight

    assert (
        train.parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "o", "--kl_weight", "ELBO")).kl_weight
        == "elbo"
    )
    extra = ["--kl_weight", "elbo", "--max_train_steps", "1", "--report_to", "none"]
    result = train.main(train.parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", *extra)))
    # The tiny VAE halves the 32 px resolution once (two blocks) into 4 latent channels; DDPM's T is 1000.
    expected = elbo_kl_weight((4, 16, 16), 1000)
    assert result["unet"].peft_config["default"].kl_weight == pytest.approx(expected)
    saved = json.loads((tmp_path / "out" / "bayesian_adapter" / "unet" / "adapter_config.json").read_text())
    assert saved["kl_weight"] == pytest.approx(expected)
    assert saved["posterior_std_parametrisation"] == "exp_linear"


def test_kl_weight_must_be_a_number_or_elbo(tmp_path, instance_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(dreambooth_args("no/such/model", instance_dir, tmp_path / "out", "--kl_weight", "big"))
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


def test_validation_logs_the_papers_metrics_with_local_models(tmp_path, tiny_sd, instance_dir):
    from tiny_models import save_tiny_clip, save_tiny_dino

    clip, dino = save_tiny_clip(tmp_path / "clip"), save_tiny_dino(tmp_path / "dino")
    extra = ["--max_train_steps", "2", "--validation_prompt", "a photo of sks dog", "--validation_steps", "2"]
    extra += ["--num_validation_images", "2", "--validation_inference_steps", "2"]
    extra += ["--eval_clip_model", clip, "--eval_dino_model", dino]
    train.main(train.parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", *extra)))
    for name in ("clip_i", "clip_t", "dino", "dino_diversity"):
        values = scalars(tmp_path / "out" / "logs", f"validation/{name}")
        assert sorted(values) == [2] and -1 <= values[2] <= 2, name
    with pytest.raises(ValueError, match="cannot load the CLIP model"):
        train.parse_args(
            dreambooth_args(tiny_sd, instance_dir, tmp_path / "o2", "--eval_clip_model", str(tmp_path / "none"))
        )


def test_caption_files_repeats_and_caption_dropout(tmp_path):
    folder = write_images(tmp_path / "imgs", 2)
    images = sorted(p for p in folder.iterdir())
    images[0].with_suffix(".txt").write_text("a photo of sks dog on grass\n")
    args = train.parse_args(dreambooth_args("no/such/model", folder, tmp_path / "out", "--repeats", "3"))
    listed = train._list_images(folder, "--instance_data_dir", ".txt")
    assert listed == images  # the caption file is not taken for an image
    captions = train.instance_captions(listed, args)
    assert captions == ["a photo of sks dog on grass", "a photo of sks dog"]  # the instance prompt is the fallback
    dataset = train.DreamBoothDataset(listed, captions, 32, repeats=args.repeats)
    assert len(dataset) == 6
    assert [dataset[i]["instance_prompt"] for i in range(6)] == captions * 3
    dropped = train.DreamBoothDataset(listed, captions, 32, caption_dropout=0.5)
    random.seed(0)
    prompts = [dropped[i % 2]["instance_prompt"] for i in range(200)]
    assert 60 < prompts.count("") < 140
    assert (
        train.instance_captions(
            listed, train.parse_args(dreambooth_args("m", folder, tmp_path / "o", "--caption_extension", "none"))
        )
        == ["a photo of sks dog"] * 2
    )


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
        train.parse_args(dreambooth_args("no/such/model", folder, tmp_path / "out", *extra))


def test_training_reads_caption_files(tmp_path, tiny_sd, monkeypatch):
    folder = write_images(tmp_path / "imgs", 2)
    next(iter(sorted(folder.iterdir()))).with_suffix(".txt").write_text("a photo of sks dog on grass")
    batches = []
    collate = train.collate
    monkeypatch.setattr(
        train, "collate", lambda examples, prior: batches.append(collate(examples, prior)) or batches[-1]
    )
    args = train.parse_args(
        dreambooth_args(tiny_sd, folder, tmp_path / "out", "--max_train_steps", "4", "--report_to", "none")
    )
    train.main(args)
    prompts = {prompt for batch in batches for prompt in batch["prompts"]}
    assert prompts == {"a photo of sks dog on grass", "a photo of sks dog"}


def test_output_kohya_format_writes_every_component(tmp_path, tiny_sd, instance_dir):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    extra = ["--max_train_steps", "1", "--train_text_encoder", "--output_kohya_format", "--report_to", "none"]
    train.main(train.parse_args(dreambooth_args(tiny_sd, instance_dir, out, *extra)))
    keys = load_file(str(out / "lora_kohya.safetensors")).keys()
    assert {key.split("_", 2)[1] for key in keys} == {"unet", "te"}
    # The UNet part, loaded by diffusers' own kohya conversion, gives what the diffusers file gives.
    kohya = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    kohya.load_lora_weights(str(out), weight_name="lora_kohya.safetensors")
    plain = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    plain.load_lora_weights(str(out))
    assert_same_numerics(
        run_unet(kohya.unet, unet_inputs(batch_size=2)), run_unet(plain.unet, unet_inputs(batch_size=2))
    )


def test_snr_gamma_noise_offset_schedules_and_text_encoder_lr(tmp_path, tiny_sd, instance_dir, monkeypatch):
    import torch.optim

    seen = []
    adamw = torch.optim.AdamW

    def recording_adamw(groups, **kwargs):
        optimizer = adamw(groups, **kwargs)
        seen.append([group["lr"] for group in optimizer.param_groups])
        return optimizer

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    extra = ["--max_train_steps", "2", "--train_text_encoder", "--text_encoder_lr", "3e-5", "--snr_gamma", "5"]
    extra += ["--noise_offset", "0.05", "--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2"]
    extra += ["--posterior_std_learning_rate", "1e-3"]
    result = train.main(train.parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", *extra)))
    assert result["global_step"] == 2
    losses = scalars(tmp_path / "out" / "logs", "loss")
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    # UNet: means at --learning_rate, stds at their own; text encoder: means at --text_encoder_lr, stds at theirs.
    assert seen == [[1e-4, 1e-3, 3e-5, 1e-3]]
    with pytest.raises(ValueError, match=r"--snr_gamma=0.0 is invalid; expected a finite number > 0"):
        train.parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "o", "--snr_gamma", "0"))


def test_min_snr_weights_follow_the_formula():
    from diffusers import DDPMScheduler

    args = argparse.Namespace(snr_gamma=5.0)
    scheduler = DDPMScheduler()
    timesteps = torch.tensor([10, 900])
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = (torch.minimum(snr, torch.tensor(5.0)) / snr).mean()  # per-example MSE is 1
    assert train.instance_loss(args, scheduler, pred, target, timesteps).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    assert train.instance_loss(argparse.Namespace(snr_gamma=None), scheduler, pred, target, timesteps).item() == 1.0


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
        train.parse_args(dreambooth_args("no/such/model", instance_dir, tmp_path / "out", *extra))
