#!/usr/bin/env bash
# README's main command: builds confmesh, brings up the SPEC.md §5 topology, starts a daemon on
# each of three peers, waits until every peer shows the other two as Active and prints the status
# from each. `demo.sh stop` stops the daemons (by the PIDs it recorded) and removes the topology.
#
# Usage: sudo netns-scripts/demo.sh [start|stop] (prefix from CONFMESH_DEMO_PREFIX, default "cm";
# CONFMESH_DEMO_KEYLOG=1 also writes each daemon's SA keys to run/<prefix>/p*/keylog, for
# Wireshark/tshark — off by default, as in production).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
P=${CONFMESH_DEMO_PREFIX:-cm}
run="$here/run/$P"
bin="$root/target/release/confmesh"
keylog=${CONFMESH_DEMO_KEYLOG:-0}

stop() {
    if [ -d "$run" ]; then
        for pidfile in "$run"/p*/pid; do
            [ -f "$pidfile" ] || continue
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$pidfile"
        done
    fi
    "$here/down.sh" "$P"
    echo "demo '$P' stopped; logs and state kept under $run"
}

if [ "${1:-start}" = stop ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "demo.sh: needs root (network namespaces); run it with sudo" >&2; exit 2; }

echo "== building confmesh (release)"
(cd "$root" && cargo build --release --quiet --bin confmesh)

echo "== topology"
"$here/up.sh" "$P" 3
trap 'echo "demo.sh: failed; stopping" >&2; stop' ERR

mkdir -p "$run"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$run/psk"
chmod 600 "$run/psk"
for i in 1 2 3; do
    d="$run/p$i"
    mkdir -p "$d/state"
    cat > "$d/confmesh.toml" <<TOML
[peer]
hostname = "conductor$i"
domain = "example.com"
serial = "CMDEMO$i"
mgmt_addr = "10.96.0.$i"
rendezvous_addrs = ["10.96.1.$i"]
state_dir = "$d/state"
mtu = 1500

[admin]
listen = "10.96.0.$i:8443"

[cluster]
peers = ["10.96.0.1", "10.96.0.2", "10.96.0.3"]
psk_file = "$run/psk"
licence = "full"
protection = "ah"
TOML
    keylog_args=()
    [ "$keylog" = 1 ] && keylog_args=(--keylog "$d/keylog")
    ip netns exec "$P"p$i "$bin" run --config "$d/confmesh.toml" "${keylog_args[@]}" </dev/null >/dev/null 2>"$d/daemon.log" &
    echo $! > "$d/pid"
done

echo "== waiting for the cluster to form"
formed=no
for _ in $(seq 1 60); do
    n=0
    for i in 1 2 3; do
        s=$(ip netns exec "$P"p$i "$bin" status --json --config "$run/p$i/confmesh.toml" 2>/dev/null || true)
        a=$(printf '%s' "$s" | grep -o '"state": *"active"' | wc -l || true)
        [ "$a" = 2 ] && n=$((n + 1))
    done
    if [ "$n" = 3 ]; then formed=yes; break; fi
    sleep 0.5
done

for i in 1 2 3; do
    echo "== confmesh status on conductor$i"
    ip netns exec "$P"p$i "$bin" status --config "$run/p$i/confmesh.toml" || true
done
trap - ERR
if [ "$formed" != yes ]; then
    echo "demo.sh: the cluster did not form within 30 s; see $run/p*/daemon.log" >&2
    stop
    exit 1
fi
cat <<TXT

The cluster is up. Look around:
  sudo ip netns exec ${P}p1 $bin status --json --config $run/p1/confmesh.toml
  sudo ip netns exec ${P}p1 $bin log events --config $run/p1/confmesh.toml
  sudo ip netns exec ${P}r tcpdump -ni p2 ip proto 51        # the wire: only AH
  sudo $here/path.sh $P 3 cut                                # partition peer 3 (heal: ... heal)
  daemon logs: $run/p*/daemon.log$([ "$keylog" = 1 ] && echo "    key logs: $run/p*/keylog")
Stop it: sudo $0 stop
TXT
