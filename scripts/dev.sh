#!/usr/bin/env bash
# README command 1: bring up the local stack, build, migrate, create (once) a demo customer,
# print its API key and ready curl lines, then run apex-server in the foreground and the cron
# process (apex-cron) beside it; Ctrl-C (or SIGTERM to this script) stops both.
# State of the dev setup (JWT secret, demo key) is kept in .stack/dev.env, gitignored.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/apex/target}"
mkdir -p "$CARGO_TARGET_DIR"

scripts/stack.sh up >/dev/null
eval "$(scripts/stack.sh env)"

echo "== building (first time: a few minutes)" >&2
cargo build --release --quiet --bin apex-server --bin apexctl --bin apex-cron
bin="$CARGO_TARGET_DIR/release"

"$bin/apexctl" migrate >&2

dev_env=.stack/dev.env
if [ ! -f "$dev_env" ]; then
  umask 077
  echo "APEX_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$dev_env"
fi
# shellcheck disable=SC1090
. "$dev_env"
export APEX_JWT_SECRET

# Reuse the demo customer while its key still works; otherwise create one.
demo_key_ok=false
if [ -n "${APEX_DEMO_API_KEY:-}" ] && "$bin/apexctl" keys list --json 2>/dev/null |
    grep -q "\"prefix\":\"${APEX_DEMO_API_KEY:0:12}\",\"status\":\"active\""; then
  demo_key_ok=true
fi
if [ "$demo_key_ok" != true ]; then
  created=$("$bin/apexctl" customers create --name "Demo Publisher" --email demo@example.com --plan starter --json)
  APEX_DEMO_CUSTOMER_ID=$(printf '%s' "$created" | sed -E 's/.*"customer_id":"([^"]+)".*/\1/')
  APEX_DEMO_API_KEY=$(printf '%s' "$created" | sed -E 's/.*"api_key":"([^"]+)".*/\1/')
  grep -v '^APEX_DEMO_' "$dev_env" >"$dev_env.tmp" || true
  printf 'APEX_DEMO_CUSTOMER_ID=%s\nAPEX_DEMO_API_KEY=%s\n' "$APEX_DEMO_CUSTOMER_ID" "$APEX_DEMO_API_KEY" >>"$dev_env.tmp"
  mv "$dev_env.tmp" "$dev_env"
fi

listen="${APEX_LISTEN:-127.0.0.1:8080}"
cron_log=.stack/cron.log
# A dashboard token for the demo customer (a day long), for the usage API.
demo_token=$("$bin/apexctl" token --customer "$APEX_DEMO_CUSTOMER_ID" --ttl-secs 86400)

# Without a Stripe key the 02:00 usage sync could only fail: it is off until one is set
# (apexctl is told so too, in the hint below, so its `cron list` shows what runs).
cron_note="" cron_env=""
if [ -z "${STRIPE_SECRET_KEY:-}" ]; then
  export APEX_CRON_SCHEDULE_STRIPE_SYNC="${APEX_CRON_SCHEDULE_STRIPE_SYNC:-off}"
  cron_note=", stripe_sync $APEX_CRON_SCHEDULE_STRIPE_SYNC without STRIPE_SECRET_KEY"
  cron_env="APEX_CRON_SCHEDULE_STRIPE_SYNC=$APEX_CRON_SCHEDULE_STRIPE_SYNC "
fi

# Emails go to files a newcomer can open: the welcome email of the demo customer appears
# there within a minute (the email_queue job).
export EMAIL_PROVIDER="${EMAIL_PROVIDER:-file}"
export EMAIL_FILE_DIR="${EMAIL_FILE_DIR:-$PWD/.stack/mail}"
mail_note=""
if [ "$EMAIL_PROVIDER" = file ]; then
  mail_note="emails (the email_queue job, every minute) appear as .eml files in $EMAIL_FILE_DIR:
  ls $EMAIL_FILE_DIR; $bin/apexctl email recent; $bin/apexctl email preview --type payment_failed
"
fi

cat >&2 <<MSG

== apex is starting on http://$listen
demo customer: $APEX_DEMO_CUSTOMER_ID
demo API key:  $APEX_DEMO_API_KEY

try, from another terminal:
  curl -s http://$listen/healthz
  curl -s -X POST http://$listen/api/usage/track -H 'Content-Type: application/json' -d '{"api_key":"$APEX_DEMO_API_KEY","metric_type":"impressions","quantity":1000,"metadata":{"platform":"iOS"}}'
  curl -s http://$listen/metrics | grep apex_ingest_records_total
  curl -s http://$listen/api/usage/current -H 'Authorization: Bearer $demo_token'

the cron process runs beside it (log: $cron_log)$cron_note:
  curl -s http://${APEX_CRON_LISTEN:-127.0.0.1:9464}/metrics | grep apex_cron_runs_total
  eval "\$(scripts/stack.sh env)"; ${cron_env}$bin/apexctl cron list
$mail_note
stop with Ctrl-C; stop the databases with: scripts/stack.sh down
MSG

"$bin/apex-cron" >>"$cron_log" 2>&1 &
cron=$!
"$bin/apex-server" &
server=$!
stop() { kill -TERM "$server" "$cron" 2>/dev/null || true; }
trap stop INT TERM
# The first wait returns early when a signal is trapped; the second waits for the exit.
wait "$server" || true
wait "$server" 2>/dev/null || true
kill -TERM "$cron" 2>/dev/null || true
wait "$cron" 2>/dev/null || true
