#!/usr/bin/env bash
# The fast tier (pytest -m fast: the real gRPC server, batcher and edge over a fake model) on
# other Python versions. The real model's stack (torch 2.14.1) is installed for the main
# Python only, so these venvs take the project without its model dependencies.
#   usage: tools/test_python_versions.sh 3.10 3.13
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN_PY=${MAIN_PY:-.venv/bin/python}
# The project's dependencies minus the model's own stack, read from pyproject.toml.
mapfile -t deps < <("$MAIN_PY" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
heavy = {"torch", "torchvision", "onnx", "onnxruntime", "onnxscript"}
for dep in project["dependencies"] + ["pytest>=8", "pytest-timeout>=2.3"]:
    if re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].lower() not in heavy:
        print(dep)
PY
)
for version in "$@"; do
    python=""
    for candidate in "$(pyenv root 2>/dev/null)/versions/$version"*/bin/python "python$version"; do
        if "$candidate" -c pass >/dev/null 2>&1; then python=$(command -v "$candidate"); break; fi
    done
    if [ -z "$python" ]; then echo "Python $version not found (install it, e.g. with pyenv)" >&2; exit 1; fi
    venv=".venv-$version"
    echo "== Python $version ($python): the fast tier"
    test -x "$venv/bin/python" || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${deps[@]}"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
    # Only the fast modules are collected: the others import the model's stack at the top.
    "$venv/bin/python" -m pytest -m fast -q -p no:cacheprovider $(grep -l '^pytestmark = pytest.mark.fast' tests/test_*.py)
done
