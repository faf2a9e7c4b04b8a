#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: starts the project's own PostgreSQL and
# ClickHouse (scripts/stack.sh), checks formatting and lints, and runs every test against
# the real servers. Build artifacts go to a fixed folder outside the clone so runs reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/apex/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A test run rebuilds from a clean tree: incremental artifacts only fill the disk (tens of GB
# across clones sharing the target folder).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
mkdir -p "$CARGO_TARGET_DIR"

step() { printf '\n== %s\n' "$*" >&2; }

step "stack: up (and a second up must be a quick no-op)"
scripts/stack.sh up >/dev/null
start=$(date +%s%N)
scripts/stack.sh up >/dev/null
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
if [ "$elapsed_ms" -gt 5000 ]; then
  echo "stack.sh up took ${elapsed_ms} ms on a running stack: it must be a no-op" >&2
  exit 1
fi
scripts/stack.sh status >&2
eval "$(scripts/stack.sh env)"

step "stack: drop test and simulation databases left by runs that are no longer alive"
# Test databases are named apex_t_<pid>_..., `apexctl simulate`'s apex_sim_<seed>_<secs>_<pid>
# (a run killed with -9 cannot drop them): only those of dead processes are dropped, so a
# suite or a simulation running elsewhere on the same stack keeps its databases.
stale() { { grep -E '^apex_(t_[0-9]+_|sim_[0-9]+_[0-9]+_[0-9]+$)' || true; } | while read -r db; do
  case "$db" in
    apex_t_*) pid=${db#apex_t_}; pid=${pid%%_*} ;;
    *) pid=${db##*_} ;;
  esac
  # /proc, not `kill -0`: that fails for another user's live process too (EPERM).
  [ -d "/proc/$pid" ] || echo "$db"
done; }
psql "$DATABASE_URL" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 'apex\_t\_%' OR datname LIKE 'apex\_sim\_%'" | stale |
  while read -r db; do psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null; done
curl -sf "$CLICKHOUSE_URL/?query=SELECT%20name%20FROM%20system.databases%20WHERE%20name%20LIKE%20'apex_t_%25'%20OR%20name%20LIKE%20'apex_sim_%25'" | stale |
  while read -r db; do curl -sf "$CLICKHOUSE_URL/" --data-binary "DROP DATABASE IF EXISTS $db" >/dev/null; done

step "cargo fmt --check"
cargo fmt --all -- --check

step "unsafe code only where the workspace allows it"
# The workspace denies unsafe code (Cargo.toml); apex-server's main is the one exception.
allowed=$(grep -rln --include='*.rs' 'allow(unsafe_code)' . --exclude-dir=target --exclude-dir=.stack |
  grep -v '^./ingest/src/main.rs$' || true)
if [ -n "$allowed" ]; then echo "unsafe code allowed outside ingest/src/main.rs: $allowed" >&2; exit 1; fi

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test (real PostgreSQL and ClickHouse)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-fail-fast: one run shows every failing test binary, not only the first.
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
# One closing line for the whole run: cargo prints a result per test binary, and the last
# one is often a crate's empty doc-test run.
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "\ntests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
