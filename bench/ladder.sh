#!/usr/bin/env bash
# Where a /play redirect's CPU goes: bench/floor.py's redirect built up step by step towards
# Edge's handler, each step against the one before it at the same moment (bench/pair.sh), then
# Edge against /healthz. Each line's ratio is the step's throughput as a share of the step
# before it; 1/ratio is the step's cost. Needs what pair.sh needs; BENCH_DB as for pair.sh.
#
#   BENCH_DB=playexp bash bench/ladder.sh       # (SEED=2000 on a first run makes the catalog)
set -euo pipefail
cd "$(dirname "$0")/.."
step() {  # name, then pair.sh's variables
    local name=$1 text
    shift
    text=$(env "$@" bash bench/pair.sh 2>&1) || { echo "$text" >&2; exit 1; }
    echo "$name: $(tail -1 <<<"$text")"
    unset SEED  # (a catalog made once is enough)
}
step "floor against /healthz" A=healthz B=redirect B_SERVE=floor
step "+ Edge's session open" A=redirect A_SERVE=floor B=redirect B_SERVE=floor B_ENV=FLOOR_PLAY=open
step "+ the choice recorded" A=redirect A_SERVE=floor A_ENV=FLOOR_PLAY=open \
    B=redirect B_SERVE=floor B_ENV=FLOOR_PLAY=open,choice
step "+ Edge's headers" A=redirect A_SERVE=floor A_ENV=FLOOR_PLAY=open,choice \
    B=redirect B_SERVE=floor B_ENV=FLOOR_PLAY=open,choice,headers
step "Edge's handler" A=redirect A_SERVE=floor A_ENV=FLOOR_PLAY=open,choice,headers B=redirect
step "Edge against /healthz" A=healthz B=redirect
