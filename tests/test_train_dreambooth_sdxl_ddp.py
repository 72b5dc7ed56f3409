"""The DreamBooth script on SDXL with Bayesian text encoders, and on two CPU processes under accelerate launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import (
    DREAMBOOTH_SCRIPT,
    assert_same_numerics,
    dreambooth_args,
    tensorboard_scalars,
    tiny_sdxl_pipeline,
    unet_inputs,
)

import bayes_adapter
from examples.dreambooth import training
from examples.dreambooth.settings import parse_args


SCRIPT = DREAMBOOTH_SCRIPT
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


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
    result = training.main(parse_args(dreambooth_args(model, instance_dir, out, *extra)))
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
        # The runner loads the script by path, as `python script.py` would with its folder first on sys.path.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")])),
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
    assert sorted(tensorboard_scalars(out / "logs", "loss")) == [1, 2]

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
