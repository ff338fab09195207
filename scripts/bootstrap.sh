#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs iadkit into it
# with the pinned torch/torchvision from constraints.txt. Usage: scripts/bootstrap.sh [EXTRAS]
# e.g. scripts/bootstrap.sh test,demo
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.iadkit-installed-${extras//,/-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first, alone, so that nothing else can pick a different build of it.
    .venv/bin/python -m pip install -q -c constraints.txt torch
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
    touch "$stamp"
fi
