"""Sends one telemetry message with the unmodified Azure IoT device SDK for Python.

Usage: send_message.py CONNECTION_STRING CA_PEM MESSAGE_ID
The SDK always connects to port 8883 of the connection string's HostName over TLS.
"""
import sys

from azure.iot.device import IoTHubDeviceClient, Message


def main() -> int:
    connection_string, ca_path, message_id = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(ca_path) as f:
        ca = f.read()
    client = IoTHubDeviceClient.create_from_connection_string(
        connection_string, server_verification_cert=ca, connection_retry=False
    )
    client.connect()
    msg = Message('{"temperature": 21.5}')
    msg.message_id = message_id
    msg.content_type = "application/json"
    msg.content_encoding = "utf-8"
    msg.custom_properties["alert"] = "high"
    msg.custom_properties["site"] = "plant 7"
    client.send_message(msg)
    client.shutdown()
    print("sent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
