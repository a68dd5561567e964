"""Drives the device plane with the unmodified Azure IoT device SDK for Python.

Usage: device_plane.py device|module CONNECTION_STRING CA_PEM

Prints one JSON object per line on stdout: first {"ready": ..., "twin": ...} once the
client is connected, has read its twin and patched its reported properties; then one line per
event the hub sends (desired patch, method request, C2D message for a device). Exits after
all expected events arrived, or after 60 s.
"""
import json
import os
import queue
import sys

from azure.iot.device import X509, IoTHubDeviceClient, IoTHubModuleClient, MethodResponse


def emit(obj):
    print(json.dumps(obj), flush=True)


def main() -> int:
    kind, connection_string, ca_path = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(ca_path) as f:
        ca = f.read()
    cls = IoTHubModuleClient if kind == "module" else IoTHubDeviceClient
    # SDK_WEBSOCKETS=1: MQTT over WebSockets on port 443, as websockets=True does it.
    websockets = os.environ.get("SDK_WEBSOCKETS") == "1"
    cert_file = os.environ.get("SDK_X509_CERT")
    if cert_file:
        # X.509: the connection string gives the host and the ids; the certificate is the
        # credential (create_from_x509_certificate, as an X.509 device's code does it).
        fields = dict(p.split("=", 1) for p in connection_string.split(";"))
        x509 = X509(cert_file=cert_file, key_file=os.environ["SDK_X509_KEY"])
        ids = {"device_id": fields["DeviceId"]}
        if kind == "module":
            ids["module_id"] = fields["ModuleId"]
        client = cls.create_from_x509_certificate(
            x509=x509, hostname=fields["HostName"], server_verification_cert=ca,
            connection_retry=False, websockets=websockets, **ids
        )
    else:
        client = cls.create_from_connection_string(
            connection_string, server_verification_cert=ca, connection_retry=False, websockets=websockets
        )
    events = queue.Queue()

    def on_desired(patch):
        events.put({"desired": patch})

    def on_method(request):
        client.send_method_response(
            MethodResponse.create_from_method_request(request, 200, {"handled": request.name, "echo": request.payload})
        )
        events.put({"method": request.name, "payload": request.payload})

    def on_message(message):
        events.put({
            "c2d": message.data.decode("utf-8"),
            "properties": message.custom_properties,
            "message_id": message.message_id,
        })

    client.connect()
    client.on_twin_desired_properties_patch_received = on_desired
    client.on_method_request_received = on_method
    expected = {"desired", "method"}
    if kind == "device":
        client.on_message_received = on_message
        expected.add("c2d")
    twin = client.get_twin()
    client.patch_twin_reported_properties({"fw": "1.2.3", "sdk": "python"})
    emit({"ready": kind, "twin": twin})
    seen = set()
    while not expected <= seen:
        try:
            event = events.get(timeout=60)
        except queue.Empty:
            emit({"timeout": sorted(expected - seen)})
            return 1
        seen.update(k for k in ("desired", "method", "c2d") if k in event)
        emit(event)
    client.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
