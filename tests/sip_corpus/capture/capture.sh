#!/usr/bin/env bash
# Re-captures the SIP corpus in tests/sip_corpus/ with sipp on loopback (ports 25060-25074 on
# 127.0.0.1) and tcpdump; needs root for tcpdump, sipp 3.6 and /usr/bin/python3 with scapy.
# Only what this script starts is stopped, by PID; every step is bounded by `timeout`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(dirname "$here")
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

capture() { # name port client-args server-args
  local name=$1 port=$2 cargs=$3 sargs=$4
  tcpdump -i lo -U -w "$tmp/$name.pcap" "port $port" >/dev/null 2>&1 & local td=$!; pids+=("$td")
  sleep 1
  (cd "$tmp" && timeout 20 sipp $sargs -i 127.0.0.1 -p "$port" -m 1 -nostdin >/dev/null 2>&1) & local sv=$!; pids+=("$sv")
  sleep 0.5
  (cd "$tmp" && timeout 20 sipp $cargs -i 127.0.0.1 -p $((port - 10)) -m 1 "127.0.0.1:$port" -nostdin >/dev/null 2>&1)
  sleep 1
  kill "$sv" 2>/dev/null || true; kill "$td"; wait "$td" 2>/dev/null || true
}
capture call 25070 "-sn uac" "-sn uas"
capture tcp 25072 "-sn uac -t t1" "-sn uas -t t1"
capture flow 25074 "-sf $here/client.xml" "-sf $here/server.xml"

/usr/bin/python3 - "$tmp" "$out" <<'PY'
import sys
from scapy.all import rdpcap, UDP, TCP, Raw
tmp, out = sys.argv[1], sys.argv[2]
def payloads(name):
    return [(p[UDP].sport if UDP in p else p[TCP].sport, bytes(p[Raw].load)) for p in rdpcap(f"{tmp}/{name}.pcap") if Raw in p]
names = {
    "call": ["invite-sdp", "180-ringing", "200-invite-sdp", "ack", "bye", "200-bye"],
    "flow": ["options-three-vias", "200-options", "register", "200-register", "invite-compact-sdp",
             "100-trying", "180-ringing", "cancel", "200-cancel", "487-invite", "ack-487"],
}
for flow, labels in names.items():
    msgs = payloads(flow)
    assert len(msgs) == len(labels), (flow, len(msgs))
    for i, ((_, data), label) in enumerate(zip(msgs, labels), 1):
        open(f"{out}/{flow}-{i:02}-{label}.sip", "wb").write(data)
# Not captured (sipp strips leading whitespace from scenario lines, so it cannot fold): the
# captured INVITE with three header fields folded over continuation lines (RFC 3261 §7.3.1).
inv = open(f"{out}/call-01-invite-sdp.sip", "rb").read()
head, body = inv.split(b"\r\n\r\n", 1)
lines = head.split(b"\r\n")
for i, l in enumerate(lines):
    if l.startswith(b"Via: "):
        lines[i] = l.replace(b";branch=", b"\r\n ;branch=", 1)
    elif l.startswith(b"To: "):
        lines[i] = l.replace(b" <", b"\r\n   <", 1)
    elif l.startswith(b"Subject: "):
        lines[i] = l.replace(b" Test", b"\r\n\tTest", 1)
open(f"{out}/derived-folded-headers.sip", "wb").write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
# The client's side of the TCP call: INVITE then ACK, as one byte stream.
client = b"".join(d for port, d in payloads("tcp") if port == 25062)
invite_ack = client[: client.index(b"BYE ")]
open(f"{out}/tcp-invite-ack.stream", "wb").write(invite_ack)
PY
echo "corpus written to $out"
