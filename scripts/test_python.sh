#!/usr/bin/env bash
# Optional: the ends of the tested ranges. Builds a venv for one Python version with torch 2.7.1 +
# torchvision 0.22.1 (the oldest torch pyproject.toml allows) and numpy 2.2 (numpy < 2.3 as
# LeRobot 0.6 needs, so scripts/install_lerobot06.sh can reuse the 3.12 venv), installs mixpolicy
# with the test and interop extras into it and runs the default test suite there.
#   bash scripts/test_python.sh 3.12 [pytest args]     (also: scripts/test_py312.sh)
#   bash scripts/test_python.sh 3.13 [pytest args]
#   NUMPY=1 bash scripts/test_python.sh 3.12           numpy 1.26 instead (pyproject's lower bound;
#                                                      numpy 1.26 has no wheels for Python 3.13)
# torch 2.7.1 comes from the package index as a CUDA build: about 3 GB to download (its nvidia-*
# wheels are the same for every Python; PIP_FIND_LINKS=DIR reuses ones saved with `pip download`),
# so this is kept out of the default test run.
#   VENV=/path/to/venv   where to build it (default /work/venvs/py3XX, /work/venvs/py3XX-numpy1 with NUMPY=1)
#   PYTHON=/path/to/python3.X   the interpreter (default: pyenv's newest 3.X)
#   SKIP_TESTS=1         install only
# Extra arguments go to pytest (e.g. tests/test_policy.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-}
case "$version" in
    3.11 | 3.12 | 3.13) shift ;;
    *) echo "error: first argument must be a Python version in pyproject's range (3.11, 3.12, 3.13), got '${version}'" >&2; exit 2 ;;
esac
numpy_major=${NUMPY:-2}
case "$numpy_major" in
    2) numpy_pin="numpy>=2.2,<2.3"; suffix=""; extra_pins="" ;;
    1)
        [ "$version" != 3.13 ] || { echo "error: NUMPY=1: numpy 1.26 has no wheels for Python 3.13" >&2; exit 2; }
        numpy_pin="numpy==1.26.4"; suffix="-numpy1"
        # pyarrow 23+ refuses numpy 1.x at import though its metadata allows it.
        extra_pins="pyarrow<23"
        ;;
    *) echo "error: NUMPY must be 1 or 2, got '${numpy_major}'" >&2; exit 2 ;;
esac
VENV=${VENV:-/work/venvs/py${version/./}${suffix}}
if [ -z "${PYTHON:-}" ]; then
    found=$(pyenv versions --bare 2>/dev/null | grep -E "^${version//./\\.}\.[0-9]+$" | sort -V | tail -1 || true)
    [ -n "$found" ] || { echo "error: no Python $version under pyenv; set PYTHON=/path/to/python$version" >&2; exit 2; }
    PYTHON=$(pyenv prefix "$found")/bin/python
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$version', sys.version" \
    || { echo "error: $VENV is not a Python $version venv" >&2; exit 2; }
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf '%s\n' "torch==2.7.1" "torchvision==0.22.1" "$numpy_pin" ${extra_pins:-} > "$constraints"
"$PY" -m pip install -c "$constraints" torch torchvision numpy
"$PY" -m pip install -c "$constraints" -e ".[test,interop]"
"$PY" - <<'PYEOF'
import sys
import numpy, torch, torchvision
print(f"python {sys.version.split()[0]}: torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {numpy.__version__}")
PYEOF
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider "$@"
fi
