#!/usr/bin/env bash
# Issue 3 benchmark: TCP throughput between two peers in network namespaces (netns-scripts/up.sh,
# router in between), in one run: direct (no tunnel), the confmesh AH overlay, the confmesh
# ESP-GCM overlay and boringtun (user-space WireGuard), each with iperf3 for 1 and 4 streams of
# DURATION seconds (default 10). Prints Gbit/s and the ratio to direct.
# Installs boringtun-cli (cargo install) and wireguard-tools (apt-get) when missing.
# Usage: sudo benches/netns-throughput.sh [DURATION]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
D=${1:-10}
P=cmbt
[ "$(id -u)" = 0 ] || { echo "netns-throughput.sh: needs root" >&2; exit 2; }
command -v iperf3 >/dev/null || apt-get install -y -qq iperf3 >/dev/null
command -v wg >/dev/null || apt-get install -y -qq --no-install-recommends wireguard-tools >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
command -v boringtun-cli >/dev/null || cargo install --locked boringtun-cli
target=${CARGO_TARGET_DIR:-$root/target}
(cd "$root" && CARGO_TARGET_DIR="$target" cargo build -q --release -p confmesh-dataplane --example static_overlay)
BIN="$target/release/examples/static_overlay"

RUN=$(mktemp -d /tmp/confmesh-throughput.XXXXXX)
declare -a PIDS=()
declare -A FDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    "$root/netns-scripts/down.sh" "$P" >/dev/null 2>&1 || true
    rm -rf "$RUN"
}
trap cleanup EXIT
"$root/netns-scripts/down.sh" "$P" >/dev/null 2>&1 || true
"$root/netns-scripts/up.sh" "$P" 2 >/dev/null
ns1="${P}p1" ns2="${P}p2"

# gbits ADDR STREAMS: iperf3 from peer 1 to a server on ADDR in peer 2; prints Gbit/s received.
gbits() {
    ip netns exec "$ns2" iperf3 -s -1 -B "$1" -p 5201 >/dev/null 2>&1 &
    local server=$!
    sleep 0.5
    ip netns exec "$ns1" iperf3 -c "$1" -p 5201 -t "$D" -P "$2" -J > "$RUN/iperf.json"
    wait "$server" 2>/dev/null || true
    /usr/bin/python3 -c 'import json,sys; print("%.3f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"] / 1e9))' "$RUN/iperf.json"
}

# Overlay processes read stdin until it closes; a fifo held open by this script keeps them up.
start_overlay() { # NS ARGS...
    local ns=$1; shift
    mkfifo "$RUN/$ns.in"
    ip netns exec "$ns" "$BIN" "$@" < "$RUN/$ns.in" > "$RUN/$ns.log" 2>&1 &
    PIDS+=($!)
    local fd
    exec {fd}> "$RUN/$ns.in"
    FDS[$ns]=$fd
}
stop_overlays() {
    for ns in "$ns1" "$ns2"; do
        eval "exec ${FDS[$ns]}>&-"
        rm -f "$RUN/$ns.in"
    done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}

declare -A result
result[direct,1]=$(gbits 10.96.0.2 1)
result[direct,4]=$(gbits 10.96.0.2 4)

for proto in ah esp; do
    start_overlay "$ns1" cmbt0 10.96.0.1 10.97.0.1 10.96.0.2 10.97.0.2 "$proto"
    start_overlay "$ns2" cmbt0 10.96.0.2 10.97.0.2 10.96.0.1 10.97.0.1 "$proto"
    sleep 1
    ip netns exec "$ns1" ping -q -c 2 -i 0.2 10.97.0.2 >/dev/null
    result[$proto,1]=$(gbits 10.97.0.2 1)
    result[$proto,4]=$(gbits 10.97.0.2 4)
    stop_overlays
    grep -h counters "$RUN/$ns1.log" "$RUN/$ns2.log" | sed "s/^/  $proto /" > "$RUN/$proto.counters" || true
done

# boringtun: one instance per namespace, keys from wg, UAPI sockets named per interface.
for i in 1 2; do
    wg genkey > "$RUN/wg$i.key"
    wg pubkey < "$RUN/wg$i.key" > "$RUN/wg$i.pub"
done
for i in 1 2; do
    j=$((3 - i))
    ip netns exec "${P}p$i" boringtun-cli --foreground --disable-drop-privileges "cmwg$i" > "$RUN/bt$i.log" 2>&1 &
    PIDS+=($!)
done
sleep 1
for i in 1 2; do
    j=$((3 - i))
    ip netns exec "${P}p$i" wg set "cmwg$i" private-key "$RUN/wg$i.key" listen-port 51820 \
        peer "$(cat "$RUN/wg$j.pub")" allowed-ips "10.98.0.$j/32" endpoint "10.96.0.$j:51820"
    ip -n "${P}p$i" addr add "10.98.0.$i/24" dev "cmwg$i"
    ip -n "${P}p$i" link set "cmwg$i" mtu 1420 up
done
ip netns exec "$ns1" ping -q -c 2 -i 0.2 10.98.0.2 >/dev/null
result[boringtun,1]=$(gbits 10.98.0.2 1)
result[boringtun,4]=$(gbits 10.98.0.2 4)

echo "TCP throughput, iperf3 ${D}s, peer 1 -> peer 2 through the router namespace ($(nproc) cores)"
printf '%-22s %14s %8s %14s %8s\n' "path" "1 stream" "ratio" "4 streams" "ratio"
for k in direct ah esp boringtun; do
    case $k in
        direct) name="direct veth" ;;
        ah) name="confmesh AH" ;;
        esp) name="confmesh ESP-GCM" ;;
        boringtun) name="boringtun (WireGuard)" ;;
    esac
    r1=$(awk -v a="${result[$k,1]}" -v b="${result[direct,1]}" 'BEGIN {printf "%.3f", a / b}')
    r4=$(awk -v a="${result[$k,4]}" -v b="${result[direct,4]}" 'BEGIN {printf "%.3f", a / b}')
    printf '%-22s %9s Gb/s %8s %9s Gb/s %8s\n' "$name" "${result[$k,1]}" "$r1" "${result[$k,4]}" "$r4"
done
cat "$RUN/ah.counters" "$RUN/esp.counters" 2>/dev/null || true
