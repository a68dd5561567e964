#!/usr/bin/env bash
# The cluster's costs, measured side by side in one run (BENCHMARKS.md, issue 16):
#   the embedded single hub, a 1-node cluster and a 3-node cluster on one PostgreSQL (fsync on,
#   as in production) and one nats-server, all on this machine, with the same loaders.
# For each: identity creates and desired twin writes per second through the API (8 clients;
# twin writes also from 1 client, for latency), routed telemetry from
# device-sim (spread over the nodes with --mqtt a,b,c) with CPU per message per node, and
# direct-method round trips through one node to devices connected to another; persistent
# sessions made (clean session 0, four SUBSCRIBEs) and resumed on the next node.
#
#   cargo build --release --bin fleethub --bin device-sim && bash bench/cluster.sh
#
# Needs PostgreSQL (/usr/lib/postgresql/*/bin) and nats-server; .ci/run installs both.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HUB=$ROOT/target/release/fleethub
SIM=$ROOT/target/release/device-sim
DEVICES=${DEVICES:-2000}
DURATION=${DURATION:-30s}
W=$(mktemp -d /tmp/fh-cluster-bench.XXXX)
PIDS=()
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  # Hubs are started inside $(...), a subshell: their ids are kept in a file, not in PIDS.
  [ -f "$W/hub.pids" ] && while read -r p; do kill "$p" 2>/dev/null || true; done < "$W/hub.pids"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  as_pg "$PGBIN/pg_ctl" -D "$W/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
  if [ -n "${KEEP:-}" ]; then echo "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metric() { # metric API NAME: the value of an unlabelled-or-node-labelled series (0 when unreadable)
  local v
  v=$(curl -s --max-time 10 "$1/metrics" | awk -v n="$2" '$1 ~ "^"n"({|$)" {print $2; exit}') || true
  echo "${v:-0}"
}

mkdir -p "$W/pg"
[ "$(id -u)" = 0 ] && chown postgres "$W" "$W/pg"
as_pg "$PGBIN/initdb" -A trust -U postgres -D "$W/pg/data" >/dev/null
PGPORT=$(free_port)
as_pg "$PGBIN/pg_ctl" -D "$W/pg/data" -o "-p $PGPORT -k $W/pg -c listen_addresses=127.0.0.1" -l "$W/pg/log" -w start >/dev/null
NATSPORT=$(free_port)
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
"$NATS" -a 127.0.0.1 -p "$NATSPORT" >/dev/null 2>&1 &
PIDS+=($!)

# start_hub NAME [CLUSTER-DB]: prints "API MQTT TOKEN"
start_hub() {
  local name=$1 db=${2:-} dir=$W/$1
  mkdir -p "$dir"
  : > "$dir/hub.toml"
  if [ -n "$db" ]; then
    printf '[cluster]\nnode = "%s"\npostgres = "host=127.0.0.1 port=%s user=postgres dbname=%s"\nnats = "nats://127.0.0.1:%s"\n' \
      "$name" "$PGPORT" "$db" "$NATSPORT" > "$dir/hub.toml"
  fi
  RUST_LOG=warn "$HUB" --data-dir "$dir/data" serve --config "$dir/hub.toml" --mqtt 127.0.0.1:0 --mqtts off --api 127.0.0.1:0 >"$dir/log" 2>&1 &
  echo $! >> "$W/hub.pids"
  for _ in $(seq 200); do [ -s "$dir/data/endpoints.json" ] && break; sleep 0.05; done
  python3 - "$dir/data" <<'PY'
import json, sys
d = sys.argv[1]
e = json.load(open(d + "/endpoints.json"))
print("http://" + e["api"], e["mqtt"], open(d + "/admin-token").read().strip())
PY
}

db() { as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -qc "CREATE DATABASE $1" >/dev/null; }

run_setup() { # run_setup LABEL NODES... (each "API MQTT TOKEN"); methods cross from node 1 to node 2 when there are two or more
  local label=$1; shift
  local nodes=("$@") apis=() mqtts=() api token=""
  # Every node has its own admin token: the first node's goes with the first node's API.
  local tokens=()
  for n in "${nodes[@]}"; do read -r a m t <<<"$n"; apis+=("$a"); mqtts+=("$m"); tokens+=("$t"); token=${token:-$t}; done
  api=${apis[0]}
  local mqtt_list; mqtt_list=$(IFS=,; echo "${mqtts[*]}")
  echo "== $label"
  python3 "$ROOT/bench/cluster_api.py" create "$api" "$token" "reg-" 2000 8 | sed 's/^/creates: /'
  python3 "$ROOT/bench/cluster_api.py" twins "$api" "$token" "reg-" 2000 8 | sed 's/^/twin writes, 8 clients: /'
  python3 "$ROOT/bench/cluster_api.py" twins "$api" "$token" "reg-" 250 1 | sed 's/^/twin writes, 1 client: /'
  # Persistent sessions (SDK-like): first connect + 4 SUBSCRIBEs, then resume on the next node.
  (cd "$ROOT/bench" && python3 cluster_sessions.py "$api" "$token" "$mqtt_list" 1000 8) | sed 's/^/sessions: /'
  # Telemetry: the load scenario, spread over the nodes; CPU and messages per node around it.
  local cpu0=() msg0=()
  for a in "${apis[@]}"; do cpu0+=("$(metric "$a" fleethub_process_cpu_seconds_total)"); msg0+=("$(metric "$a" fleethub_telemetry_messages_total)"); done
  FLEETHUB_TOKEN=$token "$SIM" run --scenario "$ROOT/config/scenarios/load.toml" --devices "$DEVICES" --duration "$DURATION" \
      --url "$api" --mqtt "$mqtt_list" --rate 5/s --output json 2>/dev/null \
    | python3 -c 'import json,sys; s=json.load(sys.stdin); print("telemetry:", json.dumps({k:s[k] for k in ("connected","sent","acked","received","errors","sent_per_s","p50_ms","p99_ms")}))' || echo "telemetry: (device-sim failed)"
  local i=0
  for a in "${apis[@]}"; do
    local cpu1 msg1; cpu1=$(metric "$a" fleethub_process_cpu_seconds_total); msg1=$(metric "$a" fleethub_telemetry_messages_total)
    python3 -c "c=$cpu1-${cpu0[$i]}; m=$msg1-${msg0[$i]}; print('node $i: %d messages, %.2f CPU s, %s ns/msg' % (m, c, int(c*1e9/m) if m else '-'))"
    i=$((i+1))
  done
  # Methods: devices that answer, all connected to the last node; calls through the first.
  local last=${mqtts[-1]}
  printf 'name = "m"\n[fleet]\ndevices = 50\nid_prefix = "m-"\nconnect_rate = 500\nmethods = true\ntwin = false\n[telemetry]\nrate = "1/min"\nduration = "40s"\nqos = 1\n' > "$W/methods.toml"
  FLEETHUB_TOKEN=$token "$SIM" run --scenario "$W/methods.toml" --url "$api" --mqtt "$last" --output json >"$W/methods-sim.log" 2>&1 &
  local sim=$!
  sleep 8
  if [ -n "${KEEP:-}" ]; then
    curl -s -H "Authorization: Bearer ${tokens[-1]}" "${apis[-1]}/devices/m-0" | python3 -c 'import json,sys; print("m-0 on the last node:", json.load(sys.stdin).get("connectionState"))' || true
  fi
  python3 "$ROOT/bench/cluster_api.py" methods "$api" "$token" "m-" 50 500 | sed "s/^/methods (through node 0, devices on node $(( ${#apis[@]} - 1 ))): /"
  kill $sim 2>/dev/null || true; wait $sim 2>/dev/null || true
}

echo "machine: $(nproc) cores; PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), fsync on; $("$NATS" --version)"
E=$(start_hub embedded)
run_setup "embedded single hub (redb)" "$E"
db one
C1=$(start_hub one-a one)
run_setup "1-node cluster (PostgreSQL + NATS)" "$C1"
db three
T1=$(start_hub three-a three); T2=$(start_hub three-b three); T3=$(start_hub three-c three)
run_setup "3-node cluster (PostgreSQL + NATS)" "$T1" "$T2" "$T3"
