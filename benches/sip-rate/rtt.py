#!/usr/bin/python3
"""INVITE→200 response times from a pcap taken at the caller (benches/sip-rate.sh).

For each Call-ID: the time of the first INVITE the caller sent (from CALLER_IP) and of the first
200 to that INVITE it received (CSeq method INVITE). Prints "CALLS P50_MS P99_MS" over the calls
that have both (nearest-rank percentiles, microsecond timestamps), "0 - -" when there are none.
Standard library only; Ethernet or Linux cooked captures of IPv4/UDP.

Usage: rtt.py PCAP CALLER_IP
"""

import socket
import struct
import sys


def packets(path):
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            return
        magic = head[:4]
        if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
            endian = "<"
        elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
            endian = ">"
        else:
            raise SystemExit(f"rtt.py: {path} is not a pcap file")
        nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
        linktype = struct.unpack(endian + "I", head[20:24])[0]
        offset = {1: 14, 113: 16}.get(linktype)
        if offset is None:
            raise SystemExit(f"rtt.py: link type {linktype} not supported (Ethernet or Linux cooked)")
        rec = struct.Struct(endian + "IIII")
        while True:
            h = f.read(16)
            if len(h) < 16:
                return
            sec, frac, incl, _orig = rec.unpack(h)
            data = f.read(incl)
            if len(data) < incl:
                return
            t = sec + frac / (1e9 if nano else 1e6)
            ip = data[offset:]
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
                continue
            ihl = (ip[0] & 0x0F) * 4
            yield t, socket.inet_ntoa(ip[12:16]), ip[ihl + 8:]


def header(payload, names):
    for name in names:
        i = payload.find(b"\r\n" + name)
        if i >= 0:
            start = i + 2 + len(name)
            end = payload.find(b"\r\n", start)
            return payload[start:end if end >= 0 else len(payload)].strip()
    return None


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: rtt.py PCAP CALLER_IP")
    path, caller = sys.argv[1], sys.argv[2]
    sent, answered = {}, {}
    for t, src, payload in packets(path):
        if src == caller and payload.startswith(b"INVITE "):
            cid = header(payload, (b"Call-ID:", b"i:"))
            if cid is not None and cid not in sent:
                sent[cid] = t
        elif src != caller and payload.startswith(b"SIP/2.0 200"):
            cseq = header(payload, (b"CSeq:",))
            cid = header(payload, (b"Call-ID:", b"i:"))
            if cseq is not None and cseq.split()[-1:] == [b"INVITE"] and cid is not None and cid not in answered:
                answered[cid] = t
    times = sorted((answered[c] - sent[c]) * 1000.0 for c in sent if c in answered and answered[c] >= sent[c])
    if not times:
        print("0 - -")
        return
    rank = lambda q: times[max(0, min(len(times) - 1, -(-len(times) * q // 100) - 1))]
    print(f"{len(times)} {rank(50):.3f} {rank(99):.3f}")


if __name__ == "__main__":
    main()
