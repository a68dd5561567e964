#!/usr/bin/env bash
# A connect storm on a 1-node cluster (PostgreSQL + NATS in a temp dir, free ports):
# THREADS clients at once make DEVICES persistent sessions and resume them
# (bench/cluster_sessions.py), against the fleethub binary given, so two builds compare
# side by side (BENCHMARKS.md, "session claims batched").
#
#   bash bench/cluster_sessions_storm.sh target/release/fleethub 64 2048
set -euo pipefail
BIN=$1; THREADS=$2; N=$3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d /tmp/fh-ab.XXXX)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mkdir -p "$W/pg"; [ "$(id -u)" = 0 ] && chown postgres "$W" "$W/pg"
as_pg "$PGBIN/initdb" -A trust -U postgres -D "$W/pg/data" >/dev/null
PGPORT=$(free_port)
as_pg "$PGBIN/pg_ctl" -D "$W/pg/data" -o "-p $PGPORT -k $W/pg -c listen_addresses=127.0.0.1" -l "$W/pg/log" -w start >/dev/null
NATSPORT=$(free_port)
"$(command -v nats-server || echo /usr/sbin/nats-server)" -a 127.0.0.1 -p "$NATSPORT" >/dev/null 2>&1 & NP=$!
mkdir -p "$W/n"
printf '[cluster]\nnode = "a"\npostgres = "host=127.0.0.1 port=%s user=postgres"\nnats = "nats://127.0.0.1:%s"\n' "$PGPORT" "$NATSPORT" > "$W/n/hub.toml"
RUST_LOG=warn "$BIN" --data-dir "$W/n/data" serve --config "$W/n/hub.toml" --mqtt 127.0.0.1:0 --mqtts off --api 127.0.0.1:0 >"$W/n/log" 2>&1 & HP=$!
for _ in $(seq 200); do [ -s "$W/n/data/endpoints.json" ] && break; sleep 0.05; done
read -r API MQTT TOKEN < <(python3 -c "
import json; e=json.load(open('$W/n/data/endpoints.json')); print('http://'+e['api'], e['mqtt'], open('$W/n/data/admin-token').read().strip())")
(cd $ROOT/bench && python3 cluster_sessions.py "$API" "$TOKEN" "$MQTT" "$N" "$THREADS")
kill $HP $NP 2>/dev/null || true; wait $HP 2>/dev/null || true
as_pg "$PGBIN/pg_ctl" -D "$W/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
rm -rf "$W"
