"""Registers bayes_adapter and (with BAYES_SELECT=1) keeps only the LoRA cases, i.e. those that run BayesLoraConfig."""

import inspect
import os
import re

from peft import PeftConfig

import bayes_adapter  # noqa: F401
from bayes_adapter import BayesLoraConfig


OTHER_LORA_NAMES = re.compile(
    r"adalora|vblora|randlora|tinylora|unilora|lorafa|lora_fa|lora_ga|loraga|riemannian|xlora|delora"
)


def _cfg_classes(obj, depth=0):
    found = set()
    if depth > 4:
        return found
    if isinstance(obj, type) and issubclass(obj, PeftConfig):
        found.add(obj)
    elif isinstance(obj, PeftConfig):
        found.add(type(obj))
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for x in obj:
            found |= _cfg_classes(x, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            found |= _cfg_classes(v, depth + 1)
    return found


def _source(obj):
    try:
        return inspect.getsource(obj)
    except Exception:
        return ""


def _reason(item):
    cs = getattr(item, "callspec", None)
    classes = set()
    if cs is not None:
        for v in cs.params.values():
            classes |= _cfg_classes(v)
    if classes:
        return "param" if BayesLoraConfig in classes else None
    if item.cls is not None:
        cls_attrs = set()
        for v in vars(item.cls).values():
            cls_attrs |= _cfg_classes(v)
        if cls_attrs:
            return "class-attr" if BayesLoraConfig in cls_attrs else None
    src = _source(item.function)
    if "BayesLoraConfig" in src:
        return "body"
    name = item.name.lower()
    if "lora" in name and not OTHER_LORA_NAMES.search(name) and not _cfg_classes(src):
        # e.g. a fixture or helper builds the config
        if item.cls is not None and "BayesLoraConfig" in _source(item.cls):
            return "name+class-source"
    return None


def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("BAYES_SELECT") != "1":
        return
    keep, drop, log = [], [], []
    for item in items:
        r = _reason(item)
        (keep if r else drop).append(item)
        log.append(f"{'KEEP' if r else 'DROP'}\t{r}\t{item.nodeid}")
    out = os.environ.get("BAYES_SELECT_LOG")
    if out:
        with open(out, "w") as f:
            f.write("\n".join(log) + "\n")
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
