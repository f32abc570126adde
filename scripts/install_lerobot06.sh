#!/usr/bin/env bash
# Optional: LeRobot 0.6.1 next to mixpolicy in a Python 3.12 venv, with mixpolicy's LeRobot
# policy plugin (plugins/lerobot_policy_mixpolicy), for tests/test_lerobot06.py and
# `lerobot-train --policy.type=mixpolicy`; gym-pusht for LeRobot's `pusht` env, where
# `lerobot-eval` runs the plugin's policies (tests/test_lerobot06_eval.py); also the LeRobot
# robot classes for tests/test_robot_lerobot_real.py and `mixpolicy deploy robot.type=lerobot`.
# LeRobot 0.6 needs Python >= 3.12 and torch >= 2.7, < 2.12: by default this reuses the venv of
# scripts/test_py312.sh (torch 2.7.1), building it first when it is missing.
# A plain `pip install lerobot` pulls several GB of CUDA wheels and extras: lerobot goes in
# without dependency resolution, then only what its dataset and training code import.
#   VENV=/path/to/venv   a Python 3.12 venv whose torch is < 2.12 (default /work/venvs/py312)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/work/venvs/py312}
if [ ! -x "$VENV/bin/python" ]; then
    VENV="$VENV" SKIP_TESTS=1 bash scripts/test_py312.sh
fi
PY="$VENV/bin/python"
"$PY" - <<'PYEOF'
import sys
import torch
from packaging.version import Version
if sys.version_info[:2] < (3, 12):
    sys.exit(f"error: LeRobot 0.6 needs Python >= 3.12; this venv has {sys.version.split()[0]}")
if not Version("2.7") <= Version(torch.__version__.split("+")[0]) < Version("2.12"):
    sys.exit(f"error: LeRobot 0.6 needs torch >= 2.7, < 2.12; this venv has {torch.__version__}")
PYEOF
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" - > "$constraints" <<'PYEOF'
import importlib.metadata as md
for name in ("torch", "torchvision", "numpy"):
    print(f"{name}=={md.version(name)}")
PYEOF
# LeRobot 0.6.1's own bounds for what it shares with mixpolicy; diffusers then resolves to a
# release that works with huggingface-hub 1.x.
printf '%s\n' "huggingface-hub>=1.6,<2" "opencv-python-headless>=4.9,<4.14" "av>=15,<16" "packaging>=24.2,<26" \
    "draccus>=0.11.6,<0.12" "datasets>=4.8,<5" "pandas>=2,<3" "pyarrow>=21,<30" >> "$constraints"
"$PY" -m pip install -c "$constraints" "huggingface-hub" "opencv-python-headless" "av" "packaging" "draccus" \
    "datasets" "pandas" "pyarrow" "einops>=0.8,<0.9" "jsonlines>=4" "termcolor>=2.4" "accelerate>=1.14,<2" \
    "Pillow>=10" "diffusers>=0.30" -e ".[test,interop]"
"$PY" -m pip install --no-deps "lerobot==0.6.1"
# Serial-bus SDKs the LeRobot arm classes use (mixpolicy deploy robot.type=lerobot).
"$PY" -m pip install -c "$constraints" "pyserial>=3.5,<4" "feetech-servo-sdk>=1,<2" "dynamixel-sdk>=3.7.31,<3.9" "deepdiff>=7.0.1,<9" \
    || echo "robot SDKs not installed; datasets and the policy plugin work without them"
"$PY" -m pip install -c "$constraints" --no-deps -e plugins/lerobot_policy_mixpolicy
# LeRobot's `pusht` env for lerobot-eval (gym-pusht without its opencv-python; see install_pusht.sh).
PYTHON="$PY" bash scripts/install_pusht.sh
HF_HUB_OFFLINE=1 "$PY" - <<'PYEOF'
from lerobot.datasets.lerobot_dataset import CODEBASE_VERSION
from lerobot.utils.import_utils import register_third_party_plugins
from lerobot.configs import PreTrainedConfig
import lerobot
register_third_party_plugins()
assert "mixpolicy" in PreTrainedConfig.get_known_choices(), "the mixpolicy plugin did not register"
from lerobot.envs.configs import EnvConfig
import gym_pusht  # noqa: F401  (lerobot-eval --env.type=pusht)
assert "pusht" in EnvConfig.get_known_choices()
print(f"lerobot {lerobot.__version__} (dataset {CODEBASE_VERSION}) with the mixpolicy policy plugin: ok")
PYEOF
