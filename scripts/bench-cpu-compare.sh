#!/usr/bin/env bash
# CPU time per `track` request of several apex-server builds and the null server, side by
# side: ROUNDS rounds, each running every binary then null-server in turn under the same wrk
# load (1 thread, CONNECTIONS connections, SECONDS each), one server at a time. For each run:
# requests, req/s, CPU µs per request (user and kernel, all threads, from
# /proc/PID/task/*/stat) and context switches per request (/proc/PID/task/*/status). Compare
# builds by copying target/release/apex-server aside before a change.
# Exit status 1 if any answer was not 2xx (the figures would not measure ingest).
# Usage: scripts/bench-cpu-compare.sh [SECONDS=10] [CONNECTIONS=256] [ROUNDS=3] [BINARY...]
# (default binary: the release apex-server just built).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"; conns="${2:-256}"; rounds="${3:-3}"; shift $(($# < 3 ? $# : 3))
. scripts/bench/prepare.sh
binaries=("$@"); [ ${#binaries[@]} -gt 0 ] || binaries=("$bin/apex-server")
APEX_BENCH_KEY=$(bench_key CPU)
export APEX_BENCH_KEY

# "utime stime" summed over every thread (fields 14 and 15 of stat), in clock ticks.
ticks() { thread_ticks "$1" | awk '{u += $2; s += $3} END {print u + 0, s + 0}'; }
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s + 0}'; }
# Minor page faults of the whole process (field 10 of /proc/PID/stat): memory the allocator
# gave back and touched again, or touched for the first time.
faults() { sed -E 's/^[0-9]+ \(.*\) [A-Za-z] (([^ ]+ ){6})([0-9]+).*/\3/' /proc/"$1"/stat; }

measure() { # name pid port
  local before after cs_before cs_after pf_before pf_after out requests bad
  before=$(ticks "$2"); cs_before=$(switches "$2"); pf_before=$(faults "$2")
  out=$(wrk -t1 -c"$conns" -d"${secs}s" -s scripts/bench/track.lua "http://127.0.0.1:$3/api/usage/track" 2>&1)
  after=$(ticks "$2"); cs_after=$(switches "$2"); pf_after=$(faults "$2")
  requests=$(printf '%s\n' "$out" | awk '/requests in/ {print $1}')
  bad=$(printf '%s\n' "$out" | awk '/Non-2xx/ {print $NF}')
  if [ -n "$bad" ] && [ "$bad" != 0 ]; then echo "FAILED: $1: $bad non-2xx answers" >&2; exit 1; fi
  echo "$before $after $requests $cs_before $cs_after $pf_before $pf_after" | awk -v name="$1" -v secs="$secs" -v hz="$(getconf CLK_TCK)" '
    { u = ($3 - $1) / hz * 1e6 / $5; s = ($4 - $2) / hz * 1e6 / $5
      printf "%-40s %9d req %8.0f req/s  CPU %6.2f µs/req (user %5.2f, kernel %5.2f)  %.3f switches/req  %.3f faults/req\n",
        name, $5, $5 / secs, u + s, u, s, ($7 - $6) / $5, ($9 - $8) / $5 }'
}

port=18400
for round in $(seq 1 "$rounds"); do
  echo "-- round $round"
  for binary in "${binaries[@]}" null-server; do
    port=$((port + 1)); wal=$(mktemp -d)
    if [ "$binary" = null-server ]; then
      "$bin/apex-loadtest" null-server --listen 127.0.0.1:$port 2>/dev/null & pid=$!
    else
      APEX_LISTEN=127.0.0.1:$port APEX_JWT_SECRET=bench-secret-bench-secret-bench-secret APEX_LOG=warn \
        APEX_CUSTOMER_RATE_LIMIT=1000000000 APEX_CUSTOMER_RATE_BURST=1000000000 APEX_WAL_DIR="$wal" \
        "$binary" & pid=$!
    fi
    trap 'kill $pid 2>/dev/null || true; rm -rf "$wal"' EXIT
    for _ in $(seq 1 100); do curl -s -o /dev/null "127.0.0.1:$port/readyz" && break; sleep 0.1; done
    measure "$binary" "$pid" "$port"
    kill "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$wal"
  done
done
