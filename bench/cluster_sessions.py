#!/usr/bin/env python3
"""Persistent-session timings for bench/cluster.sh (standard library only; MQTT 3.1.1 by hand).

  cluster_sessions.py URL TOKEN MQTT[,MQTT...] COUNT THREADS

Registers COUNT devices, then each connects as the Azure IoT SDKs do (clean session 0, the
SDK's four SUBSCRIBEs, each acknowledged only once the session holding it is stored) and
disconnects; then each connects again, to the *next* MQTT address of the list (another node
of a cluster), expecting its session back (CONNACK session-present 1) without subscribing.
Prints one JSON object: first connects with subscriptions per second, resumes per second,
and how many resumes found their session.
"""
import base64
import hashlib
import hmac
import json
import socket
import struct
import sys
import time
import urllib.parse

from cluster_api import call, conn, run_threads

FILTERS = [
    "devices/{d}/messages/devicebound/#",
    "$iothub/twin/res/#",
    "$iothub/twin/PATCH/properties/desired/#",
    "$iothub/methods/POST/#",
]


def utf8(s):
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def remaining(n):
    out = b""
    while True:
        byte = n % 128
        n //= 128
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def packet(kind, body):
    return bytes([kind]) + remaining(len(body)) + body


def read_packet(s):
    head = s.recv(1)
    if not head:
        raise ConnectionError("closed")
    mult, length = 1, 0
    while True:
        b = s.recv(1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = s.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return head[0], body


def sas(hostname, device, key):
    sr = urllib.parse.quote(f"{hostname}/devices/{device}", safe="")
    expiry = int(time.time()) + 3600
    sig = hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = urllib.parse.quote(base64.b64encode(sig).decode(), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"


def connect(addr, hostname, device, key):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    flags = 0x80 | 0x40  # username, password; clean session 0
    body = utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + utf8(device)
    body += utf8(f"{hostname}/{device}/?api-version=2021-04-12") + utf8(sas(hostname, device, key))
    s.sendall(packet(0x10, body))
    kind, ack = read_packet(s)
    if kind >> 4 != 2 or ack[1] != 0:
        raise ConnectionError(f"refused: {ack!r}")
    return s, bool(ack[0] & 1)


def main():
    url, token, mqtts, count, threads = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4]), int(sys.argv[5])
    c = conn(url)
    status, body = call(c, token, "GET", "/hub")
    hostname = json.loads(body)["hostname"]
    keys = {}
    for i in range(count):
        d = f"sess-{i:05d}"
        status, body = call(c, token, "POST", "/devices", {"deviceId": d})
        keys[d] = json.loads(body)["authentication"]["symmetricKey"]["primaryKey"]
    devices = sorted(keys)
    per = count // threads
    errors = []

    def first(t):
        for i in range(t * per, (t + 1) * per):
            d = devices[i]
            try:
                s, _ = connect(mqtts[i % len(mqtts)], hostname, d, keys[d])
                for n, f in enumerate(FILTERS, 1):
                    s.sendall(packet(0x82, struct.pack("!H", n) + utf8(f.format(d=d)) + b"\x01"))
                    kind, _ = read_packet(s)
                    if kind >> 4 != 9:
                        raise ConnectionError(f"no SUBACK: {kind}")
                s.sendall(b"\xe0\x00")
                s.close()
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(str(e))

    present = []

    def resume(t):
        for i in range(t * per, (t + 1) * per):
            d = devices[i]
            try:
                s, p = connect(mqtts[(i + 1) % len(mqtts)], hostname, d, keys[d])
                present.append(p)
                s.sendall(b"\xe0\x00")
                s.close()
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))

    first_s = run_threads(threads, first)
    time.sleep(0.5)
    resume_s = run_threads(threads, resume)
    n = per * threads
    print(json.dumps({
        "devices": n, "threads": threads, "nodes": len(mqtts),
        "first_connect_and_4_subscribes_per_s": round(n / first_s, 1),
        "resume_on_next_node_per_s": round(n / resume_s, 1),
        "sessions_found": sum(present), "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }))


if __name__ == "__main__":
    main()
