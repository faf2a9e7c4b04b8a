#!/usr/bin/env bash
# Edge throughput, side by side in one run: `POST /api/usage/track` on apex-server (with the
# durable Postgres pipeline) against apex-loadtest's null-server (reads the body, answers
# 200), same wrk client, alternating, ROUNDS times; prints each run and the medians; then
# ROUNDS runs of apex-server at half its median rate (paced connections), with their p99.
# Exit status 1 if any apex-server answer was not 2xx (the figures would not measure ingest).
# Usage: scripts/bench-edge.sh [ROUNDS=3] [SECONDS=15] [CONNECTIONS=64]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"; secs="${2:-15}"; conns="${3:-64}"
. scripts/bench/prepare.sh
. scripts/bench/servers.sh

run() { # name url -> "rps p50 p99"
  wrk -t1 -c"$conns" -d"${secs}s" --latency -s scripts/bench/track.lua "$2" 2>&1 |
    awk -v name="$1" '/Requests\/sec/ {rps=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /Non-2xx/ {bad=$NF}
      END {printf "%s %s %s %s %s\n", name, rps, p50, p99, (bad==""?0:bad)}'
}
results=$(mktemp)
for i in $(seq 1 "$rounds"); do
  run null-server http://127.0.0.1:18090/api/usage/track | tee -a "$results"
  run apex-track http://127.0.0.1:18080/api/usage/track | tee -a "$results"
done
echo "-- medians of $rounds runs, ${secs}s each, $conns connections, wrk 1 thread, $(nproc) cores"
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
null_rps=$(awk '$1=="null-server"{print $2}' "$results" | median)
apex_rps=$(awk '$1=="apex-track"{print $2}' "$results" | median)
echo "null-server req/s: $null_rps  p99: $(awk '$1=="null-server"{print $4}' "$results" | tr '\n' ' ')"
echo "apex-track  req/s: $apex_rps  p99: $(awk '$1=="apex-track"{print $4}' "$results" | tr '\n' ' ')  non-2xx: $(awk '$1=="apex-track"{print $5}' "$results" | tr '\n' ' ')"
awk -v a="$apex_rps" -v n="$null_rps" 'BEGIN {printf "ratio apex/null: %.2f\n", a/n}'

# Half load: 64 connections, each pausing so that together they offer half the median rate.
delay_ms=$(awk -v r="$apex_rps" -v c="$conns" 'BEGIN {printf "%d", c * 1000 / (r / 2)}')
for i in $(seq 1 "$rounds"); do
  APEX_BENCH_DELAY_MS=$delay_ms wrk -t1 -c"$conns" -d"${secs}s" --latency -s scripts/bench/track_paced.lua \
    http://127.0.0.1:18080/api/usage/track 2>&1 |
    awk '/Requests\/sec/ {rps=$2} /^ +99%/ {p99=$2} /Non-2xx/ {bad=$NF}
      END {printf "half-load %s %s %s\n", rps, p99, (bad==""?0:bad)}' | tee -a "$results"
done
echo "apex-track at half load (${delay_ms} ms pause per connection): req/s $(awk '$1=="half-load"{print $2}' "$results" | tr '\n' ' ') p99 $(awk '$1=="half-load"{print $3}' "$results" | tr '\n' ' ')"
bad=$(awk '($1=="apex-track" || $1=="half-load") {s += $NF} END {print s + 0}' "$results")
if [ "$bad" != 0 ]; then echo "FAILED: $bad non-2xx answers from apex-server" >&2; exit 1; fi
