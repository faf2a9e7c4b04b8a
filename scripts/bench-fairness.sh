#!/usr/bin/env bash
# Fairness between customers (issue 19): a well-behaved customer's `track` latency, open loop
# at RATE requests a second (apex-loadtest, from the intended send time), three ways per
# round, alternating:
#   alone      - only that customer, on the server with the per-customer limit;
#   limited    - beside a flooding customer (a runaway SDK: open loop at FLOOD_RATE requests
#                a second on FLOOD_CONNECTIONS connections, whatever the answers), per-customer
#                limit LIMIT records/s (burst LIMIT): the flood is answered 429 past its limit;
#   unlimited  - the same flood with the limit out of reach: every flooded record is taken.
# Two servers run side by side on the local stack (the whole durable pipeline), one with
# APEX_CUSTOMER_RATE_LIMIT=LIMIT, one without a reachable limit. Prints each run (the
# customer's p50, p99, p99.9 and answers; the flooder's answers) and the medians per way.
# Exit status 1 if the well-behaved customer got anything but 200 alone or in a limited run
# (RATE must be below LIMIT: its own requests are never over the limit).
# Usage: scripts/bench-fairness.sh [ROUNDS=3] [SECONDS=15] [RATE=1000] [LIMIT=2000]
# (FLOOD_RATE and FLOOD_CONNECTIONS in the environment, defaults 20000 and 64; FLOOD_RATE=closed
# floods in closed loop instead: as fast as it is answered). Both servers take
# APEX_RATE_LIMITED_DELAY_MS from the environment: the limited one holds each 429 that long
# (default 500 ms), which is what throttles the flood's connections; 0 answers at once.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"; secs="${2:-15}"; rate="${3:-1000}"; limit="${4:-2000}"
flood_conns="${FLOOD_CONNECTIONS:-64}"; flood_rate="${FLOOD_RATE:-20000}"
if ! awk -v r="$rate" -v l="$limit" 'BEGIN {exit !(r < l)}'; then
  echo "bench-fairness: RATE ($rate) must be below LIMIT ($limit)" >&2; exit 2
fi
if [ "$flood_rate" = closed ]; then pacing=(--closed); else pacing=(--rate "$flood_rate"); fi
. scripts/bench/prepare.sh
out="bench-results/fairness-$(date -u +%Y%m%dT%H%M%SZ)"; mkdir -p "$out"
for who in normal flooder; do
  "$bin/apexctl" customers create --name "Fairness $who" --email "$who@example.com" --plan scale \
    --json >"$out/$who.jsonl"
  echo >>"$out/$who.jsonl"
done
wal_limited=$(mktemp -d); wal_unlimited=$(mktemp -d)
start_server() { # port limit wal-dir -> pid
  APEX_LISTEN=127.0.0.1:$1 APEX_JWT_SECRET=bench-secret-bench-secret-bench-secret APEX_LOG=warn \
    APEX_CUSTOMER_RATE_LIMIT=$2 APEX_CUSTOMER_RATE_BURST=$2 APEX_WAL_DIR="$3" \
    "${APEX_BENCH_SERVER:-$bin/apex-server}" >>"$out/servers.log" 2>&1 &
  echo $!
}
limited=$(start_server 18501 "$limit" "$wal_limited")
unlimited=$(start_server 18502 1000000000 "$wal_unlimited")
trap 'kill $limited $unlimited 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$wal_limited" "$wal_unlimited"' EXIT
for port in 18501 18502; do
  for _ in $(seq 1 100); do curl -sf 127.0.0.1:$port/readyz >/dev/null && break; sleep 0.1; done
  curl -sf 127.0.0.1:$port/readyz >/dev/null ||
    { echo "bench-fairness: apex-server on :$port is not ready (see $out/servers.log)" >&2; exit 1; }
done

normal_run() { # port name
  "$bin/apex-loadtest" run --target "http://127.0.0.1:$1" --keys-file "$out/normal.jsonl" \
    --mode track --rate "$rate" --connections 32 --duration "${secs}s" --no-progress \
    --label "$2" --json "$out/$2.json" >/dev/null || true
}
flood() { # port name
  "$bin/apex-loadtest" run --target "http://127.0.0.1:$1" --keys-file "$out/flooder.jsonl" \
    --mode track "${pacing[@]}" --connections "$flood_conns" --duration "$((secs + 2))s" \
    --no-progress --label "$2" --json "$out/$2.json" >/dev/null || true
}
for i in $(seq 1 "$rounds"); do
  normal_run 18501 "alone-$i"
  flood 18501 "flood-limited-$i" & flooder=$!
  sleep 1; normal_run 18501 "limited-$i"; wait $flooder
  flood 18502 "flood-unlimited-$i" & flooder=$!
  sleep 1; normal_run 18502 "unlimited-$i"; wait $flooder
done

python3 - "$out" "$rounds" "$rate" "$limit" "$flood_conns" "$flood_rate" <<'PY'
import json, statistics, sys
out, rounds, rate, limit, conns, flood_rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
load = lambda name: json.load(open(f"{out}/{name}.json"))
ms = lambda us: us / 1000
bad = 0
pace = "closed loop" if flood_rate == "closed" else f"open loop at {flood_rate} req/s"
print(f"well-behaved customer: {rate} req/s open loop; flooder: {pace}, {conns} connections; "
      f"limit {limit} records/s")
for way in ("alone", "limited", "unlimited"):
    p50, p99, p999 = [], [], []
    for i in range(1, rounds + 1):
        r = load(f"{way}-{i}")
        lat = r["latency"]
        p50.append(ms(lat["p50_us"])); p99.append(ms(lat["p99_us"])); p999.append(ms(lat["p999_us"]))
        flood = "" if way == "alone" else \
            f"; flooder {load(f'flood-{way}-{i}')['outcomes']} ({load(f'flood-{way}-{i}')['request_rate']:.0f} req/s)"
        print(f"  {way:9} round {i}: p50 {p50[-1]:.2f} ms, p99 {p99[-1]:.2f} ms, p99.9 "
              f"{p999[-1]:.2f} ms, answers {r['outcomes']}{flood}")
        if way != "unlimited" and set(r["outcomes"]) != {"200"}:
            bad += 1
    print(f"{way:9} medians: p50 {statistics.median(p50):.2f} ms, p99 {statistics.median(p99):.2f} ms, "
          f"p99.9 {statistics.median(p999):.2f} ms")
sys.exit(1 if bad else 0)
PY
