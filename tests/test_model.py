"""BayesLoraModel and the model-level functions, on plain modules and on a diffusers UNet."""

import json
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import (
    ADAPTER_V0_1_0,
    UNET_TARGETS,
    assert_same_numerics,
    tiny_unet,
    train_diffusion_loss,
    unet_inputs,
)
from torch import nn

import bayes_adapter
from bayes_adapter import BayesLoraConfig, BayesLoraLayer, kl_loss, posterior_std_stats


def posterior_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "posterior" in n}


def eval_loss(model):
    inputs = unet_inputs(seed=1, batch_size=2, tokens=3)
    latents, text = inputs["x"], inputs["enc"]
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        return F.mse_loss(model(latents, 10, encoder_hidden_states=text).sample, target).item()


def train_steps(model, steps, lr=1e-3):
    """A few denoising-style steps towards a fixed target; returns the losses."""
    inputs = unet_inputs(seed=1, batch_size=2, tokens=3)
    latents, text = inputs["x"], inputs["enc"]
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(latents, 10, encoder_hidden_states=text).sample
        loss = F.mse_loss(out, target) + kl_loss(model, num_examples=2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("wrap", ["get_peft_model", "add_adapter"])
def test_unet_trains_and_moves_means_and_stds(wrap):
    unet = tiny_unet()
    config = BayesLoraConfig(target_modules=UNET_TARGETS, r=4, lora_alpha=4, kl_weight=1e-3)
    model = get_peft_model(unet, config) if wrap == "get_peft_model" else unet
    if wrap == "add_adapter":
        unet.add_adapter(config)
    layers = list(bayes_adapter.bayes_layers(model))
    kinds = {type(layer).__name__ for layer in layers}
    assert kinds == {"BayesLinear", "BayesConv2d"}
    expected = sum(1 for name, _ in tiny_unet().named_modules() if any(name.endswith(t) for t in UNET_TARGETS))
    assert len(layers) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    means_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    stds_before = posterior_params(model)
    # The training loss is a sample (each step draws weights), so compare the deterministic eval loss of the means.
    eval_loss_before = eval_loss(model)
    train_steps(model, 8)
    assert eval_loss(model) < eval_loss_before
    assert any(not torch.equal(p, means_before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    stds_after = posterior_params(model)
    assert stds_after.keys() == stds_before.keys()
    assert all(not torch.equal(stds_after[n], stds_before[n]) for n in stds_before)


def test_add_adapter_and_get_peft_model_agree_in_eval():
    config = dict(target_modules=UNET_TARGETS, r=4, init_lora_weights=False)
    wrapped = get_peft_model(tiny_unet(), BayesLoraConfig(**config))
    unet = tiny_unet()
    unet.add_adapter(BayesLoraConfig(**config))
    unet.load_state_dict({k.removeprefix("base_model.model."): v for k, v in wrapped.state_dict().items()})
    inputs = unet_inputs(seed=1, batch_size=2, tokens=3)
    latents, text = inputs["x"], inputs["enc"]
    wrapped.eval()
    unet.eval()
    assert torch.equal(wrapped(latents, 10, text).sample, unet(latents, 10, text).sample)


def test_kl_loss_and_std_stats():
    model = get_peft_model(tiny_unet(), BayesLoraConfig(target_modules=["to_q"], kl_weight=3.0, prior_std=0.1))
    kl = bayes_adapter.kl_divergence(model)
    torch.testing.assert_close(kl_loss(model, num_examples=4), 3.0 * kl / 4)
    torch.testing.assert_close(model.kl_divergence(), kl)
    stats = posterior_std_stats(model)
    assert stats["count"] == sum(p.numel() for n, p in model.named_parameters() if "posterior" in n)
    assert stats["min"] == pytest.approx(0.01) and stats["max"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="num_examples must be an integer >= 1, got 0"):
        kl_loss(model, num_examples=0)


FRESH_PROCESS_LOAD = textwrap.dedent(
    """
    import sys, json, torch
    sys.path.insert(0, {tests!r})
    import bayes_adapter
    from peft import PeftModel, PeftConfig
    from tiny_models import tiny_unet
    assert type(PeftConfig.from_pretrained({path!r})).__name__ == "BayesLoraConfig"
    model = PeftModel.from_pretrained(tiny_unet(), {path!r})
    torch.save({{k: v for k, v in model.state_dict().items() if "lora_" in k}}, {out!r})
    """
)


def test_save_pretrained_and_fresh_process_load_are_bit_exact(tmp_path):
    model = get_peft_model(tiny_unet(), BayesLoraConfig(target_modules=UNET_TARGETS, bayesian_factors="AB"))
    train_steps(model, 2)
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.endswith(".bin") for f in files)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BAYES_LORA" and config["bayesian_factors"] == "AB"
    script = FRESH_PROCESS_LOAD.format(
        tests=str(Path(__file__).parent), path=str(tmp_path / "adapter"), out=str(tmp_path / "sd.pt")
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    expected = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == expected.keys()
    assert any("lora_posterior_rho_A" in k for k in loaded) and any("lora_posterior_rho_B" in k for k in loaded)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_is_trainable_resumes_training(tmp_path):
    model = get_peft_model(tiny_unet(), BayesLoraConfig(target_modules=UNET_TARGETS))
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_unet(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    resumed = PeftModel.from_pretrained(tiny_unet(), tmp_path, is_trainable=True)
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert any("posterior" in n for n in trainable) and any("lora_A" in n for n in trainable)
    before = posterior_params(resumed)
    train_steps(resumed, 2)
    assert any(not torch.equal(p, before[n]) for n, p in posterior_params(resumed).items())


def test_loading_into_a_model_with_other_shapes_names_the_module(tmp_path):
    get_peft_model(tiny_unet(), BayesLoraConfig(target_modules=["to_q"], r=4)).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError) as error:
        PeftModel.from_pretrained(tiny_unet(block_out_channels=(8, 16)), tmp_path)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert f"size mismatch for base_model.model.{module}.lora_posterior_rho_B" in str(error.value)


def test_unsupported_module_type_is_an_error_not_a_plain_lora():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="Module 'attn' is a MultiheadAttention, which has no Bayesian LoRA layer"):
        get_peft_model(model, BayesLoraConfig(target_modules=["attn"]))


def test_quantised_weight_is_an_error():
    model = nn.Module()
    model.proj = nn.Linear(4, 4)
    model.proj.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="Module 'proj' has a torch.int8 weight"):
        get_peft_model(model, BayesLoraConfig(target_modules=["proj"]))


def test_bayesian_adapter_on_a_plain_lora_layer_is_an_error():
    model = nn.Module()
    model.proj = nn.Linear(4, 4)
    peft_model = get_peft_model(model, LoraConfig(target_modules=["proj"]))
    with pytest.raises(ValueError):
        peft_model.add_adapter("bayes", BayesLoraConfig(target_modules=["proj"]))


def test_plain_lora_adapter_beside_a_bayesian_one_stays_plain():
    unet = tiny_unet()
    unet.add_adapter(BayesLoraConfig(target_modules=["to_q"]), adapter_name="bayes")
    unet.add_adapter(LoraConfig(target_modules=["to_q"]), adapter_name="plain")
    layer = next(bayes_adapter.bayes_layers(unet))
    assert layer.is_bayesian("bayes") and not layer.is_bayesian("plain")
    assert "plain" not in layer.lora_variant and "bayes" in layer.lora_variant
    assert isinstance(layer, BayesLoraLayer)


def test_diffusers_adapter_controls_work_on_bayesian_layers():
    unet = tiny_unet()
    unet.add_adapter(BayesLoraConfig(target_modules=UNET_TARGETS, init_lora_weights=False), adapter_name="bayes")
    unet.eval()
    inputs = unet_inputs(seed=1, batch_size=2, tokens=3)
    latents, text = inputs["x"], inputs["enc"]
    with torch.no_grad():
        full = unet(latents, 10, text).sample
        unet.disable_adapters()
        base = unet(latents, 10, text).sample
        unet.enable_adapters()
        unet.set_adapters(["bayes"], weights=[0.5])
        half = unet(latents, 10, text).sample
        unet.set_adapters(["bayes"], weights=[1.0])
        unet.fuse_lora()
        fused = unet(latents, 10, text).sample
        unet.unfuse_lora()
        unfused = unet(latents, 10, text).sample
    assert not torch.allclose(full, base)
    assert not torch.allclose(half, full) and not torch.allclose(half, base)
    torch.testing.assert_close(fused, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unfused, full, rtol=1e-4, atol=1e-5)
    unet.delete_adapters("bayes")
    assert not list(bayes_adapter.bayes_layers(unet)) or all(
        not layer.bayes_settings for layer in bayes_adapter.bayes_layers(unet)
    )


def test_param_groups_put_the_posterior_stds_in_their_own_group():
    model = get_peft_model(tiny_unet(), BayesLoraConfig(target_modules=["to_q", "conv1"], bayesian_factors="AB"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    named = {id(p): n for n, p in model.named_parameters()}
    means, stds = bayes_adapter.param_groups(model, posterior_std_lr=0.3)
    assert stds["lr"] == 0.3 and stds["weight_decay"] == 0.0 and "lr" not in means
    assert stds["params"] and all("lora_posterior_rho" in named[id(p)] for p in stds["params"])
    assert means["params"] and all("lora_posterior_rho" not in named[id(p)] for p in means["params"])
    assert len(means["params"]) + len(stds["params"]) == len(trainable)
    optimizer = torch.optim.AdamW(bayes_adapter.param_groups(model), lr=1e-3, weight_decay=0.01)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-3, 0.01), (1e-3, 0.0)]
    for bad in (0, float("inf"), float("nan"), "0.1"):
        with pytest.raises(ValueError, match=f"posterior_std_lr must be a finite number > 0 or None, got {bad!r}"):
            bayes_adapter.param_groups(model, posterior_std_lr=bad)
    fixed = get_peft_model(tiny_unet(), BayesLoraConfig(target_modules=["to_q"], train_posterior_std=False))
    assert len(bayes_adapter.param_groups(fixed)) == 1


def test_weight_decay_leaves_the_posterior_stds_alone():
    model = get_peft_model(tiny_unet(), BayesLoraConfig(target_modules=["to_q"]))
    before = posterior_params(model)
    optimizer = torch.optim.AdamW(bayes_adapter.param_groups(model), lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, value in posterior_params(model).items():
        assert torch.equal(value, before[name]), name


def test_adapter_saved_by_v0_1_0_loads_with_its_outputs_stds_and_kl():
    """0.1.0 stored `std = softplus(rho)` and no parametrisation in its config; it must load unchanged."""
    reference = load_file(str(ADAPTER_V0_1_0 / "reference_v0_1_0.safetensors"))
    assert "posterior_std_parametrisation" not in json.loads((ADAPTER_V0_1_0 / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(tiny_unet(), str(ADAPTER_V0_1_0))
    assert model.peft_config["default"].posterior_std_parametrisation == "softplus"
    model.eval()
    with torch.no_grad():
        output = model(reference["x"], torch.tensor([10]), reference["enc"]).sample
        # Both sides ran the same kernels, but the base weights and inputs crossed a file.
        assert_same_numerics(output, reference["eval_output"])
        stds = {
            f"posterior_std.{name}.{factor}": layer.posterior_std("default", factor)
            for name, layer in model.named_modules()
            if isinstance(layer, BayesLoraLayer)
            for factor in "AB"
        }
        assert stds.keys() == {key for key in reference if key.startswith("posterior_std.")}
        for key, std in stds.items():
            assert_same_numerics(std, reference[key], msg=key)
        assert_same_numerics(bayes_adapter.kl_divergence(model), reference["kl_divergence"])
        assert_same_numerics(kl_loss(model, num_examples=3), reference["kl_loss"])


def test_saved_config_records_the_parametrisation(tmp_path):
    model = get_peft_model(tiny_unet(), BayesLoraConfig(target_modules=["to_q"]))
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["posterior_std_parametrisation"] == "exp_linear"
    loaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path))
    assert loaded.peft_config["default"].posterior_std_parametrisation == "exp_linear"
    # A reduction over tensors read from a file: equal to float32 rounding.
    assert posterior_std_stats(loaded) == pytest.approx(posterior_std_stats(model), rel=1e-6)


@pytest.mark.slow
def test_defaults_and_one_plain_optimizer_move_the_posterior_stds():
    """Issue 11's acceptance: every default, AdamW over all trainable parameters at lr 1e-4, 200 diffusion steps."""
    spreads = {}
    for parametrisation in ("exp_linear", "softplus"):
        model = get_peft_model(
            tiny_unet(), BayesLoraConfig(target_modules=UNET_TARGETS, posterior_std_parametrisation=parametrisation)
        )
        losses = train_diffusion_loss(model, 200, lr=1e-4)
        assert all(math.isfinite(loss) for loss in losses)
        stats = posterior_std_stats(model)
        spreads[parametrisation] = stats["max"] / stats["min"]
        print(f"{parametrisation}: std mean {stats['mean']:.5f} (init 0.01)")
        if parametrisation == "exp_linear":
            assert spreads["exp_linear"] >= 1.5 or abs(stats["mean"] / 0.01 - 1) >= 0.2, stats
    # Measured (printed with -s): 2.40 (exp_linear) and 1.01 (0.1.0's softplus): the test tells a std that learns from
    # one that does not.
    print(f"posterior std max/min after 200 steps: {spreads}")
    assert spreads["softplus"] < 1.1


@pytest.mark.parametrize(
    "function", ["kl_divergence", "kl_loss", "param_groups", "posterior_std_stats", "posterior_stds"]
)
def test_model_functions_name_a_wrong_argument_type(function):
    call = getattr(bayes_adapter, function)
    extra = (1,) if function == "kl_loss" else ()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module .* got str"):
        call("unet", *extra)
    if function != "param_groups":
        model = get_peft_model(tiny_unet(), BayesLoraConfig(target_modules=["to_q"]))
        with pytest.raises(TypeError, match="adapter_names must be a name, a list of names or None, got 3"):
            call(model, *extra, adapter_names=3)
        call(model, *extra, adapter_names=(name for name in ["default"]))  # any iterable of names


def test_a_layer_added_after_eval_takes_the_eval_mode_and_uses_the_mean():
    unet = tiny_unet().eval()
    unet.add_adapter(BayesLoraConfig(target_modules=["to_q"], init_lora_weights=False))
    layers = list(bayes_adapter.bayes_layers(unet))
    assert layers and not any(layer.training for layer in layers)
    inputs = unet_inputs()
    with torch.no_grad():
        assert torch.equal(
            unet(inputs["x"], inputs["t"], inputs["enc"]).sample, unet(inputs["x"], inputs["t"], inputs["enc"]).sample
        )
    unet.train()
    assert all(layer.training for layer in layers)


def test_registered_custom_lora_modules_are_refused():
    from peft.tuners.lora import LoraLayer

    class MyLora(nn.Module, LoraLayer):
        pass

    config = BayesLoraConfig(target_modules=["to_q"])
    config._register_custom_module({nn.Linear: MyLora})
    with pytest.raises(
        ValueError, match=r"Custom LoRA layers registered with _register_custom_module \(\['Linear'\]\)"
    ):
        get_peft_model(tiny_unet(), config)


@pytest.mark.parametrize("factors, on_embedding", [("B", "A"), ("A", "B"), ("AB", "AB")])
def test_embeddings_take_the_factor_in_the_role_bayesian_factors_names(factors, on_embedding):
    """PEFT initialises an embedding's A to zero (B on Linear): by default the roles swap, so that with the paper's
    'B' the embedding's noise reaches the output, and its std learns, from the first step."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = get_peft_model(model, BayesLoraConfig(target_modules=["0", "1"], bayesian_factors=factors))
    embedding, linear = model.base_model.model[0], model.base_model.model[1]
    assert embedding.bayes_settings["default"].factors == on_embedding
    assert linear.bayes_settings["default"].factors == factors
    assert set(embedding.lora_posterior_rho_A) == ({"default"} if "A" in on_embedding else set())
    if factors == "B":
        assert not embedding.lora_embedding_A["default"].any(), "PEFT's init: the embedding's A is zero"
        ids = torch.tensor([[1, 2, 3]])
        model.train()
        assert not torch.equal(model(ids), model(ids)), "no noise reaches the output"
        model(ids).pow(2).sum().backward()
        assert embedding.lora_posterior_rho_A["default"].grad.abs().sum() > 0


def test_only_b_on_an_embedding_is_allowed_with_a_warning():
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.warns(UserWarning, match="Embedding, where PEFT initialises lora_A to zero"):
        get_peft_model(model, BayesLoraConfig(target_modules=["0"], embedding_bayesian_factors="B"))
    with pytest.raises(ValueError, match="embedding_bayesian_factors must be None or one of .*, got 'C'"):
        BayesLoraConfig(embedding_bayesian_factors="C")


def test_a_config_saved_before_embedding_bayesian_factors_loads_as_it_was_trained(tmp_path):
    """Adapters built before the field existed had B Bayesian on embeddings too: loading keeps that, weights and all."""
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Embedding(10, 4)), BayesLoraConfig(target_modules=["0"], embedding_bayesian_factors="B")
    )
    model.save_pretrained(str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    del saved["embedding_bayesian_factors"]
    config_path.write_text(json.dumps(saved))
    torch.manual_seed(1)
    loaded = PeftModel.from_pretrained(nn.Sequential(nn.Embedding(10, 4)), str(tmp_path))
    assert loaded.peft_config["default"].embedding_bayesian_factors == "B"
    layer = loaded.base_model.model[0]
    assert torch.equal(
        layer.lora_posterior_rho_B["default"], model.base_model.model[0].lora_posterior_rho_B["default"]
    )


def test_mixed_adapter_models_are_refused_clearly():
    with pytest.raises(Exception, match="PeftMixedModel"):
        get_peft_model(tiny_unet(), BayesLoraConfig(target_modules=["to_q"]), mixed=True)
