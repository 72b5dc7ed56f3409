"""Counts the failures of a junit XML from run.sh by kind (the by-design kinds of issue 13): classify.py FILE.xml"""

import collections
import re
import sys
import xml.etree.ElementTree as ET


KINDS = [
    (
        "d-variant",
        r"is a LoRA variant that BayesLoraConfig does not support|is not supported by BayesLoraConfig: target modules",
    ),
    (
        "g-hub",
        r"couldn't connect to 'https://huggingface.co'|not fully cached locally|Can't find 'adapter_config.json' at 'peft-internal-testing|OfflineModeIsEnabled|LocalEntryNotFound|outgoing traffic has been disabled",
    ),
    ("e-mixed", r"not compatible with the `PeftMixedModel`"),
    ("f-custom", r"_register_custom_module"),
    ("h-unsupported-module", r"which has no Bayesian LoRA layer"),
    ("a-posterior-params", r"lora_posterior_rho"),
    ("c-names", r"BayesLoraModel|BAYES_LORA|bayes_|Bayes(Linear|Conv|Embedding)"),
]


def load(f):
    rows = []
    for tc in ET.parse(f).iter("testcase"):
        for k in ("failure", "error"):
            e = tc.find(k)
            if e is not None:
                msg = e.get("message") or ""
                text = e.text or ""
                kind = "UNCLASSIFIED"
                for name, pat in KINDS:
                    if re.search(pat, msg) or re.search(pat, text[-3000:]):
                        kind = name
                        break
                rows.append(dict(cls=tc.get("classname"), name=tc.get("name"), k=k, kind=kind, msg=msg, text=text))
    return rows


if __name__ == "__main__":
    rows = load(sys.argv[1])
    c = collections.Counter(r["kind"] for r in rows)
    print(c)
    for kind in c:
        r = next(r for r in rows if r["kind"] == kind)
        print(f"[{kind}] {r['cls']}::{r['name']}\n    {r['msg'][:250]!r}")
