#!/usr/bin/env bash
# What metrics and logging cost: /healthz on two Edge processes side by side, one with the
# observe middleware (request id, JSON access log at INFO, HTTP metrics) and one without
# (EDGE_OBSERVE=false, EDGE_LOG_LEVEL=WARNING), interleaved rounds, medians.
#
#   bash bench/observe.sh            # ROUNDS=5 DURATION=10 CONNECTIONS=32
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
start() {  # name, extra env...; sets $port (not in a subshell, so the trap sees every pid)
    local name=$1; shift
    port=$(free_port)
    env "$@" EDGE_PORT="$port" EDGE_LOG_FORMAT=json EDGE_REDIS_KEY_PREFIX="observe-$name:" \
        taskset -c 0 edge serve >"$out/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
}
start with EDGE_OBSERVE=true EDGE_LOG_LEVEL=INFO
with_port=$port
start without EDGE_OBSERVE=false EDGE_LOG_LEVEL=WARNING
without_port=$port

rps() { taskset -c 1 wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$1/healthz" \
        | tee -a "$out/wrk-$2.txt" | awk '/Requests\/sec/ {print $2}'; }
: >"$out/rounds.txt"
for r in $(seq 1 "$ROUNDS"); do
    a=$(rps "$with_port" with); b=$(rps "$without_port" without)
    echo "$r $a $b" | tee -a "$out/rounds.txt"
done
python3 - "$out/rounds.txt" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
with_ = [float(r[1]) for r in rows]; without = [float(r[2]) for r in rows]
ratios = [w / o for w, o in zip(with_, without)]
print(f"/healthz req/s with observe: median {statistics.median(with_):.0f} {with_}")
print(f"/healthz req/s without:      median {statistics.median(without):.0f} {without}")
print(f"cost of metrics+logging: {100 * (1 - statistics.median(ratios)):.1f}% of throughput"
      f" (median of per-round ratios {[round(x, 3) for x in ratios]})")
PY
