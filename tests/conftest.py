import os
from pathlib import Path

import pytest
import torch


# One torch thread: on a 2-core machine, two threads plus any other load slow torch down 10-30x.
torch.set_num_threads(1)
# Tests never reach the Hub: anything that tries fails at once instead of retrying a dead endpoint.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process run of a training script builds its own Accelerator: reset accelerate's singletons after."""
    from tiny_models import reset_accelerate_state

    yield
    reset_accelerate_state()


@pytest.fixture
def hub(monkeypatch):
    """The fake Hub installed as huggingface_hub's HTTP client, offline mode off; everything restored after."""
    # Imported here: huggingface_hub reads HF_HUB_OFFLINE when first imported, which must come after it is set above.
    import httpx2
    from fake_hub import FakeHub
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import _http as hub_http

    fake = FakeHub()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    previous_factory = hub_http._GLOBAL_CLIENT_FACTORY
    fake.uninstall = lambda: set_client_factory(previous_factory)
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handle)))
    try:
        yield fake
    finally:
        fake.uninstall()


# --- the DreamBooth script's tiny pipelines and instance images (tests/test_train_dreambooth_*.py) ------------------


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny Stable Diffusion pipeline saved to a folder (read only: the tests never write into it)."""
    from tiny_models import save_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    save_tiny_pipeline(path)
    return path


def _saved_pipeline(tmp_path_factory, name: str, build) -> Path:
    """A pipeline built by `build()` and saved to a fresh session folder named `name`."""
    path = tmp_path_factory.mktemp(name)
    build().save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny Flux.1 pipeline saved to a folder (read only)."""
    import tiny_t5_dit_models

    return _saved_pipeline(tmp_path_factory, "tiny-flux", tiny_t5_dit_models.tiny_flux_pipeline)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny SD3 pipeline saved to a folder (read only)."""
    import tiny_t5_dit_models

    return _saved_pipeline(tmp_path_factory, "tiny-sd3", tiny_t5_dit_models.tiny_sd3_pipeline)


@pytest.fixture(scope="session")
def tiny_flux2(tmp_path_factory):
    """A tiny Flux.2 pipeline saved to a folder (read only)."""
    import tiny_llm_dit_models

    return _saved_pipeline(tmp_path_factory, "tiny-flux2", tiny_llm_dit_models.tiny_flux2_pipeline)


@pytest.fixture(scope="session")
def tiny_flux2_klein(tmp_path_factory):
    """A tiny Flux.2 [klein] (base, not step-distilled) pipeline saved to a folder (read only)."""
    import tiny_llm_dit_models

    return _saved_pipeline(tmp_path_factory, "tiny-flux2-klein", tiny_llm_dit_models.tiny_flux2_klein_pipeline)


@pytest.fixture(scope="session")
def tiny_qwenimage(tmp_path_factory):
    """A tiny Qwen-Image pipeline saved to a folder (read only)."""
    import tiny_llm_dit_models

    return _saved_pipeline(tmp_path_factory, "tiny-qwenimage", tiny_llm_dit_models.tiny_qwenimage_pipeline)


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory):
    """A tiny Z-Image pipeline saved to a folder (read only)."""
    import tiny_llm_dit_models

    return _saved_pipeline(tmp_path_factory, "tiny-zimage", tiny_llm_dit_models.tiny_zimage_pipeline)


@pytest.fixture(scope="session")
def tiny_sana(tmp_path_factory):
    """A tiny SANA pipeline saved to a folder (read only)."""
    import tiny_llm_dit_models

    return _saved_pipeline(tmp_path_factory, "tiny-sana", tiny_llm_dit_models.tiny_sana_pipeline)


@pytest.fixture
def instance_dir(tmp_path):
    """Two random 40x48 instance images."""
    from tiny_models import write_images

    return write_images(tmp_path / "instance", 2)


@pytest.fixture(scope="session")
def lab_v1_model_dir(tmp_path_factory) -> str:
    """A saved lab v1 model (random weights; v1's own is no longer shipped): for the lab's refusals of a v1 model."""
    from examples.corruption_stage.model import models

    directory = str(tmp_path_factory.mktemp("lab_v1_model"))
    models.save_model(models.new_model(seed=0), directory)
    return directory


@pytest.fixture
def run_lab(capsys):
    """Runs ``python -m examples.corruption_stage ARGS`` in this process (a subprocess costs seconds of imports per
    call on 2 cores); returns a `subprocess.CompletedProcess` with the exit code and the captured output."""
    import subprocess

    from examples.corruption_stage.__main__ import main

    def run(*argv: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            main(list(argv))
            code = 0
        except SystemExit as error:
            code = error.code if isinstance(error.code, int) else 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(argv), code, out, err)

    return run
