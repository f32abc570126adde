#!/usr/bin/env bash
# A day with mixpolicy, as README's "A day in the life" runs it: collect, train, fine-tune on
# a new task, resume an interrupted run, evaluate with video, view in Rerun. Prints each
# command's wall time. Run from the repository root with mixpolicy installed (the Rerun step
# needs the viewer extra: pip install -e ".[viewer]").
#   bash scripts/day_in_the_life.sh [WORK_DIR]
set -euo pipefail
work=${1:-runs/day}
mp=${MIXPOLICY:-mixpolicy}
mkdir -p "$work"
step() {
  local t0
  t0=$(date +%s%N)
  echo "\$ $*"
  "$@"
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '== %d.%d s: %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"
}
step $mp collect tasks=[reach-v3,drawer-open-v3] episodes_per_task=30 noise_std=0.1 out="$work/data.zarr" overwrite=true progress=false
step $mp train dataset="$work/data.zarr" out_dir="$work/base" policy=dit_x0 steps=300 checkpoint_every=100 overwrite=true progress=false
step $mp collect tasks=[push-v3] episodes_per_task=30 noise_std=0.1 out="$work/push.zarr" overwrite=true progress=false
step $mp train dataset="$work/push.zarr" out_dir="$work/finetune" init_from="$work/base" steps=200 overwrite=true progress=false
# An interrupted run: SIGTERM after 40 s saves a checkpoint; resume=true continues its saved config.
set +e
timeout -s TERM 40 $mp train dataset="$work/data.zarr" out_dir="$work/long" policy=dit_x0 steps=600 checkpoint_every=50 overwrite=true progress=false
echo "interrupted with status $?"
set -e
step $mp train out_dir="$work/long" resume=true progress=false
step $mp eval checkpoint="$work/finetune/checkpoints/last" episodes_per_task=10 video=true video_episodes=1 progress=false
step $mp data view "$work/data.zarr" episode=0 out="$work/episode0.rrd"
ls "$work"/finetune/eval/*/videos/ "$work"/episode0.rrd
