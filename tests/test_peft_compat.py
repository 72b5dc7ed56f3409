import configparser
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from peft import get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from torch import nn

import bayes_adapter
from bayes_adapter import _peft_compat


def test_import_registers_the_method_with_lora_prefix():
    assert PeftType.BAYES_LORA.value == "BAYES_LORA"
    assert PeftType("BAYES_LORA") is PeftType.BAYES_LORA
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BAYES_LORA] is bayes_adapter.BayesLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BAYES_LORA] is bayes_adapter.BayesLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.BAYES_LORA] == "lora_"


RELOAD_SCRIPT = """
import importlib, sys, tempfile
import bayes_adapter
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from torch import nn

reloaded = importlib.reload(importlib.reload(bayes_adapter))
assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BAYES_LORA] is reloaded.BayesLoraConfig
assert list(PeftType).count(PeftType.BAYES_LORA) == 1
with tempfile.TemporaryDirectory() as path:
    get_peft_model(nn.Sequential(nn.Linear(3, 3)), reloaded.BayesLoraConfig(target_modules=["0"])).save_pretrained(path)
    assert isinstance(PeftConfig.from_pretrained(path), reloaded.BayesLoraConfig)
    loaded = PeftModel.from_pretrained(nn.Sequential(nn.Linear(3, 3)), path)
    assert isinstance(loaded.base_model.model[0], reloaded.BayesLoraLayer)
print("ok")
"""


def test_reload_is_harmless_and_points_peft_at_the_new_classes():
    # In a subprocess: a reload here would leave this test session holding classes from two module versions.
    out = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_registering_twice_in_process_is_harmless():
    for _ in range(2):
        _peft_compat.register("bayes_lora", bayes_adapter.BayesLoraConfig, bayes_adapter.BayesLoraModel, "lora_")
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BAYES_LORA] is bayes_adapter.BayesLoraConfig


def test_too_old_peft_is_refused_naming_the_range():
    with pytest.raises(ImportError, match=r"needs peft>=0\.21\.2,<0\.22 .* found peft==0\.17\.0"):
        _peft_compat.check_peft_version("0.17.0")


def test_newer_peft_warns_naming_the_range():
    with pytest.warns(UserWarning, match=r"tested with peft>=0\.21\.2,<0\.22, found peft==0\.23\.0"):
        _peft_compat.check_peft_version("0.23.0")


def test_setup_cfg_requires_the_tested_peft_range():
    # One policy: the range pip enforces is the one the import-time check names.
    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(Path(__file__).parents[1] / "setup.cfg")
    requirements = [Requirement(line) for line in setup_cfg["options"]["install_requires"].splitlines() if line]
    peft_requirement = next(r for r in requirements if r.name == "peft")
    assert peft_requirement.specifier == SpecifierSet(_peft_compat.PEFT_TESTED_RANGE)


def test_installed_peft_is_in_range(recwarn):
    _peft_compat.check_peft_version()
    assert not [w for w in recwarn if "tested with peft" in str(w.message)]


def test_enabled_lora_variants_lists_switched_on_variants():
    from peft import LoraConfig

    assert _peft_compat.enabled_lora_variants(LoraConfig()) == {}
    assert _peft_compat.enabled_lora_variants(LoraConfig(use_dora=True)) == {"use_dora": True}


def test_embed_helpers_match_the_lora_embedding_layer():
    model = get_peft_model(nn.Sequential(nn.Embedding(7, 4)), bayes_adapter.BayesLoraConfig(target_modules=["0"]))
    layer = model.base_model.model[0]
    indices = torch.tensor([[1, 2, 6]])
    weight = torch.randn(7, 3)
    assert torch.equal(_peft_compat.embed(layer, indices, weight, "default"), weight[indices])
    assert _peft_compat.embed_scale(layer) is None
