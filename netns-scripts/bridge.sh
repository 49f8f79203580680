#!/usr/bin/env bash
# Runs a conference bridge in bridge namespace ${P}b<N> of an up.sh topology: sipp playing
# tests/sipp/bridge.xml on 10.96.4.<N>:<PORT> (UDP), answering INVITEs (rings until CANCEL when the
# conference name contains "cancel", hangs up itself when it contains "hangup") and OPTIONS health
# probes (-aa). It runs in the foreground (exec), so the caller owns its PID and stops it with
# kill PID. Extra arguments go to sipp (e.g. -trace_msg -message_file F).
# Usage: bridge.sh PREFIX N [PORT] [SIPP ARGS...]
set -euo pipefail
P=${1:?usage: bridge.sh PREFIX N [PORT] [SIPP ARGS...]}
N=${2:?usage: bridge.sh PREFIX N [PORT] [SIPP ARGS...]}
PORT=${3:-5060}
shift $(( $# < 3 ? $# : 3 ))
[[ $P =~ ^[a-z][a-z0-9]{0,7}$ ]] || { echo "bridge.sh: bad prefix" >&2; exit 2; }
[[ $N =~ ^[12]$ ]] || { echo "bridge.sh: N must be 1 or 2 (up.sh makes ${P}b1 and ${P}b2)" >&2; exit 2; }
[[ $PORT =~ ^[0-9]+$ ]] || { echo "bridge.sh: bad port" >&2; exit 2; }
command -v sipp >/dev/null || { echo "bridge.sh: sipp not found (Debian package sip-tester)" >&2; exit 2; }
SCENARIO="$(cd "$(dirname "$0")/.." && pwd)/tests/sipp/bridge.xml"
exec ip netns exec "${P}b$N" sipp -sf "$SCENARIO" -i "10.96.4.$N" -p "$PORT" -aa -nostdin "$@"
