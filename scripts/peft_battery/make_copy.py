"""Copies PEFT's test files with LoraConfig -> BayesLoraConfig for the LoRA cases: make_copy.py SRC_TESTS DST.

SRC_TESTS is the `tests/` folder of PEFT's source package; see run.sh.
"""

import pathlib
import re
import shutil
import sys


SRC, DST = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
HERE = pathlib.Path(__file__).resolve().parent
if DST.exists():
    shutil.rmtree(DST)
DST.mkdir()
FILES = ["test_custom_models.py", "test_config.py", "test_tuners_utils.py", "testing_common.py", "testing_utils.py"]
BARE = re.compile(r"(?<![\w.\"'])LoraConfig\b")


def add_import(text):
    # after the first `from peft import (...)` block
    m = re.search(r"^from peft import \(.*?^\)\n", text, re.S | re.M)
    assert m, "no peft import block"
    return (
        text[: m.end()]
        + "import bayes_adapter  # noqa: F401  (registers BayesLoraConfig)\nfrom bayes_adapter import BayesLoraConfig\n"
        + text[m.end() :]
    )


def fix_relative(text):
    return re.sub(r"^from \.(testing_\w+) import", r"from \1 import", text, flags=re.M)


def in_import_block(text):
    """character ranges of `from peft import (...)` / `from peft... import` statements"""
    spans = []
    for m in re.finditer(r"^from [\w.]+ import \(.*?^\)\n|^from [\w.]+ import [^\n(]*\n", text, re.S | re.M):
        spans.append((m.start(), m.end()))
    return spans


def replace_bare(text):
    spans = in_import_block(text)
    out, last = [], 0
    for m in BARE.finditer(text):
        if any(a <= m.start() < b for a, b in spans):
            continue
        out.append(text[last : m.start()])
        out.append("BayesLoraConfig")
        last = m.end()
    out.append(text[last:])
    return "".join(out)


# shared helpers: keep LoraConfig, but make exact-type checks count the subclass
HELPER_EDITS = {
    "testing_common.py": [
        ("(config_cls == LoraConfig):", "issubclass(config_cls, LoraConfig) and config_cls is not AdaLoraConfig:"),
        (
            "if config_cls not in (IA3Config, LoHaConfig, LoKrConfig, LoraConfig):",
            "if config_cls not in (IA3Config, LoHaConfig, LoKrConfig, LoraConfig, BayesLoraConfig):",
        ),
        (
            "if config_cls not in (LoraConfig, RoadConfig):",
            "if config_cls not in (LoraConfig, BayesLoraConfig, RoadConfig):",
        ),
        ("if config_cls not in (LoraConfig,):", "if config_cls not in (LoraConfig, BayesLoraConfig):"),
        (
            "if config_cls == LoraConfig or config_cls == AdaLoraConfig:",
            "if config_cls in (LoraConfig, BayesLoraConfig) or config_cls == AdaLoraConfig:",
        ),
        (
            'if (config.peft_type in {"IA3", "LORA", "OFT"}) and (model_id in conv_ids):',
            'if (config.peft_type in {"IA3", "LORA", "BAYES_LORA", "OFT"}) and (model_id in conv_ids):',
        ),
    ],
    "testing_utils.py": [
        (
            "if config_cls in (LoraConfig, AdaLoraConfig):",
            "if config_cls in (LoraConfig, BayesLoraConfig, AdaLoraConfig):",
        ),
    ],
}
for name in FILES:
    text = (SRC / name).read_text()
    text = fix_relative(text)
    text = add_import(text)
    if name.startswith("test_"):
        text = replace_bare(text)
    for old, new in HELPER_EDITS.get(name, []):
        assert text.count(old) == 1, (name, old, text.count(old))
        text = text.replace(old, new)
    (DST / name).write_text(text)

(DST / "pytest.ini").write_text("[pytest]\naddopts =\n")
shutil.copy(HERE / "conftest_select.py", DST / "conftest.py")
print("done")
