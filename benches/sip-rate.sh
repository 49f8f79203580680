#!/usr/bin/env bash
# SIP call rate through one confmesh peer and through Kamailio, in one run (issue 6 benchmark).
#
# Topology (netns-scripts/up.sh, prefix sipb, one peer):
#
#   sipbvcs 10.96.3.1   sipp UAC (benches/sip-rate/uac.xml): INVITE → 100/180 → 200 → ACK,
#        │               a hold of 0-100 ms (uniform), BYE → 200; alias meet.<n>, n cycling 1..100
#   sipbr (router)
#        │
#   sipbp1 10.96.1.1:5060   confmesh run, standalone (no [cluster]); the B2BUA routes alias
#        │                  ^meet\.(\w+)@ → conference meet-$1 → bridge b1 (placement claimed and
#        │                  participants counted in the store, bandwidth admitted per location)
#        │   10.96.1.1:5070 kamailio (Debian package), transaction stateful proxy: tm + sl + rr +
#        │                  textops (subst_uri with the same alias regexp → sip:meet-$1@bridge),
#        │                  record_route so ACK and BYE pass through it
#   sipbb1 10.96.4.1:5060   sipp UAS (benches/sip-rate/uas.xml), the bridge for both: answers at
#                           once (no pause before the 200), -aa for confmesh's OPTIONS probes
#
# Both systems run all the time, in the same namespace on the same cores; only the target of the
# caller changes (its own source port per system). Kamailio gets 8 UDP workers and 1 GB of shared
# memory (with 256 MB its tm runs out of memory near 2000 calls/s and answers 500).
#
# Rate search, per system, the two taking turns one step at a time: START_RATE, doubled while
# clean, then BISECT bisections between the highest clean and the lowest failed rate. A step
# sends RATE × STEP_SECS calls. It is clean when sipp reports every call created and successful,
# none failed (an unexpected message, a 4xx/5xx, or 5 s without the expected message), and
# retransmissions under 1 % of the calls (a rate carried only by responses later than T1 = 500 ms
# is not sustained). A step that fails by under 1 % is run once more (the machine is shared).
# STEP_SECS defaults to 35 s because confmesh keeps UDP server transactions 32 s after their final
# response (RFC 3261 timers J and L, 64×T1): shorter steps never fill its transaction table to the
# steady state of the rate. Each system's steps start after that system has been idle for its
# linger time (confmesh 33 s, Kamailio 6 s), and after a failed step nobody starts until the
# failing system's retransmissions are over.
#
# Then INVITE→200 response times at one rate for both (LAT_RATE, default the highest rate both
# passed), LAT_SECS long, from a tcpdump capture at the caller (benches/sip-rate/rtt.py: per
# Call-ID, first INVITE sent to first 200 received, microseconds).
#
# Prints one line per step (calls, ok, failed, retransmissions, sipp's own response times in whole
# ms, UDP receive-buffer drops in the three namespaces, CPU ms per call of the system under test,
# how busy the whole machine was), then a table: system, max clean calls/s, first failed rate,
# p50 and p99 INVITE→200 (ms) and CPU per call at the common rate; the ratio confmesh/Kamailio of
# the max clean rates (the goal: at least 1) and of CPU per call; how many confmesh calls are
# left once the last step's calls have had 64*T1 to end (should be 0); confmesh's SIP counters.
#
# Usage: benches/sip-rate.sh   (root; sipp from sip-tester, kamailio, tcpdump, curl, iproute2)
# Environment: SYSTEMS (default "confmesh kamailio"), START_RATE (250), MAX_RATE (8000), BISECT (2),
# STEP_SECS (35), LAT_RATE, LAT_SECS (15), SEARCH_BUDGET (480 s: no new search step after that),
# KAMAILIO_CHILDREN (8), KAMAILIO_SHM_MB (1024), MAX_CALL_SECS (confmesh's maximum call duration,
# 60), CM_GAP / KAM_GAP (idle seconds between a
# system's steps, 33 / 6), CONFMESH_BIN (prebuilt binary; default: cargo build --release into
# ${CARGO_TARGET_DIR:-target}), KEEP_WORK=1 keeps configs, logs, sipp traces and captures.
# With the defaults a run takes 9-11 minutes; every sipp has a global timeout, the search at most
# 20 rounds and SEARCH_BUDGET seconds.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE=$ROOT/benches/sip-rate
P=sipb
SYSTEMS=${SYSTEMS:-"confmesh kamailio"}
START_RATE=${START_RATE:-250}
MAX_RATE=${MAX_RATE:-8000}
BISECT=${BISECT:-2}
STEP_SECS=${STEP_SECS:-35}
LAT_SECS=${LAT_SECS:-15}
SEARCH_BUDGET=${SEARCH_BUDGET:-480}
# Idle time between two steps of one system: confmesh keeps UDP server transactions 64×T1 = 32 s
# after their final response (RFC 3261 timers J and L), Kamailio's tm 5 s (wait_timer).
CM_GAP=${CM_GAP:-33} KAM_GAP=${KAM_GAP:-6}
KAMAILIO_CHILDREN=${KAMAILIO_CHILDREN:-8}
KAMAILIO_SHM_MB=${KAMAILIO_SHM_MB:-1024}
MAX_CALL_SECS=${MAX_CALL_SECS:-60}
CM_ADDR=10.96.1.1 CM_PORT=5060
KAM_ADDR=10.96.1.1 KAM_PORT=5070
BRIDGE_ADDR=10.96.4.1 BRIDGE_PORT=5060
VCS_ADDR=10.96.3.1
CONFERENCES=100

die() { echo "sip-rate.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
command -v sipp >/dev/null || die "sipp not found (Debian package sip-tester: apt-get install sip-tester)"
KAMAILIO=$(command -v kamailio || true)
[ -n "$KAMAILIO" ] || die "kamailio not found (Debian package kamailio: apt-get install kamailio)"
KAM_MODULES=""
for d in /usr/lib/x86_64-linux-gnu/kamailio/modules /usr/lib/kamailio/modules /usr/lib64/kamailio/modules; do
    [ -f "$d/tm.so" ] && { KAM_MODULES=$d; break; }
done
[ -n "$KAM_MODULES" ] || die "kamailio modules (tm.so) not found under /usr/lib*/kamailio/modules"
command -v ss >/dev/null || die "ss not found (iproute2)"
command -v curl >/dev/null || die "curl not found (Debian package curl; reads confmesh's /metrics)"
command -v tcpdump >/dev/null || die "tcpdump not found (Debian package tcpdump; response times are taken from a capture)"
[ -x /usr/bin/python3 ] || die "/usr/bin/python3 not found (reads the capture)"
[[ $STEP_SECS =~ ^[0-9]+$ ]] && [ "$STEP_SECS" -ge 1 ] && [ "$STEP_SECS" -le 120 ] || die "STEP_SECS must be 1-120"
[[ $KAMAILIO_CHILDREN =~ ^[0-9]+$ ]] && [ "$KAMAILIO_CHILDREN" -ge 1 ] && [ "$KAMAILIO_CHILDREN" -le 64 ] || die "KAMAILIO_CHILDREN must be 1-64"
for v in START_RATE MAX_RATE BISECT LAT_SECS SEARCH_BUDGET MAX_CALL_SECS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number"
done
[ "$START_RATE" -ge 10 ] && [ "$START_RATE" -le "$MAX_RATE" ] && [ "$MAX_RATE" -le 20000 ] || die "need 10 <= START_RATE <= MAX_RATE <= 20000"
[ "$MAX_CALL_SECS" -ge 1 ] && [ "$MAX_CALL_SECS" -le 86400 ] || die "MAX_CALL_SECS must be 1-86400"
[ "$BISECT" -le 5 ] && [ "$LAT_SECS" -ge 1 ] && [ "$LAT_SECS" -le 60 ] && [ "$SEARCH_BUDGET" -le 1800 ] || die "BISECT <= 5, LAT_SECS 1-60, SEARCH_BUDGET <= 1800"
for sys in $SYSTEMS; do
    [ "$sys" = confmesh ] || [ "$sys" = kamailio ] || die "SYSTEMS: $sys is neither confmesh nor kamailio"
done

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${CONFMESH_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet --bin confmesh)
    CONFMESH_BIN=$TARGET/release/confmesh
fi
[ -x "$CONFMESH_BIN" ] || die "$CONFMESH_BIN is not an executable"

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    "$ROOT/netns-scripts/down.sh" "$P" >/dev/null 2>&1 || true
    if [ -n "${KEEP_WORK:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
"$ROOT/netns-scripts/down.sh" "$P" >/dev/null 2>&1 || true
"$ROOT/netns-scripts/up.sh" "$P" 1 >/dev/null

in_ns() { local ns=$1; shift; ip netns exec "$P$ns" "$@"; }
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
# cpu_ticks SYSTEM: user + system CPU time so far of the system's processes (Kamailio: the main
# process and its workers), in clock ticks; busy_ticks: of the whole machine (all CPUs).
cpu_ticks() {
    local pids=$CM_PID
    [ "$1" = kamailio ] && pids="$KAM_PID $(ps -o pid= --ppid "$KAM_PID" | tr '\n' ' ')"
    # Field 2 (comm) has no spaces for these programs; utime and stime are fields 14 and 15.
    (cd /proc && cat $(for p in $pids; do echo "$p/stat"; done) 2>/dev/null) | awk '{ t += $14 + $15 } END { print t + 0 }'
}
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
# UDP datagrams dropped for a full receive buffer, summed over the peer, bridge and VCS namespaces.
udp_drops() {
    local ns sum=0 v
    for ns in p1 b1 vcs; do
        v=$(in_ns "$ns" awk '/^Udp:/ { if (!h) { for (i = 1; i <= NF; i++) c[$i] = i; h = 1 } else print $c["RcvbufErrors"] }' /proc/net/snmp)
        sum=$(( sum + ${v:-0} ))
    done
    echo "$sum"
}
udp_bound() { in_ns "$1" ss -Hnlu src "$2:$3" 2>/dev/null | grep -q .; }

# --- the bridge -------------------------------------------------------------------------------
mkdir -p "$WORK/bridge"
(cd "$WORK/bridge" && exec ip netns exec "${P}b1" sipp -sf "$HERE/uas.xml" -i "$BRIDGE_ADDR" -p "$BRIDGE_PORT" \
    -aa -nostdin -buff_size 4194304 -trace_err -error_file "$WORK/bridge/errors.log" </dev/null >/dev/null 2>"$WORK/bridge/stderr") &
PIDS+=($!)
wait_until 10 udp_bound b1 "$BRIDGE_ADDR" "$BRIDGE_PORT" || die "the bridge sipp did not start: $(cat "$WORK/bridge/stderr")"

# --- confmesh, standalone ---------------------------------------------------------------------
CM=$WORK/confmesh
mkdir -p "$CM/state"
cat > "$CM/confmesh.toml" <<EOF
[peer]
hostname = "sipbench1"
serial = "SIPB1"
mgmt_addr = "10.96.0.1"
rendezvous_addrs = ["$CM_ADDR"]
state_dir = "$CM/state"
EOF
RUST_LOG=warn ip netns exec "${P}p1" "$CONFMESH_BIN" run --config "$CM/confmesh.toml" </dev/null >/dev/null 2>"$CM/log" &
CM_PID=$!
PIDS+=("$CM_PID")
cm() { in_ns p1 "$CONFMESH_BIN" "$@" --config "$CM/confmesh.toml"; }
wait_until 20 eval 'cm status --json >/dev/null 2>&1' || die "confmesh did not start: $(tail -5 "$CM/log")"
cm config set alias/meet '{"pattern": "^meet\\.(\\w+)@", "conference": "meet-$1", "call_kbps": 768, "location": "default"}' >/dev/null
cm config set location/default '{"limit_kbps": 1000000000}' >/dev/null
cm config set bridge/b1 "{\"uri\": \"sip:$BRIDGE_ADDR:$BRIDGE_PORT\", \"capacity\": 1000000}" >/dev/null
cm config set sip/options_interval_ms 1000 >/dev/null
# A call whose every BYE retransmission was dropped in an overloaded step (sipp gives up after
# 5 s) can only end at the maximum call duration; a day in production, MAX_CALL_SECS here (the
# bench's calls last under 0.2 s), so that the check at the end sees them hung up and counted in
# calls_expired_total instead of left over.
cm config set sip/max_call_duration_s "$MAX_CALL_SECS" >/dev/null
metrics() { in_ns p1 curl -fsS --max-time 2 http://10.96.0.1:8443/metrics 2>/dev/null; }
bridge_up() { metrics | grep -q '^confmesh_sip_bridge_up{bridge="b1"} 1$'; }
wait_until 15 bridge_up || die "confmesh does not see bridge b1 up (OPTIONS): $(metrics | grep -E '^confmesh_sip_bridge' || echo 'no /metrics on 10.96.0.1:8443')"
wait_until 10 udp_bound p1 "$CM_ADDR" "$CM_PORT" || die "confmesh is not on $CM_ADDR:$CM_PORT"

# --- Kamailio, transaction stateful, same alias routing ---------------------------------------
KAM=$WORK/kamailio
mkdir -p "$KAM/run"
cat > "$KAM/kamailio.cfg" <<EOF
#!KAMAILIO
# Generated by benches/sip-rate.sh: a transaction stateful proxy doing confmesh's alias routing.
debug=0
log_stderror=yes
children=$KAMAILIO_CHILDREN
disable_tcp=yes
listen=udp:$KAM_ADDR:$KAM_PORT
auto_aliases=no
dns=no
rev_dns=no
use_dns_cache=off
dns_try_ipv6=no
mpath="$KAM_MODULES/"

loadmodule "pv.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "maxfwd.so"

modparam("rr", "enable_full_lr", 0)

request_route {
    if (!mf_process_maxfwd_header("10")) {
        sl_send_reply("483", "Too Many Hops");
        exit;
    }
    # In-dialog requests (ACK, BYE) follow the Route set that record_route() put in place.
    if (has_totag()) {
        if (loose_route()) {
            t_relay();
            exit;
        }
        if (is_method("ACK")) {
            if (t_check_trans()) t_relay();
            exit;
        }
        sl_send_reply("404", "Not here");
        exit;
    }
    if (is_method("CANCEL")) {
        if (t_check_trans()) t_relay();
        exit;
    }
    # Retransmissions of a known transaction are absorbed (or their reply re-sent) by tm.
    t_check_trans();
    if (!is_method("INVITE")) {
        sl_send_reply("405", "Method Not Allowed");
        exit;
    }
    # The alias: confmesh's "^meet\\.(\\w+)@" on user@host, conference "meet-\$1", on the bridge.
    if (!subst_uri('/^sip:meet\\.([[:alnum:]_]+)@[^;?]*/sip:meet-\\1@$BRIDGE_ADDR:$BRIDGE_PORT/')) {
        sl_send_reply("404", "No such conference alias");
        exit;
    }
    record_route();
    if (!t_relay()) {
        sl_reply_error();
    }
    exit;
}
EOF
"$KAMAILIO" -c -f "$KAM/kamailio.cfg" -L "$KAM_MODULES" >"$KAM/check.log" 2>&1 || die "kamailio refuses its configuration: $(tail -5 "$KAM/check.log")"
ip netns exec "${P}p1" "$KAMAILIO" -f "$KAM/kamailio.cfg" -L "$KAM_MODULES" -DD -E -P "$KAM/kamailio.pid" \
    -Y "$KAM/run" -w "$KAM" -m "$KAMAILIO_SHM_MB" -M 16 </dev/null >/dev/null 2>"$KAM/log" &
KAM_PID=$!
PIDS+=("$KAM_PID")
wait_until 15 udp_bound p1 "$KAM_ADDR" "$KAM_PORT" || die "kamailio did not start: $(tail -5 "$KAM/log")"

# --- one step ---------------------------------------------------------------------------------
seq 0 "$CONFERENCES" | awk 'NR == 1 { print "SEQUENTIAL"; next } { print $1 }' > "$WORK/conferences.csv"

# run_calls SYSTEM RATE CALLS DIR [capture]: sipp UAC against SYSTEM (confmesh|kamailio); prints
# "created successful failed retransmissions rtd_p50 rtd_p99 seconds exit_code udp_drops cpu_ms_per_call
# machine_busy_percent" (rtd: sipp's own
# INVITE→200 response times, whole milliseconds of its coarse clock). With "capture", tcpdump
# records the caller's SIP in DIR/sip.pcap for rtt.py.
run_calls() {
    local sys=$1 rate=$2 calls=$3 dir=$4 capture=${5:-} addr port vport t0 t1 code=0 limit dump=""
    # Each system has its own caller port, so that one's late retransmissions never reach a caller
    # talking to the other.
    case $sys in
        confmesh) addr=$CM_ADDR port=$CM_PORT vport=5100 ;;
        kamailio) addr=$KAM_ADDR port=$KAM_PORT vport=5102 ;;
    esac
    rm -rf "$dir"; mkdir -p "$dir"
    limit=$(( calls / rate + 30 ))
    if [ -n "$capture" ]; then
        ip netns exec "${P}vcs" tcpdump -i eth0 -n -s 700 -B 16384 -Z root -w "$dir/sip.pcap" "udp port $vport" \
            </dev/null >/dev/null 2>"$dir/tcpdump.log" &
        dump=$!
        PIDS+=("$dump")
        wait_until 5 grep -q "listening on" "$dir/tcpdump.log" || { echo "sip-rate.sh: tcpdump did not start: $(cat "$dir/tcpdump.log")" >&2; }
    fi
    local drops0 cpu0 busy0; drops0=$(udp_drops) cpu0=$(cpu_ticks "$sys") busy0=$(busy_ticks)
    t0=$(now_ns)
    (cd "$dir" && ip netns exec "${P}vcs" sipp "$addr:$port" -sf "$HERE/uac.xml" -inf "$WORK/conferences.csv" \
        -i "$VCS_ADDR" -p "$vport" -r "$rate" -m "$calls" -l 100000 -buff_size 4194304 \
        -recv_timeout 5000 -timeout "${limit}s" -timeout_error -nostdin \
        -trace_stat -stf "$dir/stat.csv" -trace_rtt -rtt_freq 100 -trace_err -error_file "$dir/errors.log" \
        </dev/null >/dev/null 2>"$dir/stderr") || code=$?
    t1=$(now_ns)
    local cpu1 busy1; cpu1=$(cpu_ticks "$sys") busy1=$(busy_ticks)
    if [ -n "$dump" ]; then
        sleep 0.3
        kill -INT "$dump" 2>/dev/null || true
        wait "$dump" 2>/dev/null || true
    fi
    # The last line of the statistics has the cumulative counters.
    local counts pct
    counts=$(awk -F';' 'NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        { last = $0 } END { n = split(last, f, ";");
          printf "%s %s %s %s", f[col["TotalCallCreated"]] + 0, f[col["SuccessfulCall(C)"]] + 0,
                 f[col["FailedCall(C)"]] + 0, f[col["Retransmissions(C)"]] + 0 }' "$dir/stat.csv" 2>/dev/null || true)
    [ -n "$counts" ] || counts="0 0 0 0"
    pct=$( (cat "$dir"/*_rtt.csv 2>/dev/null || true) | awk -F';' '$2 ~ /^[0-9.]+$/ { print $2 }' | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) { print "- -"; exit }
             i50 = int(NR * 0.50 + 0.999999); i99 = int(NR * 0.99 + 0.999999);
             printf "%d %d", v[i50 < 1 ? 1 : i50], v[i99 < 1 ? 1 : i99] }')
    echo "$counts $pct $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }') $code $(( $(udp_drops) - drops0 ))" \
        "$(awk -v c=$(( cpu1 - cpu0 )) -v n="$calls" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", c * 1000 / hz / n }')" \
        "$(awk -v b=$(( busy1 - busy0 )) -v a="$t0" -v z="$t1" -v hz="$(getconf CLK_TCK)" -v cpus="$(nproc)" \
            'BEGIN { printf "%.0f", b / hz / ((z - a) / 1e9) / cpus * 100 }')"
}

# is_clean CREATED SUCCESSFUL FAILED CALLS RETRANSMISSIONS ... EXIT: every call created and
# successful, none failed, and retransmissions (a response later than T1 = 500 ms) under 1 % of the
# calls: a rate that is only carried by retransmissions is not sustained.
is_clean() { [ "$1" = "$4" ] && [ "$2" = "$4" ] && [ "$3" = 0 ] && [ $(( $5 * 100 )) -lt "$4" ] && [ "$8" = 0 ]; }

# Warm-up: a few calls through each, which must all succeed (else the set-up is wrong).
for sys in $SYSTEMS; do
    read -r c s f x a b e code d cpu busy < <(run_calls "$sys" 20 40 "$WORK/warmup.$sys")
    if ! is_clean "$c" "$s" "$f" 40 "$x" "$a" "$b" "$code"; then
        echo "sip-rate.sh: warm-up through $sys failed: created $c, successful $s, failed $f (sipp exit $code)" >&2
        tail -20 "$WORK/warmup.$sys/errors.log" "$WORK/warmup.$sys/stderr" >&2 2>/dev/null || true
        [ "$sys" = kamailio ] && tail -20 "$KAM/log" >&2
        [ "$sys" = confmesh ] && tail -20 "$CM/log" >&2
        KEEP_WORK=1
        exit 1
    fi
done

line() { printf '%-9s %6s %7s %7s %6s %7s %7s %7s %6s %6s %8s %5s  %s\n' "$@"; }
round10() { echo $(( ($1 + 5) / 10 * 10 )); }
# wait_gap SYSTEM: a system's next step starts GAP seconds after its previous one ended, so that
# every step begins with an empty transaction table and fills it at the step's rate alone; and no
# step starts while a system that failed its last step may still be retransmitting (QUIET_UNTIL).
wait_gap() {
    local left
    left=$(awk -v end="${LAST_END[$1]}" -v now="$(now_ns)" -v gap="${GAP[$1]}" -v quiet="$QUIET_UNTIL" 'BEGIN {
        l = gap - (now - end) / 1e9; q = (quiet - now) / 1e9; if (q > l) l = q; print (l > 0 ? l : 0) }')
    sleep "$left"
}
QUIET_UNTIL=0
# after_step SYSTEM RESULT: records the end of a step.
after_step() {
    LAST_END[$1]=$(now_ns)
    [ "$2" = clean ] || QUIET_UNTIL=$(( LAST_END[$1] + GAP[$1] * 1000000000 ))
}

# The rate search, per system: START_RATE, doubling while clean, then BISECT bisections between
# the highest clean and the lowest failed rate. The systems take turns, one step each.
echo "search: ${STEP_SECS} s steps, hold 0-100 ms; rtd = sipp's INVITE→200 (whole ms, coarse clock)"
line system rate calls ok failed retrans rtd_p50 rtd_p99 secs drops cpu_ms/c busy% result
declare -A LO HI NEXT DONE BIS LAST_END RESULT
declare -A GAP=([confmesh]=$CM_GAP [kamailio]=$KAM_GAP)
for sys in $SYSTEMS; do LO[$sys]=0 HI[$sys]=0 NEXT[$sys]=$START_RATE DONE[$sys]=0 BIS[$sys]=0 LAST_END[$sys]=0; done
deadline=$(( $(date +%s) + SEARCH_BUDGET ))
for round in $(seq 1 20); do
    all_done=1
    for sys in $SYSTEMS; do
        [ "${DONE[$sys]}" = 1 ] && continue
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "  ($sys: search budget of $SEARCH_BUDGET s spent; stopping at $((LO[$sys])) calls/s clean)"
            DONE[$sys]=1; continue
        fi
        all_done=0
        rate=${NEXT[$sys]}
        calls=$(( rate * STEP_SECS ))
        for try in 1 2; do
            wait_gap "$sys"
            read -r c s f x a b e code d cpu busy < <(run_calls "$sys" "$rate" "$calls" "$WORK/$sys.$rate.$try")
            if is_clean "$c" "$s" "$f" "$calls" "$x" "$a" "$b" "$code"; then result=clean; else result=fail; fi
            after_step "$sys" "$result"
            line "$sys" "$rate" "$c" "$s" "$f" "$x" "$a" "$b" "$e" "$d" "$cpu" "$busy" "$result$([ "$try" = 2 ] && echo ' (retry)' || true)"
            # A few failed or late calls (under 1 %) may be the shared machine: such a step is run
            # again once.
            [ "$result" = clean ] || [ "$try" = 2 ] || [ $(( (calls - s) * 100 )) -ge "$calls" ] ||
                [ $(( x * 100 )) -ge "$calls" ] && break
        done
        if [ "$result" = clean ]; then LO[$sys]=$rate; else HI[$sys]=$rate; fi
        if [ "${HI[$sys]}" = 0 ]; then
            if [ $(( rate * 2 )) -gt "$MAX_RATE" ]; then DONE[$sys]=1; else NEXT[$sys]=$(( rate * 2 )); fi
        else
            mid=$(round10 $(( (LO[$sys] + HI[$sys]) / 2 )))
            if [ "${BIS[$sys]}" -ge "$BISECT" ] || [ "$mid" -le "${LO[$sys]}" ] || [ "$mid" -ge "${HI[$sys]}" ]; then
                DONE[$sys]=1
            else
                BIS[$sys]=$(( BIS[$sys] + 1 )); NEXT[$sys]=$mid
            fi
        fi
    done
    [ "$all_done" = 1 ] && break
done

# Response times INVITE→200 at one rate for all (default: the highest rate every system passed),
# from a capture at the caller: microseconds, every call.
common=$MAX_RATE
for sys in $SYSTEMS; do [ "${LO[$sys]}" -lt "$common" ] && common=${LO[$sys]}; done
LAT_RATE=${LAT_RATE:-$common}
[[ $LAT_RATE =~ ^[0-9]+$ ]] && [ "$LAT_RATE" -le 20000 ] || die "LAT_RATE must be a rate up to 20000 calls/s"
declare -A P50 P99 CPU
for sys in $SYSTEMS; do P50[$sys]=- P99[$sys]=- CPU[$sys]=-; done
if [ "$LAT_RATE" -gt 0 ]; then
    echo "response times: $LAT_RATE calls/s for $LAT_SECS s, INVITE→200 from a capture at the caller"
    line system rate calls ok failed retrans rtd_p50 rtd_p99 secs drops cpu_ms/c busy% result
    for sys in $SYSTEMS; do
        calls=$(( LAT_RATE * LAT_SECS ))
        wait_gap "$sys"
        read -r c s f x a b e code d cpu busy < <(run_calls "$sys" "$LAT_RATE" "$calls" "$WORK/$sys.latency" capture)
        if is_clean "$c" "$s" "$f" "$calls" "$x" "$a" "$b" "$code"; then result=clean; else result="not clean"; fi
        after_step "$sys" "$result"
        line "$sys" "$LAT_RATE" "$c" "$s" "$f" "$x" "$a" "$b" "$e" "$d" "$cpu" "$busy" "$result"
        read -r n p50 p99 < <(/usr/bin/python3 "$HERE/rtt.py" "$WORK/$sys.latency/sip.pcap" "$VCS_ADDR" || echo "0 - -")
        P50[$sys]=$p50 P99[$sys]=$p99 CPU[$sys]=$cpu
        dropped=$(grep -o '[0-9]* packets dropped by kernel' "$WORK/$sys.latency/tcpdump.log" | awk '{ print $1 }' || true)
        [ "${dropped:-0}" = 0 ] || echo "  ($sys: tcpdump dropped $dropped packets; percentiles over the $n calls captured whole)"
    done
fi

echo
for sys in $SYSTEMS; do
    [ "${HI[$sys]}" = 0 ] && echo "note: $sys never failed (up to ${LO[$sys]} calls/s); its maximum is at least that"
done
printf '%-9s %14s %14s %10s %10s %12s   (INVITE→200 and CPU per call at %s calls/s)\n' system max_clean_cps first_failed p50_ms p99_ms cpu_ms/call "$LAT_RATE"
for sys in $SYSTEMS; do
    printf '%-9s %14s %14s %10s %10s %12s\n' "$sys" "${LO[$sys]}" "$([ "${HI[$sys]}" = 0 ] && echo - || echo "${HI[$sys]}")" \
        "${P50[$sys]}" "${P99[$sys]}" "${CPU[$sys]}"
done
if [[ " $SYSTEMS " == *" confmesh "* && " $SYSTEMS " == *" kamailio "* ]]; then
    if [ "${LO[kamailio]}" -gt 0 ]; then
        awk -v c="${LO[confmesh]}" -v k="${LO[kamailio]}" 'BEGIN {
            printf "ratio confmesh/kamailio (max clean calls/s) = %.2f   (goal: at least 1)\n", c / k }'
        [ "${CPU[kamailio]}" = - ] || [ "${CPU[confmesh]}" = - ] || awk -v c="${CPU[confmesh]}" -v k="${CPU[kamailio]}" 'BEGIN {
            if (k > 0) printf "ratio confmesh/kamailio (CPU per call)       = %.2f   (below 1: confmesh uses less)\n", c / k }'
    else
        echo "ratio confmesh/kamailio: Kamailio had no clean rate"
    fi
fi
# No call may be left behind (issue 6: 83 calls stayed active after an overload run). Every call
# of the last step ends within 64*T1 = 32 s even if its caller never ACKs, and one whose BYE was
# lost under overload at MAX_CALL_SECS, plus 64*T1 for the BYEs it then sends to a caller that
# may be gone; wait for that (at most MAX_CALL_SECS + 37 s) and say what is left, by state.
if [[ " $SYSTEMS " == *" confmesh "* ]]; then
    calls_active() { metrics | awk '$1 == "confmesh_sip_calls_active" { print $2 }'; }
    waited=$(date +%s)
    wait_until $(( MAX_CALL_SECS + 37 )) eval '[ "$(calls_active)" = 0 ]' || true
    left=$(calls_active)
    echo "confmesh calls left $(( $(date +%s) - waited )) s after the last step: ${left:-unknown}$([ "${left:-0}" = 0 ] ||
        metrics | awk '/^confmesh_sip_calls_by_state/ && $2 != 0 { sub(/^confmesh_sip_calls_by_state/, ""); printf " %s=%s", $1, $2 }')"
fi
# confmesh's own counters over the whole run, for the record.
metrics | awk '/^confmesh_sip_(calls_active|transactions|calls_total|calls_answered_total|calls_failed_total|calls_expired_total|calls_unacknowledged_total|overloaded_total|retransmissions_total|send_failures_total|parse_errors_total) / { printf "%s%s=%s", sep, substr($1, 14), $2; sep = " " } END { if (sep) print "" }' | sed 's/^/confmesh counters: /' || true
