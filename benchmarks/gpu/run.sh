#!/usr/bin/env bash
# Run on the GPU machine (bare, offline): install the wheels prepare.sh downloaded into a
# temporary folder, then run every GPU check within its time budget (gpu_bench.py), all
# results in one JSON file.
#
#   bash benchmarks/gpu/run.sh [--out FILE] [gpu_bench.py options]
#   bash benchmarks/gpu/run.sh --device cpu --quick --no-install --out /tmp/r.json   # here, seconds
#
# --no-install (or MIXPOLICY_GPU_NO_INSTALL=1) uses the interpreter's installed packages
# instead of the wheels (the test suite runs it so). --wheels DIR reads the wheels from DIR.
# PYTHON names the interpreter (default: python3). The JSON goes to --out, else to
# $OUT/gpu_results.json when OUT is set. Options: python3 benchmarks/gpu/gpu_bench.py --help.
set -euo pipefail

T0=$(date +%s.%N)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=$HERE/wheels
INSTALL=1
[ "${MIXPOLICY_GPU_NO_INSTALL:-0}" = 1 ] && INSTALL=0

die() { echo "run.sh: error: $*" >&2; exit 2; }

ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-install) INSTALL=0; shift ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
command -v "$PYTHON" >/dev/null || die "no interpreter $PYTHON (set PYTHON=/path/to/python)"

CLEANUP=()
cleanup() { for c in "${CLEANUP[@]}"; do eval "$c"; done; }
trap cleanup EXIT

# The package's configs live at the repository root and install as mixpolicy.configs; a
# checkout that is not installed needs the link (git-excluded, so a copied tree may lack it).
if [ ! -e "$ROOT/mixpolicy/configs" ] && ! PYTHONPATH="$ROOT" "$PYTHON" -c \
    "import importlib.util, sys; sys.exit(importlib.util.find_spec('mixpolicy.configs') is None)" 2>/dev/null; then
  ln -s ../configs "$ROOT/mixpolicy/configs"
  CLEANUP+=("rm -f '$ROOT/mixpolicy/configs'")
fi

SITE=""
INSTALL_S=0
if [ "$INSTALL" = 1 ]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  [ ${#wheels[@]} -gt 0 ] || die "no wheels in $WHEELS: run benchmarks/gpu/prepare.sh where the index is reachable, or pass --no-install"
  if [ -f "$WHEELS/SHA256SUMS" ]; then
    (cd "$WHEELS" && sha256sum --quiet -c SHA256SUMS) || die "wheels in $WHEELS do not match their SHA256SUMS: prepare them again"
  fi
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/mixpolicy-gpu-site.XXXXXX")
  CLEANUP+=("rm -rf '$SITE'")
  echo "== installing ${#wheels[@]} wheels into $SITE"
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" "${wheels[@]}"
  else
    # No pip there: a wheel is a zip archive of what goes on sys.path (none of these has a .data folder).
    for w in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$w" "$SITE"; done
  fi
  INSTALL_S=$("$PYTHON" -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 2))" "$T0")
  echo "   installed in ${INSTALL_S} s"
fi

export PYTHONPATH="${SITE:+$SITE:}$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 MIXPOLICY_GPU_T0="$T0" MIXPOLICY_GPU_INSTALL_S="$INSTALL_S" MIXPOLICY_GPU_WHEELS_INSTALLED="$INSTALL"
cd "$ROOT"
"$PYTHON" "$HERE/gpu_bench.py" "${ARGS[@]+"${ARGS[@]}"}"
