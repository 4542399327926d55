#!/usr/bin/env bash
# Catalog throughput of one `edge serve` process over a synthetic catalog, measured with wrk.
#
# Creates a fresh database $BENCH_DB on $BENCH_PG, migrates it, seeds $TRACKS tracks (timed),
# starts `edge serve` on a free port (its own Redis key prefix, so nothing else is touched),
# then runs wrk against /healthz, popular tracks, track by id (hot set, warm cache) and search
# (distinct queries: cache misses), interleaved in $ROUNDS rounds, and reports the median per
# endpoint and its ratio to /healthz. Raw outputs go to $OUT (bench/out/ is gitignored).
#
#   bash bench/catalog.sh                      # 1M tracks, 3 rounds of 15 s per endpoint
#   TRACKS=100000 DURATION=5 bash bench/catalog.sh
#   SKIP_SEED=1 bash bench/catalog.sh          # reuse the catalog already in $BENCH_DB
#
# Needs wrk (Debian: apt-get update && apt-get install -y wrk), psql, curl and `edge` on PATH.
# The database is kept at the end for bench/search_db.py; DROP_DB=1 drops it.
set -euo pipefail

BENCH_PG=${BENCH_PG:-postgresql://postgres@127.0.0.1:5432}
BENCH_REDIS=${BENCH_REDIS:-redis://127.0.0.1:6379/0}
BENCH_DB=${BENCH_DB:-edge_bench}
TRACKS=${TRACKS:-1000000}
DURATION=${DURATION:-15}          # seconds per wrk run
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
HOT_IDS=${HOT_IDS:-1000}
QUERIES_PER_ROUND=${QUERIES_PER_ROUND:-20000}
PIN=${PIN:-1}                     # edge serve on CPU 0, wrk on CPU 1 (PostgreSQL, Redis: any)
SKIP_SEED=${SKIP_SEED:-0}
DROP_DB=${DROP_DB:-0}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-1800}   # the whole run, seconds
SEED_TIMEOUT=${SEED_TIMEOUT:-900}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-$HERE/out/catalog-$(date -u +%Y%m%dT%H%M%SZ)}
DB_URL="${BENCH_PG%/}/$BENCH_DB"
PREFIX="bench:$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n'):"

# fd 3: the terminal's stderr, also from inside a redirected step (a trap can run there).
exec 3>&2
say() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&3; }
die() { say "error: $*"; exit 1; }

# -- prerequisites ------------------------------------------------------------------------------
command -v wrk >/dev/null || die "wrk is not installed: apt-get update && apt-get install -y wrk"
for cmd in psql curl edge python timeout; do
    command -v "$cmd" >/dev/null || die "$cmd is not on PATH"
done
if [[ $PIN == 1 ]] && { ! command -v taskset >/dev/null || (($(nproc) < 2)); }; then
    say "taskset missing or fewer than 2 CPUs: not pinning"
    PIN=0
fi
PIN_EDGE=() PIN_WRK=()
if [[ $PIN == 1 ]]; then PIN_EDGE=(taskset -c 0) PIN_WRK=(taskset -c 1); fi
mkdir -p "$OUT"

# -- cleanup of everything this script starts ---------------------------------------------------
EDGE_PID="" WATCHDOG_PID=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    exec 1>&3 2>&3
    if [[ -n $EDGE_PID ]] && kill -0 "$EDGE_PID" 2>/dev/null; then
        kill -TERM "$EDGE_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$EDGE_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$EDGE_PID" 2>/dev/null || true
        wait "$EDGE_PID" 2>/dev/null || true
    fi
    # Only this run's keys: they all start with its random prefix.
    timeout 60 python - "$BENCH_REDIS" "$PREFIX" <<'EOF' || say "could not delete Redis keys ${PREFIX}*"
import sys, redis
r = redis.Redis.from_url(sys.argv[1])
keys = list(r.scan_iter(match=sys.argv[2] + "*", count=1000))
for i in range(0, len(keys), 500):
    r.unlink(*keys[i:i + 500])
print(f"deleted {len(keys)} Redis keys {sys.argv[2]}*", file=sys.stderr)
EOF
    if [[ $DROP_DB == 1 ]]; then
        timeout 60 psql -qX "${BENCH_PG%/}/postgres" -c "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" || true
    fi
    if [[ -n $WATCHDOG_PID ]]; then kill "$WATCHDOG_PID" 2>/dev/null || true; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'say "stopped by SIGTERM$([[ -e $OUT/TIMEOUT ]] && echo ": $(cat "$OUT/TIMEOUT")")"; exit 143' TERM

# Every step below has its own time limit; this bounds the whole in case one is missed. Its
# sleep is killed with it, and it holds none of our output open.
MAIN_PID=$$
watchdog() {
    local nap
    sleep "$BENCH_TIMEOUT" & nap=$!
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    wait "$nap"
    echo "over BENCH_TIMEOUT=${BENCH_TIMEOUT}s" > "$OUT/TIMEOUT"
    kill -TERM "$MAIN_PID"
}
watchdog </dev/null >/dev/null 2>&1 3>&- &
WATCHDOG_PID=$!

# -- what ran, where ----------------------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "memory: $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
    echo "kernel: $(uname -r)"
    echo "edge commit: $(git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$HERE/.." diff --quiet HEAD -- edge sql 2>/dev/null || echo ' (edge/ or sql/ modified)')"
    echo "uncommitted changes: $(git -C "$HERE/.." diff --stat HEAD -- edge sql 2>/dev/null | tail -1)"
    echo "python: $(python --version 2>&1)"
    echo "wrk: $(wrk --version 2>&1 | head -1 || true)"
    echo "postgres: $(timeout 10 psql -XAtq "${BENCH_PG%/}/postgres" -c 'SHOW server_version')"
    echo "postgres shared_buffers: $(timeout 10 psql -XAtq "${BENCH_PG%/}/postgres" -c 'SHOW shared_buffers')"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "settings: TRACKS=$TRACKS DURATION=$DURATION ROUNDS=$ROUNDS THREADS=$THREADS CONNECTIONS=$CONNECTIONS HOT_IDS=$HOT_IDS PIN=$PIN"
} > "$OUT/env.txt"
cat "$OUT/env.txt" >&2

# -- a fresh catalog ----------------------------------------------------------------------------
export DATABASE_URL=$DB_URL EDGE_LOG_LEVEL=WARNING
if [[ $SKIP_SEED == 1 ]]; then
    say "reusing $BENCH_DB ($(psql -XAtq "$DB_URL" -c 'SELECT count(*) FROM tracks') tracks)"
else
    say "creating database $BENCH_DB"
    timeout 120 psql -qX -v ON_ERROR_STOP=1 "${BENCH_PG%/}/postgres" \
        -c "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" -c "CREATE DATABASE $BENCH_DB"
    timeout 120 edge migrate
    say "seeding $TRACKS tracks"
    TIMEFORMAT='time: %R s wall, %U s user, %S s sys'
    started=$(date +%s.%N)
    { time timeout "$SEED_TIMEOUT" edge seed --tracks "$TRACKS" ; } > "$OUT/seed.log" 2>&1 \
        || { cat "$OUT/seed.log" >&2; die "edge seed failed"; }
    seconds=$(python -c "print(f'{$(date +%s.%N) - $started:.1f}')")
    cat "$OUT/seed.log" >&2
    echo "$TRACKS tracks in ${seconds} s wall ($(grep '^seeded' "$OUT/seed.log"))" > "$OUT/seed.txt"
    say "seed: $(cat "$OUT/seed.txt")"
fi

# -- edge serve ---------------------------------------------------------------------------------
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
say "starting edge serve on $BASE (Redis prefix $PREFIX)"
REDIS_URL=$BENCH_REDIS EDGE_REDIS_KEY_PREFIX=$PREFIX EDGE_LOG_FORMAT=json \
    "${PIN_EDGE[@]}" edge serve --host 127.0.0.1 --port "$PORT" > "$OUT/serve.log" 2>&1 3>&- &
EDGE_PID=$!
for i in $(seq 1 120); do
    kill -0 "$EDGE_PID" 2>/dev/null || { cat "$OUT/serve.log" >&2; die "edge serve exited"; }
    curl -fsS --max-time 1 "$BASE/healthz" >/dev/null 2>&1 && break
    ((i < 120)) || die "edge serve not healthy after 60 s"
    sleep 0.5
done
timeout 10 curl -fsS "$BASE/readyz" >&2 && echo >&2

# -- inputs: hot ids, distinct search queries ---------------------------------------------------
timeout 60 psql -XAtq "$DB_URL" -c "SELECT id FROM tracks ORDER BY random() LIMIT $HOT_IDS" > "$OUT/ids.txt"
say "generating $(((ROUNDS + 1) * QUERIES_PER_ROUND)) distinct search queries"
timeout 300 python "$HERE/queries.py" --dsn "$DB_URL" --seed 1 --urlencode \
    --count $(((ROUNDS + 1) * QUERIES_PER_ROUND)) --out "$OUT/queries.txt"
# Slice 0 warms up, slice r is round r's: no query is sent twice in one run.
for r in $(seq 0 "$ROUNDS"); do
    awk -v lo=$((r * QUERIES_PER_ROUND)) -v hi=$(((r + 1) * QUERIES_PER_ROUND)) \
        'NR > lo && NR <= hi' "$OUT/queries.txt" > "$OUT/queries-$r.txt"
    [[ -s $OUT/queries-$r.txt ]] || die "not enough distinct queries for round $r"
done

say "warming the cache: popular, $HOT_IDS tracks"
timeout 120 python - "$BASE" "$OUT/ids.txt" <<'EOF'
import sys, urllib.request
base, ids = sys.argv[1], open(sys.argv[2]).read().split()
for path in ["/api/v1/tracks/popular?limit=20"] + [f"/api/v1/tracks/{i}" for i in ids]:
    with urllib.request.urlopen(base + path, timeout=10) as r:
        assert r.status == 200, (path, r.status)
EOF

WRK=(timeout $((DURATION + 60)) "${PIN_WRK[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" --timeout 10s --latency)
edge_alive() {  # dies, with edge serve's exit status, if it is gone
    kill -0 "$EDGE_PID" 2>/dev/null && return 0
    local status=0
    wait "$EDGE_PID" || status=$?
    EDGE_PID=""
    tail -5 "$OUT/serve.log" >&3
    die "edge serve exited during the run, status $status ($( ((status > 128)) && kill -l $((status - 128)) || echo 'not a signal'))"
}

# CPU time of edge serve so far, in clock ticks (utime + stime of /proc/PID/stat). CPU per request
# is far less disturbed by a noisy machine than requests per second.
edge_ticks() { awk '{ print $14 + $15 }' "/proc/$EDGE_PID/stat"; }
HZ=$(getconf CLK_TCK)

run() {  # run NAME SECONDS OUTFILE [SCRIPT_ARGS...]
    edge_alive
    local name=$1 seconds=$2 file=$3 ticks; shift 3
    ticks=$(edge_ticks)
    case $name in
        healthz) "${WRK[@]}" -d"${seconds}s" -s "$HERE/wrk/report.lua" "$BASE/healthz" ;;
        popular) "${WRK[@]}" -d"${seconds}s" -s "$HERE/wrk/report.lua" "$BASE/api/v1/tracks/popular?limit=20" ;;
        track) "${WRK[@]}" -d"${seconds}s" -s "$HERE/wrk/ids.lua" "$BASE" -- "$OUT/ids.txt" ;;
        search) "${WRK[@]}" -d"${seconds}s" -s "$HERE/wrk/search.lua" "$BASE" -- "$1" "$THREADS" ;;
    esac > "$file" 2>&1 || { cat "$file" >&2; edge_alive; die "wrk failed for $name"; }
    edge_alive
    echo "EDGE_CPU {\"ticks\":$(($(edge_ticks) - ticks)),\"hz\":$HZ}" >> "$file"
    grep '^BENCH_RESULT' "$file" | sed "s/^BENCH_RESULT/  $name/" >&2
}

say "warm-up: 3 s per endpoint (not counted)"
for ep in healthz popular track; do run "$ep" 3 "$OUT/warmup-$ep.txt"; done
run search 3 "$OUT/warmup-search.txt" "$OUT/queries-0.txt"

ENDPOINTS=(healthz popular track search)
for r in $(seq 1 "$ROUNDS"); do
    say "round $r of $ROUNDS: ${DURATION}s per endpoint, -t$THREADS -c$CONNECTIONS"
    for k in 0 1 2 3; do
        # Each round starts one endpoint later, so no endpoint always runs first or last.
        ep=${ENDPOINTS[$(((k + r - 1) % 4))]}
        run "$ep" "$DURATION" "$OUT/r$r-$ep.txt" "$OUT/queries-$r.txt"
        sleep 1
    done
done

timeout 10 curl -fsS "$BASE/metrics" > "$OUT/metrics.txt" || say "could not read /metrics"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"
if grep -q '"level": *"error"' "$OUT/serve.log"; then
    say "edge logged errors during the run (see $OUT/serve.log):"
    grep '"level": *"error"' "$OUT/serve.log" | head -5 >&2
fi
python "$HERE/wrk_summary.py" "$OUT"
say "raw outputs in $OUT"
