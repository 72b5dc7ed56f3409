"""The DreamBooth script's saved adapters, exported mean LoRA and push to the Hub: atomic, one read, loadable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import (
    dreambooth_args,
    tiny_unet,
    write_images,
)

import bayes_adapter
from examples.dreambooth import adapters, loop
from examples.dreambooth.settings import parse_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _tiny_unet_with_adapter(tmp_path, *extra):
    args = parse_args(dreambooth_args("no/such/model", write_images(tmp_path / "img", 1), tmp_path / "out", *extra))
    unet = tiny_unet()
    config = adapters.lora_config(args, args.unet_target_modules, args.kl_weight)
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

    import bayes_adapter.save_and_load as save_and_load_module

    unet, config = _tiny_unet_with_adapter(tmp_path)
    out = tmp_path / "ckpt"
    adapters.save_bayes_adapters(out, {"unet": unet})
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

    monkeypatch.setattr(save_and_load_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        adapters.save_bayes_adapters(out, {"unet": unet})
    after = load_file(str(out / "unet" / "adapter_model.safetensors"))
    assert all(torch.equal(after[k], saved[k]) for k in saved)
    assert (out / "unet" / "adapter_config.json").is_file()
    assert _leftovers(out) == []
    # A first save that fails leaves no folder at all.
    with pytest.raises(OSError, match="disk full"):
        adapters.save_bayes_adapters(tmp_path / "fresh", {"unet": unet})
    assert not (tmp_path / "fresh" / "unet").exists() and _leftovers(tmp_path / "fresh") == []
    monkeypatch.undo()

    # What was saved loads back into a fresh model holding the same adapter.
    fresh, _ = _tiny_unet_with_adapter(tmp_path / "other")
    adapters.load_bayes_adapters(out, {"unet": fresh})
    state = get_peft_model_state_dict(fresh)
    assert all(torch.equal(state[k], saved["base_model.model." + k]) for k in state)
    # ... and is refused, naming the file, by a model holding a different adapter (another rank).
    other, _ = _tiny_unet_with_adapter(tmp_path / "r2", "--rank", "2")
    with pytest.raises(ValueError, match=r"has shape \(4, 8\), adapter .default. of the model has \(2, 8\)"):
        adapters.load_bayes_adapters(out, {"unet": other})


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
    adapters.export_mean_lora(out, {"unet": unet}, StableDiffusionPipeline)
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
        adapters.export_mean_lora(out, {"unet": unet}, FailingPipeline)
    assert combined.read_bytes() == before
    assert _leftovers(out) == []

    # A failing per-component export leaves the previous export folder as it was.
    exported = {p.name: p.read_bytes() for p in (out / "export" / "unet").iterdir()}

    def failing_write_export(adapter, folder, *args, **kwargs):
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(bayes_adapter.export, "write_export", failing_write_export)
    with pytest.raises(OSError, match="disk full"):
        adapters.export_mean_lora(out, {"unet": unet}, StableDiffusionPipeline)
    assert {p.name: p.read_bytes() for p in (out / "export" / "unet").iterdir()} == exported
    assert _leftovers(out) == []


def test_push_to_hub_calls_the_library_with_accepted_arguments(tmp_path, instance_dir, monkeypatch):
    """The real bayes_adapter.push_to_hub accepts the script's arguments and images; offline, it stops before any
    request (the e2e test checks what the script passes)."""
    from huggingface_hub import constants
    from tiny_models import tiny_unet

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    args = parse_args(
        dreambooth_args("no-such/model", instance_dir, tmp_path, "--push_to_hub", "--hub_model_id", "me/dog")
    )
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    unet = tiny_unet()
    unet.add_adapter(adapters.lora_config(args, args.unet_target_modules, args.kl_weight))
    images = np.zeros((2, 32, 32, 3), dtype=np.float32)
    with pytest.raises(RuntimeError, match="offline mode"):
        loop.push_to_hub(args, {"unet": unet}, images)
