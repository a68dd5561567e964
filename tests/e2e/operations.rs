//! Running the hub as a service: logs for machines (plain text without colour when not on a
//! terminal, JSON lines on request).

use crate::harness::{temp_dir, Hub};

fn logs_of(hub: &Hub) -> String {
    std::fs::read_dir(&hub.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("hub-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn redirected_logs_are_plain_and_json_logs_are_one_object_per_line() {
    // The harness sends the hub's output to a file: no terminal, so no colour codes.
    let hub = Hub::start("logs-text").await;
    hub.create_device("d1").await;
    let text = logs_of(&hub);
    assert!(text.contains("fleethub listening"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in a redirected log:\n{text}"
    );
    drop(hub);

    let hub = Hub::start_with(temp_dir("logs-json"), &["--log-format", "json"]).await;
    hub.create_device("d1").await;
    let json = logs_of(&hub);
    let mut listening = None;
    for line in json.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["target"].is_string(), "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
        if v["fields"]["message"] == "fleethub listening" {
            listening = Some(v);
        }
    }
    let listening = listening.expect("the listening line");
    assert_eq!(listening["level"], "INFO");
    assert!(
        listening["fields"]["api"].is_string(),
        "fields carried: {listening}"
    );
}

/// The systemd unit in config/systemd passes `systemd-analyze verify` with no warning
/// (skipped where systemd is absent), and carries the hardening the README promises.
#[test]
fn the_systemd_unit_verifies_clean() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/systemd/fleethub.service"),
    )
    .unwrap();
    for needed in [
        "User=fleethub",
        "StateDirectory=fleethub",
        "LimitNOFILE=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/fleethub",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.contains(needed), "the unit sets {needed}");
    }
    let Ok(which) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    };
    assert!(which.status.success());
    let dir = temp_dir("unit");
    let path = dir.join("fleethub.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/fleethub", env!("CARGO_BIN_EXE_fleethub")),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        !said.contains(path.to_str().unwrap()),
        "warnings about the unit:\n{said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/health` answers ready once the hub serves, and `fleethub health` says so with exit 0.
#[tokio::test]
async fn health_reports_ready_for_supervisors() {
    let hub = Hub::start("health").await;
    let (s, b) = hub.api(reqwest::Method::GET, "/health", None).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("ready")), "{b}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleethub"))
        .arg("--data-dir")
        .arg(hub.data_dir())
        .arg("health")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGHUP re-reads the configuration: a valid file's routes replace the config routes in
/// force; an invalid one is refused whole and the routes stay; the log says which.
#[tokio::test]
async fn sighup_reloads_routes_or_keeps_them_on_error() {
    let dir = temp_dir("sighup");
    let config = dir.join("hub.toml");
    let routes = |body: &str| format!("[routes]\n{body}\n");
    std::fs::write(
        &config,
        routes("first = \"FROM /messages/* INTO BrokeredEndpoint(\\\"/modules/a/inputs/in\\\")\""),
    )
    .unwrap();
    let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let names = || async {
        let (_, t) = hub.api(reqwest::Method::GET, "/routes", None).await;
        t["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names().await, ["first"]);
    let hup = || {
        assert!(std::process::Command::new("kill")
            .args(["-HUP", &hub.pid().to_string()])
            .status()
            .unwrap()
            .success());
    };
    let wait_for_log = |needle: &'static str, count: usize| {
        let hub = &hub;
        async move {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while logs_of(hub).matches(needle).count() < count {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no '{needle}' in the log"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };

    std::fs::write(
        &config,
        routes("second = \"FROM /messages/* WHERE $body.t > 1 INTO BrokeredEndpoint(\\\"/modules/b/inputs/in\\\")\"")
            + "[mqtt]\nmax_payload_bytes = 100\n[api]\nmax_body_bytes = 1000\n",
    )
    .unwrap();
    hup();
    wait_for_log("configuration reloaded", 1).await;
    assert_eq!(names().await, ["second"]);
    // The API body limit applies at once: a 2,000-byte body is refused with 413.
    let (s, _) = hub
        .api(
            reqwest::Method::POST,
            "/twins/query",
            Some(serde_json::json!({ "query": format!("SELECT * FROM devices WHERE tags.x = '{}'", "y".repeat(2000)) })),
        )
        .await;
    assert_eq!(s, 413, "the reloaded body limit");
    // The payload limit applies at once: 50 bytes pass, 200 close the connection.
    let key = hub.create_device("d1").await;
    let mut d = hub.device("d1", &key).await;
    d.client
        .publish(
            "devices/d1/messages/events/",
            rumqttc::QoS::AtLeastOnce,
            false,
            vec![b'x'; 50],
        )
        .await
        .unwrap();
    assert!(matches!(
        d.next(std::time::Duration::from_secs(5)).await,
        Some(crate::harness::Seen::PubAck(_))
    ));
    d.client
        .publish(
            "devices/d1/messages/events/",
            rumqttc::QoS::AtLeastOnce,
            false,
            vec![b'x'; 200],
        )
        .await
        .unwrap();
    assert!(
        d.disconnected(std::time::Duration::from_secs(5))
            .await
            .is_some(),
        "a payload over the reloaded limit closes the connection"
    );

    std::fs::write(
        &config,
        routes("broken = \"FROM /messages/* WHERE (x INTO $upstream\""),
    )
    .unwrap();
    hup();
    wait_for_log("configuration reload refused", 1).await;
    assert_eq!(names().await, ["second"], "the routes in force stay");
    assert!(
        logs_of(&hub).contains("broken"),
        "the refusal names the route"
    );
}

/// The hub runs with its allocator giving freed memory back at once (it starts itself again
/// with `MIMALLOC_PURGE_DELAY=0`, same process id), unless the operator set the option.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_hub_returns_freed_memory_at_once_unless_told_otherwise() {
    let option = |hub: &Hub| -> Option<String> {
        let environ = std::fs::read(format!("/proc/{}/environ", hub.pid())).unwrap();
        environ
            .split(|b| *b == 0)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .find_map(|v| v.strip_prefix("MIMALLOC_PURGE_DELAY=").map(str::to_string))
    };
    let hub = Hub::start("purge").await;
    assert_eq!(option(&hub).as_deref(), Some("0"));
    drop(hub);

    let dir = temp_dir("purge-set");
    let hub = Hub::start_with_env(dir, &[], &[("MIMALLOC_PURGE_DELAY", "250")]).await;
    assert_eq!(
        option(&hub).as_deref(),
        Some("250"),
        "the operator's value stays"
    );
}
