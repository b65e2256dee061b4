#!/usr/bin/env bash
# Makes sure NATS (with JetStream), Redis and PostgreSQL answer on loopback, installing them from
# Debian's packages when they are missing and starting them when they are stopped: NATS on
# 127.0.0.1:4222, Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432 with trust auth for
# user `postgres` and a database `test`. Runs as root (or with sudo rights for apt and the
# services). Idempotent and quiet when all is well. Exit status 0 only when all three answer.
set -u

say() { echo "services: $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 50); do port_open "$1" && return 0; sleep 0.2; done; return 1; }

need_install=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_install+=(nats-server)
command -v redis-server >/dev/null 2>&1 || need_install+=(redis-server)
command -v pg_ctlcluster >/dev/null 2>&1 || need_install+=(postgresql)
if [ ${#need_install[@]} -gt 0 ]; then
  say "installing ${need_install[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq "${need_install[@]}" >/dev/null || {
    say "could not install ${need_install[*]}"; exit 1; }
fi

if ! port_open 4222; then
  say "starting nats-server (JetStream) on 127.0.0.1:4222"
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port 4222 || { say "nats-server did not start"; exit 1; }
fi

if ! port_open 6379; then
  say "starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null
  wait_port 6379 || { say "redis-server did not start"; exit 1; }
fi

if ! port_open 5432; then
  say "starting postgresql on 127.0.0.1:5432"
  ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start >/dev/null 2>&1 || true
  wait_port 5432 || { say "postgresql did not start"; exit 1; }
fi

# Trust auth for loopback as on the service machines; a fresh install asks for a password.
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  if [ -w "$hba" ] && ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    say "allowing trust auth on loopback in $hba"
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main reload >/dev/null 2>&1 || true
    sleep 1
  fi
fi
psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1 || {
  say "postgresql answers but refuses user postgres on 127.0.0.1"; exit 1; }
psql -h 127.0.0.1 -U postgres -d postgres -Atc "select 1 from pg_database where datname='test'" \
  | grep -q 1 || psql -h 127.0.0.1 -U postgres -d postgres -qc 'create database test' >/dev/null
exit 0
