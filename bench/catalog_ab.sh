#!/usr/bin/env bash
# This checkout against another one, side by side: /healthz and track by id (hot ids, warm
# cache) on two `edge serve` processes, interleaved rounds, Edge's CPU per request and the
# track/healthz ratio of each. For a before/after of a change on a noisy machine, where
# catalog.sh's runs minutes apart cannot be compared.
#
#   git worktree add /tmp/old <commit>
#   BASELINE=/tmp/old bash bench/catalog_ab.sh     # ROUNDS=5 DURATION=6
#
# Uses the catalog in $BENCH_DB (default edge_bench, made by catalog.sh) and its hot ids
# (IDS, default the newest bench/out/catalog-*/ids.txt). Edge on CPU 0, wrk on CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
[[ -n ${BASELINE:-} ]] || { echo "BASELINE=<other checkout> is required" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 2; }
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6}
export DATABASE_URL=${BENCH_PG:-postgresql://postgres@127.0.0.1:5432}/${BENCH_DB:-edge_bench}
export REDIS_URL=${BENCH_REDIS:-redis://127.0.0.1:6379/0}
IDS=${IDS:-$(ls -d bench/out/catalog-*/ids.txt 2>/dev/null | sort | tail -1)}
[[ -s $IDS ]] || { echo "no hot ids: run bench/catalog.sh first, or set IDS" >&2; exit 2; }
out=bench/out/catalog_ab
mkdir -p "$out"
python=$(python3 -c 'import sys; print(sys.executable)')
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A port pid
cleanup() { for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
for v in this baseline; do
    code=$here; [[ $v == baseline ]] && code=$BASELINE
    port[$v]=$(free_port)
    # `python -m edge` from the checkout's directory imports that checkout's edge package.
    (cd "$code" && exec env EDGE_PORT="${port[$v]}" EDGE_LOG_LEVEL=WARNING \
        EDGE_REDIS_KEY_PREFIX="catalog-ab-$v-$$:" taskset -c 0 "$python" -m edge serve) \
        >"$out/$v.log" 2>&1 &
    pid[$v]=$!
done
for v in this baseline; do
    for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:${port[$v]}/healthz" >/dev/null && break; sleep 0.1; done
    while read -r id; do curl -sf -o /dev/null "http://127.0.0.1:${port[$v]}/api/v1/tracks/$id"; done <"$IDS"
done
run() {  # variant endpoint: prints "variant endpoint req/s cpu-µs-per-request"
    local c0 c1 text
    c0=$(awk '{print $14 + $15}' "/proc/${pid[$1]}/stat")
    if [[ $2 == track ]]; then
        text=$(taskset -c 1 wrk -t2 -c32 -d"${DURATION}s" -s bench/wrk/ids.lua "http://127.0.0.1:${port[$1]}" -- "$IDS")
    else
        text=$(taskset -c 1 wrk -t2 -c32 -d"${DURATION}s" "http://127.0.0.1:${port[$1]}/healthz")
    fi
    c1=$(awk '{print $14 + $15}' "/proc/${pid[$1]}/stat")
    if grep -q "Non-2xx" <<<"$text"; then echo "$1 $2: error responses" >&2; exit 1; fi
    python3 -c "import sys; n = int(sys.argv[3]); print(sys.argv[1], sys.argv[2], sys.argv[4], round(($c1 - $c0) * 1e6 / $(getconf CLK_TCK) / n, 1))" \
        "$1" "$2" "$(awk '/requests in/ {print $1}' <<<"$text")" "$(awk '/Requests\/sec/ {print $2}' <<<"$text")"
}
: >"$out/rounds.txt"
for r in $(seq 1 "$ROUNDS"); do
    for v in this baseline; do run "$v" healthz; run "$v" track; done | tee -a "$out/rounds.txt"
done
python3 - "$out/rounds.txt" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    variant, endpoint, rps, cpu = line.split()
    runs[variant, endpoint].append((float(rps), float(cpu)))
for v in ("this", "baseline"):
    h, t = runs[v, "healthz"], runs[v, "track"]
    ratio = statistics.median(b[0] / a[0] for a, b in zip(h, t))
    print(f"{v:9s} /healthz {statistics.median(x[0] for x in h):7.0f} req/s "
          f"{statistics.median(x[1] for x in h):5.1f} µs CPU | track {statistics.median(x[0] for x in t):7.0f} "
          f"req/s {statistics.median(x[1] for x in t):5.1f} µs CPU | track/healthz {ratio:.1%} "
          "(median of per-round ratios)")
PY
