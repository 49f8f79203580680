#!/usr/bin/env bash
# Changes one peer's path at the router of topology PREFIX:
#   path.sh PREFIX PEER mtu BYTES     link MTU of the router's side of the peer's link
#   path.sh PREFIX PEER cut           drop everything to and from the peer at the router
#   path.sh PREFIX PEER heal          undo cut
#   path.sh PREFIX PEER rate KBIT     token-bucket limit towards the peer (tc tbf)
#   path.sh PREFIX PEER clear         MTU 1500, no cut, no rate limit
set -euo pipefail
P=$1 I=$2 OP=$3
R="${P}r" IF="p$I"
table="cm_$IF"
case "$OP" in
    mtu) ip -n "$R" link set "$IF" mtu "$4" ;;
    cut)
        ip netns exec "$R" nft add table inet "$table"
        ip netns exec "$R" nft add chain inet "$table" cut '{ type filter hook forward priority 0; policy accept; }'
        ip netns exec "$R" nft add rule inet "$table" cut iifname "$IF" drop
        ip netns exec "$R" nft add rule inet "$table" cut oifname "$IF" drop ;;
    heal) ip netns exec "$R" nft delete table inet "$table" 2>/dev/null || true ;;
    rate) ip netns exec "$R" tc qdisc replace dev "$IF" root tbf rate "${4}kbit" burst 32kbit latency 50ms ;;
    clear)
        ip -n "$R" link set "$IF" mtu 1500
        ip netns exec "$R" nft delete table inet "$table" 2>/dev/null || true
        ip netns exec "$R" tc qdisc del dev "$IF" root 2>/dev/null || true ;;
    *) echo "path.sh: unknown operation $OP" >&2; exit 2 ;;
esac
