//! SIGTERM stops everything the hub runs and waits for it: connections, the `$upstream`
//! bridge (here backing off from an upstream that is not there), the rollout ticker with a
//! rollout in progress, the TTL sweeper and session expiry. The exit is clean and nothing
//! was cut off by the shutdown's time limit; what was queued is still there afterwards.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{free_port, temp_dir, Hub};

#[tokio::test]
async fn sigterm_stops_background_work_and_waits_for_it() {
    let dir = temp_dir("shutdown");
    let config = dir.join("hub.toml");
    // Nothing listens on the upstream port: the bridge keeps reconnecting.
    std::fs::write(
        &config,
        format!(
            "[routes]\nup = \"FROM /messages/* INTO $upstream\"\n[upstream]\nenabled = true\naddress = \"127.0.0.1:{}\"\n",
            free_port()
        ),
    )
    .unwrap();
    let mut hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let key = hub.create_device("d1").await;
    hub.create_device("d2").await;
    let (s, b) = hub
        .api(
            Method::POST,
            "/deployments",
            Some(json!({
                "id": "slow", "targetCondition": "*", "priority": 1,
                "content": { "content": { "deviceContent": { "properties.desired.x": 1 } } },
                "rollout": { "phases": [50, 100], "successThreshold": 100, "failureThreshold": 100, "observeSecs": 3600 },
            })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let mut device = hub.device("d1", &key).await;
    for i in 0..20 {
        device
            .client
            .publish(
                format!("devices/d1/messages/events/i={i}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                "x",
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 20 {
        match device.next(Duration::from_secs(10)).await {
            Some(crate::harness::Seen::PubAck(_)) => acked += 1,
            Some(_) => {}
            None => panic!("{acked} of 20 acknowledged"),
        }
    }

    let status = hub.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(
        device.disconnected(Duration::from_secs(5)).await.is_some(),
        "the device's connection was closed"
    );
    let logs: String = std::fs::read_dir(&hub.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("hub-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(logs.contains("stopped"), "the hub logged its stop:\n{logs}");
    assert!(
        !logs.contains("did not finish"),
        "shutdown had to give up on something:\n{logs}"
    );

    // What was queued for the upstream is still there, and the rollout where it was.
    let hub = hub.restart().await;
    let (_, queues) = hub.api(Method::GET, "/queues", None).await;
    let depth = queues["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["sink"] == "$upstream")
        .and_then(|q| q["depth"].as_u64());
    assert_eq!(depth, Some(20), "{queues}");
    let (_, d) = hub.api(Method::GET, "/deployments/slow", None).await;
    assert_eq!(d["rolloutState"]["status"], "running", "{d}");
}
