"""The DreamBooth script end to end on a tiny SD pipeline: train, checkpoint, resume, validate, export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import (
    assert_same_numerics,
    dreambooth_args,
    reset_accelerate_state,
    run_unet,
    tensorboard_histogram_steps,
    tensorboard_scalars,
    unet_inputs,
    write_images,
)

import bayes_adapter
from examples.dreambooth import data as dreambooth_data
from examples.dreambooth import training
from examples.dreambooth.settings import parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


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
    result = training.main(
        parse_args(
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
    assert sorted(tensorboard_scalars(out / "logs", "loss")) == [1, 2, 3, 4]
    kl = tensorboard_scalars(out / "logs", "kl")
    assert all(value > 0 for value in kl.values())
    sigma = tensorboard_scalars(out / "logs", "sigma_mean")
    assert sigma[1] == pytest.approx(0.01, rel=0.05) and sigma[4] != sigma[1]
    assert (
        tensorboard_scalars(out / "logs", "sigma_min")[4]
        < sigma[4]
        < tensorboard_scalars(out / "logs", "sigma_max")[4]
    )
    assert tensorboard_histogram_steps(out / "logs", "posterior_std/unet") == [1, 2, 4]
    assert sorted(tensorboard_scalars(out / "logs", "validation/monitor_corruption")) == [2, 4]
    assert sorted(tensorboard_scalars(out / "logs", "test/monitor_corruption")) == [4]

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
    resumed = training.main(
        parse_args(dreambooth_args(tiny_sd, instance_dir, resumed_out, *common, "--resume_from_checkpoint", "latest"))
    )
    assert resumed["global_step"] == 4
    assert sorted(tensorboard_scalars(resumed_out / "logs", "loss")) == [3, 4]
    assert (resumed_out / "checkpoint-4").is_dir()
    state = get_peft_model_state_dict(resumed["unet"])
    for key, value in final.items():
        # The resumed run's forwards ran on weights loaded from the checkpoint: equal to float32 rounding.
        assert_same_numerics(state[key], value, msg=f"{key} differs after resuming")


def test_prior_preservation_bf16_and_gradient_accumulation(tmp_path, tiny_sd, instance_dir, monkeypatch):
    class_dir = write_images(tmp_path / "class", 1, seed=1)  # one class image there, one to generate
    batches = []
    collate = dreambooth_data.collate
    monkeypatch.setattr(
        dreambooth_data, "collate", lambda examples, prior: batches.append(collate(examples, prior)) or batches[-1]
    )
    args = parse_args(
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
    result = training.main(args)
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


def test_validation_logs_the_papers_metrics_with_local_models(tmp_path, tiny_sd, instance_dir):
    from tiny_models import save_random_lpips, save_tiny_clip, save_tiny_dino

    clip, dino = save_tiny_clip(tmp_path / "clip"), save_tiny_dino(tmp_path / "dino")
    backbone, linear = save_random_lpips(tmp_path / "lpips")
    extra = ["--max_train_steps", "2", "--validation_prompt", "a photo of sks dog", "--validation_steps", "2"]
    extra += ["--num_validation_images", "2", "--validation_inference_steps", "2"]
    extra += ["--eval_clip_model", clip, "--eval_dino_model", dino]
    extra += ["--eval_lpips", "--eval_lpips_backbone", backbone, "--eval_lpips_linear_weights", linear]
    training.main(parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", *extra)))
    for name in ("clip_i", "clip_t", "dino", "dino_diversity"):
        values = tensorboard_scalars(tmp_path / "out" / "logs", f"validation/{name}")
        assert sorted(values) == [2] and -1 <= values[2] <= 2, name
    for name in ("lpips_diversity", "lpips_to_reference"):
        values = tensorboard_scalars(tmp_path / "out" / "logs", f"validation/{name}")
        assert sorted(values) == [2] and values[2] > 0, name
    with pytest.raises(ValueError, match=r"--eval_clip_model=.*none.*: CLIP model .*: no such folder"):
        parse_args(
            dreambooth_args(tiny_sd, instance_dir, tmp_path / "o2", "--eval_clip_model", str(tmp_path / "none"))
        )


def test_eval_lpips_files_are_checked_before_any_model_loads(tmp_path, tiny_sd, instance_dir):
    missing = str(tmp_path / "no_alexnet.pth")
    with pytest.raises(ValueError, match=f"--eval_lpips: LPIPS needs AlexNet's ImageNet weights .*'{missing}'"):
        parse_args(
            dreambooth_args(tiny_sd, instance_dir, tmp_path / "o", "--eval_lpips", "--eval_lpips_backbone", missing)
        )
    with pytest.raises(ValueError, match="used only with --eval_lpips"):
        parse_args(dreambooth_args(tiny_sd, instance_dir, tmp_path / "o", "--eval_lpips_backbone", missing))


def test_output_kohya_format_writes_every_component(tmp_path, tiny_sd, instance_dir):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    extra = ["--max_train_steps", "1", "--train_text_encoder", "--output_kohya_format", "--report_to", "none"]
    training.main(parse_args(dreambooth_args(tiny_sd, instance_dir, out, *extra)))
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
