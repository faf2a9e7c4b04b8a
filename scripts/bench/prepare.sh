# Sourced by the bench scripts: wrk, the local stack and its variables, release binaries in
# $bin, migrated databases.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/apex/target}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
scripts/stack.sh up >/dev/null
eval "$(scripts/stack.sh env)"
cargo build --release --quiet --bin apex-server --bin apexctl --bin apex-loadtest
bin="$CARGO_TARGET_DIR/release"
"$bin/apexctl" migrate >/dev/null
