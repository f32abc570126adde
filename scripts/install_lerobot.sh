#!/usr/bin/env bash
# Optional: LeRobot robot classes for `mixpolicy deploy robot.type=lerobot`.
# lerobot 0.4.4 pins torch<2.11; mixpolicy needs torch 2.14.1, so lerobot goes in without
# its pinned dependencies and its runtime ones are listed here. Run from the repository
# root with the project's virtual environment.
set -euo pipefail
PIP=${PIP:-.venv/bin/pip}
$PIP install --no-deps "lerobot==0.4.4"
$PIP install draccus huggingface-hub datasets pyarrow av pyserial deepdiff "feetech-servo-sdk" "dynamixel-sdk"
echo "lerobot installed; robots are created from robot.lerobot_type and robot.lerobot_args"
