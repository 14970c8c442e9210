#!/usr/bin/env bash
# Measure broadcast-chat and its peers with the relay harness, in one run, then redraw
# docs/bench.svg. The peers (../shared/peers: seed-tokio, node-ws) are built and run outside
# the project tree; the project never depends on them.
#
#   benches/compare.sh [HARNESS ARGS...]        e.g. benches/compare.sh --only fanout
#
# PEERS=dir overrides where the peers' sources are; PEERS_WORK=dir where they are built.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peers=${PEERS:-$root/../shared/peers}
work=${PEERS_WORK:-/tmp/broadcast-chat-peers}
[ -d "$peers/seed-tokio" ] && [ -d "$peers/node-ws" ] || {
  echo "compare.sh: no peers at $peers (set PEERS=dir)" >&2
  exit 1
}
cd "$root"

echo "== building the peers under $work"
cargo build -q --release --manifest-path "$peers/seed-tokio/Cargo.toml" --target-dir "$work/target"
mkdir -p "$work/node-ws"
cp "$peers/node-ws/server.js" "$peers/node-ws/package.json" "$peers/node-ws/package-lock.json" "$work/node-ws/"
[ -d "$work/node-ws/node_modules/ws" ] || (cd "$work/node-ws" && npm ci --silent)
cargo bench --no-run -q --bench relay

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# measure LABEL COMMAND...: start the peer pinned to CPU 0, run the harness, stop the peer.
measure() {
  local label=$1; shift
  local port; port=$(free_port)
  QUIET=1 taskset -c 0 "$@" "127.0.0.1:$port" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  echo "== $label"
  cargo bench -q --bench relay -- --url "ws://127.0.0.1:$port" --pid "$pid" --label "$label" "${harness_args[@]}" || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

harness_args=("$@")
echo "== broadcast-chat"
cargo bench -q --bench relay -- "${harness_args[@]}"
measure seed-tokio "$work/target/release/seed-tokio"
measure node-ws node "$work/node-ws/server.js"
cargo bench -q --bench relay -- --chart
