#!/usr/bin/env bash
# Install lerobot 0.4.4 (the newest for Python 3.11) next to mixpolicy without letting pip
# replace torch/torchvision: lerobot pins torch<2.11, but its datasets and policies run on
# the torch mixpolicy uses. Usage: bash benchmarks/lerobot_compare/install_lerobot.sh [.venv]
set -euo pipefail
VENV=${1:-.venv}
PIP="$VENV/bin/pip"
PINS=$(mktemp)
trap 'rm -f "$PINS"' EXIT
# Keep what is installed now: torch, torchvision, numpy, huggingface_hub.
"$PIP" freeze | grep -i -E '^(torch|torchvision|numpy|huggingface[-_]hub)==' > "$PINS"
"$PIP" install --no-deps "lerobot==0.4.4"
# lerobot's other runtime dependencies that its datasets, configs and policies import
# (not its robot, teleoperation, video-encoding or visualisation extras).
"$PIP" install -c "$PINS" "datasets>=4,<5" "accelerate>=1.10,<2" "draccus==0.10.0" "deepdiff>=7,<9" \
    "termcolor>=2.4,<4" "jsonlines>=4,<5" "av>=15,<16" "pyserial>=3.5,<4"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
import torch; print('lerobot ready; torch', torch.__version__)"
