#!/usr/bin/env bash
# Issue 4 benchmark: the idle cost of a 3-peer cluster. Starts the demo cluster (netns-scripts/
# demo.sh) under its own prefix, lets it settle, then measures for DURATION seconds (default 60):
# each daemon's resident memory and CPU share, and the cluster's wire traffic seen at the router
# (packets/s and bytes/s over the three peer links). Stops everything it started.
# Usage: sudo benches/idle-cost.sh [DURATION]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
D=${1:-60}
export CONFMESH_DEMO_PREFIX=cmidle
P=$CONFMESH_DEMO_PREFIX
trap '"$root/netns-scripts/demo.sh" stop >/dev/null 2>&1 || true' EXIT
"$root/netns-scripts/demo.sh" start >/dev/null
sleep 5
run="$root/netns-scripts/run/$P"
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
link_counters() { # packets bytes, summed over the router's peer links (both directions)
    local p=0 b=0
    for i in 1 2 3; do
        read -r rxb rxp txb txp <<<"$(ip netns exec "${P}r" cat /sys/class/net/p$i/statistics/{rx_bytes,rx_packets,tx_bytes,tx_packets} | tr '\n' ' ')"
        p=$((p + rxp + txp)); b=$((b + rxb + txb))
    done
    echo "$p $b"
}
declare -A t0
for i in 1 2 3; do t0[$i]=$(ticks "$(cat "$run/p$i/pid")"); done
read -r p0 b0 < <(link_counters)
sleep "$D"
read -r p1 b1 < <(link_counters)
echo "idle cost over ${D}s, 3 peers (release build)"
for i in 1 2 3; do
    pid=$(cat "$run/p$i/pid")
    t1=$(ticks "$pid")
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    cpu=$(awk -v a="${t0[$i]}" -v b="$t1" -v hz="$hz" -v d="$D" 'BEGIN {printf "%.3f", 100 * (b - a) / hz / d}')
    printf '  conductor%d: RSS %.1f MB, CPU %s%% of a core\n' "$i" "$(awk -v k="$rss" 'BEGIN {print k / 1024}')" "$cpu"
done
# Each packet crosses two router links (in on one, out on another): halve to count it once.
awk -v p=$((p1 - p0)) -v b=$((b1 - b0)) -v d="$D" 'BEGIN {printf "  wire: %.1f packets/s, %.0f bytes/s (cluster total)\n", p / 2 / d, b / 2 / d}'
