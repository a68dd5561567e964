"""A long-lived device (or module) on the unmodified Azure IoT device SDK for Python, for the
second hour: reconnects, hub restarts and token renewals are left to the SDK itself.

Usage: session_device.py device|module CONNECTION_STRING CA_PEM [SASTOKEN_TTL]

Connects (clean session 0, as the SDK always does; automatic reconnect every second), reads its
twin and then keeps the desired document the way a device application does: every desired
patch the SDK hands over is applied as a JSON merge patch (RFC 7386). Prints one JSON object per
line on stdout:
  {"ready": kind, "doc": {...}}                 once connected with the twin read
  {"connected": true|false}                     on every connection state change
  {"desired": patch, "doc": {...}}              per desired patch, with the document after it
  {"method": name, "payload": ...}              per method request (answered 200)
  {"c2d": body, "message_id": id}               per C2D message (devices)
  {"sent": text}                                after a telemetry message was acknowledged
Reads commands on stdin: `send TEXT` sends telemetry, `quit` shuts the client down.
"""
import json
import os
import sys
import threading

from azure.iot.device import X509, IoTHubDeviceClient, IoTHubModuleClient, Message, MethodResponse

lock = threading.Lock()


def emit(obj):
    with lock:
        print(json.dumps(obj), flush=True)


def merge(target, patch):
    """RFC 7386: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = merge(target.get(key), value)
    return target


def without_version(doc):
    return {k: v for k, v in doc.items() if k != "$version"}


def main() -> int:
    kind, connection_string, ca_path = sys.argv[1], sys.argv[2], sys.argv[3]
    options = {"connection_retry_interval": 1}
    # SDK_WEBSOCKETS=1: MQTT over WebSockets on port 443, as websockets=True does it.
    if os.environ.get("SDK_WEBSOCKETS") == "1":
        options["websockets"] = True
    if len(sys.argv) > 4:
        options["sastoken_ttl"] = int(sys.argv[4])
    with open(ca_path) as f:
        ca = f.read()
    cls = IoTHubModuleClient if kind == "module" else IoTHubDeviceClient
    cert_file = os.environ.get("SDK_X509_CERT")
    if cert_file:
        # X.509: the connection string gives the host and the device id; the certificate is
        # the credential (create_from_x509_certificate, as an X.509 device's code does it).
        fields = dict(p.split("=", 1) for p in connection_string.split(";"))
        client = cls.create_from_x509_certificate(
            x509=X509(cert_file=cert_file, key_file=os.environ["SDK_X509_KEY"]),
            hostname=fields["HostName"], device_id=fields["DeviceId"],
            server_verification_cert=ca, **options
        )
    else:
        client = cls.create_from_connection_string(
            connection_string, server_verification_cert=ca, **options
        )
    state = {"doc": {}}

    def on_desired(patch):
        with lock:
            state["doc"] = merge(state["doc"], without_version(patch))
            doc = json.loads(json.dumps(state["doc"]))
        emit({"desired": patch, "doc": doc})

    def on_method(request):
        client.send_method_response(
            MethodResponse.create_from_method_request(request, 200, {"handled": request.name})
        )
        emit({"method": request.name, "payload": request.payload})

    def on_message(message):
        emit({"c2d": message.data.decode("utf-8"), "message_id": message.message_id})

    def on_state():
        emit({"connected": client.connected})

    client.on_connection_state_change = on_state
    client.connect()
    client.on_twin_desired_properties_patch_received = on_desired
    client.on_method_request_received = on_method
    if kind == "device":
        client.on_message_received = on_message
    twin = client.get_twin()
    with lock:
        state["doc"] = merge(state["doc"], without_version(twin["desired"]))
        doc = json.loads(json.dumps(state["doc"]))
    emit({"ready": kind, "doc": doc})

    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "send":
            client.send_message(Message(arg))
            emit({"sent": arg})
        elif command == "quit":
            break
    client.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
