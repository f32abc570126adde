#!/usr/bin/env bash
# Run here, with the package index reachable: download the wheels the GPU machine lacks
# (benchmarks/gpu/wheels.txt) for Python 3.12 manylinux x86_64 into benchmarks/gpu/wheels/
# (git-ignored), build the one that has no wheel from its sdist, and check that the wheels
# and the repository together stay within the transfer limit.
#
#   bash benchmarks/gpu/prepare.sh [--python-version 3.12] [--dest DIR] [--limit-mib 60]
#
# PYTHON names the interpreter whose pip downloads (default: python3).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
PY_VERSION=3.12
DEST=$HERE/wheels
LIMIT_MIB=60

die() { echo "prepare.sh: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) [ $# -ge 2 ] || die "--python-version needs a value (e.g. 3.12)"; PY_VERSION=$2; shift 2 ;;
    --dest) [ $# -ge 2 ] || die "--dest needs a folder"; DEST=$2; shift 2 ;;
    --limit-mib) [ $# -ge 2 ] || die "--limit-mib needs a number"; LIMIT_MIB=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $PY_VERSION =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.12, got $PY_VERSION"
[[ $LIMIT_MIB =~ ^[0-9]+$ ]] || die "--limit-mib must be a whole number, got $LIMIT_MIB"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (set PYTHON=/path/to/python)"
# pip, quiet but for errors (local index folders named in a pip config that lack a package
# make it warn once per package).
pip_quiet() { "$PYTHON" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

LIST=$HERE/wheels.txt
# "name==version" lines; those whose comment is "build" have no wheel on the index.
requirements() {  # $1: download | build
  "$PYTHON" - "$LIST" "$1" <<'EOF'
import sys
for line in open(sys.argv[1]):
    req, _, comment = line.partition("#")
    if req.strip() and (comment.strip() == "build") == (sys.argv[2] == "build"):
        if "==" not in req:
            sys.exit(f"prepare.sh: error: {req.strip()!r} in wheels.txt is not pinned as name==version")
        print(req.strip())
EOF
}
DOWNLOAD=$(requirements download)
BUILD=$(requirements build)

PARTIAL=$DEST.partial
rm -rf "$PARTIAL"
mkdir -p "$PARTIAL"
trap 'rm -rf "$PARTIAL"' EXIT

echo "== downloading $(echo "$DOWNLOAD" | wc -w) wheels for CPython $PY_VERSION manylinux x86_64"
# shellcheck disable=SC2086
pip_quiet download --quiet --no-deps --only-binary=:all: \
  --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$PARTIAL" $DOWNLOAD

for req in $BUILD; do
  echo "== building $req from its sdist (pure Python)"
  pip_quiet wheel --quiet --no-deps --no-binary "${req%%==*}" -w "$PARTIAL" "$req"
done

# Every pinned requirement has exactly one wheel, pure Python or manylinux.
"$PYTHON" - "$PARTIAL" $DOWNLOAD $BUILD <<'EOF'
import re, sys
from pathlib import Path

folder, reqs = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
wheels = {}
for w in folder.glob("*.whl"):
    name, version = w.name.split("-")[:2]
    wheels.setdefault(norm(name), []).append((version, w.name))
problems = []
for req in reqs:
    name, version = req.split("==")
    got = wheels.pop(norm(name), [])
    if len(got) != 1 or got[0][0] != version:
        problems.append(f"{req}: found {[g[1] for g in got] or 'no wheel'}")
    elif not (got[0][1].endswith("-none-any.whl") or "manylinux" in got[0][1]):
        problems.append(f"{req}: {got[0][1]} is neither pure Python nor manylinux")
problems += [f"unexpected wheel {w[1]}" for ws in wheels.values() for w in ws]
if problems:
    sys.exit("prepare.sh: error: " + "; ".join(problems))
EOF

(cd "$PARTIAL" && sha256sum -- *.whl > SHA256SUMS)

# Sizes: the wheels travel with the working tree (its tracked and untracked, not ignored
# files). Checked before the new folder replaces an earlier one.
(cd "$ROOT" && "$PYTHON" - "$PARTIAL" "$LIMIT_MIB") <<'EOF'
import os, subprocess, sys
from pathlib import Path

folder, limit_mib = Path(sys.argv[1]), int(sys.argv[2])
MiB = 1024 * 1024
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True).stdout
inside = lambda f: os.path.realpath(f).startswith(str(folder.resolve()) + os.sep)  # the new wheels themselves
repo = sum(os.path.getsize(f) for f in files.decode().split("\0") if f and os.path.isfile(f) and not os.path.islink(f) and not inside(f))
wheels = sorted(folder.glob("*.whl"), key=lambda p: -p.stat().st_size)
for w in wheels:
    print(f"  {w.stat().st_size / MiB:7.2f} MiB  {w.name}")
total_wheels = sum(w.stat().st_size for w in wheels)
total = repo + total_wheels
print(f"wheels {total_wheels / MiB:.2f} MiB ({len(wheels)} files) + repository {repo / MiB:.2f} MiB = {total / MiB:.2f} MiB (limit {limit_mib} MiB)")
if total > limit_mib * MiB:
    sys.exit(f"prepare.sh: error: {total / MiB:.2f} MiB exceeds the {limit_mib} MiB limit; drop wheels from benchmarks/gpu/wheels.txt")
EOF

rm -rf "$DEST"
mv "$PARTIAL" "$DEST"
trap - EXIT
echo "ready: $DEST (carry it with the working tree, then run benchmarks/gpu/run.sh there)"
