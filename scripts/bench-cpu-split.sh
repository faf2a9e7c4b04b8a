#!/usr/bin/env bash
# Where the edge's CPU goes: CPU time per `track` request, user and kernel, by thread group
# (tokio workers, log writer, store appliers), for apex-server and for the bare null-server,
# under the same wrk load, one after the other. Reads utime/stime of every thread from
# /proc/PID/task/*/stat before and after each run (100 Hz ticks: run long enough).
# Exit status 1 if any answer was not 2xx (the figures would not measure ingest).
# Usage: scripts/bench-cpu-split.sh [SECONDS=20] [CONNECTIONS=256]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"; conns="${2:-256}"
. scripts/bench/prepare.sh
. scripts/bench/servers.sh

# "name utime stime" summed over the threads of each name (fields 14 and 15 of stat).
ticks() { thread_ticks "$1" | awk '{u[$1]+=$2; s[$1]+=$3} END {for (g in u) print g, u[g], s[g]}'; }

measure() { # name pid url
  local before after out requests bad
  before=$(ticks "$2")
  out=$(wrk -t1 -c"$conns" -d"${secs}s" -s scripts/bench/track.lua "$3" 2>&1)
  after=$(ticks "$2")
  requests=$(printf '%s\n' "$out" | awk '/requests in/ {print $1}')
  bad=$(printf '%s\n' "$out" | awk '/Non-2xx/ {print $NF}')
  if [ -n "$bad" ] && [ "$bad" != 0 ]; then echo "FAILED: $1: $bad non-2xx answers" >&2; exit 1; fi
  echo "== $1: $requests requests in ${secs}s, $conns connections; CPU µs per request"
  printf '%-20s %8s %8s %8s\n' threads user kernel total
  join <(echo "$before" | sort) <(echo "$after" | sort) | awk -v n="$requests" -v hz="$(getconf CLK_TCK)" '
    { u = ($4 - $2) / hz * 1e6 / n; s = ($5 - $3) / hz * 1e6 / n; tu += u; ts += s
      printf "%-20s %8.2f %8.2f %8.2f\n", $1, u, s, u + s }
    END { printf "%-20s %8.2f %8.2f %8.2f\n", "all", tu, ts, tu + ts }'
}
measure apex-server "$server" http://127.0.0.1:18080/api/usage/track
measure null-server "$null" http://127.0.0.1:18090/api/usage/track
