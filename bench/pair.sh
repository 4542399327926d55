#!/usr/bin/env bash
# Two loads at the same moment: a ratio this machine's noise does not move much. Two `edge serve`
# processes share CPU 0 (the kernel gives each half), each with its own wrk on CPU 1, started
# together; a round gives each side's Edge CPU per request over the same seconds, so a slow
# stretch of the machine slows both sides alike. Rounds run back to back, their ratios are
# printed one by one and as a median. (Runs of one load after the other, minutes or even
# seconds apart, moved by up to 40% here; these ratios, by a few percent.)
#
#   A=healthz B=track bash bench/pair.sh                    # the catalog target (issue 2)
#   A=healthz B=redirect bash bench/pair.sh                 # the /play redirect target (issue 3)
#   A=healthz B=healthz B_ENV="EDGE_OBSERVE=false EDGE_LOG_LEVEL=WARNING" A_ENV=EDGE_LOG_LEVEL=INFO \
#       bash bench/pair.sh                                  # metrics and logging (issue 4)
#   A=track B=track B_CODE=/tmp/old bash bench/pair.sh      # this code against another checkout
#   AT_ONCE=0 A=healthz B=track bash bench/pair.sh          # each side alone on CPU 0, in turns
#
# Loads: healthz; track (GET /api/v1/tracks/{id} over the hot ids, warm cache); popular
# (GET /api/v1/tracks/popular); redirect (GET /play/{id}, USERS player tokens, local signer);
# proxy (GET /play/{id}?mode=proxy&format=flac, hifi tokens, a RANGE_BYTES range at a random
# offset: the side proxies from its own /media, so its CPU counts both ends); media (the same
# ranges of signed /media URLs of the FLACs directly).
# A_CODE/B_CODE: the checkout whose edge/ package a side runs (default this one); A_ENV/B_ENV:
# its extra environment (words NAME=VALUE); A_SERVE/B_SERVE=floor: the side runs bench/floor.py
# (Edge with the track and /play handlers cut down to the least they must do; this checkout's
# script over the side's edge/) instead of `edge serve`. Between rounds the sides swap which wrk starts
# first. The catalog is $BENCH_DB (default edge_bench: bench/catalog.sh makes it; SEED=N makes a
# small one here instead, e.g. SEED=2000). Needs wrk, PostgreSQL and Redis (BENCH_PG,
# BENCH_REDIS: default the local ones), and 2+ CPUs.
# AT_ONCE=0: in each round the sides run one after the other, each with CPU 0 to itself (as one
# worker per core is deployed), and their req/s ratio is printed too; they still share the
# machine's slower swings, which the at-once rounds cancel better, but not one core's caches.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 2; }
A=${A:-healthz} B=${B:-track}
ROUNDS=${ROUNDS:-6} DURATION=${DURATION:-5} AT_ONCE=${AT_ONCE:-1} CONNECTIONS=${CONNECTIONS:-32} USERS=${USERS:-500}
RANGE_BYTES=${RANGE_BYTES:-1048576}
BENCH_DB=${BENCH_DB:-edge_bench}
export DATABASE_URL=${BENCH_PG:-postgresql://postgres@127.0.0.1:5432}/$BENCH_DB
export REDIS_URL=${BENCH_REDIS:-redis://127.0.0.1:6379/0}
export EDGE_JWT_SECRET=pair-bench-secret-0123456789abcdef EDGE_MEDIA_SECRET=pair-bench-media-0123456789
export EDGE_STREAM_LIMITS=free=100000,premium=100000,hifi=100000 EDGE_LOG_FORMAT=json
export EDGE_DATA_DIR=${EDGE_DATA_DIR:-$here/bench/out/pair/data}
python=$(python3 -c 'import sys; print(sys.executable)')
out=bench/out/pair
mkdir -p "$out"
if [[ -n ${SEED:-} ]]; then
    psql -qX "${BENCH_PG:-postgresql://postgres@127.0.0.1:5432}/postgres" \
        -c "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" -c "CREATE DATABASE $BENCH_DB"
    "$python" -m edge migrate >"$out/seed.log" 2>&1 || { cat "$out/seed.log" >&2; exit 1; }
    "$python" -m edge seed --tracks "$SEED" --audio 2 >>"$out/seed.log" 2>&1 \
        || { cat "$out/seed.log" >&2; exit 1; }
fi
# Hot ids (tracks with renditions, so a redirect has something to sign) and player tokens.
psql -XAtq "$DATABASE_URL" -c "SELECT id FROM tracks WHERE id IN (SELECT track_id FROM renditions)
    ORDER BY random() LIMIT 1000" >"$out/ids.txt"
[[ -s $out/ids.txt ]] || { echo "no tracks in $BENCH_DB: run bench/catalog.sh, or SEED=2000" >&2; exit 2; }
awk '{print "/play/" $1}' "$out/ids.txt" >"$out/paths-redirect.txt"
awk '{print "/api/v1/tracks/" $1}' "$out/ids.txt" >"$out/paths-track.txt"
echo /healthz >"$out/paths-healthz.txt"
# FLACs for the proxy and media loads, and the range starts that fit in the smallest.
psql -XAtq -F ' ' "$DATABASE_URL" -c "SELECT track_id, object_key, bytes FROM renditions
    WHERE format = 'flac' ORDER BY random() LIMIT 1000" >"$out/flac.txt"
awk '{print "/play/" $1 "?mode=proxy&format=flac"}' "$out/flac.txt" >"$out/paths-proxy.txt"
max_start=$(( $(awk '{print $3}' "$out/flac.txt" | sort -n | head -1) - RANGE_BYTES ))
if [[ " $A $B " == *" proxy "* || " $A $B " == *" media "* ]] && (( max_start < 0 )); then
    echo "the smallest FLAC in $BENCH_DB is shorter than RANGE_BYTES=$RANGE_BYTES" >&2; exit 2
fi
echo /api/v1/tracks/popular >"$out/paths-popular.txt"
"$python" - "$EDGE_JWT_SECRET" "$USERS" "$out/players.txt" <<'PY'
import sys
from edge.auth import issue
secret, users, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(path.replace("players", "hifi"), "w") as f:
    for i in range(users):
        f.write(issue(secret, f"pair-hifi-{i}", "hifi", 7200) + "\n")
formats = ["", "format=aac", "format=mp3,aac", "format=flac,aac"]
with open(path, "w") as f:
    for i in range(users):
        tier, query = ("free", "premium", "hifi")[i % 3], formats[(i // 3) % len(formats)]
        f.write(issue(secret, f"pair-{i}", tier, 7200) + (f" {query}" if query else "") + "\n")
PY
"$python" - "$EDGE_MEDIA_SECRET" "$out/flac.txt" "$out/paths-media.txt" <<'PY'
import sys, time
from edge.signing import LocalSigner
signer, expires = LocalSigner(sys.argv[1].encode()), int(time.time()) + 7200
with open(sys.argv[3], "w") as f:
    for line in open(sys.argv[2]):
        f.write(signer.sign(f"/media/{line.split()[1]}", expires) + "\n")
PY

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A port pid load
load[A]=$A load[B]=$B
cleanup() {
    for p in ${pid[@]+"${pid[@]}"}; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # This run's Redis keys (sessions live an hour: a day of runs would leave millions, and
    # every SCAN on that Redis, the tests' included, would wade through them).
    timeout 120 "$python" - "$REDIS_URL" "pair-A-$$:" "pair-B-$$:" <<'PY' || true
import sys, redis
r = redis.Redis.from_url(sys.argv[1])
for prefix in sys.argv[2:]:
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    for i in range(0, len(keys), 500):
        r.unlink(*keys[i:i + 500])
PY
}
trap cleanup EXIT
for side in A B; do
    code_var=${side}_CODE env_var=${side}_ENV serve_var=${side}_SERVE
    code=${!code_var:-$here}
    serve=(-m edge serve)
    [[ ${!serve_var:-} == floor ]] && serve=("$here/bench/floor.py")
    port[$side]=$(free_port)
    # shellcheck disable=SC2086  # the variables are words on purpose
    # (One worker: the CPU counted is this process's own.)
    # (PYTHONPATH: a script's own folder, not the working directory, comes first on its path,
    # and the installed edge may be any checkout's.)
    (cd "$code" && exec env PYTHONPATH="$code" EDGE_LOG_LEVEL=WARNING ${!env_var:-} EDGE_WORKERS=1 EDGE_PORT="${port[$side]}" \
        EDGE_REDIS_KEY_PREFIX="pair-$side-$$:" taskset -c 0 "$python" "${serve[@]}") \
        >"$out/$side.log" 2>&1 &
    pid[$side]=$!
done
warm() {  # side: every hot track once, so track, redirect and proxy loads hit a warm cache
    "$python" - "http://127.0.0.1:${port[$1]}" "$out/ids.txt" "$out/flac.txt" <<'PY'
import sys, urllib.request
base, ids = sys.argv[1], open(sys.argv[2]).read().split()
ids += [line.split()[0] for line in open(sys.argv[3])]  # (the proxy load's tracks)
for track in dict.fromkeys(ids):
    urllib.request.urlopen(f"{base}/api/v1/tracks/{track}").read()
urllib.request.urlopen(f"{base}/api/v1/tracks/popular").read()
PY
}
for side in A B; do
    for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:${port[$side]}/healthz" >/dev/null && break; sleep 0.1; done
    warm "$side"
done
wrk_run() {  # side seconds: prints the number of requests wrk completed
    local paths=$out/paths-${load[$1]}.txt tokens=- ranges=() text
    [[ ${load[$1]} == redirect ]] && tokens=$out/players.txt
    [[ ${load[$1]} == proxy ]] && tokens=$out/hifi.txt
    [[ ${load[$1]} == proxy || ${load[$1]} == media ]] && ranges=("$RANGE_BYTES" "$max_start")
    text=$(taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"$2s" -s bench/play/wrk/rotate.lua \
        "http://127.0.0.1:${port[$1]}" -- "$paths" "$tokens" ${ranges[@]+"${ranges[@]}"})
    if grep -qE "Non-2xx|Socket errors" <<<"$text"; then  # (a 302 is not one)
        echo "side $1 (${load[$1]}): error responses or socket errors" >&2; echo "$text" >&2; exit 1
    fi
    awk '/requests in/ {print $1}' <<<"$text"
}
ticks() { awk '{print $14 + $15}' "/proc/${pid[$1]}/stat"; }
: >"$out/rounds.txt"
for r in $(seq 1 "$ROUNDS"); do
    first=A second=B
    (( r % 2 == 0 )) && first=B second=A
    a0=$(ticks A) b0=$(ticks B)
    if (( AT_ONCE )); then
        wrk_run "$first" "$DURATION" >"$out/n-$first" &
        w=$!
        wrk_run "$second" "$DURATION" >"$out/n-$second"
        wait "$w"
    else
        wrk_run "$first" "$DURATION" >"$out/n-$first"
        wrk_run "$second" "$DURATION" >"$out/n-$second"
    fi
    a1=$(ticks A) b1=$(ticks B)
    echo "$r $(cat "$out/n-A") $((a1 - a0)) $(cat "$out/n-B") $((b1 - b0))" | tee -a "$out/rounds.txt"
done
"$python" - "$out/rounds.txt" "$A${A_ENV:+ [$A_ENV]}${A_CODE:+ @$A_CODE}${A_SERVE:+ ($A_SERVE)}" \
    "$B${B_ENV:+ [$B_ENV]}${B_CODE:+ @$B_CODE}${B_SERVE:+ ($B_SERVE)}" "$(getconf CLK_TCK)" "$AT_ONCE" "$DURATION" <<'PY'
import statistics, sys
rows = [list(map(int, line.split())) for line in open(sys.argv[1]) if line.strip()]
name_a, name_b, hz = sys.argv[2], sys.argv[3], int(sys.argv[4])
at_once, seconds = sys.argv[5] != "0", float(sys.argv[6])
cost = lambda n, t: t * 1e6 / hz / n  # Edge CPU µs per request
ratios = []
for r, na, ta, nb, tb in rows:
    ca, cb = cost(na, ta), cost(nb, tb)
    ratios.append(ca / cb)
    print(f"round {r}: A {na / ta * hz:.0f} req per CPU-second ({ca:.1f} µs), "
          f"B {nb / tb * hz:.0f} ({cb:.1f} µs): B/A throughput per CPU {ca / cb:.1%}")
print(f"A = {name_a}\nB = {name_b}")
print(f"A: {statistics.median(cost(r[1], r[2]) for r in rows):.1f} µs CPU/request, "
      f"B: {statistics.median(cost(r[3], r[4]) for r in rows):.1f} (medians)")
when = "same seconds" if at_once else "each alone on CPU 0, in turns"
print(f"B's throughput as a share of A's (per CPU second, {when}): "
      f"median {statistics.median(ratios):.1%}, rounds {min(ratios):.1%}..{max(ratios):.1%}")
if not at_once:  # each side had the core to itself: wrk's req/s are each side's throughput
    rps = [nb / na for _, na, _, nb, _ in rows]
    print(f"req/s: A {statistics.median(r[1] for r in rows) / seconds:.0f}, "
          f"B {statistics.median(r[3] for r in rows) / seconds:.0f} (medians); B/A per round: "
          f"median {statistics.median(rps):.1%}, rounds {min(rps):.1%}..{max(rps):.1%}")
PY
