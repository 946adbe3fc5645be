#!/usr/bin/env bash
# Create .venv once and install densessm (editable) with the pinned dev tools; cheap to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.densessm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
    .venv/bin/python -m pip check
    touch "$stamp"
fi
