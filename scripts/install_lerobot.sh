#!/usr/bin/env bash
# Optional: lerobot 0.4.4 (the newest for Python 3.11) next to mixpolicy, for the optional
# test tier (tests/test_lerobot_real.py), the side-by-side benchmarks and
# `mixpolicy deploy robot.type=lerobot` (LeRobot robot classes).
# lerobot pins torch<2.11 and would pull several GB of CUDA wheels: install it without its
# dependency resolution, then the dependencies its dataset code needs, keeping torch as is.
set -euo pipefail
cd "$(dirname "$0")/.."
# PYTHON=/path/to/venv/bin/python installs into that environment instead.
PY=${PYTHON:-.venv/bin/python}
constraints=$(mktemp)
"$PY" - > "$constraints" <<'PYEOF'
import importlib.metadata as md
for name in ("torch", "torchvision", "numpy", "huggingface-hub", "diffusers"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PYEOF
# datasets 4 asks for huggingface-hub<2 while diffusers here needs hub 2.x; its dataset
# code works with hub 2.x, so datasets too goes in without resolution, its other needs first.
"$PY" -m pip install -c "$constraints" "pyarrow>=21" "dill>=0.3,<0.4.2" pandas "requests>=2.32.2" "httpx<1" \
    xxhash "multiprocess<0.70.20" "fsspec[http]>=2023.1,<=2026.2.0" filelock pyyaml \
    "av>=15,<16" "draccus==0.10.0" "accelerate>=1.10,<2" jsonlines "deepdiff>=7" termcolor imageio-ffmpeg einops
"$PY" -m pip install --no-deps "datasets>=4,<5" "lerobot==0.4.4"
# Serial-bus SDKs the LeRobot arm classes use.
"$PY" -m pip install -c "$constraints" pyserial feetech-servo-sdk dynamixel-sdk || echo "robot SDKs not installed; datasets work without them"
rm -f "$constraints"
HF_HUB_OFFLINE=1 "$PY" -c "from lerobot.datasets.lerobot_dataset import LeRobotDataset, CODEBASE_VERSION; print('lerobot dataset', CODEBASE_VERSION, 'ok')"
