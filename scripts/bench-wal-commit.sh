#!/usr/bin/env bash
# The log's group commits under load, side by side (issue 19): for each BINARY in turn, ROUNDS
# times, a fresh apex-server (its own log) takes WARM seconds of `track` from wrk (64
# connections by default: past the log's first segment, which is created, not prepared), then
# SECONDS more that are measured: requests a second, the mean group commit (append and fsync,
# from apex_pipeline_wal_fsync_seconds), requests per commit, CPU per request (all threads,
# /proc/PID/task/*/stat), wrk's p50 and p99, and apex_pipeline_wal_rolls_total by segment.
# At 64 connections the load is closed loop and partly latency-bound: a shorter commit shows
# as more requests a second when the cores are not the limit.
# Each VARIANT is a binary to run, or NAME=VALUE[,NAME=VALUE...] to run the built apex-server
# with those variables (one binary, two settings: the fairest side by side), for example
#   scripts/bench-wal-commit.sh 20 15 64 3 APEX_WAL_PREALLOCATE=true APEX_WAL_PREALLOCATE=false
# Usage: scripts/bench-wal-commit.sh WARM SECONDS CONNECTIONS ROUNDS VARIANT...
set -euo pipefail
cd "$(dirname "$0")/.."
warm="${1:-20}"; secs="${2:-15}"; conns="${3:-64}"; rounds="${4:-3}"; shift $(($# < 4 ? $# : 4))
. scripts/bench/prepare.sh
variants=("$@"); [ ${#variants[@]} -gt 0 ] || variants=("$bin/apex-server")
APEX_BENCH_KEY=$(bench_key Commit)
export APEX_BENCH_KEY
ticks() { thread_ticks "$1" | awk '{t += $2 + $3} END {print t + 0}'; }
metric() { curl -s "127.0.0.1:$1/metrics" | awk -v k="$2" '$1 == k {print $2}'; }
load() { wrk -t1 -c"$conns" -d"$2s" --latency -s scripts/bench/track.lua "http://127.0.0.1:$1/api/usage/track" 2>&1; }
port=18700; pid=""; wal=""
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$wal"' EXIT
for round in $(seq 1 "$rounds"); do
  for variant in "${variants[@]}"; do
    port=$((port + 1)); wal=$(mktemp -d -p "${APEX_BENCH_WAL_PARENT:-/var/cache/apex}")
    binary="$variant"; settings=()
    case "$variant" in *=*) binary="$bin/apex-server"; IFS=, read -r -a settings <<< "$variant" ;; esac
    # The variant's settings come last, so they win.
    env APEX_LISTEN=127.0.0.1:$port APEX_JWT_SECRET=bench-secret-bench-secret-bench-secret APEX_LOG=warn \
      APEX_CUSTOMER_RATE_LIMIT=1000000000 APEX_CUSTOMER_RATE_BURST=1000000000 APEX_WAL_DIR="$wal" \
      ${settings[@]+"${settings[@]}"} "$binary" & pid=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null "127.0.0.1:$port/readyz" && break; sleep 0.1; done
    load "$port" "$warm" >/dev/null
    c0=$(metric "$port" apex_pipeline_wal_fsync_seconds_count); s0=$(metric "$port" apex_pipeline_wal_fsync_seconds_sum)
    t0=$(ticks "$pid")
    out=$(load "$port" "$secs")
    c1=$(metric "$port" apex_pipeline_wal_fsync_seconds_count); s1=$(metric "$port" apex_pipeline_wal_fsync_seconds_sum)
    t1=$(ticks "$pid")
    rolls=$(curl -s "127.0.0.1:$port/metrics" | grep '^apex_pipeline_wal_rolls_total' | tr '\n' ' ' || true)
    requests=$(printf '%s\n' "$out" | awk '/requests in/ {print $1}')
    p50=$(printf '%s\n' "$out" | awk '$1 == "50%" {print $2}'); p99=$(printf '%s\n' "$out" | awk '$1 == "99%" {print $2}')
    echo "$c0 $c1 $s0 $s1 $requests $t0 $t1" | awk -v name="$variant" -v round="$round" -v secs="$secs" \
      -v hz="$(getconf CLK_TCK)" -v p50="$p50" -v p99="$p99" -v rolls="$rolls" '
      { printf "round %s  %-40s %7.0f req/s  commit mean %.3f ms  %5.1f req/commit  CPU %6.2f µs/req  p50 %s  p99 %s  %s\n",
          round, name, $5 / secs, ($4 - $3) / ($2 - $1) * 1e3, $5 / ($2 - $1), ($7 - $6) / hz * 1e6 / $5, p50, p99, rolls }'
    kill "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$wal"
  done
done
