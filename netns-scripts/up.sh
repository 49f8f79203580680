#!/usr/bin/env bash
# Builds the SPEC.md §5 test topology in network namespaces:
#
#   ${P}p1 ─┐                      ┌─ ${P}vcs   10.96.3.1
#   ${P}p2 ─┼── ${P}r (router) ────┼─ ${P}b1    10.96.4.1
#   ${P}p3 ─┘                      └─ ${P}b2    10.96.4.2
#
# Peer i has management address 10.96.0.i and rendezvous address 10.96.1.i on its one link to the
# router, so a lower MTU, a cut or a rate limit can be put on one peer's path alone (netns-scripts/
# path.sh). The prefix P (default "cm") keeps concurrent topologies apart; down.sh removes exactly
# what this made. Usage: up.sh [PREFIX] [PEERS (1-3, default 3)]
set -euo pipefail
P=${1:-cm}
N=${2:-3}
[[ $P =~ ^[a-z][a-z0-9]{0,7}$ ]] || { echo "up.sh: prefix must be 1-8 lower-case letters/digits" >&2; exit 2; }
[[ $N =~ ^[1-3]$ ]] || { echo "up.sh: PEERS must be 1, 2 or 3" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "up.sh: needs root (network namespaces)" >&2; exit 2; }
if ip netns list | grep -qw "${P}r"; then
    echo "up.sh: topology '$P' already exists; run netns-scripts/down.sh $P first" >&2; exit 2
fi

# On any failure, undo what was made so far.
trap 'echo "up.sh: failed; cleaning up" >&2; "$(dirname "$0")/down.sh" "$P" >/dev/null 2>&1 || true' ERR

R="${P}r"
ip netns add "$R"
ip -n "$R" link set lo up
ip netns exec "$R" sysctl -qw net.ipv4.ip_forward=1
# The router answers oversize DF packets with ICMP fragmentation-needed, as a real router would.
ip netns exec "$R" sysctl -qw net.ipv4.ip_no_pmtu_disc=0

# link NS ROUTER_IF NS_IF ADDRS...: a veth from the router to namespace NS with host addresses.
link() {
    local ns=$1 rif=$2 nif=$3; shift 3
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "$rif" netns "$R" type veth peer name "$nif" netns "$ns"
    ip -n "$R" addr add 10.96.255.254/32 dev "$rif"
    ip -n "$R" link set "$rif" up
    ip -n "$ns" link set "$nif" up
    for a in "$@"; do
        ip -n "$ns" addr add "$a/32" dev "$nif"
        ip -n "$R" route add "$a/32" dev "$rif"
    done
    ip -n "$ns" route add 10.96.255.254/32 dev "$nif"
    ip -n "$ns" route add 10.96.0.0/16 via 10.96.255.254 dev "$nif" src "$1"
}

for i in $(seq 1 "$N"); do
    link "${P}p$i" "p$i" eth0 "10.96.0.$i" "10.96.1.$i"
done
link "${P}vcs" vcs eth0 10.96.3.1
link "${P}b1" b1 eth0 10.96.4.1
link "${P}b2" b2 eth0 10.96.4.2

trap - ERR
echo "topology '$P' up: peers ${P}p1..${P}p$N (10.96.0.i mgmt, 10.96.1.i rendezvous), router $R, ${P}vcs, ${P}b1, ${P}b2"
