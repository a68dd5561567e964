//! Interop with the Azure IoT device SDK for Python (`azure-iot-device` 2.x, unmodified):
//! telemetry with custom properties; and the device plane (twin read, reported patch,
//! desired patch, direct method, C2D) for `IoTHubDeviceClient` and, with a module twin,
//! `IoTHubModuleClient`.
//!
//! The SDK always dials port 8883, so each hub listens on 8883 of a random 127.x.y.z address
//! and uses that address as its hostname (the generated certificate covers it). The Python
//! interpreter comes from FLEETHUB_PYTHON (set by `.ci/run`, which installs the SDK into a
//! virtualenv); without it these tests are skipped locally and fail under CI.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::{temp_dir, Hub};

pub(crate) fn python() -> Option<String> {
    match std::env::var("FLEETHUB_PYTHON") {
        Ok(p) => Some(p),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("FLEETHUB_PYTHON must point at a python with azure-iot-device under CI")
        }
        Err(_) => {
            eprintln!("skipped: set FLEETHUB_PYTHON to a python with azure-iot-device installed");
            None
        }
    }
}

/// A random 127.x.y.z address: the SDK always dials port 8883, so each test needs its own.
pub(crate) fn random_loopback() -> String {
    format!(
        "127.{}.{}.{}",
        1 + rand::random::<u8>() % 250,
        rand::random::<u8>(),
        1 + rand::random::<u8>() % 250
    )
}

/// A hub whose TLS listener is on `{random loopback}:8883`, that address being its hostname.
async fn sdk_hub(name: &str) -> (Hub, String) {
    hub_named_by_loopback(name, true, false).await
}

/// A hub whose hostname is a random loopback address; with `on_8883` its TLS listener is on
/// that address's port 8883 (where the SDK dials), else on a free port for a proxy to sit in
/// front of; with `wss`, it also serves MQTT over WebSockets on a free port.
pub(crate) async fn hub_named_by_loopback(name: &str, on_8883: bool, wss: bool) -> (Hub, String) {
    let ip = random_loopback();
    let dir = temp_dir(name);
    let config = dir.join("hub.toml");
    std::fs::write(&config, format!("[hub]\nhostname = \"{ip}\"\n")).unwrap();
    let config = config.to_str().unwrap().to_string();
    let mqtts = format!("{ip}:8883");
    let mut args = vec!["--config", config.as_str()];
    if on_8883 {
        args.extend(["--mqtts", mqtts.as_str()]);
    }
    if wss {
        args.extend(["--wss", "127.0.0.1:0"]);
    }
    (Hub::start_with(dir, &args).await, ip)
}

/// A hub named by a random loopback address whose MQTT-over-WebSockets listener is on that
/// address's port 443, where the SDKs dial with `websockets=True`.
pub(crate) async fn hub_on_wss(name: &str) -> (Hub, String) {
    let ip = random_loopback();
    let dir = temp_dir(name);
    let config = dir.join("hub.toml");
    std::fs::write(&config, format!("[hub]\nhostname = \"{ip}\"\n")).unwrap();
    let wss = format!("{ip}:443");
    (
        Hub::start_with(dir, &["--config", config.to_str().unwrap(), "--wss", &wss]).await,
        ip,
    )
}

pub(crate) fn script(name: &str) -> String {
    format!("{}/../tests/interop/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn azure_iot_python_sdk_sends_telemetry_over_tls() {
    let Some(python) = python() else { return };
    let (hub, ip) = sdk_hub("interop-tel").await;
    let key = hub.create_device("sdk-device").await;
    let cs = format!("HostName={ip};DeviceId=sdk-device;SharedAccessKey={key}");
    let mut monitor = hub.monitor().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let ca = hub.data_dir().join("tls/ca.pem");
    let out = tokio::process::Command::new(python)
        .arg(script("send_message.py"))
        .arg(&cs)
        .arg(&ca)
        .arg("sdk-msg-1")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), out)
        .await
        .expect("SDK finished in time")
        .unwrap();
    assert!(
        out.status.success(),
        "SDK failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let p = monitor
        .next_publish(Duration::from_secs(10))
        .await
        .expect("the SDK's message arrives");
    let event = fleethub::cli::describe_event(&p.topic, &p.payload).unwrap();
    assert_eq!(event["origin"], "sdk-device");
    assert_eq!(event["payload"]["temperature"], 21.5);
    assert_eq!(event["properties"]["application"]["alert"], "high");
    assert_eq!(event["properties"]["application"]["site"], "plant 7");
    assert_eq!(event["properties"]["system"]["$.mid"], "sdk-msg-1");
    assert_eq!(event["properties"]["system"]["$.ct"], "application/json");
}

/// Runs the CLI against `hub` without blocking this (single-threaded) test runtime.
pub(crate) async fn cli_async(hub: &Hub, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleethub"))
        .arg("--data-dir")
        .arg(hub.data_dir())
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

type SdkLines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// The SDK script's next JSON line.
async fn read_json(lines: &mut SdkLines) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("SDK output in time")
        .unwrap()
        .expect("SDK still running");
    serde_json::from_str::<Value>(&line).unwrap()
}

/// Registers the SDK's device `sdk-dev` with `auth` (`sas`, `self-signed`: a certificate
/// registered by thumbprint, `ca`: a certificate of a CA uploaded and verified, naming the
/// device); returns its SAS key (empty for X.509) and its certificate and key files.
pub(crate) async fn sdk_device(
    hub: &Hub,
    auth: &str,
) -> (String, Option<(std::path::PathBuf, std::path::PathBuf)>) {
    let register = |body: Value| async move {
        let (s, b) = hub.api(Method::POST, "/devices", Some(body)).await;
        assert_eq!(s, 201, "{b}");
    };
    let (dkey, cert) = match auth {
        "self-signed" => {
            let c = crate::x509::self_signed("sdk-dev");
            register(json!({"deviceId": "sdk-dev", "authentication": {
                "type": "selfSigned",
                "x509Thumbprint": {"primaryThumbprint": c.sha256}
            }}))
            .await;
            (String::new(), Some(c))
        }
        "ca" => {
            let root = crate::x509::test_ca("SDK Root");
            let (s, added) = hub
                .api(
                    Method::POST,
                    "/certificates",
                    Some(json!({"name": "root", "certificate": root.cert.pem()})),
                )
                .await;
            assert_eq!(s, 201, "{added}");
            let code = added["verificationCode"].as_str().unwrap();
            let proof = root.leaf(code, &[]);
            let (s, b) = hub
                .api(
                    Method::POST,
                    "/certificates/root/verify",
                    Some(json!({"certificate": proof.cert_pem})),
                )
                .await;
            assert_eq!(s, 200, "{b}");
            register(
                json!({"deviceId": "sdk-dev", "authentication": {"type": "certificateAuthority"}}),
            )
            .await;
            (String::new(), Some(root.leaf("sdk-dev", &[])))
        }
        _ => (hub.create_device("sdk-dev").await, None),
    };
    let cert_files = cert.as_ref().map(|c| {
        let dir = hub.data_dir().join("..");
        let (cert, key) = (dir.join("device-cert.pem"), dir.join("device-key.pem"));
        std::fs::write(&cert, &c.cert_pem).unwrap();
        std::fs::write(&key, &c.key_pem).unwrap();
        (cert, key)
    });
    (dkey, cert_files)
}

async fn device_plane(kind: &str, websockets: bool) {
    device_plane_with(kind, websockets, "sas").await
}

/// The device plane with the SDK; `auth` is `sas`, `self-signed` (a certificate registered
/// by thumbprint) or `ca` (a certificate of a verified CA naming the device).
async fn device_plane_with(kind: &str, websockets: bool, auth: &str) {
    let Some(python) = python() else { return };
    let name = format!(
        "interop-{}{kind}-{auth}",
        if websockets { "wss-" } else { "" },
    );
    let (hub, ip) = if websockets {
        hub_on_wss(&name).await
    } else {
        sdk_hub(&name).await
    };
    let (dkey, cert_files) = sdk_device(&hub, auth).await;
    let (cs, twin_path, identity_args): (String, &str, Vec<&str>) = if kind == "module" {
        let mkey = hub.create_module("sdk-dev", "sdk-mod").await;
        (
            format!("HostName={ip};DeviceId=sdk-dev;ModuleId=sdk-mod;SharedAccessKey={mkey}"),
            "/twins/sdk-dev/modules/sdk-mod",
            vec!["--module", "sdk-mod"],
        )
    } else {
        (
            format!("HostName={ip};DeviceId=sdk-dev;SharedAccessKey={dkey}"),
            "/twins/sdk-dev",
            vec![],
        )
    };
    // A desired property set before the client connects shows up in its first get_twin.
    hub.api(
        Method::PATCH,
        twin_path,
        Some(json!({"properties": {"desired": {"initial": true}}})),
    )
    .await;

    let ca = hub.data_dir().join("tls/ca.pem");
    let mut child = tokio::process::Command::new(python)
        .arg(script("device_plane.py"))
        .arg(kind)
        .arg(&cs)
        .arg(&ca)
        .env("SDK_WEBSOCKETS", if websockets { "1" } else { "0" })
        .envs(
            cert_files
                .iter()
                .flat_map(|(c, k)| [("SDK_X509_CERT", c.clone()), ("SDK_X509_KEY", k.clone())]),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    let ready = read_json(&mut lines).await;
    assert_eq!(ready["ready"], kind, "{ready}");
    assert_eq!(ready["twin"]["desired"]["initial"], true, "{ready}");
    assert_eq!(ready["twin"]["desired"]["$version"], 2);

    let mut twin_args = vec!["twin", "update", "sdk-dev"];
    twin_args.extend(&identity_args);
    twin_args.extend(["--desired", r#"{"setpoint": 22}"#]);
    let (ok, _, err) = cli_async(&hub, &twin_args).await;
    assert!(ok, "{err}");
    let mut method_args = vec!["--output", "json", "method", "invoke", "sdk-dev", "reboot"];
    method_args.extend(&identity_args);
    method_args.extend(["--payload", r#"{"delay": 1}"#, "--timeout", "30"]);
    let (ok, method_out, err) = cli_async(&hub, &method_args).await;
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&method_out).unwrap(),
        json!({"status": 200, "payload": {"handled": "reboot", "echo": {"delay": 1}}})
    );
    if kind == "device" {
        let (ok, _, err) = cli_async(
            &hub,
            &[
                "c2d",
                "send",
                "sdk-dev",
                "--body",
                "hello device",
                "--property",
                "color=blue",
                "--message-id",
                "c2d-1",
            ],
        )
        .await;
        assert!(ok, "{err}");
    }

    let expected = if kind == "device" { 3 } else { 2 };
    let mut events = Vec::new();
    for _ in 0..expected {
        events.push(read_json(&mut lines).await);
    }
    let find = |k: &str| {
        events
            .iter()
            .find(|e| e.get(k).is_some())
            .unwrap_or_else(|| panic!("no {k} event in {events:?}"))
            .clone()
    };
    let desired = find("desired");
    assert_eq!(desired["desired"]["setpoint"], 22);
    assert_eq!(desired["desired"]["$version"], 3);
    assert_eq!(find("method")["payload"], json!({"delay": 1}));
    if kind == "device" {
        let c2d = find("c2d");
        assert_eq!(c2d["c2d"], "hello device");
        assert_eq!(c2d["properties"]["color"], "blue");
        assert_eq!(c2d["message_id"], "c2d-1");
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("SDK exits")
        .unwrap();
    assert!(status.success());

    let (_, twin) = hub.api(Method::GET, twin_path, None).await;
    assert_eq!(twin["properties"]["reported"]["fw"], "1.2.3");
    assert_eq!(twin["properties"]["reported"]["sdk"], "python");
}

#[tokio::test]
async fn azure_iot_python_sdk_device_client_twin_methods_c2d() {
    device_plane("device", false).await;
}

#[tokio::test]
async fn azure_iot_python_sdk_module_client_twin_and_methods() {
    device_plane("module", false).await;
}

/// The same device plane with `websockets=True`: MQTT over WebSockets on port 443.
#[tokio::test]
async fn azure_iot_python_sdk_over_websockets_twin_methods_c2d() {
    device_plane("device", true).await;
}

#[tokio::test]
async fn azure_iot_python_sdk_module_over_websockets_twin_and_methods() {
    device_plane("module", true).await;
}

/// A device authenticated by a self-signed X.509 certificate (SDK's
/// `create_from_x509_certificate`), over MQTT/TLS and over WebSockets.
#[tokio::test]
async fn azure_iot_python_sdk_x509_self_signed_device() {
    device_plane_with("device", false, "self-signed").await;
}

#[tokio::test]
async fn azure_iot_python_sdk_x509_self_signed_device_over_websockets() {
    device_plane_with("device", true, "self-signed").await;
}

/// A device whose certificate is signed by a CA uploaded and verified by proof of
/// possession, its common name the device id.
#[tokio::test]
async fn azure_iot_python_sdk_x509_ca_signed_device() {
    device_plane_with("device", false, "ca").await;
}

#[tokio::test]
async fn azure_iot_python_sdk_x509_ca_signed_device_over_websockets() {
    device_plane_with("device", true, "ca").await;
}
