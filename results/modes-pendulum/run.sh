#!/bin/sh
# The training modes on the pendulum, each ending with C searched by CMA-ES in M's dream:
# every config of configs/ with training seeds 0, 1 and 2, two runs at a time, then their
# controllers on the same 20 episodes (reset seeds 0-19). From the repository's root:
#   worldplan collect pendulum --episodes 400 --swing-up 0.5 --out data/pendulum-swingup
#   sh results/modes-pendulum/run.sh
set -e
export DATA=${DATA:-data/pendulum-swingup}
export RUNS=${RUNS:-runs/modes-pendulum}
HERE=$(dirname "$0")
for seed in 0 1 2; do
  for config in "$HERE"/configs/*.yaml; do
    echo "$config $seed"
  done
done | xargs -P 2 -n 2 sh -c 'worldplan train --config "$0" --seed "$1" --data "$DATA" \
  --out "$RUNS/$(basename "$0" .yaml)-$1" --quiet > /dev/null'
worldplan compare "$RUNS"/* --planner controller --episodes 20 --out "$HERE" --quiet
