"""The DreamBooth script's `--quantize_base {nf4,int8}` (Bayesian LoRA over a quantised denoiser) and `--use_dora`, on
the tiny SD3 pipeline.

int8 loads through diffusers' TorchAoConfig on any device; nf4 loads through diffusers' BitsAndBytesConfig on CUDA
and is quantised after loading elsewhere: the training test expects the path `quantisation_path` gives for the
machine it runs on, so on a GPU it checks the nf4 load-time path.
"""

from __future__ import annotations

import importlib.util
import logging
import types

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_models import assert_same_numerics, dreambooth_args
from tiny_t5_dit_models import T5_WIDTH

import bayes_adapter
import bayes_adapter.quantization
from bayes_adapter.bnb import BayesLinear4bit
from bayes_adapter.quantization import quantized_layer_names
from bayes_adapter.torchao import BayesTorchaoLinear
from examples.dreambooth import quantized_base, training
from examples.dreambooth.quantized_base import AFTER_LOADING, LOAD_TIME, load_denoiser, quantisation_path
from examples.dreambooth.settings import ArgumentsError, parse_args, resolve_model
from examples.dreambooth.targets import split_targets


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

T5_TOKENS = ["--max_sequence_length", "32"]  # the tiny T5 tokenizer's length


def pipeline_image(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(
            "a photo of sks dog",
            num_inference_steps=2,
            height=32,
            width=32,
            max_sequence_length=32,
            generator=generator,
            output_type="pt",
        ).images


def test_quantisation_path_uses_diffusers_config_where_it_loads():
    assert quantisation_path("nf4", "cuda") == LOAD_TIME  # BitsAndBytesConfig
    for device_type in ("cpu", "mps", "xpu"):
        assert quantisation_path("nf4", device_type) == AFTER_LOADING
    for device_type in ("cuda", "cpu", "mps"):
        assert quantisation_path("int8", device_type) == LOAD_TIME  # TorchAoConfig
    with pytest.raises(ValueError, match="--quantize_base must be one of"):
        quantisation_path("fp8", "cuda")


DEVICE_TYPE = "cuda" if torch.cuda.is_available() else "cpu"  # where the script runs (accelerate's default)


@pytest.mark.parametrize("choice, layer_cls", [("nf4", BayesLinear4bit), ("int8", BayesTorchaoLinear)])
def test_quantize_base_trains_and_the_export_loads_into_the_unquantised_pipeline(
    tiny_sd3, tmp_path, instance_dir, caplog, choice, layer_cls
):
    load_time = quantisation_path(choice, DEVICE_TYPE) == LOAD_TIME
    path_logged = "quantised while loading" if load_time else "quantised after loading"
    out = tmp_path / "out"
    validation = ["--validation_prompt", "a photo of sks dog", "--validation_steps", "2"]
    validation += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--quantize_base", choice, *T5_TOKENS, *validation]
    with caplog.at_level(logging.INFO, logger=quantized_base.__name__):
        result = training.main(parse_args(dreambooth_args(tiny_sd3, instance_dir, out, *extra)))
    transformer = result["transformer"]
    layers = list(bayes_adapter.bayes_layers(transformer))
    assert layers and all(type(layer) is layer_cls for layer in layers)
    logged = [record.getMessage() for record in caplog.records if record.name == quantized_base.__name__]
    assert len(logged) == 1  # the path taken, said once
    assert f"--quantize_base {choice}: {len(layers)} Linear layers of the transformer {path_logged}" in logged[0]
    # diffusers marks a model it quantised while loading; the swap after loading leaves no such mark.
    assert getattr(transformer, "is_quantized", False) == load_time
    assert bayes_adapter.posterior_std_stats(transformer)["max"] > 0.01  # the stds trained

    pipe = DiffusionPipeline.from_pretrained(str(tiny_sd3))
    pipe.set_progress_bar_config(disable=True)
    before = pipeline_image(pipe)
    pipe.load_lora_weights(str(out))
    assert (pipeline_image(pipe) - before).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_load_time_and_after_loading_quantise_the_same_layers_alike(
    tiny_sd3, tmp_path, instance_dir, monkeypatch, dtype
):
    from accelerate import PartialState
    from torchao.utils import TorchAOBaseTensor

    PartialState()  # the script's logger needs it
    settings = resolve_model(
        parse_args(dreambooth_args(tiny_sd3, instance_dir, tmp_path / "out", "--quantize_base", "int8"))
    )
    load_time = load_denoiser(settings, torch.device("cpu"), dtype)
    monkeypatch.setattr(quantized_base, "quantisation_path", lambda choice, device_type: AFTER_LOADING)
    after_loading = load_denoiser(settings, torch.device("cpu"), dtype)
    assert load_time.is_quantized and not getattr(after_loading, "is_quantized", False)

    def quantised(model) -> list[str]:
        return [
            name
            for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), TorchAOBaseTensor)
        ]

    linears = [module for module in after_loading.modules() if isinstance(module, torch.nn.Linear)]
    assert 0 < len(quantised(load_time)) < len(linears)  # the targeted Linears only
    assert quantised(load_time) == quantised(after_loading)
    assert all(p.dtype == dtype and not p.requires_grad for p in load_time.parameters() if p.is_floating_point())
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 4, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, T5_WIDTH, generator=generator),
        "pooled_projections": torch.randn(1, load_time.config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([500.0]),
    }
    inputs = {key: value.to(dtype) if key != "timestep" else value for key, value in inputs.items()}
    with torch.no_grad():
        outputs = [model(**inputs).sample.float() for model in (load_time, after_loading)]
    if dtype == torch.float32:
        assert_same_numerics(*outputs)
    else:
        torch.testing.assert_close(*outputs, rtol=0, atol=1e-2)


def every_linear_config(*args, **kwargs):
    """A TorchAoConfig that quantises every Linear, as a clash of diffusers' name matching with the targets would."""
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def record_loads(monkeypatch, events: list) -> None:
    """Records each component load of the script (and whether it carried a quantisation config) in `events`."""
    from examples.dreambooth import families

    load_component = families.load_component

    def recording(path, model_index, name, options=None, **load):
        events.append(("load", name, "quantization_config" in (options or {})))
        return load_component(path, model_index, name, options, **load)

    monkeypatch.setattr(families, "load_component", recording)


def test_a_load_time_clash_found_on_the_empty_model_quantises_after_loading(
    tiny_sd3, tmp_path, instance_dir, monkeypatch, caplog
):
    """A clash is found on the empty denoiser, before the class images are generated and before anything loads; the
    denoiser then loads unquantised and its targeted Linears (only) are quantised after loading."""
    from accelerate import PartialState

    PartialState()  # the script's logger needs it
    events = []
    monkeypatch.setattr(bayes_adapter.quantization, "load_time_quantization_config", every_linear_config)
    planned = bayes_adapter.quantization.load_time_quantized_layer_names
    monkeypatch.setattr(
        bayes_adapter.quantization,
        "load_time_quantized_layer_names",
        lambda *a: events.append("planned on the empty model") or planned(*a),
    )
    monkeypatch.setattr(
        training.dreambooth_data, "generate_class_images", lambda *a: events.append("class images generated")
    )
    record_loads(monkeypatch, events)
    extra = ["--quantize_base", "int8", "--with_prior_preservation", "--class_prompt", "a dog"]
    extra += ["--class_data_dir", str(tmp_path / "class")]
    settings = resolve_model(parse_args(dreambooth_args(tiny_sd3, instance_dir, tmp_path / "out", *extra)))
    accelerator = types.SimpleNamespace(mixed_precision="no", device=torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger=quantized_base.__name__):
        models = training.load_models(settings, accelerator)
    assert events[:3] == ["planned on the empty model", "class images generated", ("load", "transformer", False)]
    assert not any(event[2] for event in events if event[0] == "load")  # no load through the clashing config
    targets = split_targets(settings.family.denoiser_targets(settings))
    linears = [module for module in models.denoiser.modules() if isinstance(module, torch.nn.Linear)]
    quantised = quantized_layer_names(models.denoiser)
    assert 0 < len(quantised) < len(linears)
    assert quantised == bayes_adapter.quantization.linears_to_quantize(models.denoiser, targets)
    (logged,) = [record.getMessage() for record in caplog.records if record.name == quantized_base.__name__]
    assert "quantised after loading" in logged and "would quantise other layers than the targeted Linears" in logged


def test_a_real_name_clash_on_flux_is_quantised_after_loading(tiny_flux, tmp_path, instance_dir, caplog):
    """Targeting only `single_transformer_blocks.0.attn.to_q`: diffusers' TorchAoConfig would leave it alone (the
    untargeted `transformer_blocks.0.attn.to_q` is part of its name); quantised after loading, it is quantised."""
    from accelerate import PartialState

    PartialState()  # the script's logger needs it
    target = "single_transformer_blocks.0.attn.to_q"
    extra = ["--quantize_base", "int8", "--transformer_target_modules", target, *T5_TOKENS]
    settings = resolve_model(parse_args(dreambooth_args(tiny_flux, instance_dir, tmp_path / "out", *extra)))
    with caplog.at_level(logging.INFO, logger=quantized_base.__name__):
        denoiser = load_denoiser(settings, torch.device("cpu"), torch.float32)
    assert quantized_layer_names(denoiser) == [target] and not getattr(denoiser, "is_quantized", False)
    (logged,) = [record.getMessage() for record in caplog.records if record.name == quantized_base.__name__]
    assert "would quantise other layers than the targeted Linears while loading" in logged and target in logged


def test_the_post_load_check_still_refuses_a_load_time_quantisation_of_other_layers(
    tiny_sd3, tmp_path, instance_dir, monkeypatch
):
    """The safety net: were the empty model's answer wrong, the loaded denoiser's quantised layers are checked."""
    from accelerate import PartialState

    PartialState()  # the script's logger needs it
    argv = dreambooth_args(tiny_sd3, instance_dir, tmp_path / "out", "--quantize_base", "int8")
    settings = resolve_model(parse_args(argv))
    targets = split_targets(settings.family.denoiser_targets(settings))
    monkeypatch.setattr(bayes_adapter.quantization, "load_time_quantization_config", every_linear_config)
    monkeypatch.setattr(
        bayes_adapter.quantization,
        "load_time_quantized_layer_names",
        lambda model, config: bayes_adapter.quantization.linears_to_quantize(model, targets),
    )
    with pytest.raises(ArgumentsError, match=r"--quantize_base int8: diffusers' TorchAoConfig quantised other layers"):
        load_denoiser(settings, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("refusal", [ValueError, RuntimeError])
def test_a_quantiser_refusing_the_load_is_reported_as_a_failed_quantisation(tiny_sd3, monkeypatch, refusal):
    """Not as missing files of --variant / --revision: the quantiser (here diffusers' torchao one, made to refuse as
    the bitsandbytes one refuses without a GPU) stopped the load."""
    from diffusers import TorchAoConfig
    from diffusers.quantizers.torchao.torchao_quantizer import TorchAoHfQuantizer
    from torchao.quantization import Int8WeightOnlyConfig

    from examples.dreambooth import families

    def refuse(self, *args, **kwargs):
        raise refusal("No GPU found. A GPU is needed for quantization.")

    monkeypatch.setattr(TorchAoHfQuantizer, "validate_environment", refuse)
    options = {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig()), "dtype": torch.float32}
    model_index = families.read_model_index(str(tiny_sd3))
    with pytest.raises(ArgumentsError) as refused:
        families.load_component(str(tiny_sd3), model_index, "transformer", options, variant="fp16", revision=None)
    message = str(refused.value)
    assert "quantising its transformer (SD3Transformer2DModel) while loading it through diffusers' TorchAoConfig " in (
        message
    )
    assert f"failed ({refusal.__name__}: No GPU found." in message and "--variant" not in message, message


def test_quantize_base_without_its_package_is_refused_before_any_work(tiny_sd3, tmp_path, instance_dir, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    with pytest.raises(
        ArgumentsError, match=r"--quantize_base int8 needs the torchao package, which is not installed"
    ):
        parse_args(dreambooth_args(tiny_sd3, instance_dir, tmp_path / "out", "--quantize_base", "int8"))
    assert not (tmp_path / "out").exists()


def test_use_dora_trains_and_its_export_loads_into_the_vanilla_pipeline(tiny_sd3, tmp_path, instance_dir):
    out = tmp_path / "out"
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--use_dora", *T5_TOKENS]
    result = training.main(parse_args(dreambooth_args(tiny_sd3, instance_dir, out, *extra)))
    layer = result["transformer"].transformer_blocks[0].attn.to_q
    assert layer.lora_magnitude_vector and layer.is_bayesian("default")
    pipe = DiffusionPipeline.from_pretrained(str(tiny_sd3))
    pipe.set_progress_bar_config(disable=True)
    before = pipeline_image(pipe)
    pipe.load_lora_weights(str(out))
    assert pipe.transformer.transformer_blocks[0].attn.to_q.lora_magnitude_vector
    assert (pipeline_image(pipe) - before).abs().max() > 1e-3


def test_use_dora_with_a_kohya_file_or_the_local_estimator_is_refused(tiny_sd, tmp_path, instance_dir):
    argv = dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", "--use_dora")
    with pytest.raises(ArgumentsError, match="--output_kohya_format cannot carry a DoRA adapter"):
        parse_args([*argv, "--output_kohya_format"])
    with pytest.raises(ArgumentsError, match="use_dora=True needs --estimator='weight', got --estimator='local'"):
        parse_args([*argv, "--estimator", "local"])
