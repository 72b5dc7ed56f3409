"""push_to_hub against the real huggingface_hub client, with an in-process fake Hub behind an httpx2 MockTransport.

No test reaches the network: the fake Hub answers every request `huggingface_hub` makes and records it.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from fake_hub import COMMIT, REPO, TOKEN
from huggingface_hub import ModelCard, constants, snapshot_download
from peft import PeftModel
from PIL import Image
from safetensors import safe_open
from tiny_models import (
    assert_same_numerics,
    bayesian_unet,
    randomise,
    run_unet,
    tiny_pipeline,
    tiny_text_encoder,
    tiny_unet,
    unet_inputs,
)

import bayes_adapter
from bayes_adapter import export_lora, push_to_hub
from bayes_adapter.hub import HubPushError, build_model_card


def tensor_keys(data: bytes, tmp_path, name: str) -> list[str]:
    path = tmp_path / name.replace("/", "__")
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def snapshot_cache(files: dict[str, bytes], cache) -> None:
    """Lays the committed files out as a Hub cache snapshot of REPO at COMMIT (what a download would leave)."""
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    for path, data in files.items():
        target = repo_dir / "snapshots" / COMMIT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)


def test_push_model_then_load_by_repo_id(hub, tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    model = bayesian_unet("peft")
    reference = run_unet(model, unet_inputs())
    image = tmp_path / "sample.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image)

    url = push_to_hub(
        model,
        REPO,
        token=TOKEN,
        include_bayesian=True,
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        instance_prompt="a photo of sks dog",
        validation_images=[image],
        local_dir=tmp_path / "upload",
    )
    assert url == f"https://huggingface.co/{REPO}/commit/{COMMIT}"
    assert hub.paths() == [
        "/api/repos/create",
        "/api/validate-yaml",
        f"/api/models/{REPO}/preupload/main",
        f"/api/models/{REPO}/commit/main",
    ]
    assert all(auth == f"Bearer {TOKEN}" for method, path, auth in hub.requests if path in hub.paths())
    assert sorted(hub.files) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "bayes_lora_export.json",
        "bayesian/adapter_config.json",
        "bayesian/adapter_model.safetensors",
        "images/validation_0.png",
        "pytorch_lora_weights.safetensors",
    ]

    # The card, read back with huggingface_hub.
    (tmp_path / "README.md").write_bytes(hub.files["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers"
    assert {"lora", "bayes-lora", "diffusers", "text-to-image", "stable-diffusion"} <= set(card.data.tags)
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.instance_prompt == "a photo of sks dog"
    assert card.data.widget == [{"text": "a photo of sks dog", "output": {"url": "images/validation_0.png"}}]
    assert f'pipe.load_lora_weights("{REPO}")' in card.text
    assert ', dtype=torch.float16).to("cuda")' in card.text and "torch_dtype" not in card.text
    assert 'image = pipe(prompt="a photo of sks dog").images[0]' in card.text  # Flux.2 takes an image first
    assert (
        f'unet = PeftModel.from_pretrained(pipe.unet, "{REPO}", subfolder="bayesian", is_trainable=True)' in card.text
    )
    assert 'subfolder="bayesian"' in card.text
    stats = bayes_adapter.posterior_std_stats(model)
    assert f"{stats['mean']:.4g}" in card.text and "| Bayesian factors | AB |" in card.text
    assert "| posterior std parametrisation | exp_linear |" in card.text

    # The mean at the root, sigma only in bayesian/.
    for name, data in hub.files.items():
        if name.endswith(".safetensors"):
            keys = tensor_keys(data, tmp_path, name)
            has_sigma = any("posterior" in k or "rho" in k for k in keys)
            assert has_sigma == name.startswith("bayesian/"), name
    assert json.loads(hub.files["adapter_config.json"])["peft_type"] == "LORA"
    assert json.loads(hub.files["bayesian/adapter_config.json"])["peft_type"] == "BAYES_LORA"

    # The token went to the Hub only: no written file, no log line, no output.
    assert all(TOKEN.encode() not in data for data in hub.files.values())
    for root, _, names in os.walk(tmp_path):
        for name in names:
            assert TOKEN.encode() not in (tmp_path / root / name).read_bytes(), name
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err

    # Loading by repo id, offline, from the snapshot a download would leave in the cache.
    cache = tmp_path / "cache"
    snapshot_cache(hub.files, cache)
    hub.uninstall()  # huggingface_hub's own client again, which refuses every request in offline mode
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = snapshot_download(REPO, cache_dir=str(cache))
    assert snapshot.endswith(COMMIT)
    # By repo id PEFT 0.21.2's offline branch looks for bayesian/bayesian/adapter_model.safetensors (it joins the
    # subfolder twice), so the snapshot folder is given here, with the same subfolder argument.
    bayesian = PeftModel.from_pretrained(tiny_unet(), snapshot, subfolder="bayesian").eval()
    assert bayes_adapter.posterior_std_stats(bayesian) == pytest.approx(stats)
    assert_same_numerics(run_unet(bayesian, unet_inputs()), reference)  # loaded from files

    pipe = tiny_pipeline()
    pipe.load_lora_weights(snapshot)  # finds the mean LoRA at the root
    assert_same_numerics(run_unet(pipe.unet, unet_inputs()), reference)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(REPO, cache_dir=str(cache), weight_name="pytorch_lora_weights.safetensors")
    assert_same_numerics(run_unet(pipe.unet, unet_inputs()), reference)


def test_push_export_dir(hub, tmp_path):
    model = bayesian_unet()
    export = export_lora(model, tmp_path / "export")
    with pytest.raises(ValueError, match="include_bayesian=True needs the Bayesian adapter"):
        push_to_hub(export, REPO, token=TOKEN, include_bayesian=True)
    assert hub.requests == []

    push_to_hub(export, REPO, token=TOKEN, local_dir=tmp_path / "upload")
    assert sorted(hub.files) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "bayes_lora_export.json",
        "pytorch_lora_weights.safetensors",
    ]
    assert hub.files["pytorch_lora_weights.safetensors"] == (export / "pytorch_lora_weights.safetensors").read_bytes()
    (tmp_path / "README.md").write_bytes(hub.files["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None and "bayes-lora" in card.data.tags
    assert "subfolder=" not in card.text  # no Bayesian adapter uploaded, no resume snippet
    assert "README.md" not in os.listdir(export)  # the user's export folder is left as it was


@pytest.mark.parametrize(
    "base_model, family_tags",
    [
        ("black-forest-labs/FLUX.1-dev", {"flux", "flux-diffusers"}),
        ("black-forest-labs/FLUX.2-dev", {"flux2", "flux2-diffusers"}),
        ("black-forest-labs/FLUX.2-klein-4B", {"flux2", "flux2-diffusers"}),
        ("Qwen/Qwen-Image", {"qwen-image", "qwen-image-diffusers"}),
        ("Efficient-Large-Model/Sana_600M_1024px_diffusers", {"sana", "sana-diffusers"}),
        ("stabilityai/stable-diffusion-3.5-medium", {"sd3", "sd3-diffusers"}),
        ("Tongyi-MAI/Z-Image-Turbo", {"z-image"}),
    ],
)
def test_the_card_carries_the_tags_diffusers_scripts_give_each_family(base_model, family_tags):
    card = build_model_card({"component": "transformer", "r": 4}, REPO, base_model=base_model)
    tags = set(card.data.tags)
    assert family_tags <= tags and {"lora", "bayes-lora", "diffusers", "text-to-image"} <= tags
    assert not ({"flux", "flux2", "sd3", "qwen-image", "sana", "z-image", "stable-diffusion"} - family_tags) & tags


@pytest.mark.parametrize("repo_id", ["no spaces/allowed", "a/b/c", "", "user/-bad-", 42])
def test_invalid_repo_id_fails_before_any_request(hub, tmp_path, repo_id):
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(bayesian_unet(), repo_id, token=TOKEN, local_dir=tmp_path / "upload")
    assert hub.requests == []
    assert not (tmp_path / "upload").exists()


def test_bad_arguments_fail_before_any_request(hub, tmp_path):
    model = bayesian_unet()
    with pytest.raises(ValueError, match="validation_images"):
        push_to_hub(model, REPO, token=TOKEN, validation_images=[tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="adapter_name='other'"):
        push_to_hub(model, REPO, token=TOKEN, adapter_name="other")
    with pytest.raises(ValueError, match="no PEFT adapter"):
        push_to_hub(tiny_unet(), REPO, token=TOKEN)
    with pytest.raises(ValueError, match="base_model='/data/sd15' is not a Hub model id"):  # the Hub refuses it
        push_to_hub(model, REPO, token=TOKEN, base_model="/data/sd15")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="local_dir"):
        push_to_hub(model, REPO, token=TOKEN, local_dir=tmp_path / "exists")
    assert hub.requests == []


@pytest.mark.parametrize("failing", ["/api/repos/create", "/commit/main"])
def test_failed_upload_names_repo_and_cause_and_keeps_export(hub, tmp_path, failing):
    hub.fail[failing] = 403
    with pytest.raises(HubPushError) as raised:
        push_to_hub(bayesian_unet(), REPO, token=TOKEN, local_dir=tmp_path / "upload")
    message = str(raised.value)
    assert REPO in message and "403" in message and str(tmp_path / "upload") in message
    assert TOKEN not in message
    assert raised.value.local_dir == tmp_path / "upload"
    assert {"README.md", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"} <= set(
        os.listdir(tmp_path / "upload")
    )


def test_offline_mode_gives_a_clear_message(tmp_path, monkeypatch):
    # conftest turned offline mode on; make sure of it for this test.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        push_to_hub(bayesian_unet(), REPO, token=TOKEN, local_dir=tmp_path / "upload")
    assert not (tmp_path / "upload").exists()


def test_push_several_components_in_one_diffusers_file(hub, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from peft import inject_adapter_in_model

    from bayes_adapter import BayesLoraConfig

    unet = bayesian_unet()
    encoder = tiny_text_encoder()
    inject_adapter_in_model(BayesLoraConfig(r=2, target_modules=["q_proj", "v_proj"]), encoder)
    randomise(encoder)
    encoder.eval()
    ids = torch.tensor([[0, 40, 41, 42, 2]])
    with torch.no_grad():
        reference_text = encoder(ids)[0]
    reference = run_unet(unet, unet_inputs())

    with pytest.raises(ValueError, match="pipeline_cls must be a diffusers pipeline class with save_lora_weights"):
        push_to_hub({"unet": unet, "text_encoder": encoder}, REPO, token=TOKEN)
    assert hub.requests == []
    push_to_hub(
        {"unet": unet, "text_encoder": encoder},
        REPO,
        token=TOKEN,
        include_bayesian=True,
        pipeline_cls=StableDiffusionPipeline,
        instance_prompt="a photo of sks dog",
    )
    assert {"README.md", "pytorch_lora_weights.safetensors", "bayesian/unet/adapter_config.json"} <= set(hub.files)
    assert {"bayesian/text_encoder/adapter_model.safetensors", "export/text_encoder/adapter_config.json"} <= set(
        hub.files
    )
    card = hub.files["README.md"].decode()
    assert 'subfolder="bayesian/unet"' in card
    # the PEFT line points at a folder the push wrote (no adapter_config.json sits at the root here)
    assert "adapter_config.json" not in hub.files and "export/unet/adapter_config.json" in hub.files
    assert 'PeftModel.from_pretrained(pipe.unet, "someone/sks-dog-bayes-lora", subfolder="export/unet")' in card
    keys = tensor_keys(hub.files["pytorch_lora_weights.safetensors"], tmp_path, "combined")
    assert {key.split(".", 1)[0] for key in keys} == {"unet", "text_encoder"}

    # Both components load from the one file, with plain diffusers.
    cache = tmp_path / "cache"
    snapshot_cache(hub.files, cache)
    hub.uninstall()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(snapshot_download(REPO, cache_dir=str(cache)))
    assert_same_numerics(run_unet(pipe.unet, unet_inputs()), reference)
    with torch.no_grad():
        assert_same_numerics(pipe.text_encoder(ids)[0], reference_text)


def test_a_token_from_the_environment_is_masked_in_the_error_and_its_chain(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail["/api/repos/create"] = 401
    hub.quote_auth = True
    with pytest.raises(HubPushError) as raised:
        push_to_hub(bayesian_unet(), REPO, local_dir=tmp_path / "upload")  # no token=: huggingface_hub reads HF_TOKEN
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests), "the fake Hub did not see the token"
    assert "you sent Bearer ***" in str(raised.value)
    error: BaseException | None = raised.value
    while error is not None:
        assert TOKEN not in str(error) and TOKEN not in repr(error.args)
        error = error.__cause__ or error.__context__


@pytest.mark.parametrize("component, dtype", [("unet", "torch.float16"), ("transformer", "torch.bfloat16")])
def test_the_cards_snippet_loads_the_base_in_the_dtype_its_family_runs_in(component, dtype):
    summary = {"component": component, "r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}
    card = str(build_model_card(summary, "me/dog", base_model="org/base"))
    assert f'AutoPipelineForText2Image.from_pretrained("org/base", dtype={dtype}).to("cuda")' in card
    assert "torch_dtype" not in card
