# Sourced by the bench scripts: wrk, the local stack and its variables, release binaries in
# $bin, migrated databases, and `bench_customers` (20 customers into a key file).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/apex/target}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
scripts/stack.sh up >/dev/null
eval "$(scripts/stack.sh env)"
cargo build --release --quiet --bin apex-server --bin apexctl --bin apex-loadtest
bin="$CARGO_TARGET_DIR/release"
"$bin/apexctl" migrate >/dev/null

# bench_customers LABEL FILE: 20 `scale` customers, "LABEL 1" to "LABEL 20", appended to FILE
# one `apexctl customers create --json` line each (apex-loadtest's --keys-file).
bench_customers() {
  local i
  for i in $(seq 1 20); do
    "$bin/apexctl" customers create --name "$1 $i" --email "bench+$i@example.com" --plan scale --json >>"$2"
    echo >>"$2"
  done
}

# thread_ticks PID: one line per thread, "name utime stime" (fields 2, 14 and 15 of
# /proc/PID/task/TID/stat, in clock ticks), for the CPU-per-request scripts.
thread_ticks() {
  local f
  for f in /proc/"$1"/task/*/stat; do
    sed -E 's/^[0-9]+ \((.*)\) [A-Za-z] (([^ ]+ ){10})([0-9]+) ([0-9]+).*/\1 \4 \5/' "$f" 2>/dev/null
  done
}

# bench_key LABEL: creates the customer "LABEL <unix time>" and prints its API key.
bench_key() {
  "$bin/apexctl" customers create --name "$1 $(date +%s)" --email bench@example.com --json |
    sed -E 's/.*"api_key":"([^"]+)".*/\1/'
}
