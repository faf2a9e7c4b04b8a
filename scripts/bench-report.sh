#!/usr/bin/env bash
# Regenerates the measured table of BENCHMARKS.md (between its bench-report markers), every
# figure from a run of apex-loadtest or criterion made here, the median of ROUNDS runs:
#   1. `apex-loadtest compare`: track req/s of apex-server and null-server, alternating, their
#      ratio, and p99 at half apex-server's rate (open loop);
#   2. 1,000-record batches, closed loop, with --verify (both stores equal what was acked);
#   3. track at twice apex-server's rate with 5,000 connections (more than the server's
#      4,096-request queue, so it can refuse), OVERLOAD seconds, server RSS;
#   4. the criterion benches.
# Raw reports (JSON, HTML plots) are kept in bench-results/<time>/.
# Usage: scripts/bench-report.sh [ROUNDS=3] [SECONDS=15] [BATCH_SECONDS=30] [OVERLOAD_SECONDS=60]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"; secs="${2:-15}"; batch_secs="${3:-30}"; overload_secs="${4:-60}"
since=$(date +%s)
. scripts/bench/prepare.sh
ulimit -n "$(ulimit -Hn)"  # 5,000 connections need 10,000 descriptors (client and server)
out="bench-results/$(date -u +%Y%m%dT%H%M%SZ)"; mkdir -p "$out"
wal=$(mktemp -d)
APEX_LISTEN=127.0.0.1:18082 APEX_JWT_SECRET=bench-secret-bench-secret-bench-secret APEX_LOG=warn \
  APEX_WAL_DIR="$wal" "$bin/apex-server" & server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$wal"' EXIT
for _ in $(seq 1 100); do curl -sf 127.0.0.1:18082/readyz >/dev/null && break; sleep 0.1; done
target=http://127.0.0.1:18082
lt="$bin/apex-loadtest"

keys="$out/keys.jsonl"
for i in $(seq 1 20); do
  "$bin/apexctl" customers create --name "Bench $i" --email "bench+$i@example.com" --plan scale --json >>"$keys"
  echo >>"$keys"
done

compare_args=(compare --target "$target" --keys-file "$keys" --rounds "$rounds" --duration "${secs}s" --connections 64 --no-progress)
"$lt" "${compare_args[@]}" --json "$out/compare.json" | tee "$out/compare.txt"

batch_args=(run --target "$target" --keys-file "$keys" --mode batch --batch-size 1000 --closed --connections 16 --duration "${batch_secs}s" --verify --verify-timeout 300s --no-progress)
for i in $(seq 1 "$rounds"); do
  "$lt" "${batch_args[@]}" --json "$out/batch-$i.json" --html "$out/batch-$i.html" | tee "$out/batch-$i.txt"
done

rate=$(python3 -c 'import json,sys; print(int(2 * json.load(open(sys.argv[1]))["apex_median_rate"]))' "$out/compare.json")
overload_args=(run --target "$target" --keys-file "$keys" --mode track --rate "$rate" --connections 5000 --duration "${overload_secs}s" --timeout 5s --no-progress)
for i in $(seq 1 "$rounds"); do
  "$lt" "${overload_args[@]}" --watch-pid "$server" --json "$out/overload-$i.json" --html "$out/overload-$i.html" | tee "$out/overload-$i.txt"
done

# The server's appliers may still be writing the overload's backlog: stop it so the criterion
# benches have the machine to themselves.
kill "$server"; wait "$server" 2>/dev/null || true
criterion_args=(bench -p apex-benches -- --warm-up-time 1 --measurement-time 5)
cargo "${criterion_args[@]}" 2>&1 | grep -E '^[a-z].*time:|^[a-z_/0-9]+$|time:' | tee "$out/criterion.txt"

python3 - "$out/meta.json" "$rounds" "$overload_secs" "${compare_args[*]}" "${batch_args[*]}" "${overload_args[*]}" "${criterion_args[*]}" <<'PY'
import json, sys, datetime
path, rounds, overload, cmp, batch, over, crit = sys.argv[1:]
import re
# KEYS is the key file of the 20 customers the script creates; SERVER_PID the server's pid.
clean = lambda c: "apex-loadtest " + re.sub(r"--keys-file \S+", "--keys-file KEYS", c).split(" --no-progress")[0]
json.dump({"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "rounds": int(rounds),
           "overload_secs": int(overload), "compare_command": clean(cmp), "batch_command": clean(batch),
           "overload_command": clean(over) + " --watch-pid SERVER_PID", "criterion_command": "cargo " + crit},
          open(path, "w"))
PY
python3 scripts/bench/table.py "$out" "$CARGO_TARGET_DIR/criterion" "$since" >"$out/table.md"
cat "$out/table.md"
python3 - "$out/table.md" <<'PY'
import sys
table = open(sys.argv[1]).read()
text = open("BENCHMARKS.md").read()
start, end = "<!-- bench-report:start -->", "<!-- bench-report:end -->"
if start not in text:
    text = text.rstrip("\n") + "\n\n## Summary (scripts/bench-report.sh)\n\n" + start + "\n" + end + "\n"
head, rest = text.split(start, 1)
_, tail = rest.split(end, 1)
open("BENCHMARKS.md", "w").write(head + start + "\n" + table + end + tail)
PY
echo "BENCHMARKS.md updated; raw reports in $out"
