#!/usr/bin/python3
"""Independent AH/ESP implementation for confmesh's interop test: scapy's SecurityAssociation.

Reads one JSON document on stdin:
  {"ah_key": hex, "esp_key": hex (AES-256 key then 4-byte salt),
   "a": {"mgmt": ip, "overlay": ip}, "b": {...},
   "spi_ab": int, "spi_ba": int, "pcap": path,
   "from_confmesh": [{"proto": "ah"|"esp", "hex": outer packet a->b}],
   "to_confmesh": [{"proto": "ah"|"esp", "inner_hex": inner packet b->a, "seq": int}]}

Verifies and decrypts every confmesh packet with scapy (SA a->b), protects every inner packet
with scapy (SA b->a, tunnel header b->a with DF), writes confmesh's packets to the pcap for
tshark, and prints {"opened": [inner hex...], "sealed": [{"proto", "hex"}...]}. Any ICV failure
raises, so the test sees a non-zero exit.
"""
import json
import sys

from scapy.all import IP, wrpcap
from scapy.layers.ipsec import AH, ESP, SecurityAssociation


def sa(proto, spi, key_hex, src, dst):
    key = bytes.fromhex(key_hex)
    tunnel = IP(src=src, dst=dst, flags="DF", ttl=64)
    if proto == "ah":
        return SecurityAssociation(AH, spi=spi, auth_algo="SHA2-256-128", auth_key=key, tunnel_header=tunnel)
    return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=key, tunnel_header=tunnel)


def main():
    req = json.load(sys.stdin)
    a, b = req["a"], req["b"]
    keys = {"ah": req["ah_key"], "esp": req["esp_key"]}
    opened, sealed, capture = [], [], []
    for item in req["from_confmesh"]:
        proto = item["proto"]
        raw = bytes.fromhex(item["hex"])
        capture.append(IP(raw))  # a copy: decrypt may rewrite the packet it is given
        packet = IP(raw)
        inner = sa(proto, req["spi_ab"], keys[proto], a["mgmt"], b["mgmt"]).decrypt(packet)
        opened.append(bytes(inner).hex())
    for item in req["to_confmesh"]:
        proto = item["proto"]
        inner = IP(bytes.fromhex(item["inner_hex"]))
        outer = sa(proto, req["spi_ba"], keys[proto], b["mgmt"], a["mgmt"]).encrypt(inner, seq_num=item["seq"])
        sealed.append({"proto": proto, "hex": bytes(outer).hex()})
    wrpcap(req["pcap"], capture)
    json.dump({"opened": opened, "sealed": sealed}, sys.stdout)


if __name__ == "__main__":
    main()
