# Sourced by the wrk bench scripts after prepare.sh: a bench customer (its key in
# APEX_BENCH_KEY for the wrk scripts), apex-server on 127.0.0.1:18080 (pid $server) and the
# null-server on 127.0.0.1:18090 (pid $null), both ready, both stopped when the script exits.
# APEX_BENCH_SERVER names another apex-server binary to measure (an earlier build, to compare
# two builds side by side on the same stack); by default the one just built.
# The customer rate limits (issue 19) are set out of reach: the limiter still runs on every
# request (its cost is part of what is measured) but never refuses, so the figures measure
# the edge, not the bench customer's plan (starter: 20,000 records/s, far below wrk's load).
APEX_BENCH_KEY=$("$bin/apexctl" customers create --name "Bench $(date +%s)" --email bench@example.com --json |
  sed -E 's/.*"api_key":"([^"]+)".*/\1/')
export APEX_BENCH_KEY

APEX_LISTEN=127.0.0.1:18080 APEX_JWT_SECRET=bench-secret-bench-secret-bench-secret APEX_LOG=warn \
  APEX_CUSTOMER_RATE_LIMIT=1000000000 APEX_CUSTOMER_RATE_BURST=1000000000 APEX_WAL_DIR="$(mktemp -d)" "${APEX_BENCH_SERVER:-$bin/apex-server}" & server=$!
"$bin/apex-loadtest" null-server --listen 127.0.0.1:18090 2>/dev/null & null=$!
trap 'kill $server $null 2>/dev/null' EXIT
for _ in $(seq 1 100); do curl -sf 127.0.0.1:18080/readyz >/dev/null && curl -sf -X POST 127.0.0.1:18090/ >/dev/null && break; sleep 0.1; done
