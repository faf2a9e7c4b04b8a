#!/usr/bin/env bash
# The hourly usage check (`apexctl alerts check`, the `usage_limits` job's work; release build)
# over N active customers (default 10,000) on Starter, in a fresh database of the stack, with
# hourly rollups of all three metrics for the first DAYS days of the month (default 15: about
# 10.8 million rows for 10,000 customers; DAYS=30 is a month's end, 21.6 million), written
# hour by hour across all customers as the pipeline writes them; every third customer is at
# 105 % of its impressions limit when the check runs (80, 90 and 100 % crossed), the others at
# 30 %. ROUNDS runs (default 3): the first records the alerts and enqueues the
# emails, the later ones find nothing new (the check is idempotent); prints each run's time
# and the median. The goal (issue 17): 10,000 customers in seconds.
# Usage: scripts/bench-alerts.sh [N] [DAYS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
days=${2:-15}
rounds=${3:-3}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/apex/target}"
cargo build --release --quiet -p apexctl
apexctl="$CARGO_TARGET_DIR/release/apexctl"
scripts/stack.sh up >/dev/null
eval "$(scripts/stack.sh env)"
base_url=$DATABASE_URL
db="apex_bench_alerts_$$"
psql "$base_url" -qc "CREATE DATABASE $db"
trap 'psql "$base_url" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true' EXIT
url="${base_url%/*}/$db"
DATABASE_URL=$url "$apexctl" migrate >/dev/null
# The checks run at noon on day DAYS+1 of March 2026 (simulated clock).
month=2026-03-01
now=$(date -u -d "$month + $days days 12:00" +%Y-%m-%dT%H:%M:%SZ)
echo "seeding $n customers, $days days of hourly rollups ..." >&2
psql "$url" -q <<SQL
INSERT INTO customers (id, name, email, created_at)
  SELECT 'cus_b' || i, 'Bench ' || i, 'b' || i || '@example.com', '$month'::timestamptz - interval '1 month'
  FROM generate_series(1, $n) i;
INSERT INTO subscriptions (customer_id, plan_id, status)
  SELECT 'cus_b' || i, 'starter', 'active' FROM generate_series(1, $n) i;
-- Per hour, hour by hour: every third customer reaches 105 % of its 1,000,000 impressions by
-- the check, the others 30 %; API calls and data transfer stay low.
INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity)
  SELECT 'cus_b' || i, m, '$month'::timestamptz + h * interval '1 hour',
         CASE m WHEN 'impressions' THEN CASE WHEN i % 3 = 0 THEN ceil(1050000.0 / ($days * 24))
                                             ELSE ceil(300000.0 / ($days * 24)) END
                WHEN 'api_calls' THEN 20 ELSE 1000000 END
  FROM generate_series(0, $days * 24 - 1) h, generate_series(1, $n) i,
       unnest(ARRAY['impressions', 'api_calls', 'data_transfer']) m;
ANALYZE;
SQL
rows=$(psql "$url" -tAc "SELECT count(*) FROM usage_records")
echo "$rows rollup rows; checking at $now" >&2
times=()
for r in $(seq 1 "$rounds"); do
  start=$(date +%s.%N)
  out=$(DATABASE_URL=$url APEX_CLOCK_START=$now APEX_CLOCK_SPEED=1 "$apexctl" alerts check --json)
  end=$(date +%s.%N)
  t=$(python3 -c "print(round($end - $start, 2))")
  times+=("$t")
  echo "  run $r: $t s: $out" >&2
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "median of $rounds runs over $n customers ($rows rows): $median s"
