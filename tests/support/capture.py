"""Capture TCP payloads on one interface with an AF_PACKET socket (no tcpdump needed).
Capture on a bridge *port* (a veth), where every frame of that link passes once.

Usage (inside the namespace that owns IFACE): capture.py IFACE OUT.json STOPFILE
Writes, when STOPFILE appears, a JSON list of {"src", "dst", "sport", "dport", "payload"}
(payload hex, first 256 bytes) for every IPv4 TCP segment that carried data.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

iface, out_path, stop_file = sys.argv[1], sys.argv[2], sys.argv[3]
ETH_P_ALL = 0x0003
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
sock.bind((iface, 0))
sock.settimeout(0.1)
seen = []
open(out_path + ".ready", "w").close()
while not os.path.exists(stop_file):
    try:
        frame, addr = sock.recvfrom(65535)
    except TimeoutError:
        continue
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        continue
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != 6:
        continue
    total = struct.unpack("!H", ip[2:4])[0]
    tcp = ip[ihl:total]
    if len(tcp) < 20:
        continue
    sport, dport = struct.unpack("!HH", tcp[:4])
    payload = tcp[(tcp[12] >> 4) * 4 :]
    if payload:
        seen.append(
            {
                "src": socket.inet_ntoa(ip[12:16]),
                "dst": socket.inet_ntoa(ip[16:20]),
                "sport": sport,
                "dport": dport,
                "payload": payload[:256].hex(),
            }
        )
with open(out_path, "w") as f:
    json.dump(seen, f)
