"""Sends COUNT messages one after another with the unmodified Azure IoT device SDK for
Python, each waiting for its acknowledgement, and prints a line per message sent.

Usage: refused_send.py CONNECTION_STRING CA_PEM COUNT SIZE
The hub's store-and-forward quota is full part of the time: it must not leave send_message
waiting forever (it holds the message and acknowledges it once the store has room).
"""
import sys
import time

from azure.iot.device import IoTHubDeviceClient, Message


def main() -> int:
    connection_string, ca_path = sys.argv[1], sys.argv[2]
    count, size = int(sys.argv[3]), int(sys.argv[4])
    with open(ca_path) as f:
        ca = f.read()
    client = IoTHubDeviceClient.create_from_connection_string(
        connection_string,
        server_verification_cert=ca,
        connection_retry=True,
        connection_retry_interval=1,
    )
    client.connect()
    started = time.monotonic()
    for i in range(count):
        msg = Message("x" * size)
        msg.custom_properties["seq"] = str(i)
        client.send_message(msg)
        print(f"sent {i} {time.monotonic() - started:.1f}", flush=True)
    client.shutdown()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
