#!/usr/bin/env bash
# Issue 5 cluster benchmark, packet-level: replicated writes between three peers in network
# namespaces (netns-scripts/up.sh, prefix cmrb, every peer-to-peer packet through the router
# namespace), confmesh over its AH overlay and a 3-member etcd (Debian's etcd-server) in the same
# namespaces, one after the other in the same run, with the same load generator, sizes and method.
#
# Load (examples/write_load.rs, run in peer 1's namespace): WRITERS (default 12) writers on peer 1,
# each keeping DEPTH (default 16) writes in flight, writing keys of exactly KEY_SIZE bytes (64)
# with values of exactly VALUE_SIZE bytes (256) back to back for DURATION seconds (default 20); a
# write counts when it is acknowledged. Both systems have WRITERS x DEPTH writes in flight.
# confmesh: `config-set` requests pipelined on one control-socket connection per writer (answered
# in order; acknowledged once durable on peer 1's disk; replication to the others is
# asynchronous); etcd: `POST /v3/kv/put` on member 1's gRPC gateway over HTTP/1.1 keep-alive, which
# serves one request at a time per connection, so DEPTH connections per writer (acknowledged once
# committed by a majority; member 1 is made the leader first with `etcdctl move-leader`). DEPTH=1
# is the old one-write-at-a-time load. RATE (default 0: as fast as each system answers) offers a
# fixed load instead, in writes/s over all writers, the same for both systems: lag and CPU per
# write compared at the same load. The admin HTTP API of confmesh is not used: it verifies an
# Argon2id password on every request.
#   writes/s   acknowledged writes / time from the first write to the last acknowledgement.
#   repl/s     acknowledged writes / time from the first write until every other peer holds all of
#              them (confmesh: peer 1's replication status shows no entry unacknowledged by peers 2
#              and 3; etcd: members 2 and 3 report the revision of the last acknowledged put).
#   ack        latency of one write as its writer sees it, p50/p99/max.
#   CPU/write  CPU time (user + system, from /proc) of the three daemons over the run, per
#              acknowledged write: what a write costs, whatever else the machine was doing. Also per
#              daemon: peer 1 (confmesh: where the writes originate; etcd: the raft leader) spends
#              the most, and on one host per peer, as deployed, it is the busiest host.
# confmesh's store on peers 1 and 2: writes made durable per journal sync (group commit), journal
# bytes per write, checkpoints into the database file during the first run.
# confmesh runs the load twice: acknowledged once durable on peer 1 (the default), and with
# `wait_peers: 1`, acknowledged once one other peer has it too (the analogue of etcd's majority).
# Then confmesh once more, offered the writes/s etcd sustained (RATE: the same), so that lag is also
# compared at the same load, not only each at its own limit.
# Lag (the same for both): while the writers run, one more connection to peer 1 writes a probe key
# (same sizes), takes the wall-clock time of its acknowledgement and hands it to a reader process in
# peer 2's namespace, which polls peer 2 for that key (confmesh: `config-get` on peer 2's control
# socket; etcd: `/v3/kv/range` with serializable=true on member 2, i.e. member 2's own state) and
# answers the time from the acknowledgement to the first read that finds it. It polls every 100 µs
# at first, then every tenth of the time waited so far, at most every 1 ms: about 10 % resolution
# without a read storm on a peer that lags behind. Then the next probe, 10 ms later. Lag p50/p99 over all probes of the window. Then, for each system, the
# same probe alone for LIGHT seconds (default 5; about 100 writes/s, no other writer): lag and ack
# latency at light load.
# Packets: nftables counters in the router namespace at prerouting priority -450 (before any
# defragmentation) count every packet between the peers: AH (IP protocol 51) for confmesh, TCP port
# 2380 (etcd's peer traffic, plain TCP: etcd has no AH) for etcd, and IPv4 packets with MF set or a
# fragment offset, and IPv6 fragment headers, for both. Bytes are IP packet lengths on the wire.
# A 3000-byte ping across the router before the run proves that the fragment counter counts.
# confmesh's own counters on peer 1 are shown too: sync-stream bytes (inside the overlay) and AH
# packets sent per replicated write, and the dataplane's fragmentation attempts (refused sends).
#
# Usage: sudo benches/replication-netns.sh [DURATION]   env: WRITERS DEPTH RATE KEY_SIZE VALUE_SIZE LIGHT
#   CONFMESH_BIN / WRITE_LOAD_BIN: prebuilt binaries (default: cargo build --release into
#   ${CARGO_TARGET_DIR:-target}). KEEP_WORK=1 keeps the state, logs and JSON results.
# Installs etcd-server and etcd-client (apt-get) when missing. WRITERS is at most 14: a confmesh
# daemon serves 16 control connections at once and the script needs one for status. DEPTH is at
# most 64, the requests a confmesh control connection has in progress at once.
set -euo pipefail
D=${1:-20}
WRITERS=${WRITERS:-12}
DEPTH=${DEPTH:-16}
RATE=${RATE:-0}
KEY_SIZE=${KEY_SIZE:-64}
VALUE_SIZE=${VALUE_SIZE:-256}
LIGHT=${LIGHT:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
P=cmrb
PSK=bench-pre-shared-key-0123456789abcdef
PY=/usr/bin/python3
[ "$(id -u)" = 0 ] || { echo "replication-netns.sh: needs root (network namespaces)" >&2; exit 2; }
[[ $D =~ ^[0-9]+$ ]] && [ "$D" -ge 1 ] && [ "$D" -le 120 ] || { echo "replication-netns.sh: DURATION is 1-120 s" >&2; exit 2; }
[[ $LIGHT =~ ^[0-9]+$ ]] && [ "$LIGHT" -ge 1 ] && [ "$LIGHT" -le 60 ] || { echo "replication-netns.sh: LIGHT is 1-60 s" >&2; exit 2; }
[[ $WRITERS =~ ^[0-9]+$ ]] && [ "$WRITERS" -ge 1 ] && [ "$WRITERS" -le 14 ] || { echo "replication-netns.sh: WRITERS is 1-14" >&2; exit 2; }
[[ $DEPTH =~ ^[0-9]+$ ]] && [ "$DEPTH" -ge 1 ] && [ "$DEPTH" -le 64 ] || { echo "replication-netns.sh: DEPTH is 1-64" >&2; exit 2; }
[[ $RATE =~ ^[0-9]+$ ]] && [ "$RATE" -le 1000000 ] || { echo "replication-netns.sh: RATE is 0 (unlimited) to 1000000 writes/s" >&2; exit 2; }
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >/dev/null
fi
command -v nft >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${CONFMESH_BIN:-}" ] || [ -z "${WRITE_LOAD_BIN:-}" ]; then
    (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET" cargo build --release --quiet --bin confmesh --example write_load)
    CONFMESH_BIN=$TARGET/release/confmesh
    WRITE_LOAD_BIN=$TARGET/release/examples/write_load
fi

# State on disk, not tmpfs: both systems fsync their writes there.
WORK=$(mktemp -d /var/tmp/confmesh-replication.XXXXXX)
PIDS=()
# stop_all: SIGTERM to the processes this script started, SIGKILL after 10 s.
stop_all() {
    local p n
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for n in $(seq 1 100); do
        local alive=0
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    PIDS=()
}
cleanup() {
    stop_all
    "$ROOT/netns-scripts/down.sh" "$P" >/dev/null 2>&1 || true
    if [ -n "${KEEP_WORK:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'echo "replication-netns.sh: failed at line $LINENO (KEEP_WORK=1 keeps the logs)" >&2' ERR
"$ROOT/netns-scripts/down.sh" "$P" >/dev/null 2>&1 || true
"$ROOT/netns-scripts/up.sh" "$P" 3 >/dev/null

# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

ip netns exec "${P}r" nft -f - <<'EOF'
table inet cmrb {
  counter n_all {}
  counter n_frag4 {}
  counter n_frag6 {}
  counter n_ah {}
  counter n_esp {}
  counter n_etcdpeer {}
  counter n_etcdclient {}
  chain pre {
    type filter hook prerouting priority -450; policy accept;
    counter name n_all
    meta nfproto ipv4 ip frag-off & 0x3fff != 0 counter name n_frag4
    meta nfproto ipv6 exthdr frag exists counter name n_frag6
    meta nfproto ipv4 ip protocol 51 counter name n_ah
    meta nfproto ipv4 ip protocol 50 counter name n_esp
    tcp dport 2380 counter name n_etcdpeer
    tcp sport 2380 counter name n_etcdpeer
    tcp dport 2379 counter name n_etcdclient
    tcp sport 2379 counter name n_etcdclient
  }
}
EOF
# nft_snap FILE: "name packets bytes" of every counter.
nft_snap() {
    ip netns exec "${P}r" nft -j list counters table inet cmrb | $PY -c '
import json, sys
for o in json.load(sys.stdin)["nftables"]:
    c = o.get("counter")
    if c: print(c["name"], c["packets"], c["bytes"])' > "$1"
}
# cpu_snap FILE: CPU ticks (user + system) of the daemons this script started: the sum, the clock
# rate, then each daemon's (peer 1 first).
cpu_snap() {
    local p t=0 each=""
    for p in "${PIDS[@]}"; do
        local n; n=$(awk '{print $14 + $15}' "/proc/$p/stat")
        t=$(( t + n )); each="$each $n"
    done
    echo "$t $(getconf CLK_TCK)$each" > "$1"
}
nft_snap "$WORK/nft.0"
ip netns exec "${P}p1" ping -q -c 1 -W 2 -s 3000 -M dont 10.96.0.2 >/dev/null
nft_snap "$WORK/nft.selftest"
SELFTEST=$(awk 'NR==FNR { a[$1] = $2; next } $1 == "n_frag4" { print $2 - a[$1] }' "$WORK/nft.0" "$WORK/nft.selftest")
[ "$SELFTEST" -ge 2 ] || { echo "replication-netns.sh: the fragment counter did not see a fragmented ping ($SELFTEST)" >&2; exit 1; }

LOAD0=$(cut -d' ' -f1 /proc/loadavg)
# ---- etcd ------------------------------------------------------------------------------------
CLUSTER=m1=http://10.96.0.1:2380,m2=http://10.96.0.2:2380,m3=http://10.96.0.3:2380
ENDPOINTS=http://10.96.0.1:2379,http://10.96.0.2:2379,http://10.96.0.3:2379
for i in 1 2 3; do
    ip netns exec "${P}p$i" etcd --name "m$i" --data-dir "$WORK/etcd$i" \
        --listen-client-urls "http://10.96.0.$i:2379" --advertise-client-urls "http://10.96.0.$i:2379" \
        --listen-peer-urls "http://10.96.0.$i:2380" --initial-advertise-peer-urls "http://10.96.0.$i:2380" \
        --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token "$P" \
        --logger zap --log-level warn </dev/null >/dev/null 2>"$WORK/etcd$i.log" &
    PIDS+=($!)
done
etcd_ready() { ip netns exec "${P}p1" etcdctl --endpoints="$ENDPOINTS" --command-timeout=2s endpoint health >/dev/null 2>&1; }
wait_until 60 etcd_ready || { echo "etcd: the cluster did not form; logs:" >&2; tail -n 20 "$WORK"/etcd*.log >&2; exit 1; }
# Member 1 (where the writes go) becomes the leader, as the writes' origin is for confmesh.
ip netns exec "${P}p1" etcdctl --endpoints="$ENDPOINTS" endpoint status -w json > "$WORK/etcd-status.json"
read -r LEADER_EP M1_HEX < <($PY -c '
import json, sys
s = json.load(open(sys.argv[1]))
leader = s[0]["Status"]["leader"]
ep = [x["Endpoint"] for x in s if x["Status"]["header"]["member_id"] == leader][0]
m1 = [x["Status"]["header"]["member_id"] for x in s if x["Endpoint"].startswith("http://10.96.0.1:")][0]
print(ep, format(m1, "x"))' "$WORK/etcd-status.json")
if [ "$LEADER_EP" != "http://10.96.0.1:2379" ]; then
    ip netns exec "${P}p1" etcdctl --endpoints="$LEADER_EP" move-leader "$M1_HEX" >/dev/null
fi
echo "etcd $(etcd --version | awk '/etcd Version/ {print $3}'): 3 members up (plain TCP, no AH), leader member 1; writing for ${D}s with $((WRITERS * DEPTH)) connections" >&2
nft_snap "$WORK/nft.et0"; cpu_snap "$WORK/cpu.et0"
ip netns exec "${P}p1" "$WRITE_LOAD_BIN" write --system etcd --target 10.96.0.1:2379 --others 10.96.0.2:2379,10.96.0.3:2379 \
    --reader-netns "${P}p2" --reader-target 10.96.0.2:2379 --writers "$WRITERS" --depth "$DEPTH" --rate "$RATE" \
    --duration "$D" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" > "$WORK/etcd.json"
nft_snap "$WORK/nft.et1"; cpu_snap "$WORK/cpu.et1"
ip netns exec "${P}p1" "$WRITE_LOAD_BIN" write --system etcd --target 10.96.0.1:2379 --others 10.96.0.2:2379,10.96.0.3:2379 \
    --reader-netns "${P}p2" --reader-target 10.96.0.2:2379 --writers 0 \
    --duration "$LIGHT" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" > "$WORK/etcd-light.json"
stop_all

# ---- confmesh --------------------------------------------------------------------------------
printf '%s' "$PSK" > "$WORK/psk"
for i in 1 2 3; do
    mkdir -p "$WORK/cm$i/state"
    cat > "$WORK/cm$i/confmesh.toml" <<EOF
[peer]
hostname = "bench$i"
serial = "BENCH$i"
mgmt_addr = "10.96.0.$i"
rendezvous_addrs = ["10.96.1.$i"]
state_dir = "$WORK/cm$i/state"

[cluster]
peers = ["10.96.0.1", "10.96.0.2", "10.96.0.3"]
psk_file = "$WORK/psk"
licence = "full"
EOF
    ip netns exec "${P}p$i" "$CONFMESH_BIN" run --config "$WORK/cm$i/confmesh.toml" </dev/null >/dev/null 2>"$WORK/cm$i/log" &
    PIDS+=($!)
done
# Every peer shows the two others active, with their sync sessions up.
cm_ready() {
    local i
    for i in 1 2 3; do
        ip netns exec "${P}p$i" "$CONFMESH_BIN" status --json --config "$WORK/cm$i/confmesh.toml" 2>/dev/null | $PY -c '
import json, sys
s = json.load(sys.stdin)
others = [p for p in s["peers"] if p["state"] != "this-system"]
repl = (s.get("replication") or {}).get("peers", [])
ok = len(others) == 2 and all(p["state"] == "active" for p in others) and len(repl) == 2 and all(r["connected"] for r in repl)
sys.exit(0 if ok else 1)' 2>/dev/null || return 1
    done
}
wait_until 60 cm_ready || { echo "confmesh: the cluster did not form; logs:" >&2; tail -n 20 "$WORK"/cm*/log >&2; exit 1; }
echo "confmesh: cluster up (AH overlay); writing for ${D}s with $WRITERS writers x $DEPTH in flight, ${KEY_SIZE} B keys, ${VALUE_SIZE} B values" >&2
cm_status() { # SUFFIX: every peer's status document
    local i
    for i in 1 2 3; do
        ip netns exec "${P}p$i" "$CONFMESH_BIN" status --json --config "$WORK/cm$i/confmesh.toml" > "$WORK/cmstatus.$i.$1"
    done
}
cm_status 0
nft_snap "$WORK/nft.cm0"; cpu_snap "$WORK/cpu.cm0"
ip netns exec "${P}p1" "$WRITE_LOAD_BIN" write --system confmesh --target "$WORK/cm1/state/confmesh.sock" \
    --reader-netns "${P}p2" --reader-target "$WORK/cm2/state/confmesh.sock" --writers "$WRITERS" --depth "$DEPTH" --rate "$RATE" \
    --duration "$D" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" > "$WORK/confmesh.json"
nft_snap "$WORK/nft.cm1"; cpu_snap "$WORK/cpu.cm1"
cm_status 1
# The same load, each write acknowledged once one other peer has it too (like etcd's majority).
nft_snap "$WORK/nft.cw0"; cpu_snap "$WORK/cpu.cw0"
ip netns exec "${P}p1" "$WRITE_LOAD_BIN" write --system confmesh --target "$WORK/cm1/state/confmesh.sock" \
    --reader-netns "${P}p2" --reader-target "$WORK/cm2/state/confmesh.sock" --writers "$WRITERS" --depth "$DEPTH" --rate "$RATE" --wait-peers 1 \
    --duration "$D" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" > "$WORK/confmesh-wait1.json"
nft_snap "$WORK/nft.cw1"; cpu_snap "$WORK/cpu.cw1"
ip netns exec "${P}p1" "$WRITE_LOAD_BIN" write --system confmesh --target "$WORK/cm1/state/confmesh.sock" \
    --reader-netns "${P}p2" --reader-target "$WORK/cm2/state/confmesh.sock" --writers 0 \
    --duration "$LIGHT" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" > "$WORK/confmesh-light.json"
# The load etcd sustained, offered to confmesh: lag compared at the same load.
SAME_RATE=$($PY -c 'import json, sys; print(max(1, round(json.load(open(sys.argv[1]))["writes_per_s"])))' "$WORK/etcd.json")
ip netns exec "${P}p1" "$WRITE_LOAD_BIN" write --system confmesh --target "$WORK/cm1/state/confmesh.sock" \
    --reader-netns "${P}p2" --reader-target "$WORK/cm2/state/confmesh.sock" --writers "$WRITERS" --depth "$DEPTH" --rate "$SAME_RATE" \
    --duration "$D" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" > "$WORK/confmesh-same.json"
stop_all

# ---- report ----------------------------------------------------------------------------------
echo "load average (1 min) at the start $LOAD0, at the end $(cut -d' ' -f1 /proc/loadavg) on $(nproc) cores: anything else running skews both systems" >&2
$PY - "$WORK" "$SELFTEST" <<'EOF'
import json, sys
work, selftest = sys.argv[1], int(sys.argv[2])
def snap(name):
    out = {}
    for line in open(f"{work}/nft.{name}"):
        n, p, b = line.split()
        out[n] = (int(p), int(b))
    return out
def delta(a, b, n):
    return snap(b)[n][0] - snap(a)[n][0], snap(b)[n][1] - snap(a)[n][1]
cm, et = json.load(open(f"{work}/confmesh.json")), json.load(open(f"{work}/etcd.json"))
cw = json.load(open(f"{work}/confmesh-wait1.json"))
rows = []
for r, (a, b), wire in ((cm, ("cm0", "cm1"), "n_ah"), (et, ("et0", "et1"), "n_etcdpeer"), (cw, ("cw0", "cw1"), "n_ah")):
    pk, by = delta(a, b, wire)
    f4, f6 = delta(a, b, "n_frag4")[0], delta(a, b, "n_frag6")[0]
    allp = delta(a, b, "n_all")[0]
    (t0, hz, *p0), (t1, _, *p1) = (list(map(int, open(f"{work}/cpu.{x}").read().split())) for x in (a, b))
    per = [(y - x) * 1000 / hz / max(r["acked"], 1) for x, y in zip(p0, p1)]
    rows.append(dict(r=r, pk=pk, by=by, frag=f4 + f6, allp=allp, cpu_ms=(t1 - t0) * 1000 / hz / max(r["acked"], 1), per=per))
fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
ratio = lambda a, b: "-" if a is None or b in (None, 0) else f"{a / b:.2f}"
offered = f", offered {cm['rate']} writes/s" if cm['rate'] else ""
print(f"replicated writes, 3 peers in namespaces, {cm['writers']} writers x {cm['depth']} in flight on peer 1{offered}, {cm['key_size']} B keys, "
      f"{cm['value_size']} B values, {cm['window_s']:.1f} s (confmesh) and {et['window_s']:.1f} s (etcd) from the first "
      f"write to the last acknowledgement; lag = ack on peer 1 -> visible on peer 2")
print(f"{'system':<22} {'writes/s':>9} {'repl/s':>9} {'ack p50/p99/max ms':>19} {'lag p50/p99 ms':>16} {'samples':>7} "
      f"{'B/write':>8} {'pkts/write':>10} {'fragments':>9} {'CPU ms/write':>12}")
ack = lambda r: f"{fmt(r['ack_ms']['p50'], 2)}/{fmt(r['ack_ms']['p99'], 1)}/{fmt(r['ack_ms'].get('max'), 0)}"
for x, name in zip(rows, ("confmesh (AH overlay)", "etcd (plain TCP)", "confmesh wait_peers=1")):
    r = x["r"]
    print(f"{name:<22} {r['writes_per_s']:>9.0f} {fmt(r['replicated_writes_per_s'], 0):>9} "
          f"{ack(r):>19} "
          f"{fmt(r['lag_ms']['p50'], 2) + '/' + fmt(r['lag_ms']['p99'], 1):>16} {r['lag_ms']['samples']:>7} "
          f"{x['by'] / max(r['acked'], 1):>8.0f} {x['pk'] / max(r['acked'], 1):>10.2f} {x['frag']:>9} {x['cpu_ms']:>12.3f}")
    if r["errors"] or r["lag_ms"]["timeouts"] or r["replicated_writes_per_s"] is None:
        print(f"  {name}: {r['errors']} failed writes (last: {r['last_error']}), {r['lag_ms']['timeouts']} probes "
              f"not visible within 5 s, {'not all replicated within 60 s' if r['replicated_writes_per_s'] is None else 'all replicated'}")
for name, f in (("confmesh at etcd's w/s", "confmesh-same"), ("confmesh, probe alone", "confmesh-light"), ("etcd, probe alone", "etcd-light")):
    r = json.load(open(f"{work}/{f}.json"))
    print(f"{name:<22} {r['writes_per_s']:>9.0f} {fmt(r['replicated_writes_per_s'], 0):>9} "
          f"{ack(r):>19} "
          f"{fmt(r['lag_ms']['p50'], 2) + '/' + fmt(r['lag_ms']['p99'], 1):>16} {r['lag_ms']['samples']:>7}"
          + (f"  ({r['lag_ms']['timeouts']} probes not visible within 5 s)" if r['lag_ms']['timeouts'] else ""))
c, e = rows[0]["r"], rows[1]["r"]
cl, el = json.load(open(f"{work}/confmesh-light.json")), json.load(open(f"{work}/etcd-light.json"))
cs = json.load(open(f"{work}/confmesh-same.json"))
print("B/write, pkts/write: on the wire through the router, all directions, per acknowledged write "
      "(confmesh: AH packets; etcd: TCP port 2380, member to member). CPU ms/write: user + system time of "
      "the three daemons over the run per acknowledged write.")
print("CPU ms/write per daemon (peer/member 1, 2, 3): " + "; ".join(
    f"{name} " + "/".join(f"{v:.3f}" for v in x["per"])
    for x, name in zip(rows, ("confmesh", "etcd", "confmesh wait_peers=1")))
    + f". Peer 1 is where the writes arrive (confmesh: their origin; etcd: the raft leader): with one host per "
    f"peer, as deployed, its CPU per write is what the busiest host spends; confmesh/etcd there: "
    f"{ratio(rows[0]['per'][0], rows[1]['per'][0])} (this machine runs all three on 2 cores, so above the sum counts).")
k = cm["counters"]
n = c["acked"]
print(f"confmesh counters on peer 1 per write: sync-stream bytes sent {k['sync_bytes_sent'] / n:.0f} "
      f"(= {k['sync_bytes_sent'] / max(k['sync_entries_sent'], 1):.0f} per entry per peer), received {k['sync_bytes_received'] / n:.1f}; "
      f"AH packets sent {k['dataplane_tx_packets_total'] / n:.2f}, received {k['dataplane_rx_packets_total'] / n:.2f}; "
      f"fragmentation attempts {k['dataplane_fragmentation_attempts_total']:.0f}, oversize {k['dataplane_oversize_total']:.0f}")
def sent(i, j, suffix):  # entries peer i sent to peer j, from peer i's status
    s = json.load(open(f"{work}/cmstatus.{i}.{suffix}"))
    origin = (10 << 24) | (96 << 16) | j
    return sum(p["entries_sent"] for p in s["replication"]["peers"] if p["origin"] == origin)
relayed = sum(sent(i, j, 1) - sent(i, j, 0) for i, j in ((2, 3), (3, 2)))
direct = sum(sent(1, j, 1) - sent(1, j, 0) for j in (2, 3))
print(f"confmesh entries per write sent by peer 1 to peers 2 and 3: {direct / n:.2f}; relayed between peers 2 and 3: "
      f"{relayed / n:.2f} (every copy is sync-stream bytes and AH packets on the wire)")
def store(i, suffix):  # peer i's store write-path counters
    return json.load(open(f"{work}/cmstatus.{i}.{suffix}"))["replication"].get("store", {})
for i in (1, 2):
    a, b = store(i, 0), store(i, 1)
    d = {k: b.get(k, 0) - a.get(k, 0) for k in ("journal_syncs", "journal_bytes", "checkpoints")}
    if d["journal_syncs"]:
        print(f"confmesh store on peer {i}: {n / d['journal_syncs']:.1f} writes per journal sync, "
              f"{d['journal_bytes'] / n:.0f} journal bytes per write, {d['checkpoints']} checkpoints into the database file")
print(f"fragments on the wire (IPv4 MF/offset, IPv6 fragment header) during confmesh: {rows[0]['frag'] + rows[2]['frag']}, during etcd: "
      f"{rows[1]['frag']} (the counter saw {selftest} fragments of a 3000-byte ping before the run)")
print(f"ratio confmesh/etcd: writes/s {ratio(c['writes_per_s'], e['writes_per_s'])} (goal >= 10), "
      f"repl/s {ratio(c['replicated_writes_per_s'], e['replicated_writes_per_s'])}, "
      f"lag p50 {ratio(c['lag_ms']['p50'], e['lag_ms']['p50'])} p99 {ratio(c['lag_ms']['p99'], e['lag_ms']['p99'])} (goal < 1), "
      f"bytes/write {ratio(rows[0]['by'] / c['acked'], rows[1]['by'] / e['acked'])}, "
      f"CPU/write {ratio(rows[0]['cpu_ms'], rows[1]['cpu_ms'])}; "
      f"lag at etcd's w/s (the same load) p50 {ratio(cs['lag_ms']['p50'], e['lag_ms']['p50'])} p99 {ratio(cs['lag_ms']['p99'], e['lag_ms']['p99'])}; "
      f"probe alone: lag p50 {ratio(cl['lag_ms']['p50'], el['lag_ms']['p50'])} p99 {ratio(cl['lag_ms']['p99'], el['lag_ms']['p99'])}; "
      f"confmesh wait_peers=1 (acknowledged, like etcd, once another peer has it): writes/s {ratio(cw['writes_per_s'], e['writes_per_s'])}, "
      f"lag p50 {ratio(cw['lag_ms']['p50'], e['lag_ms']['p50'])} p99 {ratio(cw['lag_ms']['p99'], e['lag_ms']['p99'])}, "
      f"CPU/write {ratio(rows[2]['cpu_ms'], rows[1]['cpu_ms'])}")
print("acknowledged: confmesh once durable on peer 1 (replication asynchronous), with wait_peers=1 once durable on peer 1 and "
      "one other peer; etcd once committed by a majority (raft: leader and one follower).")
EOF
