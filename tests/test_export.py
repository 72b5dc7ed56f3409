"""Export of a Bayesian adapter to its mean LoRA: the formats and sources, and loading without bayes-adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import (
    assert_same_numerics,
    bayesian_unet,
    randomise,
    read_safetensors_metadata,
    run_unet,
    save_tiny_pipeline,
    tiny_pipeline,
    tiny_text_encoder,
    tiny_unet,
    unet_config,
    unet_inputs,
)
from tiny_t5_dit_models import sd3_transformer_inputs, tiny_sd3_transformer

import bayes_adapter
from bayes_adapter import BayesLoraConfig, export_lora
from bayes_adapter import export as export_module
from bayes_adapter.adapter import BAYESIAN_CONFIG_FIELDS


def safetensors_keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


# --- the proof: a process where bayes_adapter cannot be imported ----------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys

    sys.modules["bayes_adapter"] = None  # whatever is installed, it cannot be imported here
    try:
        import bayes_adapter  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("bayes_adapter was importable in the child process")

    import torch

    torch.set_num_threads(1)
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    pipe_dir, unet_export, te_export, inputs_path, out_path = sys.argv[1:]
    inputs = load_file(inputs_path)
    x, t, enc, ids = inputs["x"], inputs["t"], inputs["enc"], inputs["ids"]
    out = {}

    def image(pipe):
        generator = torch.Generator().manual_seed(0)
        images = pipe("a sks dog", num_inference_steps=2, generator=generator, output_type="np", height=32, width=32)
        return torch.from_numpy(images.images)

    with torch.no_grad():
        unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet"), unet_export)
        assert type(unet.peft_config["default"]).__name__ == "LoraConfig"
        out["peft_unet"] = unet.eval()(x, t, enc).sample

        pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(unet_export, adapter_name="unet_mean")
        pipe.load_lora_weights(te_export, adapter_name="te_mean")
        out["diffusers_unet"] = pipe.unet(x, t, enc).sample
        out["diffusers_te"] = pipe.text_encoder(ids)[0]
        out["image"] = image(pipe)

        pipe.unet.set_adapters(["unet_mean"], weights=[0.5])
        out["half_unet"] = pipe.unet(x, t, enc).sample
        pipe.set_adapters(["unet_mean", "te_mean"], adapter_weights=[0.5, 1.0])
        out["half_unet_pipe"] = pipe.unet(x, t, enc).sample
        pipe.set_adapters(["unet_mean", "te_mean"], adapter_weights=[1.0, 1.0])

        pipe.fuse_lora(components=["unet", "text_encoder"])
        out["fused_unet"] = pipe.unet(x, t, enc).sample
        out["fused_te"] = pipe.text_encoder(ids)[0]
        out["fused_image"] = image(pipe)
    save_file({k: v.contiguous() for k, v in out.items()}, out_path)
    """
)


@pytest.mark.slow
def test_export_loads_without_bayes_adapter(tmp_path):
    pipe_dir = tmp_path / "pipe"
    save_tiny_pipeline(pipe_dir)
    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(unet_config())
    # transformers 5's own add_adapter needs peft >= 0.22; get_peft_model injects the layers in place.
    text_encoder = get_peft_model(
        pipe.text_encoder,
        BayesLoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "out_proj"], bayesian_factors="B"),
    )
    randomise(pipe.unet, seed=1)
    randomise(pipe.text_encoder, seed=2)
    pipe.unet.eval()
    pipe.text_encoder.eval()

    inputs = unet_inputs()
    inputs["ids"] = pipe.tokenizer(["a sks dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = {
            "unet": run_unet(pipe.unet, inputs),
            "te": pipe.text_encoder(inputs["ids"])[0],
            "image": torch.from_numpy(
                pipe(
                    "a sks dog",
                    num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0),
                    output_type="np",
                    height=32,
                    width=32,
                ).images
            ),
        }
        pipe.unet.set_adapters(["default"], weights=[0.5])
        reference["half_unet"] = run_unet(pipe.unet, inputs)
        pipe.unet.set_adapters(["default"], weights=[1.0])
        base = run_unet(UNet2DConditionModel.from_pretrained(str(pipe_dir), subfolder="unet"), inputs)

    unet_export = export_lora(pipe.unet, tmp_path / "unet_export")
    te_export = export_lora(text_encoder, tmp_path / "te_export")
    assert all(k.startswith("text_encoder.") for k in safetensors_keys(te_export / "pytorch_lora_weights.safetensors"))
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp_path / "inputs.safetensors"))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [str(pipe_dir), str(unet_export), str(te_export), str(tmp_path / "inputs.safetensors")]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, *args, str(tmp_path / "out.safetensors")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    out = load_file(str(tmp_path / "out.safetensors"))

    # The adapter changes the output (so the comparisons below could fail) ...
    assert (reference["unet"] - base).abs().max() > 1e-3
    assert (reference["half_unet"] - reference["unet"]).abs().max() > 1e-4
    # ... and unfused, the plain LoRA computed in the other process equals the Bayesian adapter in eval mode to
    # float32 rounding (a process boundary and a file separate them: see assert_same_numerics).
    for key, expected in (("peft_unet", "unet"), ("diffusers_unet", "unet"), ("diffusers_te", "te")):
        assert_same_numerics(out[key], reference[expected], msg=key)
    assert_same_numerics(out["image"], reference["image"], msg="image")
    assert_same_numerics(out["half_unet"], reference["half_unet"], msg="half_unet")
    assert_same_numerics(out["half_unet_pipe"], reference["half_unet"], msg="half_unet_pipe")
    # (Bit-identity with a plain PEFT LoRA holding the same A and B, same process and tensors, is checked per layer type
    # in test_layer.py; here even an in-process plain UNet differs by ~7e-7, since pipe.unet's base weights come from a
    # file.)
    # Fused: within fp32 rounding.
    torch.testing.assert_close(out["fused_unet"], reference["unet"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["fused_te"], reference["te"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["fused_image"], reference["image"], rtol=1e-4, atol=1e-4)


# --- formats and sources ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["peft", "add_adapter"])
def test_export_files_keys_and_configs(tmp_path, wrap):
    model = bayesian_unet(wrap)
    reference = run_unet(model, unet_inputs())
    out = export_lora(model, tmp_path / "export")

    assert sorted(os.listdir(out)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "bayes_lora_export.json",
        "pytorch_lora_weights.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {"to_k": 2} and config["alpha_pattern"] == {"to_v": 3}
    assert not set(BAYESIAN_CONFIG_FIELDS) & set(config)

    peft_keys = safetensors_keys(out / "adapter_model.safetensors")
    diffusers_keys = safetensors_keys(out / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("base_model.model.") for k in peft_keys)
    assert all(k.startswith("unet.") and "base_model.model." not in k for k in diffusers_keys)
    assert not [k for k in peft_keys + diffusers_keys if "rho" in k or "posterior" in k]
    assert {k.removeprefix("base_model.model.") for k in peft_keys} == {
        k.removeprefix("unet.") for k in diffusers_keys
    }
    assert any(".resnets.0.conv1.lora_A.weight" in k for k in diffusers_keys)  # a Conv2d target

    metadata = json.loads(read_safetensors_metadata(out / "pytorch_lora_weights.safetensors")["lora_adapter_metadata"])
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8
    assert metadata["unet.rank_pattern"] == {"to_k": 2} and metadata["unet.alpha_pattern"] == {"to_v": 3}
    # Only keys every PEFT version accepts: LoraConfig(**metadata) is what diffusers does with them.
    assert set(metadata) == {
        f"unet.{k}" for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules")
    }

    summary = json.loads((out / "bayes_lora_export.json").read_text())
    assert summary["component"] == "unet" and summary["bayesian"]["bayesian_factors"] == "AB"
    stats = bayes_adapter.posterior_std_stats(model)
    assert summary["posterior_std"]["count"] == stats["count"] > 0
    assert summary["posterior_std"]["mean"] == pytest.approx(stats["mean"])

    loaded = PeftModel.from_pretrained(tiny_unet(), str(out)).eval()
    assert type(loaded.peft_config["default"]) is LoraConfig
    assert_same_numerics(run_unet(loaded, unet_inputs()), reference)

    plain = tiny_unet()
    plain.load_lora_adapter(str(out), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    assert_same_numerics(run_unet(plain, unet_inputs()), reference)


def test_export_one_of_several_adapters(tmp_path):
    model = get_peft_model(tiny_unet(), unet_config(), adapter_name="first")
    model.add_adapter("second", unet_config(r=2, lora_alpha=2, rank_pattern={}, alpha_pattern={}))
    randomise(model, "first", seed=1)
    randomise(model, "second", seed=2)
    model.set_adapter("second")
    model.eval()
    reference = run_unet(model, unet_inputs())

    out = export_lora(model, tmp_path / "second", adapter_name="second")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    weights = load_file(str(out / "adapter_model.safetensors"))
    expected = {
        name.replace(".second", ""): parameter
        for name, parameter in model.named_parameters()
        if ".second." in name and ".lora_" in name and "rho" not in name
    }
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
    loaded = PeftModel.from_pretrained(tiny_unet(), str(out)).eval()
    assert_same_numerics(run_unet(loaded, unet_inputs()), reference)


def test_export_from_saved_folder_matches_memory(tmp_path):
    model = bayesian_unet("peft")
    model.save_pretrained(str(tmp_path / "bayes"))
    model.add_adapter("other", unet_config(r=2))
    randomise(model, "other", seed=3)
    model.save_pretrained(str(tmp_path / "bayes_both"))

    from_memory = export_lora(model, tmp_path / "memory")
    from_disk = export_lora(tmp_path / "bayes", tmp_path / "disk")  # component inferred from the saved config
    for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(str(from_memory / name)), load_file(str(from_disk / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = export_lora(tmp_path / "bayes_both", tmp_path / "other", adapter_name="other")  # the <name>/ subfolder
    assert json.loads((other / "adapter_config.json").read_text())["r"] == 2


def test_export_dit_transformer(tmp_path):
    transformer = tiny_sd3_transformer()
    transformer.add_adapter(
        BayesLoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "add_q_proj", "ff.net.2", "proj_out"])
    )
    randomise(transformer)
    transformer.eval()
    with torch.no_grad():
        reference = transformer(**sd3_transformer_inputs()).sample
        base = tiny_sd3_transformer()(**sd3_transformer_inputs()).sample
    assert (reference - base).abs().max() > 1e-3

    out = export_lora(transformer, tmp_path / "dit")
    keys = safetensors_keys(out / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("transformer.") for k in keys)
    loaded = tiny_sd3_transformer()
    loaded.load_lora_adapter(str(out), prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        assert_same_numerics(loaded(**sd3_transformer_inputs()).sample, reference)
    with pytest.raises(ValueError, match="kohya"):
        export_lora(transformer, tmp_path / "dit_kohya", format="kohya")
    assert not (tmp_path / "dit_kohya").exists()


def test_export_a_component_mapping_into_one_diffusers_file(tmp_path):
    from peft import inject_adapter_in_model

    unet = bayesian_unet()
    encoder = tiny_text_encoder()
    inject_adapter_in_model(BayesLoraConfig(r=2, target_modules=["q_proj"]), encoder)
    randomise(encoder)
    encoder.eval()
    ids = torch.tensor([[0, 40, 41, 42, 2]])
    with torch.no_grad():
        reference_text = encoder(ids)[0]
    out = export_lora({"unet": unet, "text_encoder": encoder}, tmp_path / "out", pipeline_cls=StableDiffusionPipeline)
    assert sorted(os.listdir(out)) == ["export", "pytorch_lora_weights.safetensors"]
    assert sorted(os.listdir(out / "export")) == ["text_encoder", "unet"]
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(out))
    assert_same_numerics(run_unet(pipe.unet, unet_inputs()), run_unet(unet, unet_inputs()))
    with torch.no_grad():
        assert_same_numerics(pipe.text_encoder(ids)[0], reference_text)
    with pytest.raises(FileExistsError, match="already exists"):
        export_lora({"unet": unet}, out, pipeline_cls=StableDiffusionPipeline)
    # format and component apply to a mapping too: the formats asked for, component refused (the keys name them).
    only_diffusers = export_lora(
        {"unet": unet}, tmp_path / "d", format="diffusers", pipeline_cls=StableDiffusionPipeline
    )
    assert sorted(os.listdir(only_diffusers / "export" / "unet")) == [
        "bayes_lora_export.json",
        export_module.DIFFUSERS_WEIGHTS_NAME,
    ]
    kohya = export_lora(
        {"unet": unet}, tmp_path / "k", format=["diffusers", "kohya"], pipeline_cls=StableDiffusionPipeline
    )
    assert "lora_kohya.safetensors" in os.listdir(kohya)
    with pytest.raises(ValueError, match="component='unet' does not apply to a {component: model} mapping"):
        export_lora({"unet": unet}, tmp_path / "c", component="unet", pipeline_cls=StableDiffusionPipeline)
    with pytest.raises(ValueError, match="format='peft': a {component: model} mapping is exported as one diffusers"):
        export_lora({"unet": unet}, tmp_path / "p", format="peft", pipeline_cls=StableDiffusionPipeline)
    assert not (tmp_path / "c").exists() and not (tmp_path / "p").exists()
