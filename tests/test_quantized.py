"""Bayesian LoRA on quantised bases: bitsandbytes NF4 / FP4 / LLM.int8 layers and torchao int8 weight-only weights.

Each kind trains a few Bayesian steps on a tiny SD3 transformer with its attention Linears quantised, exports the mean
LoRA, and the export loads both into the unquantised vanilla pipeline (where it changes the image) and back onto the
quantised model (where it gives the Bayesian model's eval output).
"""

from __future__ import annotations

import os
import warnings


# bitsandbytes (which `import diffusers` imports) fetches a CPU kernel from the Hub on some CPUs: never in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bitsandbytes as bnb  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusion3Pipeline  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tiny_models import assert_same_numerics  # noqa: E402
from tiny_t5_dit_models import T5_WIDTH, tiny_sd3_pipeline  # noqa: E402
from torch import nn  # noqa: E402

import bayes_adapter  # noqa: E402
from bayes_adapter import BayesLoraConfig, export_lora  # noqa: E402
from bayes_adapter.bnb import BayesLinear4bit, BayesLinear8bitLt  # noqa: E402
from bayes_adapter.quantization import (  # noqa: E402
    linears_to_quantize,
    load_time_quantization_config,
    load_time_quantized_layer_names,
    quantize_linears,
    quantized_layer_names,
)
from bayes_adapter.torchao import BayesTorchaoLinear  # noqa: E402


TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LAYER_CLASSES = {
    "bnb_nf4": BayesLinear4bit,
    "bnb_fp4": BayesLinear4bit,
    "bnb_int8": BayesLinear8bitLt,
    "torchao_int8": BayesTorchaoLinear,
}


def transformer_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for the tiny SD3 pipeline's transformer: two 16x16 latents, 6 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, 4, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(2, 6, T5_WIDTH, generator=generator),
        "pooled_projections": torch.randn(2, 16, generator=generator),
        "timestep": torch.tensor([100.0, 700.0]),
    }


@torch.no_grad()
def eval_output(transformer: nn.Module) -> torch.Tensor:
    transformer.eval()
    return transformer(**transformer_batch(1)).sample


def quantised_transformer(method: str):
    transformer = tiny_sd3_pipeline().transformer
    quantize_linears(transformer, method, TARGETS)
    return transformer


def train_bayesian(transformer: nn.Module, steps: int = 3) -> list[float]:
    """A few steps of a regression loss plus the KL: enough to move every mean and std."""
    transformer.add_adapter(BayesLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bayesian_factors="AB"))
    optimizer = torch.optim.AdamW(bayes_adapter.param_groups(transformer), lr=1e-2)
    batch, target = transformer_batch(0), torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    transformer.train()
    losses = []
    for _ in range(steps):
        prediction = transformer(**batch).sample
        loss = nn.functional.mse_loss(prediction, target) + bayes_adapter.kl_loss(transformer, 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def pipeline_image(pipe: StableDiffusion3Pipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    image = pipe("a sks dog", num_inference_steps=2, generator=generator, output_type="pt", height=32, width=32)
    return image.images


@pytest.mark.parametrize("method", ["bnb_nf4", "bnb_fp4", "bnb_int8", "torchao_int8"])
def test_adapter_on_a_quantised_base_is_bayesian_and_the_base_frozen(method):
    transformer = quantised_transformer(method)
    transformer.add_adapter(BayesLoraConfig(r=4, target_modules=TARGETS, bayesian_factors="AB"))
    layers = list(bayes_adapter.bayes_layers(transformer))
    assert len(layers) == 4 * len(transformer.transformer_blocks)
    assert all(type(layer) is LAYER_CLASSES[method] for layer in layers)
    for layer in layers:
        assert all(not p.requires_grad for p in layer.get_base_layer().parameters())
        for factor in "AB":
            assert layer.factor_mean(factor, "default").dtype == torch.float32
            assert layer.posterior_rho("default", factor).requires_grad
    if method.startswith("bnb"):
        assert layers[0].get_base_layer().weight.dtype in (torch.uint8, torch.int8)


@pytest.mark.parametrize("method", ["bnb_nf4", "torchao_int8"])
def test_train_on_a_quantised_base_export_and_load_into_vanilla_pipelines(method, tmp_path):
    transformer = quantised_transformer(method)
    frozen = {name: p.detach().clone() for name, p in transformer.named_parameters() if "lora_" not in name}
    losses = train_bayesian(transformer)
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, parameter in transformer.named_parameters():
        if name in frozen:
            assert torch.equal(parameter.detach(), frozen[name]), f"{name}: the quantised base moved"
    stats = bayes_adapter.posterior_std_stats(transformer)
    assert stats["max"] > stats["min"], "the posterior stds did not train"
    reference = eval_output(transformer)
    out = export_lora(transformer, tmp_path / "export", component="transformer")

    # The mean LoRA in the unquantised vanilla pipeline: loads and changes the image.
    pipe = tiny_sd3_pipeline()
    before = pipeline_image(pipe)
    pipe.load_lora_weights(str(out))
    after = pipeline_image(pipe)
    assert (after - before).abs().max() > 1e-3

    # Back onto the quantised model with plain PEFT (diffusers' loader): the Bayesian model's eval output.
    requantised = quantised_transformer(method)
    requantised.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="transformer")
    assert not list(bayes_adapter.bayes_layers(requantised))
    assert_same_numerics(eval_output(requantised), reference)


def merge_distances(transformer: nn.Module) -> tuple[float, float]:
    """(max |merged - adapted|, max |adapted - base|) of the eval outputs, fusing the adapter into the base."""
    adapted = eval_output(transformer)
    transformer.disable_adapters()
    base = eval_output(transformer)
    transformer.enable_adapters()
    transformer.fuse_lora()
    merged = eval_output(transformer)
    return (merged - adapted).abs().max().item(), (adapted - base).abs().max().item()


@pytest.mark.parametrize(
    "method, bits, weight_cls", [("bnb_nf4", "4-bit", bnb.nn.Params4bit), ("bnb_int8", "8-bit", bnb.nn.Int8Params)]
)
def test_bnb_merge_requantises_the_merged_weight(method, bits, weight_cls):
    transformer = quantised_transformer(method)
    train_bayesian(transformer)
    with pytest.warns(UserWarning, match=f"{bits} linear may get different generations due to rounding"):
        merge_error, adapter_effect = merge_distances(transformer)
    layer = transformer.transformer_blocks[0].attn.to_q
    assert layer.merged and isinstance(layer.get_base_layer().weight, weight_cls)
    assert merge_error < 0.5 * adapter_effect


def test_torchao_merge_without_its_config_is_refused_with_the_reason():
    transformer = quantised_transformer("torchao_int8")
    with pytest.warns(UserWarning, match="get_apply_tensor_subclass"):
        transformer.add_adapter(BayesLoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="needs the torchao config the model was loaded with"):
        transformer.fuse_lora()


def test_torchao_model_loaded_with_its_config_merges(tmp_path):
    from diffusers import SD3Transformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.utils import TorchAOBaseTensor

    tiny_sd3_pipeline().transformer.save_pretrained(tmp_path / "transformer")
    transformer = SD3Transformer2DModel.from_pretrained(
        tmp_path / "transformer", quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.float32
    )
    train_bayesian(transformer)
    layer = transformer.transformer_blocks[0].attn.to_q
    assert type(layer) is BayesTorchaoLinear and layer.get_apply_tensor_subclass is not None
    merge_error, adapter_effect = merge_distances(transformer)
    assert layer.merged and isinstance(layer.get_base_layer().weight, TorchAOBaseTensor)
    assert merge_error < 0.1 * adapter_effect


def test_bnb_4bit_layer_keeps_its_gradient_after_an_eval_forward():
    """On CPUs with AVX512-BF16 bitsandbytes repacks a 4-bit weight after an eval forward without gradients, for a
    kernel without a backward; the gradient to earlier layers' adapters would silently vanish."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4"))
    model[1] = model[1].to("cpu")
    peft_model = get_peft_model(model, BayesLoraConfig(r=2, target_modules=["0", "1"]))
    x = torch.randn(3, 64)
    first_lora_B = peft_model.base_model.model[0].lora_B["default"].weight

    def first_layer_gradient() -> torch.Tensor:
        peft_model.train()
        torch.manual_seed(1)  # the same weight samples each time
        first_lora_B.grad = None
        peft_model(x).sum().backward()
        return first_lora_B.grad.clone()

    before = first_layer_gradient()
    peft_model.eval()
    with torch.no_grad():
        peft_model(x)
    assert_same_numerics(first_layer_gradient(), before)


@pytest.mark.parametrize("method", ["bnb_nf4", "bnb_int8", "torchao_int8"])
def test_bayesian_layers_subclass_the_layer_plain_peft_picks(method):
    transformer = quantised_transformer(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao: merging needs get_apply_tensor_subclass
        get_peft_model(transformer, LoraConfig(r=2, target_modules=["to_q"]))
    peft_layer = transformer.transformer_blocks[0].attn.to_q
    assert type(peft_layer).__module__.startswith("peft.tuners.lora.")
    assert issubclass(LAYER_CLASSES[method], type(peft_layer))


def test_torchao_weight_on_a_module_other_than_linear_is_refused():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = nn.Sequential(nn.Embedding(10, 64))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: isinstance(module, nn.Embedding))
    with pytest.raises(ValueError, match="Module '0' is a Embedding with a torchao-quantised weight"):
        get_peft_model(model, BayesLoraConfig(r=2, target_modules=["0"]))


def test_quantize_linears_refuses_bad_input_before_changing_anything():
    transformer = tiny_sd3_pipeline().transformer
    with pytest.raises(
        ValueError, match=r"method must be one of \('bnb_nf4', 'bnb_fp4', 'bnb_int8', 'torchao_int8'\)"
    ):
        quantize_linears(transformer, "nf4")
    with pytest.raises(ValueError, match="No torch.nn.Linear layer of SD3Transformer2DModel matches"):
        quantize_linears(transformer, "bnb_nf4", ["no_such_layer"])
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in transformer.modules())


@pytest.mark.parametrize("method", ["bnb_nf4", "torchao_int8"])
def test_bayesian_dora_trains_on_a_quantised_base(method):
    transformer = quantised_transformer(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao: merging needs get_apply_tensor_subclass
        transformer.add_adapter(BayesLoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    layer = transformer.transformer_blocks[0].attn.to_q
    magnitude = layer.lora_magnitude_vector["default"].weight.detach().clone()
    optimizer = torch.optim.AdamW(bayes_adapter.param_groups(transformer), lr=1e-2)
    transformer.train()
    for _ in range(2):
        loss = transformer(**transformer_batch(0)).sample.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(layer.lora_magnitude_vector["default"].weight, magnitude)
    assert torch.isfinite(eval_output(transformer)).all()


def test_dora_on_bnb_int8_is_refused():
    transformer = quantised_transformer("bnb_int8")
    with pytest.raises(ValueError, match="Bayesian DoRA is not available on Linear8bitLt layers"):
        transformer.add_adapter(BayesLoraConfig(r=4, target_modules=TARGETS, use_dora=True))


@pytest.mark.parametrize("method", ["bnb_nf4", "bnb_int8", "torchao_int8"])
def test_a_bfloat16_base_keeps_its_output_dtype_and_trains_a_float32_adapter(method):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).to(torch.bfloat16)
    quantize_linears(model, method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao: merging needs get_apply_tensor_subclass
        peft_model = get_peft_model(model, BayesLoraConfig(r=2, target_modules=["0", "2"]))
    layer = peft_model.base_model.model[0]
    output = peft_model.train()(torch.randn(4, 64, dtype=torch.bfloat16))
    output.float().sum().backward()
    assert output.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == layer.posterior_rho("default", "B").dtype == torch.float32
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["bnb_nf4", "bnb_int8"])
def test_bitsandbytes_load_time_config_converts_exactly_the_layers_quantize_linears_swaps(method):
    """diffusers loads a BitsAndBytesConfig on a GPU only; its layer replacement (which runs on the meta device) is
    what decides which Linears the config quantises."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    config = tiny_sd3_pipeline().transformer.config
    with init_empty_weights():
        layers = SD3Transformer2DModel.from_config(config)
    quantization_config = load_time_quantization_config(layers, method, TARGETS, compute_dtype=torch.bfloat16)
    with init_empty_weights():
        replaced = replace_with_bnb_linear(
            SD3Transformer2DModel.from_config(config),
            modules_to_not_convert=quantization_config.llm_int8_skip_modules,
            quantization_config=quantization_config,
        )
    bnb_class = bnb.nn.Linear8bitLt if method == "bnb_int8" else bnb.nn.Linear4bit
    converted = [name for name, module in replaced.named_modules() if isinstance(module, bnb_class)]
    swapped = quantize_linears(tiny_sd3_pipeline().transformer, method, TARGETS)
    assert len(converted) == 8 and converted == swapped
    # Worked out by diffusers' own quantiser on the empty model, which it leaves as it is.
    assert load_time_quantized_layer_names(layers, quantization_config) == converted
    assert type(layers.transformer_blocks[0].attn.to_q) is nn.Linear
    if method == "bnb_nf4":
        assert quantization_config.bnb_4bit_quant_type == "nf4"
        assert quantization_config.bnb_4bit_compute_dtype == torch.bfloat16


def test_torchao_load_time_config_quantises_exactly_the_layers_quantize_linears_does_and_merges(tmp_path):
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel
    from torchao.utils import TorchAOBaseTensor

    transformer = tiny_sd3_pipeline().transformer
    transformer.save_pretrained(tmp_path)
    with init_empty_weights():
        layers = SD3Transformer2DModel.from_config(transformer.config)
    quantization_config = load_time_quantization_config(layers, "torchao_int8", TARGETS)
    loaded = SD3Transformer2DModel.from_pretrained(
        tmp_path, quantization_config=quantization_config, dtype=torch.float32
    )
    assert load_time_quantized_layer_names(layers, quantization_config) == quantized_layer_names(loaded)
    swapped = quantize_linears(transformer, "torchao_int8", TARGETS)
    assert len(swapped) == 8 and quantized_layer_names(loaded) == swapped == quantized_layer_names(transformer)
    for name in swapped:  # the same int8 weights, whichever path quantised them
        assert torch.equal(
            loaded.get_submodule(name).weight.dequantize(), transformer.get_submodule(name).weight.dequantize()
        )
    # The config quantises a lone layer again after a merge (a torchao FqnToConfig of the layers' names would not).
    train_bayesian(loaded)
    merge_error, adapter_effect = merge_distances(loaded)
    assert isinstance(loaded.transformer_blocks[0].attn.to_q.get_base_layer().weight, TorchAOBaseTensor)
    assert merge_error < 0.1 * adapter_effect


def test_load_time_quantized_layer_names_foresees_a_clash_of_diffusers_name_matching(tmp_path):
    """diffusers' torchao quantiser leaves a Linear alone when the name of a module not to convert is part of its
    name: targeting only Flux's `single_transformer_blocks.0.attn.to_q` (which contains the untargeted
    `transformer_blocks.0.attn.to_q`), nothing is quantised while loading; the empty model says so beforehand."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from tiny_t5_dit_models import tiny_flux_pipeline

    transformer = tiny_flux_pipeline().transformer
    transformer.save_pretrained(tmp_path)
    with init_empty_weights():
        layers = FluxTransformer2DModel.from_config(transformer.config)
    targets = ["single_transformer_blocks.0.attn.to_q"]
    quantization_config = load_time_quantization_config(layers, "torchao_int8", targets)
    planned = load_time_quantized_layer_names(layers, quantization_config)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path, quantization_config=quantization_config)
    assert planned == quantized_layer_names(loaded) == [] != linears_to_quantize(layers, targets)


def test_load_time_quantization_config_refuses_an_unknown_method_or_no_match():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="method must be one of"):
        load_time_quantization_config(model, "nf4")
    with pytest.raises(ValueError, match="No torch.nn.Linear layer of Sequential matches"):
        load_time_quantization_config(model, "torchao_int8", ["to_q"])
