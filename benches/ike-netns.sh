#!/usr/bin/env bash
# Time from start to phase 2, two peers in network namespaces (issue 7 benchmark), in one run.
#
# This kernel has no xfrm AH, so two charons never both finish Quick Mode: the initiator derives
# the child keys after QM2, fails to install them and sends NO_PROPOSAL_CHOSEN instead of QM3. What
# is measured is therefore the time until the Quick Mode INITIATOR has processed QM2 and holds the
# child keys (phase 1 and the PFS exchange are complete at that point; QM3 is one more one-way trip):
#
#   confmesh   two `confmesh run` daemons (peers 10.96.0.1/.2) started at t0; done when the first
#              key log holds an AH pair (written by the Quick Mode initiator after QM2). The column
#              "cm-both" also waits for the responder's pair (after QM3): both ends up.
#   engine     the same with the `udp_peer` example of confmesh-ike (the engine alone on a UDP
#              socket, no daemon start-up), first AH pair.
#   strongswan two charon-systemd (strongSwan's IKE daemon) started at t0, connections loaded with
#              swanctl as soon as each vici socket exists, peer 1 initiating on load (start_action
#              = start); same suite (IKEv1 aes256-sha256-modp4096, AH sha256-modp4096, tunnel).
#              Done when the initiator logs "unable to install inbound and outbound IPsec SA",
#              which it prints right after deriving the child keys from QM2.
#
# Everything is measured from before the first process is spawned; polling is every 5 ms.
# Usage: benches/ike-netns.sh [RUNS (default 5)]   (root; strongswan-swanctl, charon-systemd)
# CONFMESH_BIN / UDP_PEER_BIN: prebuilt binaries (default: cargo build --release into
# ${CARGO_TARGET_DIR:-target}). KEEP_WORK=1 keeps the logs and key logs of the runs.
set -euo pipefail
RUNS=${1:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
P=cmbi
PSK=bench-pre-shared-key-0123456789abcdef
[ "$(id -u)" = 0 ] || { echo "ike-netns.sh: needs root (network namespaces)" >&2; exit 2; }
for t in /usr/sbin/charon-systemd /usr/sbin/swanctl; do
    [ -x "$t" ] || { echo "ike-netns.sh: $t missing (charon-systemd, strongswan-swanctl)" >&2; exit 2; }
done
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${CONFMESH_BIN:-}" ] || [ -z "${UDP_PEER_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet --bin confmesh && cargo build --release --quiet -p confmesh-ike --example udp_peer)
    CONFMESH_BIN=$TARGET/release/confmesh
    UDP_PEER_BIN=$TARGET/release/examples/udp_peer
fi

WORK=$(mktemp -d)
PIDS=()
stop_all() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
cleanup() { stop_all; "$ROOT/netns-scripts/down.sh" "$P" >/dev/null 2>&1 || true; [ -n "${KEEP_WORK:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"; }
trap cleanup EXIT
"$ROOT/netns-scripts/down.sh" "$P" >/dev/null 2>&1 || true
"$ROOT/netns-scripts/up.sh" "$P" 2 >/dev/null

# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
WAIT_POLL_S=0.005   # establishment times are measured by these polls
lines_at_least() { [ -f "$1" ] && [ "$(grep -c "$2" "$1" 2>/dev/null)" -ge "$3" ]; }
either_has() { lines_at_least "$1" '^AH ' 2 || lines_at_least "$2" '^AH ' 2; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }

confmesh_run() {
    local d=$WORK/cm.$1 t0 i first
    rm -rf "$d"; mkdir -p "$d"
    printf '%s' "$PSK" > "$d/psk"
    for i in 1 2; do
        mkdir -p "$d/p$i/state"
        cat > "$d/p$i/confmesh.toml" <<EOF
[peer]
hostname = "bench$i"
serial = "BENCH$i"
mgmt_addr = "10.96.0.$i"
rendezvous_addrs = ["10.96.1.$i"]
state_dir = "$d/p$i/state"

[cluster]
peers = ["10.96.0.1", "10.96.0.2"]
psk_file = "$d/psk"
licence = "full"
EOF
    done
    t0=$(now_ns)
    for i in 1 2; do
        ip netns exec "${P}p$i" "$CONFMESH_BIN" run --config "$d/p$i/confmesh.toml" --keylog "$d/p$i/keylog" \
            </dev/null >/dev/null 2>"$d/p$i/log" &
        PIDS+=($!)
    done
    wait_until 30 either_has "$d/p1/keylog" "$d/p2/keylog" || { echo "confmesh: no phase 2" >&2; return 1; }
    first=$(now_ns)
    wait_until 30 lines_at_least "$d/p1/keylog" '^AH ' 2 || { echo "confmesh: no phase 2" >&2; return 1; }
    wait_until 30 lines_at_least "$d/p2/keylog" '^AH ' 2 || { echo "confmesh: no phase 2" >&2; return 1; }
    local both; both=$(now_ns)
    stop_all
    echo "$(secs "$t0" "$first") $(secs "$t0" "$both")"
}

engine_run() {
    local d=$WORK/en.$1 t0 i j
    rm -rf "$d"; mkdir -p "$d"
    printf '%s' "$PSK" > "$d/psk"
    t0=$(now_ns)
    for i in 1 2; do
        j=$((3 - i))
        ip netns exec "${P}p$i" "$UDP_PEER_BIN" --local "10.96.0.$i" --overlay "198.18.0.$i" \
            --peer "10.96.0.$j" --peer-overlay "198.18.0.$j" --psk-file "$d/psk" --keylog "$d/keylog$i" \
            </dev/null >"$d/out$i" 2>&1 &
        PIDS+=($!)
    done
    wait_until 30 either_has "$d/keylog1" "$d/keylog2" || { echo "engine: no phase 2" >&2; return 1; }
    local t1; t1=$(now_ns)
    stop_all
    secs "$t0" "$t1"
}

charon_conf() { # DIR I J START_ACTION
    local d=$1 i=$2 j=$3
    mkdir -p "$d"
    cat > "$d/strongswan.conf" <<EOF
charon {
  load_modular = no
  load = random nonce aes sha1 sha2 hmac gmp kernel-netlink socket-default vici
  install_routes = no
  install_virtual_ip = no
  plugins {
    vici {
      socket = unix://$d/charon.vici
    }
  }
  filelog {
    main {
      path = $d/charon.log
      default = 1
      flush_line = yes
    }
  }
  syslog {
    daemon {
      default = -1
    }
  }
}
charon-systemd {
  journal {
    default = -1
  }
}
EOF
    cat > "$d/swanctl.conf" <<EOF
connections {
  cm {
    version = 1
    local_addrs = 10.96.0.$i
    remote_addrs = 10.96.0.$j
    proposals = aes256-sha256-modp4096
    local {
      auth = psk
      id = 10.96.0.$i
    }
    remote {
      auth = psk
      id = 10.96.0.$j
    }
    children {
      cm {
        ah_proposals = sha256-modp4096
        mode = tunnel
        local_ts = 198.18.0.$i/32
        remote_ts = 198.18.0.$j/32
        start_action = $4
      }
    }
  }
}
secrets {
  ike-cm {
    id-a = 10.96.0.$i
    id-b = 10.96.0.$j
    secret = "$PSK"
  }
}
EOF
}

strongswan_run() {
    local d=$WORK/sw.$1 t0 i done_msg="unable to install inbound and outbound IPsec SA"
    rm -rf "$d"
    charon_conf "$d/c1" 1 2 start
    charon_conf "$d/c2" 2 1 none
    t0=$(now_ns)
    for i in 1 2; do
        STRONGSWAN_CONF=$d/c$i/strongswan.conf ip netns exec "${P}p$i" /usr/sbin/charon-systemd \
            </dev/null >/dev/null 2>&1 &
        PIDS+=($!)
    done
    # Responder first, so that the initiator's first message finds its connection loaded.
    for i in 2 1; do
        wait_until 10 test -S "$d/c$i/charon.vici" || { echo "charon: no vici socket" >&2; return 1; }
        STRONGSWAN_CONF=$d/c$i/strongswan.conf ip netns exec "${P}p$i" swanctl --load-all \
            --file "$d/c$i/swanctl.conf" --uri "unix://$d/c$i/charon.vici" >/dev/null 2>&1
    done
    wait_until 30 lines_at_least "$d/c1/charon.log" "$done_msg" 1 || { echo "strongswan: initiator did not finish QM" >&2; return 1; }
    local t1; t1=$(now_ns)
    stop_all
    secs "$t0" "$t1"
}

median() { sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

printf '%-4s %10s %10s %10s %10s   (seconds from start: QM initiator has its child keys)\n' run confmesh cm-both engine strongswan
: > "$WORK/cm"; : > "$WORK/cb"; : > "$WORK/en"; : > "$WORK/sw"
for r in $(seq 1 "$RUNS"); do
    cb=$(confmesh_run "$r"); c=${cb% *}; b=${cb#* }; e=$(engine_run "$r"); s=$(strongswan_run "$r")
    echo "$c" >> "$WORK/cm"; echo "$b" >> "$WORK/cb"; echo "$e" >> "$WORK/en"; echo "$s" >> "$WORK/sw"
    printf '%-4s %10s %10s %10s %10s\n' "$r" "$c" "$b" "$e" "$s"
done
C=$(median < "$WORK/cm"); B=$(median < "$WORK/cb"); E=$(median < "$WORK/en"); S=$(median < "$WORK/sw")
printf '%-4s %10s %10s %10s %10s\n' med "$C" "$B" "$E" "$S"
awk -v c="$C" -v e="$E" -v s="$S" 'BEGIN {
    printf "ratio confmesh/strongswan = %.2f   engine/strongswan = %.2f   (below 1: confmesh is faster)\n", c / s, e / s }'
