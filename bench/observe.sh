#!/usr/bin/env bash
# What metrics and logging cost: /healthz on two Edge processes side by side, one with the
# observe middleware (request id, JSON access log at INFO, HTTP metrics) and one without
# (EDGE_OBSERVE=false, EDGE_LOG_LEVEL=WARNING), interleaved rounds, medians.
#
#   bash bench/observe.sh            # ROUNDS=5 DURATION=10 CONNECTIONS=32
#   BASELINE=/tmp/old bash bench/observe.sh   # and another checkout's pair, in the same rounds
#
# Needs wrk (apt-get install -y wrk), PostgreSQL and Redis (DATABASE_URL / REDIS_URL, default
# the local ones). Each Edge is pinned to CPU 0 in its turn and wrk to CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 2; }
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
export DATABASE_URL=${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/test}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
out=bench/out/observe
mkdir -p "$out"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

port=""
python=$(python3 -c 'import sys; print(sys.executable)')
start() {  # name, code dir, extra env...; sets $port (not in a subshell, so the trap sees every pid)
    local name=$1 code=$2; shift 2
    port=$(free_port)
    # `python -m edge` from the checkout's directory imports that checkout's edge package.
    (cd "$code" && exec env "$@" EDGE_PORT="$port" EDGE_LOG_FORMAT=json \
        EDGE_REDIS_KEY_PREFIX="observe-$name:" taskset -c 0 "$python" -m edge serve) \
        >"$out/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
}
here=$PWD
start with "$here" EDGE_OBSERVE=true EDGE_LOG_LEVEL=INFO
with_port=$port
start without "$here" EDGE_OBSERVE=false EDGE_LOG_LEVEL=WARNING
without_port=$port
if [[ -n ${BASELINE:-} ]]; then
    start baseline-with "$BASELINE" EDGE_OBSERVE=true EDGE_LOG_LEVEL=INFO
    base_with_port=$port
    start baseline-without "$BASELINE" EDGE_OBSERVE=false EDGE_LOG_LEVEL=WARNING
    base_without_port=$port
fi

rps() { taskset -c 1 wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$1/healthz" \
        | tee -a "$out/wrk-$2.txt" | awk '/Requests\/sec/ {print $2}'; }
: >"$out/rounds.txt"
for r in $(seq 1 "$ROUNDS"); do
    a=$(rps "$with_port" with); b=$(rps "$without_port" without)
    if [[ -n ${BASELINE:-} ]]; then
        c=$(rps "$base_with_port" baseline-with); d=$(rps "$base_without_port" baseline-without)
        echo "$r $a $b $c $d" | tee -a "$out/rounds.txt"
    else
        echo "$r $a $b" | tee -a "$out/rounds.txt"
    fi
done
python3 - "$out/rounds.txt" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]

def report(label: str, first: int) -> None:
    with_ = [float(r[first]) for r in rows]; without = [float(r[first + 1]) for r in rows]
    ratios = [w / o for w, o in zip(with_, without)]
    print(f"{label}/healthz req/s with observe: median {statistics.median(with_):.0f} {with_}")
    print(f"{label}/healthz req/s without:      median {statistics.median(without):.0f} {without}")
    print(f"{label}cost of metrics+logging: {100 * (1 - statistics.median(ratios)):.1f}% of"
          f" throughput (median of per-round ratios {[round(x, 3) for x in ratios]})")

report("", 1)
if len(rows[0]) > 3:
    report("baseline: ", 3)
PY
