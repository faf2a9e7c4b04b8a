#!/usr/bin/env bash
# Email queue throughput: N `email.welcome` events (default 30,000: a day's emails for 10,000
# customers) drained by ONE `apexctl email process` (release build, the file provider) in a
# fresh database of the stack, ROUNDS times (default 3), each round once with one send in
# flight and once with the default four, side by side; prints events per second of each run,
# the medians and their ratio. The goal (issue 15): 30,000 events in under a minute (500/s).
# Usage: scripts/bench-email.sh [N] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-30000}
rounds=${2:-3}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/apex/target}"
cargo build --release --quiet -p apexctl
apexctl="$CARGO_TARGET_DIR/release/apexctl"
scripts/stack.sh up >/dev/null
eval "$(scripts/stack.sh env)"
base_url=$DATABASE_URL

# One run: a fresh database with N events, drained with $1 sends in flight; prints events/s.
run() {
  local concurrency=$1 db="apex_bench_email_$$_$2" mail url start end sent files rate
  mail=$(mktemp -d)
  psql "$base_url" -qc "CREATE DATABASE $db"
  url="${base_url%/*}/$db"
  DATABASE_URL=$url "$apexctl" migrate >/dev/null
  psql "$url" -qc "INSERT INTO events (event_type, data, created_at)
    SELECT 'email.welcome', jsonb_build_object('to', 'c' || n || '@example.com',
           'customer_id', 'cus_' || n, 'plan_type', 'starter', 'api_key_prefix', 'rsk_AbC12345'),
           now() FROM generate_series(1, $n) n"
  start=$(date +%s.%N)
  DATABASE_URL=$url EMAIL_PROVIDER=file EMAIL_FILE_DIR=$mail \
    "$apexctl" email process --concurrency "$concurrency" --json >"$mail/report.json"
  end=$(date +%s.%N)
  sent=$(python3 -c "import json; print(json.load(open('$mail/report.json'))['sent'])")
  files=$(find "$mail" -name '*.eml' | wc -l)
  rate=$(python3 -c "print(round($sent / ($end - $start)))")
  echo "  concurrency $concurrency: $sent sent ($files files) in $(python3 -c "print(round($end - $start, 1))") s: $rate events/s" >&2
  rm -rf "$mail"
  psql "$base_url" -qc "DROP DATABASE $db"
  echo "$rate"
}

one=() four=()
for round in $(seq 1 "$rounds"); do
  echo "round $round" >&2
  one+=("$(run 1 "${round}a")")
  four+=("$(run 4 "${round}b")")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m1=$(median "${one[@]}")
m4=$(median "${four[@]}")
echo "email queue, one worker, file provider, $n events: median $m1 events/s with 1 send in flight, $m4 with 4 (ratio $(python3 -c "print(round($m4 / $m1, 2))")); goal 500/s"
