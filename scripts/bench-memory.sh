#!/usr/bin/env bash
# The edge's memory under overload with the dedup window full (issue 19): for each server
# binary, start it on the local stack (the whole durable pipeline), fill its dedup table with
# 1,000-record batches (every record has its own event_id) offered at FILL_RATE requests a
# second for FILL seconds (below what the stores absorb, so no backlog is left: wait until
# both appliers have caught up), then offer `track` well above what it can serve (RATE req/s,
# 5,000 connections) for OVERLOAD seconds while apex-loadtest samples the server's RSS every
# second. Prints, per binary: RSS when ready and after the fill; RSS max, at the middle and
# at the end of the overload, and the growth over its second half; and the dedup gauges from
# /metrics at the end. The binaries run one after the other in one invocation, so their
# figures compare side by side.
# Usage: scripts/bench-memory.sh [FILL=30] [OVERLOAD=60] [RATE=150000] [SERVER_BINARY...]
# (default binary: the release apex-server just built; pass an earlier build's path too to
# compare, e.g. a copy of target/release/apex-server made before a change). FILL_RATE
# (environment, default 400 batches/s = 400,000 records/s) sets the fill's pace.
set -euo pipefail
cd "$(dirname "$0")/.."
fill="${1:-30}"; overload="${2:-60}"; rate="${3:-150000}"; shift $(($# < 3 ? $# : 3))
. scripts/bench/prepare.sh
ulimit -n "$(ulimit -Hn)"  # 5,000 connections need 10,000 descriptors (client and server)
binaries=("$@"); [ ${#binaries[@]} -gt 0 ] || binaries=("$bin/apex-server")
out="bench-results/memory-$(date -u +%Y%m%dT%H%M%SZ)"; mkdir -p "$out"
keys="$out/keys.jsonl"
bench_customers Memory "$keys"
lt="$bin/apex-loadtest"
n=0
for binary in "${binaries[@]}"; do
  n=$((n + 1)); port=$((18300 + n)); wal=$(mktemp -d)
  APEX_LISTEN=127.0.0.1:$port APEX_JWT_SECRET=bench-secret-bench-secret-bench-secret APEX_LOG=warn \
    APEX_WAL_DIR="$wal" "$binary" & server=$!
  trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$wal"' EXIT
  for _ in $(seq 1 100); do curl -sf 127.0.0.1:$port/readyz >/dev/null && break; sleep 0.1; done
  target=http://127.0.0.1:$port
  kill -0 "$server" 2>/dev/null || { echo "bench-memory: $binary did not start" >&2; exit 1; }
  rss_start=$(awk '/^VmRSS/ {print $2}' /proc/$server/status)
  "$lt" run --target "$target" --keys-file "$keys" --mode batch --batch-size 1000 \
    --rate "${FILL_RATE:-400}" --connections 32 --duration "${fill}s" --no-progress \
    --json "$out/fill-$n.json" >/dev/null
  for _ in $(seq 1 600); do
    backlog=$(curl -sf "$target/metrics" | awk '/^apex_pipeline_wal_backlog_bytes/ {s += $NF} END {print s + 0}')
    [ "$backlog" = 0 ] && break
    sleep 0.2
  done
  rss_filled=$(awk '/^VmRSS/ {print $2}' /proc/$server/status)
  "$lt" run --target "$target" --keys-file "$keys" --mode track --rate "$rate" --connections 5000 \
    --duration "${overload}s" --timeout 5s --no-progress --watch-pid "$server" \
    --json "$out/overload-$n.json" >/dev/null ||
    true  # exit 1 on refusals: an overload is answered 503 in part, by design
  metrics=$(curl -sf "$target/metrics" | grep -E '^apex_ingest_dedup_(ids|bytes|window_seconds|evictions_total) ' || true)
  python3 - "$out/overload-$n.json" "$binary" "$metrics" "$rss_start" "$rss_filled" <<'PY'
import json, sys
report, binary, metrics = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
rss_start, rss_filled = int(sys.argv[4]) / 1024, int(sys.argv[5]) / 1024
rss = [(t["second"], t["rss_bytes"]) for t in report["timeline"] if t.get("rss_bytes")]
mib = lambda b: b / 1048576
half = len(rss) // 2
mid, end = rss[half][1], rss[-1][1]
second_half_max = max(b for _, b in rss[half:])
print(f"== {binary}")
print(f"  RSS when ready {rss_start:.1f} MiB; after the fill {rss_filled:.1f} MiB")
print(f"  RSS max {mib(max(b for _, b in rss)):.1f} MiB; at {rss[half][0]} s {mib(mid):.1f} MiB; "
      f"at {rss[-1][0]} s {mib(end):.1f} MiB; growth over the second half "
      f"{mib(second_half_max - mid):+.1f} MiB")
print(f"  2xx req/s {report['success_rate']:.0f}; sent req/s {report['request_rate']:.0f}; "
      f"outcomes {report['outcomes']}")
for line in metrics.splitlines():
    print("  " + line)
PY
  kill "$server"; wait "$server" 2>/dev/null || true; rm -rf "$wal"
done
