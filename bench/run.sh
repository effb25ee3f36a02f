#!/usr/bin/env bash
# bench/run.sh: the same oha load against the demo data API directly, through nginx
# (mTLS reverse proxy) and through nexus-sidecar (inbound), then a rotation run.
# Prints markdown tables (see bench/README.md). Everything runs on 127.0.0.1 and is
# stopped on exit.
#
#   bench/run.sh                       # DURATION=20s RATE=2000 CONNECTIONS=32
#   DURATION=10s bench/run.sh
#
# To add a row (e.g. "nexus with policy"): start the target in main() the way
# start_sidecar does (it returns its URL and registers its PIDs for the memory table),
# then call `add_target NAME URL [extra oha args]` before run_targets. Rows whose NAME
# starts with "nexus" get the nexus/nginx ratios.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")

# ---- options --------------------------------------------------------------------
DURATION=${DURATION:-20s}             # each measured oha run
RATE=${RATE:-2000}                    # fixed-rate runs, requests/s
CONNECTIONS=${CONNECTIONS:-32}        # oha -c
WARMUP=${WARMUP:-3s}                  # per target, at RATE, not measured
SETTLE=${SETTLE:-2s}                  # fixed-rate runs last SETTLE longer, on the same
                                      # connections; latency counts the requests after it
                                      # (not the 32 handshakes at its start); 0s: all
ROUNDS=${ROUNDS:-3}                   # rounds of runs; the tables show the median
NGINX_WORKERS=${NGINX_WORKERS:-2}     # 2 cores; the sidecar runs 2 connection workers
ROTATION_TTL=${ROTATION_TTL:-4s}      # SVID lifetime in the rotation run (rotates at half)
ROTATION_RATE=${ROTATION_RATE:-1000}  # oha --disable-keepalive rotation run, requests/s
                                      # (2000 new connections/s saturate the 2 cores here)
FULL_HANDSHAKE_RATE=${FULL_HANDSHAKE_RATE:-250} # python full-handshake rotation run
OHA_LATENCY_CORRECTION=${OHA_LATENCY_CORRECTION:-0} # 1: oha --latency-correction
KEEP_WORKDIR=${KEEP_WORKDIR:-0}       # 1: keep configs, logs and raw oha JSON
SIDECAR_BIN=${SIDECAR_BIN:-}          # another nexus-sidecar binary (e.g. a differently built one)
ONLY=${ONLY:-}                        # e.g. "direct nginx nexus nexus-policy-audit": only these
                                      # rows (keep direct and nginx: the ratios); "rotation" too
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
PY=${PYTHON:-python3}
LIB="$BENCH_DIR/benchlib.py"

CERTS="$ROOT/certs-dev/nexus.local"
CA="$CERTS/ca.pem"
CLIENT_CERT="$CERTS/flood-model.pem"
CLIENT_KEY="$CERTS/flood-model.key"
SERVER_ID="spiffe://nexus.local/ns/data/sa/hazard-api"
ALLOWED='["spiffe://nexus.local/ns/plugins/*"]'
REQUEST_PATH="/clauses/c-flood-17/rainfall"

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# "20s" / "2m" / "20" -> whole seconds.
seconds() {
  case $1 in
    *m) echo $((${1%m} * 60)) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}
DURATION_S=$(seconds "$DURATION")
WARMUP_S=$(seconds "$WARMUP")
SETTLE_S=$(seconds "$SETTLE")
[[ $DURATION_S =~ ^[0-9]+$ && $WARMUP_S =~ ^[0-9]+$ && $SETTLE_S =~ ^[0-9]+$ ]] ||
  die "DURATION, WARMUP and SETTLE take whole seconds or minutes (e.g. 20s, 1m)"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"

# ---- process bookkeeping --------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nexus-bench.XXXXXX")
RESULTS="$WORK/results.jsonl"
PIDS=()
declare -A TARGET_PIDS=()  # name -> PIDs whose RSS/CPU the memory table reports
declare -A TARGET_WHAT=()  # name -> what those PIDs are

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local i pid
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[i]}
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid did not stop on SIGTERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  if [[ $KEEP_WORKDIR == 1 || $status != 0 ]]; then
    log "work dir kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD...: runs CMD in the background with its output in $WORK/NAME.log;
# the PID is in $STARTED_PID.
start() {
  local name=$1
  shift
  "$@" >"$WORK/$name.log" 2>&1 &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}

alive_or_die() {
  local pid=$1 name=$2
  kill -0 "$pid" 2>/dev/null || die "$name exited; its log: $(tail -n 20 "$WORK/$name.log")"
}

# wait_file FILE PID NAME [TIMEOUT_S]: until FILE exists (and PID still runs).
wait_file() {
  local file=$1 pid=$2 name=$3 limit=$((${4:-30} * 10))
  for ((i = 0; i < limit; i++)); do
    [[ -s $file ]] && return 0
    alive_or_die "$pid" "$name"
    sleep 0.1
  done
  die "timed out waiting for $file ($name)"
}

# wait_http URL PID NAME [curl args...]: until URL answers 200.
wait_http() {
  local url=$1 pid=$2 name=$3
  shift 3
  for ((i = 0; i < 300; i++)); do
    if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" "$url" || true) == 200 ]]; then
      return 0
    fi
    alive_or_die "$pid" "$name"
    sleep 0.1
  done
  die "timed out waiting for $url ($name)"
}

# ---- prerequisites --------------------------------------------------------------
prerequisites() {
  [[ -x $OHA ]] || die "oha not found (cargo install oha --locked), or set OHA=/path/to/oha"
  if [[ ! -x $NGINX ]]; then
    log "nginx missing: installing Debian's nginx"
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    timeout 600 "${sudo[@]}" apt-get update -qq
    timeout 600 "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    [[ -x $NGINX ]] || die "nginx still missing after apt-get install"
  fi
  for tool in curl openssl "$PY"; do
    command -v "$tool" >/dev/null || die "$tool is required"
  done
  if [[ ! -x $TARGET_DIR/release/nexus-sidecar || ! -x $TARGET_DIR/release/nexusctl || ! -x $TARGET_DIR/release/nexus-gateway ]]; then
    log "building release binaries (cargo build --release -p nexus-sidecar -p nexusctl -p nexus-gateway)"
    (cd "$ROOT" && cargo build --release -p nexus-sidecar -p nexusctl -p nexus-gateway)
  fi
  SIDECAR=${SIDECAR_BIN:-$TARGET_DIR/release/nexus-sidecar}
  NEXUSCTL="$TARGET_DIR/release/nexusctl"
  GATEWAY="$TARGET_DIR/release/nexus-gateway"
}

# ---- targets --------------------------------------------------------------------
start_data_api() {
  start data-api "$NEXUSCTL" dev data-api --listen 127.0.0.1:0 --address-file "$WORK/data-api.json"
  DATA_API_PID=$STARTED_PID
  wait_file "$WORK/data-api.json" "$DATA_API_PID" data-api
  DATA_API=$("$PY" "$LIB" addr "$WORK/data-api.json" http)
  wait_http "http://$DATA_API/healthz" "$DATA_API_PID" data-api
}

# start_workload_api NAME TTL: a dev Workload API handing out the data API's SVID
# (with DNS SAN localhost, so oha's hostname check passes). Sets WA_SOCKET, WA_PID.
start_workload_api() {
  local name=$1 ttl=$2
  WA_SOCKET="$WORK/$name.sock"
  start "$name" "$NEXUSCTL" dev workload-api --socket "$WA_SOCKET" --spiffe-id "$SERVER_ID" \
    --dns-name localhost --ttl "$ttl"
  WA_PID=$STARTED_PID
  for ((i = 0; i < 300; i++)); do
    [[ -S $WA_SOCKET ]] && return 0
    alive_or_die "$WA_PID" "$name"
    sleep 0.1
  done
  die "timed out waiting for $WA_SOCKET"
}

# start_gateway: nexus-gateway (SQLite in the work dir) with its own dev Workload API.
# Sets GATEWAY_GRPC and GATEWAY_ID.
start_gateway() {
  GATEWAY_ID="spiffe://nexus.local/ns/nexus/sa/gateway"
  local socket="$WORK/gateway-workload-api.sock"
  start gateway-workload-api "$NEXUSCTL" dev workload-api --socket "$socket" --spiffe-id "$GATEWAY_ID" --ttl 1h
  for ((i = 0; i < 300; i++)); do [[ -S $socket ]] && break; sleep 0.1; done
  # Who may open a control stream is an explicit list (docs/threat-model.md): the
  # bench's sidecars run as the data API, which receives every execution.
  cat >"$WORK/gateway.toml" <<EOF
listen = "127.0.0.1:0"
sidecars = ["$SERVER_ID"]
data_sidecars = ["$SERVER_ID"]

[identity]
workload_api_socket = "unix://$socket"

[admin]
listen = "127.0.0.1:0"
address_file = "$WORK/gateway.json"

[database]
url = "sqlite://$WORK/gateway.db"
EOF
  start gateway "$GATEWAY" --config "$WORK/gateway.toml"
  wait_file "$WORK/gateway.json" "$STARTED_PID" gateway
  GATEWAY_GRPC=$("$PY" "$LIB" addr "$WORK/gateway.json" grpc)
}

# start_sidecar NAME WORKLOAD_API_SOCKET [EXTRA_TOML]: nexus-sidecar inbound in front
# of the data API. Sets SIDECAR_URL, SIDECAR_ADMIN, SIDECAR_PID and registers NAME's PIDs.
start_sidecar() {
  local name=$1 socket=$2 extra=${3:-}
  cat >"$WORK/$name.toml" <<EOF
[identity]
workload_api_socket = "unix://$socket"

[admin]
listen = "127.0.0.1:0"
address_file = "$WORK/$name.json"

[inbound]
listen = "127.0.0.1:0"
app = "$DATA_API"
allowed_ids = $ALLOWED
$extra
EOF
  start "$name" "$SIDECAR" --config "$WORK/$name.toml"
  SIDECAR_PID=$STARTED_PID
  wait_file "$WORK/$name.json" "$SIDECAR_PID" "$name"
  SIDECAR_ADMIN="http://$("$PY" "$LIB" addr "$WORK/$name.json" admin)"
  local inbound
  inbound=$("$PY" "$LIB" addr "$WORK/$name.json" inbound)
  SIDECAR_URL="https://localhost:${inbound##*:}"
  wait_http "$SIDECAR_ADMIN/ready" "$SIDECAR_PID" "$name"
  wait_http "$SIDECAR_URL/healthz" "$SIDECAR_PID" "$name" \
    --cacert "$CA" --cert "$CLIENT_CERT" --key "$CLIENT_KEY"
  TARGET_PIDS[$name]=$SIDECAR_PID
  TARGET_WHAT[$name]="nexus-sidecar (1 process)"
}

# nginx's server certificate: minted here with openssl, signed by the dev CA, with the
# same shape as the data API's dev SVID (ECDSA P-256, URI SAN = its SPIFFE ID, DNS SAN
# localhost, serverAuth+clientAuth).
mint_nginx_cert() {
  local dir=$1
  openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null |
    openssl pkcs8 -topk8 -nocrypt -out "$dir/server.key"
  openssl req -new -key "$dir/server.key" -subj "/O=nexus-bench nginx" -out "$dir/server.csr"
  cat >"$dir/server.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = URI:$SERVER_ID, DNS:localhost
EOF
  openssl x509 -req -in "$dir/server.csr" -CA "$CA" -CAkey "$CERTS/ca.key" -set_serial "0x$(openssl rand -hex 8)" \
    -days 2 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
}

# start_nginx NAME: nginx as an mTLS reverse proxy to the data API. Sets NGINX_URL,
# NGINX_PID and registers its worker PIDs.
start_nginx() {
  local name=$1
  local dir="$WORK/$name"
  mkdir -p "$dir/tmp"
  mint_nginx_cert "$dir"
  local port
  port=$("$PY" "$LIB" free-port)
  cat >"$dir/nginx.conf" <<EOF
# nexus bench: Debian nginx as an mTLS reverse proxy in front of the demo data API.
daemon off;
master_process on;
worker_processes $NGINX_WORKERS;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  upstream data_api {
    server $DATA_API;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$port ssl;
    server_name localhost;
    ssl_certificate $dir/server.pem;
    ssl_certificate_key $dir/server.key;
    ssl_protocols TLSv1.3;
    ssl_client_certificate $CA;
    ssl_verify_client on;
    ssl_verify_depth 2;
    # hyper (the sidecar) does not cap requests per connection; nginx's default is 1000.
    keepalive_requests 1000000;
    location / {
      proxy_pass http://data_api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # The sidecar forwards the caller's identity; do comparable work here.
      proxy_set_header X-Forwarded-Client-Cert "Hash=\$ssl_client_fingerprint";
    }
  }
}
EOF
  "$NGINX" -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" ||
    die "nginx rejected $dir/nginx.conf: $(tail -n 5 "$dir/error.log")"
  start "$name" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
  NGINX_PID=$STARTED_PID
  NGINX_URL="https://localhost:$port"
  wait_http "$NGINX_URL/healthz" "$NGINX_PID" "$name" \
    --cacert "$CA" --cert "$CLIENT_CERT" --key "$CLIENT_KEY"
  local workers
  workers=$("$PY" "$LIB" children "$NGINX_PID")
  [[ -n $workers ]] || die "nginx has no worker processes"
  TARGET_PIDS[$name]=$workers
  TARGET_WHAT[$name]="nginx workers ($(wc -w <<<"$workers"), master excluded: $(
    "$PY" -c 'import json,sys; print(round(json.loads(sys.argv[1])["rss_kib"]/1024,1))' \
      "$("$PY" "$LIB" rss "$NGINX_PID")") MiB)"
}

# ---- load -----------------------------------------------------------------------
# oha_run OUT_JSON DURATION_S [oha args...]: one bounded oha run, JSON to OUT_JSON.
oha_run() {
  local out=$1 dur=$2
  shift 2
  timeout --kill-after=5 $((dur + 60)) "$OHA" --no-tui --output-format json -o "$out" \
    -c "$CONNECTIONS" -w -t 10s --ipv4 "$@" ||
    die "oha failed or timed out (args: $*)"
}

tls_args() {
  [[ $1 == https://* ]] && printf '%s\n' --cacert "$CA" --cert "$CLIENT_CERT" --key "$CLIENT_KEY"
  return 0
}

# rss_snapshot PIDS OUT: summed VmRSS/VmHWM/Pss of PIDS into OUT (zeros if none).
rss_snapshot() {
  local pids=$1 out=$2
  if [[ -n $pids ]]; then
    # shellcheck disable=SC2086 # PID lists are space-separated on purpose
    "$PY" "$LIB" rss $pids >"$out"
  else
    echo '{"rss_kib": 0, "hwm_kib": 0, "pss_kib": 0}' >"$out"
  fi
}

# sampled PIDS OUT CMD...: runs CMD while sampling the PIDs' RSS and CPU into OUT.
sampled() {
  local pids=$1 out=$2 sampler=""
  shift 2
  if [[ -n $pids ]]; then
    # shellcheck disable=SC2086
    start "$(basename "$out" .json)" "$PY" "$LIB" sample-rss "$out" $((DURATION_S + 60)) $pids
    sampler=$STARTED_PID
  fi
  "$@"
  if [[ -n $sampler ]]; then
    kill -TERM "$sampler"
    wait "$sampler" || true
  fi
}

# add_target NAME URL_BASE [extra oha args...]: adds NAME to the latency table: one
# "RATE rps" row and one "max" row. Its memory/CPU row needs its PIDs in
# TARGET_PIDS[NAME] (the start_* functions set them).
TARGETS=()
declare -A TARGET_URL=() TARGET_ARGS=()
add_target() {
  local name=$1
  [[ -z $ONLY || " $ONLY " == *" $name "* ]] || return 0
  TARGETS+=("$name")
  TARGET_URL[$name]="$2$REQUEST_PATH"
  shift 2
  TARGET_ARGS[$name]=""
  (($# == 0)) || TARGET_ARGS[$name]=$(printf '%q ' "$@")
}

# oha_target NAME OUT_JSON DURATION_S [oha args...]: oha against NAME's URL with its
# TLS and extra arguments.
oha_target() {
  local name=$1 out=$2 dur=$3 url=${TARGET_URL[$1]} tls
  shift 3
  eval "local extra=(${TARGET_ARGS[$name]})"
  mapfile -t tls < <(tls_args "$url")
  # shellcheck disable=SC2154 # extra is set by the eval
  oha_run "$out" "$dur" "$@" "${tls[@]}" "${extra[@]}" "$url"
}

# run_targets: every target warmed up, then ROUNDS rounds; in each round every target
# gets a fixed-rate run (latency, RSS, CPU) and an unthrottled run (max rps), in
# turn, so background noise on the shared cores spreads over all targets. Each round
# starts one target further along (round 2 with the second, ...), so that no target
# always runs right after the same one. The report shows the median over rounds.
run_targets() {
  local name round pids w i order lc=() db=() settled=()
  [[ $OHA_LATENCY_CORRECTION == 1 ]] && lc=(--latency-correction)
  for name in "${TARGETS[@]}"; do
    rss_snapshot "${TARGET_PIDS[$name]:-}" "$WORK/$name.idle.json"
    log "$name: warm-up $WARMUP at $RATE rps"
    oha_target "$name" "$WORK/$name.warmup.json" "$WARMUP_S" -z "${WARMUP_S}s" -q "$RATE"
  done
  for ((round = 1; round <= ROUNDS; round++)); do
    order=()
    for ((i = 0; i < ${#TARGETS[@]}; i++)); do
      order+=("${TARGETS[(i + round - 1) % ${#TARGETS[@]}]}")
    done
    for name in "${order[@]}"; do
      pids=${TARGET_PIDS[$name]:-} w="$WORK/$name.$round"
      log "round $round/$ROUNDS, $name: $SETTLE then $DURATION at $RATE rps"
      # Each request's times go to a database, for the latency of the requests after
      # the first SETTLE (oha's own percentiles count the connections' handshakes).
      db=() settled=()
      if ((SETTLE_S > 0)); then
        db=(--db-url "$w.rate.db")
        settled=("$w.rate.db" "$SETTLE_S" "$OHA_LATENCY_CORRECTION")
      fi
      sampled "$pids" "$w.rate-sample.json" \
        oha_target "$name" "$w.rate.json" $((SETTLE_S + DURATION_S)) \
        -z "$((SETTLE_S + DURATION_S))s" -q "$RATE" "${lc[@]}" "${db[@]}"
      "$PY" "$LIB" row "$RESULTS" "$name" "$RATE rps" "$w.rate.json" "${settled[@]}"
      rss_snapshot "$pids" "$w.after-rate.json"
    done
    for name in "${order[@]}"; do
      pids=${TARGET_PIDS[$name]:-} w="$WORK/$name.$round"
      log "round $round/$ROUNDS, $name: $DURATION unthrottled"
      sampled "$pids" "$w.max-sample.json" \
        oha_target "$name" "$w.max.json" "$DURATION_S" -z "${DURATION_S}s"
      "$PY" "$LIB" row "$RESULTS" "$name" "max" "$w.max.json"
      rss_snapshot "$pids" "$w.after-max.json"
      if [[ -n $pids ]]; then
        "$PY" "$LIB" rss-row "$RESULTS" "$name" "${TARGET_WHAT[$name]:-}" \
          "$WORK/$name.idle.json" "$w.rate-sample.json" "$w.rate.json" "$w.after-rate.json" \
          "$w.max-sample.json" "$w.max.json" "$w.after-max.json"
      fi
    done
  done
}

# sighup_while PID_TO_WATCH PID_TO_SIGNAL: SIGHUP every second while the first runs.
sighup_while() {
  local watch=$1 target=$2
  while kill -0 "$watch" 2>/dev/null; do
    sleep 1
    kill -HUP "$target" 2>/dev/null || true
  done
}

metric() { "$PY" "$LIB" metric "$SIDECAR_ADMIN/metrics" "$1"; }

# run_rotation NAME: a fresh sidecar whose Workload API rotates every ~TTL/2 and on a
# SIGHUP every second, under two loads: oha without keep-alive (oha resumes TLS
# sessions, so few of its handshakes are full ones), and full handshakes only.
run_rotation() {
  local name=$1
  start_workload_api "$name-workload-api" "$ROTATION_TTL"
  local wa=$WA_PID
  start_sidecar "$name" "$WA_SOCKET"
  local url="$SIDECAR_URL$REQUEST_PATH" hs0 rot0 load_pid

  log "$name: oha --disable-keepalive, $DURATION at $ROTATION_RATE rps, TTL $ROTATION_TTL + SIGHUP every 1 s"
  hs0=$(metric nexus_tls_handshake_failures_total)
  rot0=$(metric nexus_svid_rotations_total)
  local tls
  mapfile -t tls < <(tls_args "$url")
  timeout --kill-after=5 $((DURATION_S + 60)) "$OHA" --no-tui --output-format json \
    -o "$WORK/$name.oha.json" -c "$CONNECTIONS" -w -t 10s --ipv4 --disable-keepalive \
    -z "${DURATION_S}s" -q "$ROTATION_RATE" "${tls[@]}" "$url" &
  load_pid=$!
  PIDS+=("$load_pid")
  sighup_while "$load_pid" "$wa"
  wait "$load_pid" || die "oha (rotation) failed"
  "$PY" "$LIB" rotation-row "$RESULTS" "oha, no keep-alive (mostly resumed sessions)" \
    "$ROTATION_RATE rps" oha "$WORK/$name.oha.json" \
    "$hs0" "$(metric nexus_tls_handshake_failures_total)" \
    "$rot0" "$(metric nexus_svid_rotations_total)"

  log "$name: full handshakes only, $DURATION at $FULL_HANDSHAKE_RATE rps"
  hs0=$(metric nexus_tls_handshake_failures_total)
  rot0=$(metric nexus_svid_rotations_total)
  timeout --kill-after=5 $((DURATION_S + 60)) "$PY" "$BENCH_DIR/handshake_load.py" \
    --url "$url" --rate "$FULL_HANDSHAKE_RATE" --duration "$DURATION_S" \
    --concurrency "$CONNECTIONS" --cacert "$CA" --cert "$CLIENT_CERT" --key "$CLIENT_KEY" \
    >"$WORK/$name.full.json" &
  load_pid=$!
  PIDS+=("$load_pid")
  sighup_while "$load_pid" "$wa"
  wait "$load_pid" || die "handshake_load.py failed"
  "$PY" "$LIB" rotation-row "$RESULTS" "full handshakes (bench/handshake_load.py)" \
    "$FULL_HANDSHAKE_RATE new conn/s" full "$WORK/$name.full.json" \
    "$hs0" "$(metric nexus_tls_handshake_failures_total)" \
    "$rot0" "$(metric nexus_svid_rotations_total)"
}

# ---- main -----------------------------------------------------------------------
main() {
  prerequisites
  log "work dir $WORK; DURATION=$DURATION RATE=$RATE CONNECTIONS=$CONNECTIONS WARMUP=$WARMUP ROUNDS=$ROUNDS"
  log "load average before start: $(cut -d' ' -f1-3 /proc/loadavg)"

  start_data_api
  TARGET_PIDS[direct]=$DATA_API_PID
  TARGET_WHAT[direct]="demo data API (backend itself)"
  start_nginx nginx
  start_workload_api workload-api 1h
  start_sidecar nexus "$WA_SOCKET"

  add_target direct "http://$DATA_API"
  add_target nginx "$NGINX_URL"
  add_target nexus "$SIDECAR_URL"
  # The same sidecar with the reference policy evaluated on every request (one open
  # execution for the plugin on the requested clause), to show what policy adds. Only
  # what a sidecar loads (policies/nexus, as `nexusctl up` and docs/deployment.md do):
  # policies/revocation is the gateway's.
  mkdir -p "$WORK/policies"
  cp -r "$ROOT/policies/nexus" "$WORK/policies/nexus"
  local not_after
  not_after=$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)
  printf '{"executions": {"ex-bench": {"plugin": "spiffe://nexus.local/ns/plugins/sa/flood-model", "clause": "c-flood-17", "not_after": "%s"}}, "revoked": {}}\n' \
    "$not_after" >"$WORK/runtime-data.json"
  start_sidecar nexus-policy "$WA_SOCKET" "
[policy]
dir = \"$WORK/policies\"
state_file = \"$WORK/runtime-data.json\""
  add_target nexus-policy "$SIDECAR_URL"
  # The same policy with every request on a path of its own (oha's --rand-regex-url):
  # each misses the decision cache, as a request crafted to miss it does, and is
  # evaluated (issue 15's "bad input"). A sidecar of its own, so that its full cache
  # and its memory are its own.
  start_sidecar nexus-policy-miss "$WA_SOCKET" "
[policy]
dir = \"$WORK/policies\"
state_file = \"$WORK/runtime-data.json\""
  add_target nexus-policy-miss "$SIDECAR_URL" --rand-regex-url
  TARGET_URL[nexus-policy-miss]="${SIDECAR_URL//./\\.}$REQUEST_PATH/r[0-9]{12}"
  # ... and with an execution record per request too (file sink, hash chain).
  start_sidecar nexus-policy-audit "$WA_SOCKET" "
[policy]
dir = \"$WORK/policies\"
state_file = \"$WORK/runtime-data.json\"

[audit]
sink = { file = { path = \"$WORK/records.jsonl\", max_bytes = 1073741824 } }"
  add_target nexus-policy-audit "$SIDECAR_URL"
  # On a gateway's control stream, without and with the anomaly detectors on every
  # request: what the watch costs on the request path.
  start_gateway
  start_sidecar nexus-gateway "$WA_SOCKET" "
[gateway]
address = \"$GATEWAY_GRPC\"
identity = \"$GATEWAY_ID\"
snapshot_file = \"$WORK/nexus-gateway.snapshot.json\"
detect_anomalies = false"
  add_target nexus-gateway "$SIDECAR_URL"
  start_sidecar nexus-gateway-watch "$WA_SOCKET" "
[gateway]
address = \"$GATEWAY_GRPC\"
identity = \"$GATEWAY_ID\"
snapshot_file = \"$WORK/nexus-gateway-watch.snapshot.json\""
  add_target nexus-gateway-watch "$SIDECAR_URL"
  run_targets
  # Every request the audited sidecar served must be in its chain.
  log "audit: $("$NEXUSCTL" audit verify "$WORK/records.jsonl" 2>&1 | head -3 | tr '\n' ' ')"

  [[ -z $ONLY || " $ONLY " == *" rotation "* ]] && run_rotation nexus-rotation

  local load
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  echo
  echo "## Nexus bench: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, load average at end $load"
  echo
  echo "oha $("$OHA" --version | awk '{print $2}'), $CONNECTIONS connections, HTTP/1.1, GET $REQUEST_PATH;" \
    "$DURATION per run after a $WARMUP warm-up$( ((SETTLE_S > 0)) && echo " (fixed-rate runs: the latencies of the requests after the run's first $SETTLE, on connections already open)"), median of $ROUNDS rounds; nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///')" \
    "with worker_processes $NGINX_WORKERS; added = minus the direct row of the same load."
  echo
  "$PY" "$LIB" report "$RESULTS" direct nginx
}

main "$@"
