#!/usr/bin/env bash
# /play benchmark: the targets of issue 3, measured side by side in one run.
#
# Creates a fresh database $BENCH_DB, migrates it, seeds $TRACKS tracks with $AUDIO sets of real
# renditions (media in a temp dir), adds a few long tracks (one long FLAC) for the slow clients,
# and starts, each on a free port with its own Redis key prefix:
#   a: edge serve, local signer, proxying from its own local origin /media (the default)
#   b: edge serve, CloudFront signer (RSA-2048 key made here, CDN_DOMAIN=cdn.example.com;
#      redirect mode never contacts the CDN)
#   c: edge serve, proxying from nginx (EDGE_CDN_URL=nginx): "a CDN in front"
#   nginx: its own instance (config from bench/play/nginx.conf.template, temp dir, one worker)
#      serving the same media folder.
# With PIN=1 (default, 2+ CPUs) every server (a, b, c, nginx) runs on CPU 0, and wrk and the
# client scripts on CPU 1; PostgreSQL and Redis run where the kernel puts them.
#
# 1. /healthz vs /play redirect (a and b), interleaved rounds; signatures per request from
#    edge_signed_urls_total{result=signed|cached} before/after each run.
# 2. Proxy mode, 1 MiB ranges, $CONNECTIONS connections: /play?mode=proxy on a, nginx directly,
#    a's /media directly, /play?mode=proxy on c; interleaved rounds.
# 3. $SLOW_CLIENTS concurrent slow clients in proxy mode on a (own origin) and on c (nginx):
#    Edge's RSS before and while connected; concurrency checked (in-flight gauge, ss).
# 4. /metrics scrape time before and with $SESSIONS active sessions (on a).
# Then py-spy profiles of a redirect run and a proxy run (PROFILE=1, if py-spy is installed).
# With BASELINE=/path/to/another/checkout, two more servers run that checkout's edge: d (same
# settings as c: proxying from nginx) and e (same as a: its own /media), and step 2 adds their
# runs, proxy-nginx-baseline, proxy-local-baseline and media-baseline, to the same interleaved
# rounds: a before/after of a change, side by side in one run.
#
#   bash bench/play.sh                          # the full run, ~11 min
#   DURATION=5 ROUNDS=2 SLOW_HOLD=10 bash bench/play.sh    # a quick look
#   STEPS=3 TRACKS=200 AUDIO=1 bash bench/play.sh            # only the slow clients (~2 min)
#
# Needs wrk and nginx (Debian: apt-get update && apt-get install -y wrk nginx), psql, curl,
# openssl, ss, taskset, `edge` on PATH (pip install -e .). Raw outputs go to $OUT (bench/out/
# is gitignored). Everything it starts is stopped on exit; its Redis keys and the database are
# deleted (KEEP_DB=1 keeps the database).
set -euo pipefail

BENCH_PG=${BENCH_PG:-postgresql://postgres@127.0.0.1:5432}
BENCH_REDIS=${BENCH_REDIS:-redis://127.0.0.1:6379/0}
BENCH_DB=${BENCH_DB:-edge_play_bench}
TRACKS=${TRACKS:-10000}
AUDIO=${AUDIO:-4}
DURATION=${DURATION:-8}           # seconds per wrk run
ROUNDS=${ROUNDS:-5}
WARMUP=${WARMUP:-3}               # seconds per run before the rounds (not counted)
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
USERS=${USERS:-500}               # player tokens (distinct users) for wrk
HOT_IDS=${HOT_IDS:-1000}          # track ids wrk rotates over
RANGE_BYTES=${RANGE_BYTES:-1048576}
SLOW_CLIENTS=${SLOW_CLIENTS:-1000}
SLOW_RATE=${SLOW_RATE:-4096}      # bytes a second per slow client
SLOW_HOLD=${SLOW_HOLD:-30}        # seconds sampled while all are connected
LONG_SECONDS=${LONG_SECONDS:-240} # length of the long FLAC the slow clients read
SESSIONS=${SESSIONS:-10000}
SCRAPES=${SCRAPES:-50}
PIN=${PIN:-1}
PROFILE=${PROFILE:-1}
STEPS=${STEPS:-1234}              # which of the numbered steps below to run
BASELINE=${BASELINE:-}            # another checkout of this repository, for servers d and e
KEEP_DB=${KEEP_DB:-0}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-1500}   # the whole run, seconds

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PLAY=$HERE/play
# This repository's edge, whatever `pip install -e` points the `edge` command at (on a machine
# with another clone installed, the console script would otherwise import that clone).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$HERE/out/play-$(date -u +%Y%m%dT%H%M%SZ)}
DB_URL="${BENCH_PG%/}/$BENCH_DB"
RAND=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
PREFIX="playbench:$RAND:"

exec 3>&2
say() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&3; }
die() { say "error: $*"; exit 1; }

# -- prerequisites ------------------------------------------------------------------------------
command -v wrk >/dev/null || die "wrk is not installed: apt-get update && apt-get install -y wrk"
NGINX=$(command -v nginx || true)
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
[[ -n $NGINX ]] || die "nginx is not installed: apt-get update && apt-get install -y nginx
  (this script runs its own nginx instance from a temp dir; the system service is not used)"
for cmd in psql curl edge python timeout openssl ss; do
    command -v "$cmd" >/dev/null || die "$cmd is not on PATH"
done
PY=$(python -c 'import sys; print(sys.executable)')   # the interpreter itself, not a shim
"$PY" -c 'import edge, aiohttp, asyncpg, redis' || die "edge is not installed: pip install -e ."
from=$(cd / && "$PY" -c 'import edge; print(edge.__file__)')
[[ $from == "$REPO/edge/__init__.py" ]] || die "python imports edge from $from, not $REPO/edge"
if [[ $PIN == 1 ]] && { ! command -v taskset >/dev/null || (($(nproc) < 2)); }; then
    say "taskset missing or fewer than 2 CPUs: not pinning"
    PIN=0
fi
SRV=() CLI=()
if [[ $PIN == 1 ]]; then SRV=(taskset -c 0) CLI=(taskset -c 1); fi
if [[ $PROFILE == 1 ]] && ! command -v py-spy >/dev/null; then
    say "py-spy not installed (pip install py-spy): no profiles"
    PROFILE=0
fi
(($(ulimit -n) >= 4 * SLOW_CLIENTS)) || ulimit -n $((4 * SLOW_CLIENTS + 1000)) 2>/dev/null \
    || die "open-file limit $(ulimit -n) too low for $SLOW_CLIENTS slow clients"
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/edge-play-bench.XXXXXX)
chmod 755 "$WORK"   # nginx's worker (user nobody) reads the media under it

# -- cleanup of everything this script starts ---------------------------------------------------
declare -A PIDS=()
WATCHDOG_PID=""
stop_pid() {  # stop_pid PID: TERM, wait up to 15 s, KILL
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    exec 1>&3 2>&3
    for name in "${!PIDS[@]}"; do stop_pid "${PIDS[$name]}"; done
    timeout 60 "$PY" - "$BENCH_REDIS" "$PREFIX" <<'EOF' || say "could not delete Redis keys ${PREFIX}*"
import sys, redis
r = redis.Redis.from_url(sys.argv[1])
keys = list(r.scan_iter(match=sys.argv[2] + "*", count=1000))
for i in range(0, len(keys), 500):
    r.unlink(*keys[i:i + 500])
print(f"deleted {len(keys)} Redis keys {sys.argv[2]}*", file=sys.stderr)
EOF
    if [[ $KEEP_DB != 1 ]]; then
        timeout 60 psql -qX "${BENCH_PG%/}/postgres" -c "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" \
            || say "could not drop $BENCH_DB"
    fi
    rm -rf "$WORK"
    if [[ -n $WATCHDOG_PID ]]; then kill "$WATCHDOG_PID" 2>/dev/null || true; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'say "stopped by SIGTERM$([[ -e $OUT/TIMEOUT ]] && echo ": $(cat "$OUT/TIMEOUT")")"; exit 143' TERM

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
    echo "tcp_wmem: $(cat /proc/sys/net/ipv4/tcp_wmem)"
    echo "edge commit: $(git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$HERE/.." diff --quiet HEAD -- edge sql 2>/dev/null || echo ' (edge/ or sql/ modified)')"
    echo "edge imported from: $(cd / && "$PY" -c 'import edge; print(edge.__file__)') (PYTHONPATH=$PYTHONPATH)"
    echo "python: $("$PY" --version 2>&1)"
    echo "aiohttp: $("$PY" -c 'import aiohttp; print(aiohttp.__version__)')"
    echo "wrk: $(wrk --version 2>&1 | head -1 || true)"
    echo "nginx: $("$NGINX" -v 2>&1)"
    echo "postgres: $(timeout 10 psql -XAtq "${BENCH_PG%/}/postgres" -c 'SHOW server_version')"
    echo "redis: $(timeout 10 "$PY" -c "import redis,sys; print(redis.Redis.from_url(sys.argv[1]).info()['redis_version'])" "$BENCH_REDIS")"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "settings: TRACKS=$TRACKS AUDIO=$AUDIO DURATION=$DURATION ROUNDS=$ROUNDS WARMUP=$WARMUP THREADS=$THREADS CONNECTIONS=$CONNECTIONS USERS=$USERS HOT_IDS=$HOT_IDS RANGE_BYTES=$RANGE_BYTES SLOW_CLIENTS=$SLOW_CLIENTS SLOW_RATE=$SLOW_RATE SLOW_HOLD=$SLOW_HOLD LONG_SECONDS=$LONG_SECONDS SESSIONS=$SESSIONS SCRAPES=$SCRAPES PIN=$PIN"
} > "$OUT/env.txt"
cat "$OUT/env.txt" >&2
# The exact code measured: uncommitted changes to edge/ and sql/, if any, are kept with the run.
git -C "$REPO" diff HEAD -- edge sql > "$OUT/edge-uncommitted.diff" 2>/dev/null || true
git -C "$REPO" status --short -- edge sql > "$OUT/edge-status.txt" 2>/dev/null || true

# -- a fresh catalog with real renditions -------------------------------------------------------
export EDGE_DATA_DIR=$WORK/data EDGE_LOG_LEVEL=WARNING EDGE_LOG_FORMAT=json
MEDIA=$WORK/data/media
export DATABASE_URL=$DB_URL
say "creating database $BENCH_DB, seeding $TRACKS tracks with $AUDIO sets of renditions"
timeout 120 psql -qX -v ON_ERROR_STOP=1 "${BENCH_PG%/}/postgres" \
    -c "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" -c "CREATE DATABASE $BENCH_DB"
timeout 120 edge migrate
timeout 600 edge seed --tracks "$TRACKS" --audio "$AUDIO" > "$OUT/seed.log" 2>&1 \
    || { cat "$OUT/seed.log" >&2; die "edge seed failed"; }
tail -1 "$OUT/seed.log" >&2
# Inputs drawn before the long tracks exist: wrk rotates over the seed's tracks only.
timeout 60 psql -XAtq "$DB_URL" -c "SELECT id FROM tracks ORDER BY random() LIMIT $HOT_IDS" > "$OUT/ids.txt"
timeout 60 psql -XAtq -F ' ' "$DB_URL" -c "SELECT DISTINCT ON (object_key) track_id, object_key, bytes
    FROM renditions WHERE format = 'flac' ORDER BY object_key, track_id" > "$OUT/flac.txt"
[[ -s $OUT/flac.txt ]] || die "the seed made no FLAC renditions"
MIN_FLAC=$(awk '{print $3}' "$OUT/flac.txt" | sort -n | head -1)
MAX_START=$((MIN_FLAC - RANGE_BYTES))
((MAX_START >= 0)) || die "the smallest FLAC ($MIN_FLAC bytes) is shorter than RANGE_BYTES=$RANGE_BYTES"
say "adding long tracks (${LONG_SECONDS} s FLAC) for the slow clients"
timeout 300 "$PY" "$PLAY/long_track.py" --dsn "$DB_URL" --media "$MEDIA" \
    --seconds "$LONG_SECONDS" --tracks 4 > "$OUT/long_ids.txt" 2> "$OUT/long_track.log" \
    || { cat "$OUT/long_track.log" >&2; die "long_track.py failed"; }
cat "$OUT/long_track.log" >&2

# -- keys, tokens -------------------------------------------------------------------------------
JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
MEDIA_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export EDGE_JWT_SECRET=$JWT_SECRET
timeout 30 openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/cloudfront.pem" 2>/dev/null \
    || die "openssl could not make an RSA key"
# Players for wrk: USERS tokens, tiers free/premium/hifi in turn, each with its own fixed
# formats (as a real player keeps them); and USERS hifi tokens for FLAC proxying. Made with
# edge.auth.issue, the function `edge token` prints (one process instead of 2 x USERS).
timeout 60 "$PY" - "$JWT_SECRET" "$USERS" "$OUT/players.txt" "$OUT/hifi.txt" <<'EOF'
import sys
from edge.auth import issue
secret, users = sys.argv[1], int(sys.argv[2])
formats = ["", "format=aac", "format=mp3,aac", "format=flac,aac"]
with open(sys.argv[3], "w") as f:
    for i in range(users):
        tier = ("free", "premium", "hifi")[i % 3]
        query = formats[(i // 3) % len(formats)]
        f.write(issue(secret, f"bench-{i}", tier, 7200) + (f" {query}" if query else "") + "\n")
with open(sys.argv[4], "w") as f:
    for i in range(users):
        f.write(issue(secret, f"bench-hifi-{i}", "hifi", 7200) + "\n")
EOF
CLI_TOKEN=$(edge token --user bench-cli --tier premium --ttl 7200)
awk '{print "/play/" $1}' "$OUT/ids.txt" > "$OUT/paths-redirect.txt"
awk '{print "/play/" $1 "?mode=proxy&format=flac"}' "$OUT/ids.txt" > "$OUT/paths-proxy.txt"
awk '{print "/" $2}' "$OUT/flac.txt" > "$OUT/paths-nginx.txt"
echo /healthz > "$OUT/paths-healthz.txt"

# -- servers ------------------------------------------------------------------------------------
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rss_mb() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

NGINX_PORT=$(free_port)
mkdir -p "$WORK/nginx"
sed -e "s#@PREFIX@#$WORK/nginx#g" -e "s#@PORT@#$NGINX_PORT#g" -e "s#@MEDIA@#$MEDIA#g" \
    "$PLAY/nginx.conf.template" > "$WORK/nginx/nginx.conf"
"$NGINX" -t -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" 2> "$OUT/nginx-t.log" \
    || { cat "$OUT/nginx-t.log" >&2; die "nginx config test failed"; }
"${SRV[@]}" "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" \
    > "$OUT/nginx.log" 2>&1 3>&- &
PIDS[nginx_master]=$!
NGINX_BASE="http://127.0.0.1:$NGINX_PORT"

declare -A BASE=()
start_edge() {  # start_edge NAME CHECKOUT ENV...: that checkout's edge (python -m imports from
    local name=$1 code=$2 port; shift 2  # the working directory first, PYTHONPATH after it)
    port=$(free_port)
    (cd "$code" && exec env EDGE_REDIS_KEY_PREFIX="${PREFIX}${name}:" REDIS_URL="$BENCH_REDIS" \
        EDGE_MEDIA_SECRET="$MEDIA_SECRET" \
        EDGE_STREAM_LIMITS=free=100000,premium=100000,hifi=100000 "$@" \
        "${SRV[@]}" "$PY" -m edge serve --host 127.0.0.1 --port "$port") \
        > "$OUT/serve-$name.log" 2>&1 3>&- &
    PIDS[$name]=$!
    BASE[$name]="http://127.0.0.1:$port"
}
start_edge a "$REPO"
start_edge b "$REPO" CDN_DOMAIN=cdn.example.com CLOUDFRONT_KEY_PAIR_ID=K2PLAYBENCH0001 \
    CLOUDFRONT_PRIVATE_KEY_FILE="$WORK/cloudfront.pem"
start_edge c "$REPO" EDGE_CDN_URL="$NGINX_BASE"
SERVERS=(a b c)
if [[ -n $BASELINE ]]; then
    [[ -f $BASELINE/edge/__init__.py ]] || die "BASELINE=$BASELINE is not a checkout of this repository"
    BASELINE=$(cd "$BASELINE" && pwd)
    [[ $(cd "$BASELINE" && "$PY" -c 'import edge; print(edge.__file__)') == "$BASELINE/edge/__init__.py" ]] \
        || die "python -m edge in $BASELINE does not import its own edge/"
    start_edge d "$BASELINE" EDGE_CDN_URL="$NGINX_BASE"
    start_edge e "$BASELINE"
    SERVERS+=(d e)
    echo "baseline (d): $BASELINE at $(git -C "$BASELINE" rev-parse --short HEAD 2>/dev/null || echo '?')" >> "$OUT/env.txt"
fi
for name in "${SERVERS[@]}" nginx_master; do
    for i in $(seq 1 120); do
        kill -0 "${PIDS[$name]}" 2>/dev/null || { tail -20 "$OUT/serve-$name.log" "$OUT/nginx.log" 2>/dev/null >&2; die "$name exited at start"; }
        url=${BASE[$name]:-$NGINX_BASE}/healthz
        [[ $name == nginx_master ]] && url="$NGINX_BASE$(head -1 "$OUT/paths-nginx.txt")"
        curl -fsS --max-time 1 -o /dev/null "$url" 2>/dev/null && break
        ((i < 120)) || die "$name not answering after 60 s"
        sleep 0.5
    done
done
NGINX_WORKER=$(pgrep -P "${PIDS[nginx_master]}" | head -1)
[[ -n $NGINX_WORKER ]] || die "no nginx worker"
say "edge a ${BASE[a]} (local signer, own origin), b ${BASE[b]} (CloudFront key), c ${BASE[c]} (origin nginx), nginx $NGINX_BASE (worker $NGINX_WORKER); Redis prefix $PREFIX"
printf '{"a": %s, "b": %s, "c": %s}\n' "$(rss_mb "${PIDS[a]}")" "$(rss_mb "${PIDS[b]}")" \
    "$(rss_mb "${PIDS[c]}")" > "$OUT/startup.json"
for name in "${SERVERS[@]}"; do timeout 10 curl -fsS "${BASE[$name]}/readyz" > /dev/null || die "$name not ready"; done

# Checks before measuring: `edge token` works, redirect answers 302, proxy answers the exact range.
sample_id=$(head -1 "$OUT/ids.txt")
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $CLI_TOKEN" "${BASE[a]}/play/$sample_id")
[[ $code == 302 ]] || die "/play/$sample_id with an \`edge token\` token answered $code, not 302"
loc=$(curl -s -o /dev/null -w '%{redirect_url}' -H "Authorization: Bearer $CLI_TOKEN" "${BASE[b]}/play/$sample_id")
[[ $loc == https://cdn.example.com/*Key-Pair-Id=K2PLAYBENCH0001* ]] || die "b did not redirect to a CloudFront URL: $loc"
HIFI=$(head -1 "$OUT/hifi.txt")
for name in a c ${BASELINE:+d}; do
    got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' -H "Authorization: Bearer $HIFI" \
        -H "Range: bytes=100-$((100 + RANGE_BYTES - 1))" "${BASE[$name]}/play/$sample_id?mode=proxy&format=flac")
    [[ $got == "206 $RANGE_BYTES" ]] || die "proxy on $name answered '$got', not '206 $RANGE_BYTES'"
done
# Signed /media URLs of the FLACs (the local origin directly), from a's redirects.
while read -r tid key _; do
    loc=$(curl -s -o /dev/null -w '%{redirect_url}' -H "Authorization: Bearer $HIFI" "${BASE[a]}/play/$tid?format=flac")
    [[ $loc == */media/$key\?* ]] || die "redirect for track $tid is not its FLAC: $loc"
    echo "/media/${loc#*/media/}"
done < "$OUT/flac.txt" > "$OUT/paths-media.txt"
for url in "$NGINX_BASE$(head -1 "$OUT/paths-nginx.txt")" "${BASE[a]}$(head -1 "$OUT/paths-media.txt")"; do
    got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' -H "Range: bytes=100-$((100 + RANGE_BYTES - 1))" "$url")
    [[ $got == "206 $RANGE_BYTES" ]] || die "$url answered '$got', not '206 $RANGE_BYTES'"
done

# -- runs ---------------------------------------------------------------------------------------
alive() {
    local name
    for name in "${!PIDS[@]}"; do
        kill -0 "${PIDS[$name]}" 2>/dev/null && continue
        tail -5 "$OUT/serve-$name.log" "$OUT/nginx.log" 2>/dev/null >&3
        die "$name (pid ${PIDS[$name]}) exited during the run"
    done
}
snap() {
    timeout 30 "$PY" "$PLAY/snap.py" "a=${BASE[a]}@${PIDS[a]}" "b=${BASE[b]}@${PIDS[b]}" \
        "c=${BASE[c]}@${PIDS[c]}" ${BASELINE:+"d=${BASE[d]}@${PIDS[d]}" "e=${BASE[e]}@${PIDS[e]}"} "nginx=@$NGINX_WORKER"
}
WRK=(timeout $((DURATION + WARMUP + 60)) "${CLI[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" --timeout 10s --latency -s "$PLAY/wrk/rotate.lua")
run() {  # run NAME SECONDS OUTFILE
    alive
    local name=$1 seconds=$2 file=$3 url args=()
    case $name in
        healthz-local) url=${BASE[a]} args=("$OUT/paths-healthz.txt" -) ;;
        healthz-cloudfront) url=${BASE[b]} args=("$OUT/paths-healthz.txt" -) ;;
        redirect-local) url=${BASE[a]} args=("$OUT/paths-redirect.txt" "$OUT/players.txt") ;;
        redirect-cloudfront) url=${BASE[b]} args=("$OUT/paths-redirect.txt" "$OUT/players.txt") ;;
        proxy-local) url=${BASE[a]} args=("$OUT/paths-proxy.txt" "$OUT/hifi.txt" "$RANGE_BYTES" "$MAX_START") ;;
        proxy-nginx) url=${BASE[c]} args=("$OUT/paths-proxy.txt" "$OUT/hifi.txt" "$RANGE_BYTES" "$MAX_START") ;;
        proxy-nginx-baseline) url=${BASE[d]} args=("$OUT/paths-proxy.txt" "$OUT/hifi.txt" "$RANGE_BYTES" "$MAX_START") ;;
        proxy-local-baseline) url=${BASE[e]} args=("$OUT/paths-proxy.txt" "$OUT/hifi.txt" "$RANGE_BYTES" "$MAX_START") ;;
        media-baseline) url=${BASE[e]} args=("$OUT/paths-media.txt" - "$RANGE_BYTES" "$MAX_START") ;;
        media) url=${BASE[a]} args=("$OUT/paths-media.txt" - "$RANGE_BYTES" "$MAX_START") ;;
        nginx) url=$NGINX_BASE args=("$OUT/paths-nginx.txt" - "$RANGE_BYTES" "$MAX_START") ;;
        *) die "unknown run $name" ;;
    esac
    {
        echo "SNAP_BEFORE $(snap)"
        "${WRK[@]}" -d"${seconds}s" "$url" -- "${args[@]}" || { alive; die "wrk failed for $name"; }
        echo "SNAP_AFTER $(snap)"
    } > "$file" 2>&1 || { cat "$file" >&2; die "run $name failed"; }
    alive
    grep '^BENCH_RESULT' "$file" | sed "s/^BENCH_RESULT/  $name/" | cut -c1-230 >&2
}
phase() {  # phase LABEL RUN...: warm-up, then ROUNDS interleaved rounds, each starting one later
    local label=$1; shift
    local names=("$@") n=$# r k
    say "$label: warm-up ${WARMUP}s per run (not counted)"
    for name in "${names[@]}"; do run "$name" "$WARMUP" "$OUT/warmup-$name.txt"; done
    for r in $(seq 1 "$ROUNDS"); do
        say "$label: round $r of $ROUNDS, ${DURATION}s per run, -t$THREADS -c$CONNECTIONS"
        for k in $(seq 0 $((n - 1))); do
            run "${names[$(((k + r - 1) % n))]}" "$DURATION" "$OUT/r$r-${names[$(((k + r - 1) % n))]}.txt"
            sleep 1
        done
    done
}

# What one signature costs alone (context for "signatures per request").
timeout 60 "${CLI[@]}" "$PY" - "$WORK/cloudfront.pem" > "$OUT/sign-cost.json" <<'EOF'
import json, sys, timeit
from edge.signing import CloudFrontSigner, LocalSigner
cf = CloudFrontSigner("K2PLAYBENCH0001", open(sys.argv[1]).read())
local = LocalSigner(b"k" * 32)
url, exp = "https://cdn.example.com/demo/10001/mp3-320.mp3", 1900000000
n = 300
cf_us = min(timeit.repeat(lambda: cf.sign(url, exp), number=n, repeat=3)) / n * 1e6
local_us = min(timeit.repeat(lambda: local.sign("/media/demo/10001/mp3-320.mp3", exp), number=3000, repeat=3)) / 3000 * 1e6
print(json.dumps({"cloudfront_us": cf_us, "local_us": local_us}))
EOF

step() { [[ $STEPS == *$1* ]]; }
if step 1; then phase "1. redirect" healthz-local redirect-local healthz-cloudfront redirect-cloudfront; fi
if step 2; then phase "2. proxy" proxy-local nginx media proxy-nginx \
    ${BASELINE:+proxy-nginx-baseline proxy-local-baseline media-baseline}; fi

# -- profiles (not counted) ---------------------------------------------------------------------
profile() {  # profile NAME EDGE: py-spy on that Edge during a DURATION-second run
    local name=$1 edge=$2
    run "$name" $((DURATION + 4)) "$OUT/profile-run-$name.txt" &
    local runner=$!
    sleep 2
    timeout $((DURATION + 30)) py-spy record -p "${PIDS[$edge]}" -d "$DURATION" -r 250 -f raw \
        --function --nonblocking -o "$OUT/profile-$name.raw" > "$OUT/profile-$name.log" 2>&1 \
        || say "py-spy failed for $name (see $OUT/profile-$name.log)"
    wait "$runner" || true
    [[ -s $OUT/profile-$name.raw ]] && "$PY" "$PLAY/profile_top.py" "$OUT/profile-$name.raw" 60 > "$OUT/profile-$name.txt"
    return 0
}
if [[ $PROFILE == 1 ]]; then
    say "profiles: py-spy on a during redirect-local (step 1), on c during proxy-nginx (step 2)"
    if step 1; then profile redirect-local a; fi
    if step 2; then profile proxy-nginx c; fi
fi

# -- 3. slow clients ----------------------------------------------------------------------------
slow() {  # slow NAME EDGE
    local name=$1 edge=$2
    alive
    say "3. $SLOW_CLIENTS slow clients (${SLOW_RATE} B/s each) in proxy mode on $edge ($name)"
    timeout $((SLOW_HOLD + 240)) "${CLI[@]}" "$PY" "$PLAY/slow_clients.py" --base "${BASE[$edge]}" \
        --pid "${PIDS[$edge]}" --tokens "$OUT/hifi.txt" --ids "$OUT/long_ids.txt" \
        --count "$SLOW_CLIENTS" --rate "$SLOW_RATE" --hold "$SLOW_HOLD" \
        --json "$OUT/slow-$name.json" > "$OUT/slow-$name.txt" 2>&1 \
        || { tail -5 "$OUT/slow-$name.txt" >&2; die "slow clients failed on $edge"; }
    alive
    "$PY" - "$OUT/slow-$name.json" <<'EOF' >&2
import json, sys
r = json.loads(open(sys.argv[1]).read())
print(f"  RSS before {r['before']['vmrss_mb']} MB, all connected max {r['max_rss_mb']} MB; "
      f"streaming min {r['min_streaming']} of {r['count']}, in flight min {r['min_in_flight']}, "
      f"established min {r['min_established']}; statuses {r['statuses']}; after close "
      f"{r['after_close']['vmrss_mb']} MB")
EOF
    timeout 10 curl -fsS "${BASE[$edge]}/metrics" > "$OUT/metrics-after-slow-$name.txt" || true
}
if step 3; then
    slow local a
    slow nginx c
fi

# -- 4. /metrics with many active sessions ------------------------------------------------------
alive
if step 4; then
    say "4. /metrics scrape time: $SCRAPES scrapes, then $SESSIONS new sessions, then $SCRAPES scrapes"
    timeout 600 "${CLI[@]}" "$PY" "$PLAY/sessions.py" --base "${BASE[a]}" --players "$OUT/players.txt" \
        --ids "$OUT/ids.txt" --sessions "$SESSIONS" --scrapes "$SCRAPES" --json "$OUT/sessions.json" \
        > "$OUT/sessions.txt" 2>&1 || { tail -5 "$OUT/sessions.txt" >&2; die "sessions.py failed"; }
    cut -c1-300 "$OUT/sessions.txt" >&2
fi
timeout 10 curl -fsS "${BASE[a]}/metrics" > "$OUT/metrics-a.txt" || say "could not read /metrics of a"
timeout 10 curl -fsS "${BASE[b]}/metrics" > "$OUT/metrics-b.txt" || say "could not read /metrics of b"
timeout 10 curl -fsS "${BASE[c]}/metrics" > "$OUT/metrics-c.txt" || say "could not read /metrics of c"
alive

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"
for name in a b c; do
    n=$(grep -c '"level": *"error"' "$OUT/serve-$name.log" || true)
    ((n == 0)) || say "edge $name logged $n errors (see $OUT/serve-$name.log), e.g.: $(grep '"level": *"error"' "$OUT/serve-$name.log" | head -1 | cut -c1-300)"
done
"$PY" "$PLAY/summary.py" "$OUT"
say "raw outputs in $OUT"
