#!/usr/bin/env bash
# PEFT's own LoRA tests with BayesLoraConfig in place of LoraConfig (issue 13). Not part of the test suite: it needs
# PEFT's source package and takes ~25 minutes on 2 cores. Usage: bash scripts/peft_battery/run.sh [WORK_DIR]
# Then: python scripts/peft_battery/classify.py WORK_DIR/<file>.xml counts the failures by kind.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-/tmp/peftbattery}"
PY="$ROOT/.venv/bin/python"
mkdir -p "$WORK" && cd "$WORK"
PEFT_VERSION="$("$PY" -c 'import peft; print(peft.__version__)')"
[ -d "peft-$PEFT_VERSION" ] || {
  "$PY" -m pip download -q --no-deps --no-binary :all: "peft==$PEFT_VERSION" -d .
  tar xzf "peft-$PEFT_VERSION.tar.gz"
}
# PEFT's test dependencies, kept out of the project's venv (never a torch: the constraints pin it).
"$PY" -m pip install -q --target extra parameterized datasets scipy pytest-xdist -c "$ROOT/constraints.txt"
"$PY" "$ROOT/scripts/peft_battery/make_copy.py" "peft-$PEFT_VERSION/tests" bayestests
cd bayestests
for file in test_config.py test_tuners_utils.py test_custom_models.py; do
  BAYES_SELECT=1 BAYES_SELECT_LOG="$WORK/sel_${file%.py}.txt" HF_HUB_OFFLINE=1 PYTHONPATH="$WORK/extra" \
    "$PY" -m pytest "$file" -q -p no:cacheprovider -o addopts="" -n 2 --junitxml="$WORK/${file%.py}.xml" \
    > "$WORK/${file%.py}.log" 2>&1 || true
  tail -1 "$WORK/${file%.py}.log"
done
