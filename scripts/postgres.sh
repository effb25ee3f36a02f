#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests: `scripts/postgres.sh start DIR PORT` creates a
# cluster in DIR (initdb, trust auth on 127.0.0.1 only), starts it on PORT and prints
# its URL; `scripts/postgres.sh stop DIR` stops it. TLS is on too (plain connections
# still work): a test CA signs a server certificate for 127.0.0.1 and localhost, and the
# CA is DIR/nexus-test-ca.pem, for `?sslmode=verify-full&sslrootcert=DIR/nexus-test-ca.pem`. Uses the machine's PostgreSQL
# binaries (Debian's postgresql-15 layout, or initdb/pg_ctl on PATH). PostgreSQL refuses
# to run as root, so as root the cluster runs as the `postgres` user.
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:?data directory}
bin=""
for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && bin="$d/"; done
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "$cmd" in
  start)
    port=${3:?port}
    if [ -z "$bin" ] && ! command -v initdb >/dev/null; then
      echo "postgres.sh: no PostgreSQL binaries (initdb) on this machine" >&2; exit 2
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
      chown postgres "$dir"
      # The postgres user must be able to reach the folder (mktemp makes 0700 parents).
      chmod a+x "$(dirname "$dir")"
    fi
    if [ ! -f "$dir/PG_VERSION" ]; then
      as_pg "${bin}initdb" -D "$dir" -A trust -U nexus --no-sync >/dev/null
    fi
    if [ ! -f "$dir/server.crt" ]; then
      tls=$(mktemp -d)
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=nexus test PostgreSQL CA" -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=localhost" -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$tls/ext"
      openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
        -CAcreateserial -days 2 -extfile "$tls/ext" -out "$tls/server.crt" 2>/dev/null
      cp "$tls/server.crt" "$tls/server.key" "$dir/"
      cp "$tls/ca.pem" "$dir/nexus-test-ca.pem"
      chmod 600 "$dir/server.key"
      chmod 644 "$dir/nexus-test-ca.pem"
      if [ "$(id -u)" = 0 ]; then chown postgres "$dir/server.crt" "$dir/server.key"; fi
      rm -rf "$tls"
    fi
    as_pg "${bin}pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=on -c ssl=on" start >/dev/null
    "${bin}psql" -h 127.0.0.1 -p "$port" -U nexus -d postgres -qtAc "CREATE DATABASE nexus" >/dev/null 2>&1 || true
    echo "postgres://nexus@127.0.0.1:$port/nexus"
    ;;
  stop)
    as_pg "${bin}pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 || true
    ;;
esac
