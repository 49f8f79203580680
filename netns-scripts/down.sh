#!/usr/bin/env bash
# Removes the namespaces that up.sh made with this prefix (their veths go with them), and nothing
# else. Processes still running inside them are left to their owners. Usage: down.sh [PREFIX]
set -uo pipefail
P=${1:-cm}
[[ $P =~ ^[a-z][a-z0-9]{0,7}$ ]] || { echo "down.sh: bad prefix" >&2; exit 2; }
for ns in "${P}p1" "${P}p2" "${P}p3" "${P}vcs" "${P}b1" "${P}b2" "${P}r"; do
    if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
        ip netns del "$ns"
    fi
done
exit 0
