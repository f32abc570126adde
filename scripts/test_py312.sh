#!/usr/bin/env bash
# The Python 3.12 low-end tier (torch 2.7.1): scripts/test_python.sh 3.12, kept under its old name.
# Same variables (VENV, PYTHON, NUMPY, SKIP_TESTS); PYTHON312 still names the interpreter.
set -euo pipefail
if [ -n "${PYTHON312:-}" ]; then export PYTHON="$PYTHON312"; fi
exec bash "$(dirname "$0")/test_python.sh" 3.12 "$@"
