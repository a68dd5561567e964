//! The identity registry over the API and CLI: validation, conflicts, paging, and
//! durability across restart and `kill -9`.

use reqwest::Method;
use serde_json::json;

use crate::harness::{cli, Hub};

#[tokio::test]
async fn api_requires_the_admin_token() {
    let hub = Hub::start("reg-auth").await;
    let resp = reqwest::get(hub.api_url("/devices")).await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = reqwest::Client::new()
        .get(hub.api_url("/devices"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Metrics are open for Prometheus.
    assert!(hub.metrics().await.contains("fleethub_connections "));
    assert!(hub.metric("fleethub_process_resident_memory_bytes").await > 1_000_000.0);
}

#[tokio::test]
async fn invalid_ids_bad_bodies_and_duplicates_get_clear_errors() {
    let hub = Hub::start("reg-errors").await;
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices",
            Some(json!({ "deviceId": "has space" })),
        )
        .await;
    assert_eq!(s, 400);
    assert!(b["message"].as_str().unwrap().contains("position 3"), "{b}");
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices",
            Some(json!({ "deviceId": "x".repeat(129) })),
        )
        .await;
    assert_eq!(s, 400);
    assert!(b["message"].as_str().unwrap().contains("129"), "{b}");
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices",
            Some(json!({ "deviceId": "d", "colour": "red" })),
        )
        .await;
    assert_eq!(s, 400);
    assert!(b["message"].as_str().unwrap().contains("colour"), "{b}");
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices",
            Some(json!({ "deviceId": "d", "status": "sleepy" })),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, _) = hub
        .api(Method::POST, "/devices", Some(json!({ "deviceId": "d1" })))
        .await;
    assert_eq!(s, 201);
    let (s, b) = hub
        .api(Method::POST, "/devices", Some(json!({ "deviceId": "d1" })))
        .await;
    assert_eq!(s, 409);
    assert!(
        b["message"].as_str().unwrap().contains("already exists"),
        "{b}"
    );
    let (s, _) = hub
        .api(
            Method::POST,
            "/devices/nope/modules",
            Some(json!({ "moduleId": "m" })),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = hub.api(Method::GET, "/devices/nope", None).await;
    assert_eq!(s, 404);
    // The CLI shows the same message.
    let (ok, _, err) = cli(&hub, &["device", "create", "d1"]);
    assert!(!ok);
    assert!(
        err.contains("already exists") && err.contains("409"),
        "{err}"
    );
}

#[tokio::test]
async fn list_pages_and_cli_json_output() {
    let hub = Hub::start("reg-list").await;
    for i in 0..5 {
        hub.create_device(&format!("dev{i}")).await;
    }
    let (_, page) = hub.api(Method::GET, "/devices?limit=2", None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], "dev1");
    let (_, page) = hub
        .api(Method::GET, "/devices?limit=2&after=dev3", None)
        .await;
    assert_eq!(page["items"][0]["deviceId"], "dev4");
    assert!(page["next"].is_null());

    let (ok, out, err) = cli(&hub, &["--output", "json", "device", "create", "cli1"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cs = v["connectionString"].as_str().unwrap();
    assert!(
        cs.starts_with("HostName=localhost;DeviceId=cli1;SharedAccessKey="),
        "{cs}"
    );
    let (ok, out, _) = cli(
        &hub,
        &["--output", "json", "module", "create", "cli1", "m1"],
    );
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["connectionString"]
        .as_str()
        .unwrap()
        .contains(";ModuleId=m1;"));
    let (ok, out, _) = cli(
        &hub,
        &[
            "--output", "json", "device", "list", "--all", "--limit", "2",
        ],
    );
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Five devices, cli1, and the hub's own device ("fleethub").
    assert_eq!(v["items"].as_array().unwrap().len(), 7);
    let (ok, out, _) = cli(
        &hub,
        &[
            "--output",
            "json",
            "sas-token",
            "cli1",
            "--module",
            "m1",
            "--duration",
            "2h",
        ],
    );
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["sasToken"]
        .as_str()
        .unwrap()
        .contains("sr=localhost%2Fdevices%2Fcli1%2Fmodules%2Fm1"));
    // The token the CLI made opens the module's connection.
    let token = v["sasToken"].as_str().unwrap();
    crate::harness::Client::connect(hub.options("cli1/m1", token))
        .await
        .expect("CLI token works");
}

#[tokio::test]
async fn registry_survives_kill_9_and_restart() {
    let hub = Hub::start("reg-crash").await;
    let key = hub.create_device("dev1").await;
    hub.create_module("dev1", "m1").await;
    hub.api(
        Method::PATCH,
        "/devices/dev1",
        Some(json!({ "statusReason": "maintenance" })),
    )
    .await;
    let (_, before) = hub.api(Method::GET, "/devices/dev1", None).await;
    let mut hub = hub;
    hub.kill9();
    let hub = hub.restart().await;
    let (s, after) = hub.api(Method::GET, "/devices/dev1", None).await;
    assert_eq!(s, 200);
    assert_eq!(after["authentication"], before["authentication"]);
    assert_eq!(after["etag"], before["etag"]);
    assert_eq!(after["statusReason"], "maintenance");
    let (s, _) = hub.api(Method::GET, "/devices/dev1/modules/m1", None).await;
    assert_eq!(s, 200);
    // Same keys still authenticate after the restart.
    hub.device("dev1", &key).await;
}

#[tokio::test]
async fn delete_removes_modules_and_closes_connections() {
    let hub = Hub::start("reg-delete").await;
    let key = hub.create_device("dev1").await;
    hub.create_module("dev1", "m1").await;
    let mut live = hub.device("dev1", &key).await;
    let (s, _) = hub.api(Method::DELETE, "/devices/dev1", None).await;
    assert_eq!(s, 204);
    assert!(live
        .disconnected(std::time::Duration::from_secs(5))
        .await
        .is_some());
    let (s, _) = hub.api(Method::GET, "/devices/dev1/modules/m1", None).await;
    assert_eq!(s, 404);
    let mut hub = hub;
    let status = hub.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}
