#!/usr/bin/env bash
# The project's own local stack: a PostgreSQL 15 cluster and a ClickHouse server on loopback,
# on project ports, with data under .stack/ (gitignored). Installs what is missing (Debian 12,
# as root), is idempotent, and stops only the processes it started (by recorded pid).
#
#   scripts/stack.sh up [--export]   start what is not running; print DATABASE_URL & co
#   scripts/stack.sh env             print the variables as `export` lines, start nothing
#   scripts/stack.sh status          exit 0 when both answer, 3 otherwise
#   scripts/stack.sh down            stop what `up` started
#   scripts/stack.sh reset           down, delete .stack/, up
#
# Ports: APEX_STACK_PG_PORT (15432), APEX_STACK_CH_HTTP_PORT (18123), APEX_STACK_CH_TCP_PORT (19000).
# PostgreSQL refuses to run as root, so its cluster belongs to the `postgres` user; when that
# user cannot reach the repository (a clone under /root, say), the cluster lives under
# /var/lib/apex-stack/<hash of the repo path>/ and .stack/pg points there.
# APEX_STACK_FAST=1 turns off fsync in PostgreSQL (throwaway test data only).
# `up` also installs the Stripe stand-in's Python (localstripe, pinned) in a virtualenv under
# APEX_TOOLS_DIR (/var/cache/apex/tools), outside the clone so CI reuses it; tests start
# scripts/stripe-standin.py with it, one process per test. Likewise aiosmtpd (pinned), a real
# SMTP server the email tests send to (apex_notify::testing::SmtpStandIn). And promtool
# (Debian's prometheus package, unpacked there, no daemon), which the tests run on
# apex-server's /metrics. And Debian's chromium (with fonts-liberation for its text), which
# the report test of `apexctl simulate` runs headless on the report file.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
stack="$repo/.stack"
pg_port="${APEX_STACK_PG_PORT:-15432}"
ch_http="${APEX_STACK_CH_HTTP_PORT:-18123}"
ch_tcp="${APEX_STACK_CH_TCP_PORT:-19000}"
pg_bin=/usr/lib/postgresql/15/bin
ch_dir="$stack/ch"
localstripe_version=1.15.10
tools_dir="${APEX_TOOLS_DIR:-/var/cache/apex/tools}"
standin_venv="$tools_dir/localstripe-$localstripe_version"
# aiosmtpd in a virtualenv of its own, so its pins never fight localstripe's.
aiosmtpd_version=1.4.6
smtp_venv="$tools_dir/aiosmtpd-$aiosmtpd_version"
# promtool, from Debian's prometheus package unpacked (no daemon, no service): the tests run
# `promtool check metrics` on apex-server's /metrics.
promtool_dir="$tools_dir/prometheus"

log() { echo "stack: $*" >&2; }
die() { echo "stack: $*" >&2; exit 1; }

database_url="postgres://postgres@127.0.0.1:$pg_port/apex"
clickhouse_url="http://127.0.0.1:$ch_http"

print_env() {
  local prefix="${1:-}"
  echo "${prefix}DATABASE_URL=$database_url"
  echo "${prefix}CLICKHOUSE_URL=$clickhouse_url"
  echo "${prefix}CLICKHOUSE_DATABASE=apex"
  echo "${prefix}APEX_STRIPE_STANDIN_PYTHON=$standin_venv/bin/python"
  echo "${prefix}APEX_SMTP_STANDIN_PYTHON=$smtp_venv/bin/python"
  echo "${prefix}APEX_PROMTOOL=$promtool_dir/usr/bin/promtool"
  echo "${prefix}APEX_CHROMIUM=/usr/bin/chromium"
}

# promtool: Debian's prometheus package, downloaded and unpacked once (a marker says done).
promtool_up() {
  [ -f "$promtool_dir/.ready" ] && return 0
  log "installing promtool (Debian prometheus) into $promtool_dir"
  local work; work=$(mktemp -d)
  # `apt-get download` needs no root; refreshing the package lists (when they are stale) does.
  (cd "$work" && apt-get download -qq prometheus >&2) || {
    [ "$(id -u)" = 0 ] || die "cannot download Debian's prometheus package (as root, the package lists would be refreshed first)"
    apt-get update -qq >&2
    (cd "$work" && apt-get download -qq prometheus >&2)
  } || die "cannot download Debian's prometheus package"
  rm -rf "$promtool_dir"
  dpkg -x "$work"/prometheus_*.deb "$promtool_dir"
  rm -rf "$work"
  "$promtool_dir/usr/bin/promtool" --version >/dev/null 2>&1 || die "promtool does not run"
  touch "$promtool_dir/.ready"
}

# python3 with venv and ensurepip (Debian splits them into python3-venv).
need_python_venv() {
  command -v python3 >/dev/null || die "python3 is missing"
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    [ "$(id -u)" = 0 ] || die "python3-venv is missing: run as root to install it"
    log "installing python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2
  fi
}

# The stand-in's Python: a virtualenv with localstripe, made once (a marker file says done).
standin_up() {
  [ -f "$standin_venv/.ready" ] && return 0
  need_python_venv
  log "installing localstripe $localstripe_version into $standin_venv"
  rm -rf "$standin_venv"
  python3 -m venv "$standin_venv" >&2
  "$standin_venv/bin/pip" install -q --disable-pip-version-check "localstripe==$localstripe_version" >&2
  touch "$standin_venv/.ready"
}

# The SMTP stand-in's Python: a virtualenv with aiosmtpd, made once (a marker says done).
smtp_standin_up() {
  [ -f "$smtp_venv/.ready" ] && return 0
  need_python_venv
  log "installing aiosmtpd $aiosmtpd_version into $smtp_venv"
  rm -rf "$smtp_venv"
  python3 -m venv "$smtp_venv" >&2
  "$smtp_venv/bin/pip" install -q --disable-pip-version-check "aiosmtpd==$aiosmtpd_version" >&2
  "$smtp_venv/bin/python" -c 'import aiosmtpd.handlers' || die "aiosmtpd does not import"
  touch "$smtp_venv/.ready"
}

# ---------- install ----------
install_missing() {
  local need=()
  [ -x "$pg_bin/postgres" ] || need+=(postgresql-15)
  [ -x /usr/bin/clickhouse-server ] || [ -x /usr/sbin/clickhouse-server ] || need+=(clickhouse-server)
  command -v curl >/dev/null || need+=(curl)
  command -v psql >/dev/null || need+=(postgresql-client-15)
  [ -x /usr/bin/chromium ] || need+=(chromium)
  # Each on its own: a chromium installed without it draws the report's text in a fallback.
  dpkg-query -W -f='${Status}' fonts-liberation 2>/dev/null | grep -q 'ok installed' ||
    need+=(fonts-liberation)
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing ${need[*]}: run as root to install them"
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
}

ch_server_bin() {
  if [ -x /usr/bin/clickhouse-server ]; then echo /usr/bin/clickhouse-server; else echo /usr/sbin/clickhouse-server; fi
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# ---------- PostgreSQL ----------
pg_home() {
  # Where the cluster lives: in the repo when the postgres user can reach it.
  if [ -L "$stack/pg" ]; then readlink "$stack/pg"; return; fi
  if [ -d "$stack/pg" ]; then echo "$stack/pg"; return; fi
  mkdir -p "$stack"
  if runuser -u postgres -- test -x "$stack" 2>/dev/null; then
    echo "$stack/pg"
  else
    echo "/var/lib/apex-stack/$(printf '%s' "$repo" | sha256sum | cut -c1-16)/pg"
  fi
}

pg_pid() {
  local home; home=$(pg_home)
  [ -f "$home/data/postmaster.pid" ] && head -1 "$home/data/postmaster.pid" 2>/dev/null || true
}

pg_ready() { "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" 2>/dev/null; }

pg_up() {
  local home pid
  home=$(pg_home)
  pid=$(pg_pid)
  if alive "$pid" && pg_ready; then return 0; fi
  if port_taken "$pg_port"; then
    die "port $pg_port is taken by a process this stack did not start: set APEX_STACK_PG_PORT"
  fi
  mkdir -p "$stack"
  if [ "$home" != "$stack/pg" ]; then
    mkdir -p "$home"
    ln -sfn "$home" "$stack/pg"
  fi
  mkdir -p "$home/run"
  chown postgres:postgres "$home" "$home/run"
  if [ ! -f "$home/data/PG_VERSION" ]; then
    log "initializing PostgreSQL cluster in $home/data"
    rm -rf "$home/data"
    runuser -u postgres -- "$pg_bin/initdb" -D "$home/data" -U postgres -A trust -E UTF8 \
      --locale=C.UTF-8 --no-sync >"$home/initdb.log" 2>&1 || die "initdb failed: see $home/initdb.log"
  fi
  # A kill -9 leaves postmaster.pid behind; pg_ctl copes when the pid is dead.
  local opts="-p $pg_port -k $home/run -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=128MB"
  if [ "${APEX_STACK_FAST:-0}" = 1 ]; then
    opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  log "starting PostgreSQL on 127.0.0.1:$pg_port"
  touch "$home/postgres.log" && chown postgres:postgres "$home/postgres.log"
  runuser -u postgres -- "$pg_bin/pg_ctl" -D "$home/data" -l "$home/postgres.log" -w -t 30 \
    -o "$opts" start >/dev/null || die "PostgreSQL did not start: see $home/postgres.log"
  for _ in $(seq 1 150); do pg_ready && break; sleep 0.2; done
  pg_ready || die "PostgreSQL does not answer: see $home/postgres.log"
  if ! psql -h 127.0.0.1 -p "$pg_port" -U postgres -Atqc "SELECT 1 FROM pg_database WHERE datname = 'apex'" postgres | grep -q 1; then
    psql -h 127.0.0.1 -p "$pg_port" -U postgres -qc "CREATE DATABASE apex" postgres >/dev/null
  fi
}

pg_down() {
  local home pid
  home=$(pg_home)
  pid=$(pg_pid)
  if alive "$pid"; then
    log "stopping PostgreSQL (pid $pid)"
    runuser -u postgres -- "$pg_bin/pg_ctl" -D "$home/data" -m fast -w -t 30 stop >/dev/null
  fi
}

# ---------- ClickHouse ----------
ch_pid() { [ -f "$ch_dir/clickhouse.pid" ] && cat "$ch_dir/clickhouse.pid" 2>/dev/null || true; }
ch_ready() { curl -sf "http://127.0.0.1:$ch_http/ping" >/dev/null 2>&1; }

ch_config() {
  mkdir -p "$ch_dir/data" "$ch_dir/tmp" "$ch_dir/user_files" "$ch_dir/format_schemas" "$ch_dir/log"
  cat >"$ch_dir/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>$ch_dir/log/clickhouse-server.log</log>
        <errorlog>$ch_dir/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$ch_http</http_port>
    <tcp_port>$ch_tcp</tcp_port>
    <path>$ch_dir/data/</path>
    <tmp_path>$ch_dir/tmp/</tmp_path>
    <user_files_path>$ch_dir/user_files/</user_files_path>
    <format_schema_path>$ch_dir/format_schemas/</format_schema_path>
    <users_config>$ch_dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>536870912</mark_cache_size>
    <max_concurrent_queries>200</max_concurrent_queries>
</yandex>
XML
  cat >"$ch_dir/users.xml" <<'XML'
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
XML
}

ch_up() {
  local pid
  pid=$(ch_pid)
  if alive "$pid" && ch_ready; then return 0; fi
  if port_taken "$ch_http"; then
    die "port $ch_http is taken by a process this stack did not start: set APEX_STACK_CH_HTTP_PORT"
  fi
  if port_taken "$ch_tcp"; then
    die "port $ch_tcp is taken by a process this stack did not start: set APEX_STACK_CH_TCP_PORT"
  fi
  ch_config
  log "starting ClickHouse on 127.0.0.1:$ch_http"
  # setsid: Ctrl-C in the terminal that ran `up` must not reach the server. Started as a
  # simple command (not `cd && ...`) so that $! is the server's own pid.
  (cd "$ch_dir"; setsid nohup "$(ch_server_bin)" --config-file="$ch_dir/config.xml" \
      >"$ch_dir/log/stdout.log" 2>&1 </dev/null & echo $! >"$ch_dir/clickhouse.pid")
  # ClickHouse loads every table before it answers: with many (test) databases that takes
  # a while, so wait up to two minutes, giving up early if the server died.
  for _ in $(seq 1 600); do
    ch_ready && break
    alive "$(ch_pid)" || break
    sleep 0.2
  done
  ch_ready || die "ClickHouse does not answer: see $ch_dir/log/"
  curl -sf "http://127.0.0.1:$ch_http/" --data-binary "CREATE DATABASE IF NOT EXISTS apex" >/dev/null
}

ch_down() {
  local pid
  pid=$(ch_pid)
  if alive "$pid"; then
    log "stopping ClickHouse (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -9 "$pid"
  fi
  rm -f "$ch_dir/clickhouse.pid"
}

status() {
  local ok=0 pid
  pid=$(pg_pid)
  if alive "$pid" && pg_ready; then
    echo "postgres: running (pid $pid) on 127.0.0.1:$pg_port"
  else
    echo "postgres: stopped"; ok=3
  fi
  pid=$(ch_pid)
  if alive "$pid" && ch_ready; then
    echo "clickhouse: running (pid $pid) on 127.0.0.1:$ch_http"
  else
    echo "clickhouse: stopped"; ok=3
  fi
  return $ok
}

case "${1:-}" in
  up)
    install_missing
    pg_up
    ch_up
    standin_up
    smtp_standin_up
    promtool_up
    if [ "${2:-}" = --export ]; then print_env "export "; else print_env; fi
    ;;
  env) print_env "export " ;;
  status) status ;;
  down) ch_down; pg_down ;;
  reset)
    ch_down; pg_down
    home=$(pg_home)
    [ "$home" != "$stack/pg" ] && rm -rf "$home"
    rm -rf "$stack"
    "$0" up "${@:2}"
    ;;
  *) echo "usage: $0 up [--export] | env | status | down | reset" >&2; exit 2 ;;
esac
