#!/usr/bin/env bash
# Instructions per request: a measure the machine's noise does not move. Each variant is an
# `edge serve` run under valgrind's callgrind, which counts the instructions the process
# executes (not seconds: the same code, inputs and environment give the same count whatever
# else the machine is doing). The load is wrk for DURATION seconds; the instructions of an
# idle stretch as long (timers: alerts, the dashboard sampler, the L1 watch) are subtracted
# first. Syscalls and cache misses are not counted: compare code with this, confirm with
# wrk (observe.sh, catalog.sh).
#
#   bash bench/instructions.sh "with:EDGE_OBSERVE=true EDGE_LOG_LEVEL=INFO" \
#                              "without:EDGE_OBSERVE=false EDGE_LOG_LEVEL=WARNING"
#   URLPATH=/api/v1/tracks/1 bash bench/instructions.sh "track:" ...
#   IDS=bench/out/ids.txt bash bench/instructions.sh ...   # track ids drawn from a file
#
# Each argument is NAME:ENV=VALUE...; a variant may run another checkout's code with
# CODE=<dir> among its variables (that directory's edge/ package is imported). The last
# variant is the baseline of the ratios. Two run at a time. Needs valgrind and wrk
# (apt-get install -y valgrind wrk), PostgreSQL and Redis (DATABASE_URL, REDIS_URL: default
# the local ones; the database needs a catalog for catalog paths: edge migrate, edge seed).
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install -y valgrind" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 2; }
[[ $# -ge 1 ]] || { echo "usage: $0 NAME:ENV=VALUE... [...]" >&2; exit 2; }
DURATION=${DURATION:-12}
URLPATH=${URLPATH:-/healthz}
export DATABASE_URL=${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/test}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
python=$(python3 -c 'import sys; print(sys.executable)')  # the interpreter, not a shim
out=bench/out/instructions
mkdir -p "$out"
rm -f "$out"/*.cg.* "$out"/results.txt
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
load() {  # port seconds
    if [[ -n ${IDS:-} ]]; then
        wrk -t1 -c4 -d"$2s" -s "$here/bench/wrk/ids.lua" "http://127.0.0.1:$1" -- "$here/$IDS"
    else
        wrk -t1 -c4 -d"$2s" "http://127.0.0.1:$1$URLPATH"
    fi
}

measure() {  # name env...: appends "name instructions/request requests" to results.txt
    local name=$1; shift
    local code=$here port pid
    for kv in "$@"; do [[ $kv == CODE=* ]] && code=${kv#CODE=}; done
    port=$(free_port)
    (cd "$code" && exec env "$@" EDGE_PORT="$port" EDGE_LOG_FORMAT=json \
        EDGE_REDIS_KEY_PREFIX="instructions-$name:" valgrind --tool=callgrind \
        --callgrind-out-file="$here/$out/$name.cg" "$python" -m edge serve) \
        >"$out/$name.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 1500); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
    load "$port" 3 >/dev/null                                   # warm: caches, prepared statements
    callgrind_control -z "$pid" >/dev/null 2>&1
    sleep "$DURATION"                                           # idle: the timers alone
    callgrind_control -d "$pid" >/dev/null 2>&1
    callgrind_control -z "$pid" >/dev/null 2>&1
    load "$port" "$DURATION" >"$out/$name.wrk"
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 - "$name" "$out" <<'PY' >>"$out/results.txt"
import glob, re, sys
name, out = sys.argv[1], sys.argv[2]
dumps = sorted(glob.glob(f"{out}/{name}.cg.*"), key=lambda p: int(p.rsplit(".", 1)[1]))
idle, busy = (int(re.search(r"^summary: (\d+)", open(p).read(), re.M).group(1)) for p in dumps[:2])
wrk = open(f"{out}/{name}.wrk").read()
requests = int(re.search(r"(\d+) requests in", wrk).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
assert errors is None, f"{name}: {errors.group(1)} error responses"
print(name, round((busy - idle) / requests), requests)
PY
}

pending=()
for spec in "$@"; do
    name=${spec%%:*}; envs=${spec#*:}
    # shellcheck disable=SC2086  # the variables are words on purpose
    measure "$name" $envs &
    pending+=($!)
    if [[ ${#pending[@]} -ge 2 ]]; then wait "${pending[@]}"; pending=(); fi
done
[[ ${#pending[@]} -eq 0 ]] || wait "${pending[@]}"
python3 - "$out/results.txt" "$@" <<'PY'
import sys
found = dict((l.split()[0], l.split()[1:]) for l in open(sys.argv[1]))
names = [spec.split(":", 1)[0] for spec in sys.argv[2:]]
base = int(found[names[-1]][0])
for name in names:
    ir, requests = (int(x) for x in found[name])
    print(f"{name:16s} {ir:9,d} instructions/request  ({requests} requests)  "
          f"{ir / base:.3f} x {names[-1]}  (+{100 * (ir - base) / base:.1f}%)")
PY
