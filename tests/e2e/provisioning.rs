//! Zero-touch provisioning with the unmodified Azure IoT device SDK for Python: a fleet of
//! devices that know only the ID scope, the provisioning host and a key derived from their
//! group enrollment's register themselves (ProvisioningDeviceClient, symmetric key), land in
//! the enrollment's device group with its initial twin, and connect to the hub they were
//! assigned with the same key. Registering again returns the same device, across kill -9;
//! a wrong key, a disabled enrollment and a device created with other credentials are
//! refused, each in its own way and counted. Skipped locally without FLEETHUB_PYTHON.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::Hub;
use crate::interop::{hub_named_by_loopback, hub_on_wss, python, script};

const SCOPE: &str = "0ne00000F1E";

/// Runs `provision.py` for `ids`; its JSON lines by registration id.
async fn provision(
    python: &str,
    hub: &Hub,
    ip: &str,
    mode: &str,
    key: &str,
    ids: &[String],
) -> BTreeMap<String, Value> {
    provision_over(python, hub, ip, mode, key, ids, false).await
}

/// [`provision`], over WebSockets when `websockets`.
async fn provision_over(
    python: &str,
    hub: &Hub,
    ip: &str,
    mode: &str,
    key: &str,
    ids: &[String],
    websockets: bool,
) -> BTreeMap<String, Value> {
    let ca = hub.data_dir().join("tls/ca.pem");
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(python)
            .arg(script("provision.py"))
            .args([ip, SCOPE, ca.to_str().unwrap(), mode, key])
            .args(ids)
            .env("SDK_WEBSOCKETS", if websockets { "1" } else { "0" })
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("provisioning finished in time")
    .expect("run provision.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: BTreeMap<String, Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .map(|v| (v["registrationId"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(results.len(), ids.len(), "{stdout}");
    results
}

fn provisioned(result: &Value, id: &str, ip: &str) {
    assert_eq!(result["status"], "assigned", "{result}");
    assert_eq!(result["deviceId"], id, "{result}");
    assert_eq!(result["assignedHub"], ip, "{result}");
    assert_eq!(result["sent"], true, "{result}");
}

#[tokio::test]
async fn azure_iot_python_sdk_provisions_a_fleet_from_one_group_enrollment() {
    let Some(python) = python() else { return };
    let (mut hub, ip) = hub_named_by_loopback("dps", true, false).await;
    let (s, b) = hub
        .api(
            Method::POST,
            "/products",
            Some(json!({ "name": "Sensors" })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let twin_file = hub.data_dir().join("../initial-twin.json");
    std::fs::write(
        &twin_file,
        json!({"tags": {"site": "lab"}, "desired": {"interval": 5}}).to_string(),
    )
    .unwrap();
    let (ok, out, err) = hub.fleethub(&format!(
        "--output json enrollment create group sensors --device-group 'Sensors/Field Test' --initial-twin {}",
        twin_file.display()
    ));
    assert!(ok, "{err}");
    let enrollment: Value = serde_json::from_str(&out).unwrap();
    let group_key = enrollment["primaryKey"].as_str().unwrap().to_string();
    assert_eq!(enrollment["provisioningStatus"], "enabled");

    // A hundred devices, each with only its derived key.
    let mut monitor = hub.monitor().await;
    let fleet: Vec<String> = (0..100).map(|i| format!("sensor-{i:03}")).collect();
    let results = provision(&python, &hub, &ip, "group", &group_key, &fleet).await;
    for id in &fleet {
        provisioned(&results[id], id, &ip);
    }
    // Each one's telemetry reached the hub under its own id.
    let mut heard = BTreeSet::new();
    while heard.len() < fleet.len() {
        let Some(p) = monitor.next_publish(Duration::from_secs(20)).await else {
            break;
        };
        if let Some(rest) = p.topic.strip_prefix("$fleethub/events/") {
            heard.insert(rest.split('/').next().unwrap_or_default().to_string());
        }
    }
    assert_eq!(
        heard,
        fleet.iter().cloned().collect(),
        "telemetry from every device"
    );
    let (_, group) = hub
        .api(Method::GET, "/products/Sensors/groups/Field%20Test", None)
        .await;
    assert_eq!(group["devices"], 100, "{group}");
    let (_, twin) = hub.api(Method::GET, "/twins/sensor-042", None).await;
    assert_eq!(twin["tags"]["site"], "lab", "{twin}");
    assert_eq!(twin["properties"]["desired"]["interval"], 5, "{twin}");
    // The CLI derives the same key the SDK sample does.
    let (_, device) = hub.api(Method::GET, "/devices/sensor-042", None).await;
    let (ok, out, _) = hub.fleethub("enrollment derive-key sensors sensor-042");
    assert!(ok);
    assert_eq!(
        out.trim(),
        device["authentication"]["symmetricKey"]["primaryKey"]
    );
    let generation = device["generationId"].clone();
    let assigned = "fleethub_provisioning_registrations_total{result=\"assigned\"}";
    assert_eq!(hub.metric(assigned).await, 100.0);

    // What was assigned survives kill -9; registering again returns the same device, which
    // keeps what it changed since (its group, its twin).
    let (s, _) = hub
        .api(
            Method::PATCH,
            "/twins/sensor-042",
            Some(json!({"properties": {"desired": {"interval": 60}}})),
        )
        .await;
    assert_eq!(s, 200);
    hub.kill9();
    hub = hub.restart().await;
    let again = vec!["sensor-042".to_string(), "sensor-099".to_string()];
    let results = provision(&python, &hub, &ip, "group", &group_key, &again).await;
    for id in &again {
        provisioned(&results[id], id, &ip);
    }
    let (_, device) = hub.api(Method::GET, "/devices/sensor-042", None).await;
    assert_eq!(device["generationId"], generation);
    let (_, twin) = hub.api(Method::GET, "/twins/sensor-042", None).await;
    assert_eq!(twin["properties"]["desired"]["interval"], 60, "{twin}");

    // A key the enrollment did not give: refused at CONNECT, nothing created.
    let intruder = vec!["intruder".to_string()];
    let results = provision(&python, &hub, &ip, "device", &group_key, &intruder).await;
    assert_eq!(
        results["intruder"]["error"], "CredentialError",
        "{results:?}"
    );
    let (s, _) = hub.api(Method::GET, "/devices/intruder", None).await;
    assert_eq!(s, 404);

    // An individual enrollment: its own key, no group.
    let (s, solo) = hub
        .api(Method::POST, "/enrollments", Some(json!({"id": "solo"})))
        .await;
    assert_eq!(s, 201, "{solo}");
    let solo_key = solo["primaryKey"].as_str().unwrap();
    let one = vec!["solo".to_string()];
    let results = provision(&python, &hub, &ip, "device", solo_key, &one).await;
    provisioned(&results["solo"], "solo", &ip);

    // A device the operator created with its own keys is not taken over.
    let manual_key = hub.create_device("sensor-manual").await;
    let manual = vec!["sensor-manual".to_string()];
    let results = provision(&python, &hub, &ip, "group", &group_key, &manual).await;
    let cause = results["sensor-manual"]["cause"]
        .as_str()
        .unwrap_or_default();
    assert!(cause.contains("409"), "{results:?}");
    let (_, device) = hub.api(Method::GET, "/devices/sensor-manual", None).await;
    assert_eq!(
        device["authentication"]["symmetricKey"]["primaryKey"],
        manual_key.as_str()
    );

    // Disabled: the registration completes with DPS's status `disabled` (the C# SDK returns
    // it as the result; the Python SDK, which knows only assigned and failed, raises with it
    // as the cause) and creates nothing.
    let (ok, _, err) = hub.fleethub("enrollment disable group sensors");
    assert!(ok, "{err}");
    let late = vec!["sensor-late".to_string()];
    let results = provision(&python, &hub, &ip, "group", &group_key, &late).await;
    let cause = results["sensor-late"]["cause"].as_str().unwrap_or_default();
    assert!(cause.contains("status disabled"), "{results:?}");
    let (s, _) = hub.api(Method::GET, "/devices/sensor-late", None).await;
    assert_eq!(s, 404);
    // Enabled again, the same device provisions.
    let (ok, _, err) = hub.fleethub("enrollment enable group sensors");
    assert!(ok, "{err}");
    let results = provision(&python, &hub, &ip, "group", &group_key, &late).await;
    provisioned(&results["sensor-late"], "sensor-late", &ip);

    let metric = |r: &str| format!("fleethub_provisioning_registrations_total{{result=\"{r}\"}}");
    assert_eq!(
        hub.metric(&metric("assigned")).await,
        4.0,
        "since the restart"
    );
    assert_eq!(hub.metric(&metric("not_authorized")).await, 1.0);
    assert_eq!(hub.metric(&metric("disabled")).await, 1.0);
    assert_eq!(hub.metric(&metric("failed")).await, 1.0);
}

/// Devices behind a firewall that allows only 443 provision over WebSockets
/// (`websockets=True` on both clients), individually enrolled.
#[tokio::test]
async fn azure_iot_python_sdk_provisions_over_websockets() {
    let Some(python) = python() else { return };
    let (hub, ip) = hub_on_wss("dps-wss").await;
    let ids: Vec<String> = (0..5).map(|i| format!("wss-{i}")).collect();
    let mut keys = BTreeMap::new();
    for id in &ids {
        let (s, e) = hub
            .api(Method::POST, "/enrollments", Some(json!({ "id": id })))
            .await;
        assert_eq!(s, 201, "{e}");
        keys.insert(id.clone(), e["primaryKey"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let one = vec![id.clone()];
        let results = provision_over(&python, &hub, &ip, "device", &keys[id], &one, true).await;
        provisioned(&results[id], id, &ip);
    }
    let (s, _) = hub.api(Method::GET, "/devices/wss-4", None).await;
    assert_eq!(s, 200);
}

/// Enrollments through the API and the CLI: validation by field, duplicates, status, delete.
#[tokio::test]
async fn enrollments_are_validated_listed_and_deleted() {
    let hub = Hub::start("enrollments").await;
    for (body, want) in [
        (json!({"id": "g", "deviceGroup": "Nope/X"}), "deviceGroup"),
        (json!({"id": "g", "primaryKey": "short"}), "primaryKey"),
        (
            json!({"id": "g", "provisioningStatus": "maybe"}),
            "provisioningStatus",
        ),
        (json!({"id": "bad id!"}), "id"),
        (json!({"id": "g", "colour": "red"}), "colour"),
    ] {
        let (s, b) = hub
            .api(Method::POST, "/enrollmentGroups", Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body}: {b}");
        assert!(b["message"].as_str().unwrap().contains(want), "{body}: {b}");
    }
    let (s, g) = hub
        .api(Method::POST, "/enrollmentGroups", Some(json!({"id": "g"})))
        .await;
    assert_eq!(s, 201, "{g}");
    let (s, _) = hub
        .api(Method::POST, "/enrollmentGroups", Some(json!({"id": "g"})))
        .await;
    assert_eq!(s, 409);
    // Groups and individuals are separate namespaces.
    let (s, _) = hub
        .api(Method::POST, "/enrollments", Some(json!({"id": "g"})))
        .await;
    assert_eq!(s, 201);
    let (ok, out, _) = hub.fleethub("--output json enrollment list group");
    assert!(ok);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let (ok, out, _) = hub.fleethub("enrollment derive-key g dev-1");
    assert!(ok);
    assert_eq!(out.trim().len(), 44, "{out}");
    let (ok, _, err) = hub.fleethub("enrollment derive-key nope dev-1");
    assert!(!ok);
    assert!(err.contains("nope"), "{err}");
    let (ok, _, _) = hub.fleethub("enrollment delete group g");
    assert!(ok);
    let (s, _) = hub.api(Method::GET, "/enrollmentGroups/g", None).await;
    assert_eq!(s, 404);
    let (s, _) = hub.api(Method::GET, "/enrollments/g", None).await;
    assert_eq!(s, 200);
    let (ok, _, err) = hub.fleethub("enrollment delete group g");
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
}

/// DPS's MQTT exchange at the wire, as the SDKs speak it (no Python needed): a token with
/// `skn=registration` (the C and C# SDKs send it), the 202 with `retry-after` and an operation
/// id, the poll answered 200 `assigned`, an unknown operation 404; a token for another
/// registration id is refused at CONNECT.
#[tokio::test]
async fn dps_protocol_at_the_wire() {
    use crate::harness::Client;
    let hub = Hub::start("dps-wire").await;
    let (s, group) = hub
        .api(
            Method::POST,
            "/enrollmentGroups",
            Some(json!({"id": "wire"})),
        )
        .await;
    assert_eq!(s, 201, "{group}");
    let group_key = group["primaryKey"].as_str().unwrap();
    let key = fleethub::enrollment::derive_key(group_key, "wire-1").unwrap();
    let token = |reg: &str| {
        fleethub::sas::generate(
            &format!("{SCOPE}/registrations/{reg}"),
            &key,
            crate::harness::unix_now() + 600,
        )
        .unwrap()
    };
    let options = |reg: &str, password: String| {
        let addr = hub.endpoints.mqtt.unwrap();
        let mut o = rumqttc::MqttOptions::new(reg, addr.ip().to_string(), addr.port());
        o.set_credentials(
            format!("{SCOPE}/registrations/{reg}/api-version=2019-03-31&ClientVersion=wire"),
            password,
        );
        o
    };
    // The key derived for wire-1 does not register wire-2.
    let refused = Client::connect(options("wire-2", token("wire-2"))).await;
    assert!(refused.is_err(), "wire-2 with wire-1's key");

    let mut c = Client::connect(options(
        "wire-1",
        format!("{}&skn=registration", token("wire-1")),
    ))
    .await
    .expect("registration connection");
    c.subscribe_ok("$dps/registrations/res/#").await;
    let body = json!({"registrationId": "wire-1"}).to_string();
    let answer = c
        .request(
            "$dps/registrations/PUT/iotdps-register/?$rid=7",
            body.as_bytes(),
            "$dps/registrations/res/",
        )
        .await;
    assert!(
        answer
            .topic
            .starts_with("$dps/registrations/res/202/?$rid=7&retry-after="),
        "{}",
        answer.topic
    );
    let pending: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(pending["status"], "assigning", "{pending}");
    let operation = pending["operationId"].as_str().unwrap();
    let answer = c
        .request(
            &format!(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=8&operationId={operation}"
            ),
            b"",
            "$dps/registrations/res/",
        )
        .await;
    assert_eq!(answer.topic, "$dps/registrations/res/200/?$rid=8");
    let done: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(done["registrationState"]["deviceId"], "wire-1");
    assert_eq!(
        done["registrationState"]["assignedHub"],
        hub.hostname.as_str()
    );
    let answer = c
        .request(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=9&operationId=nope",
            b"",
            "$dps/registrations/res/",
        )
        .await;
    assert_eq!(answer.topic, "$dps/registrations/res/404/?$rid=9");
    // The device it made connects with the derived key.
    let _device = hub.device("wire-1", &key).await;
}
