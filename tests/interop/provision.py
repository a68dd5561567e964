"""Provisions devices with the unmodified Azure IoT device SDK for Python, as a fleet's
firmware does it: ProvisioningDeviceClient with symmetric-key attestation registers through
the Device Provisioning Service protocol, then IoTHubDeviceClient connects to the hub it was
assigned with the same key and sends one telemetry message.

Usage: provision.py HOST ID_SCOPE CA_PEM KEY_MODE KEY REGISTRATION_ID...

KEY_MODE is `group` (KEY is the enrollment group's key; each device derives its own as the
SDK samples do: base64(HMAC-SHA256(group key, registration id))) or `device` (KEY is the
device's own key, as for an individual enrollment, or a wrong one).

Prints one JSON object per registration id: {"registrationId", "status", "assignedHub",
"deviceId", "sent"} or {"registrationId", "error", "message", "cause"}. Runs 25 devices at a time.
"""
import base64
import concurrent.futures
import hashlib
import hmac
import json
import os
import sys

from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient


def derive_device_key(group_key: str, registration_id: str) -> str:
    digest = hmac.new(
        base64.b64decode(group_key), registration_id.encode("utf-8"), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode("utf-8")


# SDK_WEBSOCKETS=1: both clients over MQTT over WebSockets on port 443 (websockets=True).
WEBSOCKETS = os.environ.get("SDK_WEBSOCKETS") == "1"


def provision(host, scope, ca, key_mode, key, registration_id):
    device_key = derive_device_key(key, registration_id) if key_mode == "group" else key
    out = {"registrationId": registration_id}
    try:
        client = ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host=host,
            registration_id=registration_id,
            id_scope=scope,
            symmetric_key=device_key,
            server_verification_cert=ca,
            websockets=WEBSOCKETS,
        )
        result = client.register()
        out["status"] = result.status
        state = result.registration_state
        if result.status != "assigned" or state is None:
            return out
        out["assignedHub"] = state.assigned_hub
        out["deviceId"] = state.device_id
        device = IoTHubDeviceClient.create_from_symmetric_key(
            symmetric_key=device_key,
            hostname=state.assigned_hub,
            device_id=state.device_id,
            server_verification_cert=ca,
            connection_retry=False,
            websockets=WEBSOCKETS,
        )
        device.connect()
        message = Message("provisioned")
        message.custom_properties["registrationId"] = registration_id
        device.send_message(message)
        device.shutdown()
        out["sent"] = True
    except Exception as e:  # noqa: BLE001 - reported to the test, which decides
        out["error"] = type(e).__name__
        out["message"] = str(e)
        if e.__cause__ is not None:
            out["cause"] = str(e.__cause__)
    return out


def main() -> int:
    host, scope, ca_path, key_mode, key = sys.argv[1:6]
    ids = sys.argv[6:]
    with open(ca_path) as f:
        ca = f.read()
    with concurrent.futures.ThreadPoolExecutor(max_workers=25) as pool:
        futures = [pool.submit(provision, host, scope, ca, key_mode, key, r) for r in ids]
        for future in concurrent.futures.as_completed(futures):
            print(json.dumps(future.result()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
