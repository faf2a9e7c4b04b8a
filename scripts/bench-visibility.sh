#!/usr/bin/env bash
# How long until an acknowledged record is visible in both stores, under load: wrk offers
# RATE records/s of 1,000-record batches (16 paced connections) for the whole run while a
# probe sends PROBES single `track` records of its own customer, one every 0.3 s, and times
# each from the send until Postgres `usage_records` and ClickHouse `usage_events` both hold
# it (polled every 10 ms, so figures are +-20 ms). Prints p50, p99 and max.
# Usage: scripts/bench-visibility.sh [RATE=425000] [PROBES=200]
set -euo pipefail
cd "$(dirname "$0")/.."
rate="${1:-425000}"; probes="${2:-200}"; conns=16
. scripts/bench/prepare.sh
wal=$(mktemp -d)
APEX_LISTEN=127.0.0.1:18082 APEX_JWT_SECRET=bench-secret-bench-secret-bench-secret APEX_LOG=warn \
  APEX_WAL_DIR="$wal" "$bin/apex-server" & server=$!
trap 'kill $server $load 2>/dev/null; wait $server 2>/dev/null; rm -rf "$wal"' EXIT
load=
for _ in $(seq 1 100); do curl -sf 127.0.0.1:18082/readyz >/dev/null && break; sleep 0.1; done
new_key() { "$bin/apexctl" customers create --name "Visibility $1 $(date +%s)" --email bench@example.com --plan scale --json; }
APEX_BENCH_KEY=$(new_key load | sed -E 's/.*"api_key":"([^"]+)".*/\1/')
probe=$(new_key probe)
probe_customer=$(printf '%s' "$probe" | sed -E 's/.*"customer_id":"([^"]+)".*/\1/')
probe_key=$(printf '%s' "$probe" | sed -E 's/.*"api_key":"([^"]+)".*/\1/')
delay_ms=$(( conns * 1000 * 1000 / rate ))
seconds=$(( probes * 3 / 10 + 10 ))
APEX_BENCH_KEY=$APEX_BENCH_KEY APEX_BENCH_DELAY_MS=$delay_ms wrk -t1 -c$conns -d${seconds}s \
  -s scripts/bench/batch_paced.lua http://127.0.0.1:18082/api/usage/batch >/tmp/apex-visibility-wrk.txt 2>&1 & load=$!
sleep 3
latencies=$(mktemp)
for i in $(seq 1 "$probes"); do
  start=$(date +%s%N)
  curl -sf -X POST 127.0.0.1:18082/api/usage/track -H 'Content-Type: application/json' \
    -d "{\"api_key\":\"$probe_key\",\"metric_type\":\"impressions\",\"quantity\":1}" >/dev/null
  while :; do
    pg=$(psql "$DATABASE_URL" -Atqc "SELECT coalesce(sum(quantity), 0) FROM usage_records WHERE customer_id = '$probe_customer'")
    ch=$(curl -sf "$CLICKHOUSE_URL/?database=$CLICKHOUSE_DATABASE" --data-binary \
      "SELECT count() FROM usage_events WHERE customer_id = '$probe_customer'")
    [ "$pg" -ge "$i" ] && [ "$ch" -ge "$i" ] && break
    [ $(( ($(date +%s%N) - start) / 1000000 )) -gt 30000 ] && { echo "probe $i never became visible" >&2; exit 1; }
    sleep 0.01
  done
  echo $(( ($(date +%s%N) - start) / 1000000 )) >>"$latencies"
  sleep 0.3
done
wait $load || true
offered=$(awk '/Requests\/sec/ {printf "%d", $2 * 1000}' /tmp/apex-visibility-wrk.txt)
sort -n "$latencies" | awk -v offered="$offered" '{a[NR]=$1} END {
  printf "load %s records/s; %d probes; visible in both stores after: p50 %d ms, p99 %d ms, max %d ms\n",
    offered, NR, a[int(NR*0.5+0.5)], a[int(NR*0.99+0.5)], a[NR] }'
