#!/usr/bin/env bash
# Where the tail latency is (issue 19): `track` offered open loop at RATE requests a second
# for SECONDS (apex-loadtest, the harness's records, 20 `scale` customers, CONNECTIONS
# connections), first to the null-server, then to apex-server on the local stack (the whole
# durable pipeline; the null-server goes first so that apex-server's appliers and stores are
# not still at work during its run). Prints, for each: the client's p50, p99, p99.9 and max
# from the intended send time, and its worst latency in every second; for apex-server also
# its own view (`apex_ingest_request_duration_seconds` of `track`: the share of requests its
# handler finished within 10 and 25 ms) and the log's fsync quantiles. vmstat's columns
# during apex-server's run are kept in bench-results/tail-*/vmstat.txt. A client p99 far
# above the server's own says the time is spent outside the handler: in the run queues of
# two shared cores.
# Usage: [APEX_BENCH_CLIENT_NICE=-10] scripts/bench-tail.sh [RATE=21000] [SECONDS=30] [CONNECTIONS=64]
set -euo pipefail
cd "$(dirname "$0")/.."
rate="${1:-21000}"; secs="${2:-30}"; conns="${3:-64}"
. scripts/bench/prepare.sh
out="bench-results/tail-$(date -u +%Y%m%dT%H%M%SZ)"; mkdir -p "$out"
keys="$out/keys.jsonl"
bench_customers Tail "$keys"
wal=$(mktemp -d)
APEX_LISTEN=127.0.0.1:18601 APEX_JWT_SECRET=bench-secret-bench-secret-bench-secret APEX_LOG=warn \
  APEX_WAL_DIR="$wal" "${APEX_BENCH_SERVER:-$bin/apex-server}" & server=$!
"$bin/apex-loadtest" null-server --listen 127.0.0.1:18602 2>/dev/null & null=$!
vmstat=""
# The server stops before its log goes: removed under it, its appliers log read errors.
trap 'kill $server $null $vmstat 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$wal"' EXIT
for _ in $(seq 1 100); do
  curl -sf 127.0.0.1:18601/readyz >/dev/null && curl -sf -X POST 127.0.0.1:18602/ >/dev/null && break
  sleep 0.1
done
# APEX_BENCH_CLIENT_NICE (e.g. -10) runs the load generator at that niceness: on two shared
# cores an open-loop client that waits for a core sends late, and its lateness counts as the
# server's latency; ahead of the server in the run queue, the figures say more of the server.
run() { # port name
  ${APEX_BENCH_CLIENT_NICE:+nice -n "$APEX_BENCH_CLIENT_NICE"} "$bin/apex-loadtest" run --target "http://127.0.0.1:$1" --keys-file "$keys" --mode track \
    --rate "$rate" --connections "$conns" --duration "${secs}s" --no-progress \
    --json "$out/$2.json" >/dev/null
}
run 18602 null-server
vmstat 1 "$((secs + 1))" >"$out/vmstat.txt" & vmstat=$!
run 18601 apex-server
curl -sf 127.0.0.1:18601/metrics >"$out/metrics.txt"
python3 - "$out" "$rate" "$conns" <<'PY'
import json, re, sys
out, rate, conns = sys.argv[1], sys.argv[2], sys.argv[3]
print(f"track, open loop at {rate} req/s, {conns} connections, latency from the intended send time")
for name in ("null-server", "apex-server"):
    r = json.load(open(f"{out}/{name}.json"))
    l = r["latency"]
    print(f"{name}: p50 {l['p50_us']/1e3:.2f} ms, p99 {l['p99_us']/1e3:.2f} ms, p99.9 "
          f"{l['p999_us']/1e3:.2f} ms, max {l['max_us']/1e3:.2f} ms; answers {r['outcomes']}")
    print("  worst per second, ms:", " ".join(str(round(t["max_us"] / 1e3)) for t in r["timeline"]))
metrics = open(f"{out}/metrics.txt").read()
bucket = lambda le: float(re.search(
    r'apex_ingest_request_duration_seconds_bucket\{route="/api/usage/track",le="' + re.escape(le) + r'"\} (\S+)',
    metrics).group(1))
total = bucket("+Inf")
print(f"apex-server's own histogram: {bucket('0.01') / total:.2%} of requests within 10 ms, "
      f"{bucket('0.025') / total:.3%} within 25 ms")
fsync = dict(re.findall(r'apex_pipeline_wal_fsync_seconds\{quantile="([^"]+)"\} (\S+)', metrics))
print("log fsync (last minute), ms: " + ", ".join(
    f"q{q} {float(v) * 1e3:.2f}" for q, v in fsync.items() if q in ("0.5", "0.99", "1")))
PY
