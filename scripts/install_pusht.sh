#!/usr/bin/env bash
# Optional: gym-pusht 0.1.8 and its simulator, for `mixpolicy eval env=pusht` and the PushT
# test tier (tests/test_pusht_eval.py, skipped with a reason where gym-pusht is missing).
# gym-pusht requires opencv-python, whose cv2 replaces the cv2 of opencv-python-headless
# that mixpolicy uses; so gym-pusht goes in without dependency resolution and its other
# dependencies (the `pusht` extra: pymunk<7, pygame, shapely) by name.
set -euo pipefail
cd "$(dirname "$0")/.."
# PYTHON=/path/to/venv/bin/python installs into that environment instead.
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip install "pymunk>=6.6,<7" "pygame>=2.5.2,<2.7" "shapely>=2.0.3,<3"
"$PY" -m pip install --no-deps "gym-pusht==0.1.8"
"$PY" - <<'PYEOF'
import importlib.metadata as md

try:
    md.version("opencv-python")
    raise SystemExit("opencv-python is installed next to opencv-python-headless; pip uninstall opencv-python, then reinstall opencv-python-headless")
except md.PackageNotFoundError:
    pass
import cv2  # noqa: F401  (still opencv-python-headless's)
from gym_pusht.envs.pusht import PushTEnv

env = PushTEnv(obs_type="pixels_agent_pos", render_mode="rgb_array")
obs, _ = env.reset(seed=0)
_, _, _, _, info = env.step(obs["agent_pos"])
assert obs["pixels"].shape == (96, 96, 3) and 0.0 <= info["coverage"] <= 1.0
print(f"gym-pusht {md.version('gym-pusht')} ok (pymunk {md.version('pymunk')}, opencv-python-headless {md.version('opencv-python-headless')})")
PYEOF
