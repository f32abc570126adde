#!/usr/bin/env bash
# Optional: the low end of the tested ranges. Builds a Python 3.12 venv with torch 2.7.1 +
# torchvision 0.22.1 and numpy 2.2 (the oldest torch pyproject.toml allows; numpy <2.3 as
# LeRobot 0.6 needs, so scripts/install_lerobot06.sh can reuse this venv), installs mixpolicy
# into it and runs the default test suite there.
# torch for Python 3.12 comes from the package index as a CUDA build: about 3 GB to
# download, so this is kept out of the default test run.
#   VENV=/path/to/venv   where to build it (default /work/venvs/py312)
#   PYTHON312=/path/to/python3.12   the interpreter (default: pyenv's 3.12.1)
#   SKIP_TESTS=1         install only
# Extra arguments go to pytest (e.g. tests/test_policy.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/work/venvs/py312}
PYTHON312=${PYTHON312:-$(pyenv prefix 3.12.1 2>/dev/null)/bin/python}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON312" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
    || { echo "error: $VENV is not a Python 3.12 venv" >&2; exit 2; }
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf '%s\n' "torch==2.7.1" "torchvision==0.22.1" "numpy>=2.2,<2.3" > "$constraints"
"$PY" -m pip install -c "$constraints" torch torchvision numpy
"$PY" -m pip install -c "$constraints" -e ".[test,interop]"
"$PY" - <<'PYEOF'
import numpy, torch, torchvision
print(f"python 3.12: torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {numpy.__version__}")
PYEOF
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider "$@"
fi
