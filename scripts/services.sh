#!/usr/bin/env bash
# Starts throwaway PostgreSQL and Redis servers on 127.0.0.1 (free ports, data in a temporary
# folder) and prints the environment to use them. `scripts/services.sh stop DIR` stops them.
# Sourced by scripts/test.sh; usable alone: eval "$(scripts/services.sh start)".
set -euo pipefail

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

as_pg() {
  # initdb refuses to run as root: run the server as the postgres user when we are root.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ensure_installed() {
  local need=()
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  # Browser tests drive Debian's Chromium (no browser downloads); wrk drives the benchmark smoke run.
  [ -x /usr/bin/chromium ] || need+=(chromium)
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  if [ ${#need[@]} -gt 0 ]; then
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    echo "installing ${need[*]} from Debian's packages" >&2
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >&2
  fi
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
  fi
}

start() {
  ensure_installed
  local pgbin; pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  local dir; dir=$(mktemp -d /tmp/gateway-services.XXXXXX)
  # Whatever fails from here on (initdb, a port taken, createdb, Redis), nothing is left running.
  trap 'status=$?; if [ "$status" != 0 ]; then stop "'"$dir"'"; fi' EXIT
  chmod 755 "$dir"
  mkdir -p "$dir/pg"
  [ "$(id -u)" = 0 ] && chown postgres "$dir/pg"
  local pgport redisport
  pgport=${TEST_PG_PORT:-$(free_port)}
  redisport=${TEST_REDIS_PORT:-$(free_port)}
  as_pg "$pgbin/initdb" -D "$dir/pg/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  as_pg "$pgbin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w -t 60 start \
    -o "-p $pgport -k $dir/pg -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" >&2 \
    || { cat "$dir/pg/server.log" >&2; exit 1; }
  as_pg "$pgbin/createdb" -h 127.0.0.1 -p "$pgport" -U postgres gateway_test
  redis-server --port "$redisport" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$dir/redis.pid" --dir "$dir" --logfile "$dir/redis.log"
  local up=""
  for _ in $(seq 1 50); do
    redis-cli -p "$redisport" ping >/dev/null 2>&1 && { up=1; break; }; sleep 0.1
  done
  [ -n "$up" ] || { echo "Redis did not answer on port $redisport" >&2; cat "$dir/redis.log" >&2 || true; exit 1; }
  cat <<ENV
export GATEWAY_SERVICES_DIR=$dir
export TEST_PG_BIN=$pgbin
export TEST_PG_PORT=$pgport
export TEST_REDIS_PORT=$redisport
export DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:$pgport/gateway_test
export REDIS_URL=redis://127.0.0.1:$redisport/0
ENV
}

stop() {
  local dir=$1
  [ -d "$dir" ] || return 0
  local pgbin; pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  if [ -f "$dir/pg/data/postmaster.pid" ]; then
    as_pg "$pgbin/pg_ctl" -D "$dir/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  if [ -f "$dir/redis.pid" ]; then
    kill "$(cat "$dir/redis.pid")" 2>/dev/null || true
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop "${2:?usage: services.sh stop DIR}" ;;
  *) echo "usage: $0 start | stop DIR" >&2; exit 2 ;;
esac
