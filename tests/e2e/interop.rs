//! Interop with the Azure IoT device SDK for Python (`azure-iot-device` 2.x, unmodified):
//! `create_from_connection_string(cs, server_verification_cert=ca.pem)` connects to the TLS
//! listener and `send_message` arrives with its custom properties.
//!
//! The SDK always dials port 8883, so the hub listens on 8883 of a random 127.x.y.z address
//! and uses that address as its hostname (the generated certificate covers it). The Python
//! interpreter comes from FLEETHUB_PYTHON (set by `.ci/run`, which installs the SDK into a
//! virtualenv); without it the test is skipped locally and fails under CI.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{temp_dir, Hub};

#[tokio::test]
async fn azure_iot_python_sdk_sends_telemetry_over_tls() {
    let python = match std::env::var("FLEETHUB_PYTHON") {
        Ok(p) => p,
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("FLEETHUB_PYTHON must point at a python with azure-iot-device under CI")
        }
        Err(_) => {
            eprintln!("skipped: set FLEETHUB_PYTHON to a python with azure-iot-device installed");
            return;
        }
    };
    let ip = format!(
        "127.{}.{}.{}",
        1 + rand::random::<u8>() % 250,
        rand::random::<u8>(),
        1 + rand::random::<u8>() % 250
    );
    let dir = temp_dir("interop");
    let config = dir.join("hub.toml");
    std::fs::write(&config, format!("[hub]\nhostname = \"{ip}\"\n")).unwrap();
    let mqtts = format!("{ip}:8883");
    let hub = Hub::start_with(
        dir,
        &["--config", config.to_str().unwrap(), "--mqtts", &mqtts],
    )
    .await;
    let (s, rec) = hub
        .api(
            Method::POST,
            "/devices",
            Some(json!({ "deviceId": "sdk-device" })),
        )
        .await;
    assert_eq!(s, 201);
    let key = rec["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    let cs = format!("HostName={ip};DeviceId=sdk-device;SharedAccessKey={key}");
    let mut monitor = hub.monitor().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/interop/send_message.py"
    );
    let ca = hub.data_dir().join("tls/ca.pem");
    let out = tokio::process::Command::new(python)
        .arg(script)
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
