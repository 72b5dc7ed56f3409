#!/usr/bin/env bash
# Runs the test suite in a throwaway venv on the newest releases that setup.cfg allows (torch, peft, diffusers and
# the rest, upgraded eagerly), to decide whether an upper bound can be raised. Not part of CI: on Linux it downloads
# PyPI's CUDA build of torch and its NVIDIA libraries (several GB) and the suite then takes as long as CI's.
#
#   bash scripts/test_newest_stack.sh                    # the whole suite
#   bash scripts/test_newest_stack.sh -x -q -m 'not slow'  # arguments go to pytest
#
# Environment:
#   PYTHON            the interpreter for the venv (default python3; >= 3.11)
#   TORCH_INDEX_URL   install torch from this index first, e.g. https://download.pytorch.org/whl/cpu (smaller)
#   PIP_CONFIG_FILE   pip's configuration files are NOT read unless you set this yourself: the default here is
#                     /dev/null, so that a global constraint file that caps torch (as on our build machines, see
#                     /etc/xdg/pip) does not hide the newest release. An empty config file is not enough: pip still
#                     reads the global files beside it.
#   KEEP_WORKDIR=1    keep the venv and the copy of the sources (otherwise deleted on exit)
#
# Nothing is written into this repository: the working tree (tracked and untracked, not ignored, files) is copied to a
# temporary folder, installed and tested there, without bytecode or pytest cache in the sources.
# The last lines printed are the installed versions and pytest's result; the exit status is pytest's.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "bayes-adapter needs Python >= 3.11")'
export PIP_CONFIG_FILE="${PIP_CONFIG_FILE:-/dev/null}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/bayes-adapter-newest-stack.XXXXXX")"
case "$WORKDIR/" in
"$REPO"/*) echo "error: the work folder $WORKDIR lies inside the repository $REPO; set TMPDIR elsewhere" >&2; exit 2 ;;
esac
if [ "${KEEP_WORKDIR:-0}" != 1 ]; then trap 'rm -rf "$WORKDIR"' EXIT; fi
echo "work folder: $WORKDIR (pip config: $PIP_CONFIG_FILE)"

SRC="$WORKDIR/src"
mkdir -p "$SRC"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$SRC"

"$PYTHON" -m venv "$WORKDIR/venv"
VPY="$WORKDIR/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    TORCH_REQUIREMENT="$("$VPY" -c '
import configparser, sys
cfg = configparser.ConfigParser(); cfg.read(sys.argv[1])
print(next(r for r in cfg["options"]["install_requires"].split() if r.startswith("torch")))' "$SRC/setup.cfg")"
    "$VPY" -m pip install -q --index-url "$TORCH_INDEX_URL" "$TORCH_REQUIREMENT"
fi
"$VPY" -m pip install -q --upgrade --upgrade-strategy eager "$SRC[test,train,lab,quant]"
"$VPY" -m pip check
"$VPY" -m pip freeze > "$WORKDIR/pip-freeze.txt"

status=0
(cd "$SRC" && "$VPY" -m pytest -p no:cacheprovider tests "$@") || status=$?

echo "== newest allowed stack (full list: $WORKDIR/pip-freeze.txt) =="
"$VPY" - <<'EOF'
import importlib.metadata as metadata
import platform

names = ["torch", "peft", "diffusers", "transformers", "accelerate", "huggingface_hub", "safetensors", "numpy"]
print(f"python {platform.python_version()}; " + ", ".join(f"{n} {metadata.version(n)}" for n in names))
EOF
echo "pytest exit status: $status"
exit "$status"
