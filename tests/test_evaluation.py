"""bayes_adapter.evaluation and `bayes-adapter evaluate`, on tiny CLIP and ViT models built in code and saved locally."""

from __future__ import annotations

import importlib
import json
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import natural_image, save_tiny_clip, save_tiny_dino

from bayes_adapter import evaluation
from bayes_adapter.cli import main


PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_clip(root / "clip"), save_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def models(model_dirs):
    return evaluation.load_clip(model_dirs[0]), evaluation.load_dino(model_dirs[1])


def noise_images(n: int, size: int = 48) -> list[Image.Image]:
    return [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)) for i in range(n)
    ]


def test_mean_pairwise_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cos: (a0,b0)=1, (a0,b1)=1/sqrt2, (a1,b0)=0, (a1,b1)=1/sqrt2
    assert evaluation.mean_pairwise_cosine(a, b) == pytest.approx((1 + 2 / 2**0.5) / 4, abs=1e-12)
    with pytest.raises(ValueError, match=r"expected \(n, d\) and \(m, d\) embeddings"):
        evaluation.mean_pairwise_cosine(a, torch.zeros(2, 3))


def test_copies_score_one_and_unrelated_images_lower(models):
    clip, dino = models
    subject = natural_image()
    copies = evaluation.evaluate([subject] * 4, [subject], PROMPT, clip, dino)
    assert copies["clip_i"] == pytest.approx(1.0, abs=1e-6) and copies["dino"] == pytest.approx(1.0, abs=1e-6)
    assert copies["dino_diversity"] == pytest.approx(0.0, abs=1e-6)
    assert -1 <= copies["clip_t"] <= 1
    assert (copies["num_generated"], copies["num_reference"]) == (4, 1)
    unrelated = evaluation.evaluate(noise_images(4), [subject], PROMPT, clip, dino)
    assert unrelated["clip_i"] < copies["clip_i"] - 1e-3 and unrelated["dino"] < copies["dino"] - 1e-4
    assert unrelated["dino_diversity"] > 0


def test_batch_size_does_not_change_the_numbers(models):
    clip, dino = models
    images = noise_images(4) + [natural_image()]
    one = evaluation.evaluate(images, images[:2], PROMPT, clip, dino, batch_size=1)
    four = evaluation.evaluate(images, images[:2], PROMPT, clip, dino, batch_size=4)
    assert one.keys() == four.keys()
    for key in one:
        assert one[key] == pytest.approx(four[key], abs=1e-6), key  # batch rows agree to float32 rounding


def test_a_model_that_cannot_be_loaded_names_it_and_the_way_out(tmp_path):
    with pytest.raises(ValueError, match=r"cannot load the CLIP model .*nowhere.* pass a local folder"):
        evaluation.load_clip(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="cannot load the DINO model"):
        evaluation.load_dino(str(tmp_path / "nowhere"))


def _write(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    return folder


def test_evaluate_command_writes_the_table_and_json(model_dirs, tmp_path, capsys):
    subject = natural_image().resize((64, 64))
    generated = _write(tmp_path / "generated", [subject] * 4)
    reference = _write(tmp_path / "reference", [subject])
    out = tmp_path / "out.json"
    argv = ["evaluate", "--generated", str(generated), "--reference", str(reference), "--prompt", PROMPT]
    argv += ["--clip-model", model_dirs[0], "--dino-model", model_dirs[1], "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["clip_i"] >= 0.9999 and result["dino"] >= 0.9999 and -1 <= result["clip_t"] <= 1
    assert result["num_generated"] == 4 and result["num_reference"] == 1
    assert "| clip_i |" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "bad_model"])
def test_evaluate_command_bad_input_exit_2(model_dirs, tmp_path, capsys, case):
    reference = _write(tmp_path / "reference", [natural_image()])
    generated = tmp_path / "generated"
    if case == "empty":
        generated.mkdir()
    elif case == "unreadable":
        _write(generated, [natural_image()])
        (generated / "broken.png").write_bytes(b"not an image")
    elif case == "bad_model":
        _write(generated, [natural_image()])
    clip = str(tmp_path / "no_clip") if case == "bad_model" else model_dirs[0]
    argv = ["evaluate", "--generated", str(generated), "--reference", str(reference), "--prompt", PROMPT]
    assert main(argv + ["--clip-model", clip, "--dino-model", model_dirs[1]]) == 2
    err = capsys.readouterr().err
    expected = {
        "missing": "is not an existing folder",
        "empty": "holds no images",
        "unreadable": "broken.png' is not a readable image",
        "bad_model": "cannot load the CLIP model",
    }[case]
    assert "bayes-adapter evaluate: error:" in err and expected in err and "Traceback" not in err


def test_old_module_name_is_a_deprecated_alias():
    sys.modules.pop("bayes_adapter.metrics", None)
    with pytest.warns(FutureWarning, match="renamed bayes_adapter.evaluation"):
        old = importlib.import_module("bayes_adapter.metrics")
    assert old is evaluation
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning comes once, on the first import
        from bayes_adapter.metrics import evaluate
    assert evaluate is evaluation.evaluate
