"""The lab's within-stage pretraining checkpoint (PLAN_V3's amendments of 7 December, 03:00 and 03:50): written
atomically, read with tensors only, and resumed only by the run that wrote it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable

import torch

from .models import LabModel


UNET_RESUME_FILE = "unet_resume.pt"  # pretrain_v2's within-stage checkpoint, removed once the stage is saved


def save_resume_state(path: str, state: dict) -> None:
    """Writes a training checkpoint atomically (a cut-off write leaves the previous one whole)."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_resume_state(path: str, fingerprint: dict) -> dict | None:
    """The checkpoint at ``path`` if there is one, after checking it belongs to this run (tensors only: nothing
    executable is unpickled)."""
    if not os.path.exists(path):
        return None
    state = torch.load(path, weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"resume checkpoint {path!r} was written by another run ({state.get('fingerprint')}), expected "
            f"{fingerprint}: delete it to start this run over"
        )
    return state


def tensors_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """A digest of the tensors' float32 values, in order: equal only for the same weights (a seeded init or a saved
    file)."""
    digest = hashlib.sha256()
    for p in tensors:
        digest.update(p.detach().float().numpy().tobytes())
    return digest.hexdigest()


def weights_sha256(*modules: torch.nn.Module) -> str:
    """`tensors_sha256` of the modules' parameters."""
    return tensors_sha256(p for module in modules for p in module.parameters())


def run_identity(model: LabModel, latents: torch.Tensor, labels: torch.Tensor, params: list) -> dict:
    """What a checkpoint must match to be resumed: the model's config, a digest of the starting weights of the
    denoiser, condition and autoencoder (exact: a seeded init or a saved file), the labels, and the latents' shape.
    The latents' values are left out: re-encoded on another CPU they may differ in the last bits, and they follow
    from the autoencoder and the data (``run_note``)."""
    return {
        "config": json.loads(json.dumps(dataclasses.asdict(model.cfg))),
        "start_weights_sha256": tensors_sha256([*params, *model.vae.parameters()]),
        "labels_sha256": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
        "latents": list(latents.shape),
    }


def training_state(model: LabModel, ema: list, optimizer, scheduler, generator: torch.Generator) -> dict:
    """The denoiser's training state a checkpoint holds: weights, EMA, optimiser, schedule and batch-order generator."""
    return {
        "unet": model.unet.state_dict(),
        "cond": model.cond.state_dict(),
        "ema": ema,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
    }


def restore_training(
    state: dict, model: LabModel, ema: list, optimizer, scheduler, generator: torch.Generator
) -> None:
    """Puts `training_state`'s parts of a checkpoint back into a run built afresh."""
    model.unet.load_state_dict(state["unet"])
    model.cond.load_state_dict(state["cond"])
    with torch.no_grad():
        for e, saved in zip(ema, state["ema"]):
            e.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
