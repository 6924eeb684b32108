#!/usr/bin/env bash
# The small-budget table of training modes (results/end_to_end/README.md): every mode with
# and without the auxiliary losses, and end_to_end with meta-learned weights, on pendulum and
# pointmaze-umaze, at a small budget (320 steps per stage), then `worldplan compare` on each
# environment.
# Run from the repository root: bash results/end_to_end/table.sh
set -euo pipefail
R=results/end_to_end
[ -d data/pendulum ] || worldplan collect pendulum --episodes 8 --out data/pendulum
[ -d data/umaze-skew ] || worldplan collect pointmaze-umaze --episodes 100 --skew 0.3 \
    --out data/umaze-skew

train_all() {  # env, packaged config, aux config, meta config
    local env=$1 base=$2 aux=$3 meta=$4 S="--steps 320 --data $5"
    worldplan train --config "$base" --mode staged $S --out "runs/$env-staged"
    worldplan train --config "$aux" --mode staged $S --out "runs/$env-staged-aux"
    worldplan train --config "$base" --mode end_to_end $S --out "runs/$env-e2e"
    worldplan train --config "$aux" --mode end_to_end $S --out "runs/$env-e2e-aux"
    worldplan train --config "$base" --mode end_to_end --tbptt 8 $S --out "runs/$env-e2e-tbptt8"
    worldplan train --config "$aux" --mode end_to_end --tbptt 8 $S --out "runs/$env-e2e-tbptt8-aux"
    worldplan train --config "$base" --mode alternating $S --out "runs/$env-alternating"
    worldplan train --config "$aux" --mode alternating $S --out "runs/$env-alternating-aux"
    worldplan train --config "$meta" $S --out "runs/$env-e2e-meta"
}
runs_of() {
    local env=$1
    echo runs/$env-{staged,staged-aux,e2e,e2e-aux,e2e-tbptt8,e2e-tbptt8-aux,alternating,alternating-aux,e2e-meta}
}

train_all pendulum pendulum $R/pendulum-aux.yaml $R/pendulum-meta.yaml data/pendulum
worldplan compare $(runs_of pendulum) --episodes 5 --out $R/pendulum
train_all umaze pointmaze-umaze $R/umaze-aux.yaml $R/umaze-meta.yaml data/umaze-skew
worldplan compare $(runs_of umaze) --episodes 20 --out $R/umaze
