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
from tiny_models import natural_image, save_random_lpips, save_tiny_clip, save_tiny_dino

from bayes_adapter import evaluation
from bayes_adapter.cli import main
from bayes_adapter.lpips import load_lpips


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


def test_a_model_that_cannot_be_loaded_names_it_and_the_way_out(tmp_path, monkeypatch):
    from transformers import CLIPModel, ViTModel

    # A path that does not exist fails at once, before any loading (no Hub retries), and gives no `hf download` hint.
    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained was called for a missing local folder")

    with monkeypatch.context() as patched:
        patched.setattr(CLIPModel, "from_pretrained", no_loading)
        patched.setattr(ViTModel, "from_pretrained", no_loading)
        for missing in (str(tmp_path / "nowhere"), "./no/clip/here", "~/no-such-clip-folder-xyz"):
            with pytest.raises(ValueError, match=r"CLIP model '.*': no such folder") as error:
                evaluation.load_clip(missing)
            assert "hf download" not in str(error.value)
        (tmp_path / "models").mkdir()  # "models/clip" beside an existing models/ folder is a mistyped local path
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ValueError, match=r"CLIP model 'models/clip': no such folder"):
            evaluation.load_clip("models/clip")
        with pytest.raises(ValueError, match=r"DINO model '.*nowhere': no such folder"):
            evaluation.load_dino(str(tmp_path / "nowhere"))
    # A Hub id that cannot be reached (offline here) still says how to get the model.
    with pytest.raises(ValueError, match=r"(?s)cannot load the CLIP model 'nobody/no-such-clip' .*hf download"):
        evaluation.load_clip("nobody/no-such-clip")


def test_a_model_of_the_wrong_kind_is_named(model_dirs, tmp_path):
    clip_dir, dino_dir = model_dirs
    with pytest.raises(ValueError, match=r"this folder holds a ViT/DINO model \(ViTModel\), not CLIP"):
        evaluation.load_clip(dino_dir)
    with pytest.raises(ValueError, match=r"this folder holds a CLIP model \(CLIPModel\), not DINO"):
        evaluation.load_dino(clip_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"the folder has no config.json"):
        evaluation.load_clip(str(tmp_path / "empty"))


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


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    return save_random_lpips(tmp_path_factory.mktemp("lpips"))


def test_lpips_alone_with_images_of_any_size(lpips_files):
    subject = natural_image().crop((0, 0, 400, 400))
    other = subject.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    lpips_model = load_lpips(*lpips_files)
    copies = evaluation.evaluate([subject.resize((96, 96))] * 3, [subject], PROMPT, lpips_model=lpips_model)
    assert copies.keys() == {"num_generated", "num_reference", "lpips_diversity", "lpips_to_reference"}
    assert copies["lpips_diversity"] == 0.0
    to_other = evaluation.evaluate([other], [subject], PROMPT, lpips_model=lpips_model)["lpips_to_reference"]
    mixed = evaluation.evaluate([subject, other], [subject], PROMPT, lpips_model=lpips_model)
    assert mixed["lpips_diversity"] == pytest.approx(to_other, rel=1e-5)
    assert mixed["lpips_to_reference"] == pytest.approx(to_other / 2, rel=1e-5)
    # Both sides are resized to LPIPS_IMAGE_SIZE; a smaller copy comes out near the reference, not at it.
    assert 0 < copies["lpips_to_reference"] < 0.5 * to_other
    assert evaluation.lpips_pixels([subject.resize((300, 200))]).shape == (1, 3, 256, 256)


def test_evaluate_command_adds_lpips_with_local_files(model_dirs, lpips_files, tmp_path, capsys):
    subject = natural_image().resize((64, 64))
    other = subject.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    generated = _write(tmp_path / "generated", [subject, subject, other])
    reference = _write(tmp_path / "reference", [subject])
    out = tmp_path / "out.json"
    argv = ["evaluate", "--generated", str(generated), "--reference", str(reference), "--prompt", PROMPT]
    argv += ["--clip-model", model_dirs[0], "--dino-model", model_dirs[1], "--json", str(out), "--lpips"]
    argv += ["--lpips-backbone", lpips_files[0], "--lpips-linear-weights", lpips_files[1]]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    # Pairs: (s, s) 0, (s, o) d, (s, o) d -> diversity 2d/3; nearest references: 0, 0, d -> d/3.
    assert result["lpips_diversity"] > 0
    assert result["lpips_to_reference"] == pytest.approx(result["lpips_diversity"] / 2, rel=1e-5)
    assert result["lpips_backbone"] == lpips_files[0] and result["lpips_linear_weights"] == lpips_files[1]
    table = capsys.readouterr().out
    assert "| lpips_diversity |" in table and "| lpips_to_reference |" in table


def test_evaluate_command_without_the_lpips_backbone_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    images = _write(tmp_path / "images", [natural_image()])
    argv = ["evaluate", "--generated", str(images), "--reference", str(images), "--prompt", PROMPT, "--lpips"]
    # A CLIP model that cannot load: the missing LPIPS file is reported first, before any model loads.
    argv += ["--clip-model", str(tmp_path / "no_clip"), "--lpips-linear-weights", str(tmp_path / "unread")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert f"found no file '{expected}'" in err and "--lpips-backbone PATH" in err and "Traceback" not in err
    assert main(argv[:-2] + ["--lpips-backbone", str(tmp_path / "mine.pth")]) == 2
    assert f"found no file '{tmp_path / 'mine.pth'}'" in capsys.readouterr().err
    assert main([a for a in argv if a != "--lpips"]) == 2
    assert "used only with --lpips" in capsys.readouterr().err


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
        "bad_model": "no_clip': no such folder",
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
