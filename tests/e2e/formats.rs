//! On-disk formats: data directories written by earlier formats (fixtures, checked in) open,
//! migrate and serve their devices; a directory from a newer format is refused untouched.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{temp_dir, Hub};

/// The fixed key of the fixtures' device (base64 of 32 bytes).
const DEVICE_KEY: &str = "Zml4dHVyZS1kZXZpY2Uta2V5LWZvci1mb3JtYXQtdGVzdHM=";
const SINK_KEY: &str = "Zml4dHVyZS1zaW5rLWtleS1mb3ItZm9ybWF0LXRlc3RzISE=";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Writes the fixture of the current format: a device with a known key and a twin, a hub
/// module with five queued messages, a persistent session. Run by hand when the format
/// changes (`cargo test -p fleethub --test e2e generate_format_fixture -- --ignored`), with
/// FORMAT set to the new version's name, then check the directory in.
#[tokio::test]
#[ignore]
async fn generate_format_fixture() {
    let name = std::env::var("FORMAT").expect("FORMAT=format-N");
    let dir = temp_dir("fixture");
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        // A century to live: the queued messages carry absolute expiry times, and the
        // fixture must still hold them whenever the test runs (format-0 and format-1 were
        // written with the two-hour default and had their expiry moved by a century since).
        "[routes]\nsink = { route = \"FROM /messages/* INTO BrokeredEndpoint(\\\"/modules/sink/inputs/in\\\")\", timeToLiveSecs = 3153600000 }\n",
    )
    .unwrap();
    let mut hub = Hub::start_with(dir.clone(), &["--config", config.to_str().unwrap()]).await;
    let auth =
        |k: &str| json!({ "type": "sas", "symmetricKey": { "primaryKey": k, "secondaryKey": k } });
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices",
            Some(json!({ "deviceId": "d1", "authentication": auth(DEVICE_KEY) })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices/fleethub/modules",
            Some(json!({ "moduleId": "sink", "authentication": auth(SINK_KEY) })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/d1",
            Some(json!({ "tags": { "site": "fixture" }, "properties": { "desired": { "interval": 30 } } })),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let mut d = hub.device("d1", DEVICE_KEY).await;
    d.subscribe_many(&["devices/d1/messages/devicebound/#"])
        .await;
    for i in 0..5 {
        d.client
            .publish(
                format!("devices/d1/messages/events/seq={i}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                "fixture",
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 5 {
        if let Some(crate::harness::Seen::PubAck(_)) = d.next(Duration::from_secs(10)).await {
            acked += 1;
        }
    }
    drop(d);
    assert!(hub.terminate().success());
    let target = fixtures().join(&name);
    let _ = std::fs::remove_dir_all(&target);
    std::fs::create_dir_all(&target).unwrap();
    copy_dir(&hub.data_dir(), &target.join("data"));
    let _ = std::fs::remove_file(target.join("data").join("endpoints.json"));
    // Small enough to keep in the repository: the stores without their free pages.
    for store in ["fleethub.redb", "queues.redb"] {
        let mut db = redb::Database::open(target.join("data").join(store)).unwrap();
        while db.compact().unwrap() {}
    }
    std::fs::copy(&config, target.join("hub.toml")).unwrap();
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// A copy of a fixture's data directory in a fresh temp dir, with its config.
fn fixture_copy(name: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    copy_dir(&fixtures().join(name).join("data"), &dir.join("data"));
    let config = dir.join("hub.toml");
    std::fs::copy(fixtures().join(name).join("hub.toml"), &config).unwrap();
    (dir, config)
}

/// What every fixture holds, checked through a running hub: the device connects with its
/// key, its twin is intact, the module receives the five queued messages.
async fn serves_the_fixture(hub: &Hub) {
    let (_, twin) = hub.api(Method::GET, "/twins/d1", None).await;
    assert_eq!(twin["tags"]["site"], "fixture", "{twin}");
    assert_eq!(twin["properties"]["desired"]["interval"], 30, "{twin}");
    let _d = hub.device("d1", DEVICE_KEY).await;
    let mut sink = hub.device("fleethub/sink", SINK_KEY).await;
    sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
        .await;
    let mut got = std::collections::BTreeSet::new();
    while let Some(p) = sink.next_publish(Duration::from_secs(3)).await {
        let bag = p.topic.rsplit_once('/').unwrap().1;
        let m = fleethub_router::Message::from_bag(bag, bytes::Bytes::new()).unwrap();
        got.insert(m.property("seq").unwrap().to_string());
    }
    assert_eq!(got.len(), 5, "the queued messages: {got:?}");
}

fn store_check(data: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleethub"))
        .arg("--data-dir")
        .arg(data)
        .args(["store", "check"])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Every fixture of an earlier format opens, migrates (recorded, checked by `store check`)
/// and serves its devices.
#[tokio::test]
async fn data_directories_of_earlier_formats_migrate_and_serve() {
    let formats: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("format-"))
        .collect();
    assert!(formats.contains(&"format-0".to_string()), "{formats:?}");
    for name in formats {
        let (dir, config) = fixture_copy(&name);
        let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
        serves_the_fixture(&hub).await;
        let mut hub = hub;
        assert!(hub.terminate().success());
        let (ok, out) = store_check(&hub.data_dir());
        assert!(ok, "{name}: {out}");
        let current = format!(
            "format {} (this binary: {})",
            fleethub::stores::FORMAT,
            fleethub::stores::FORMAT
        );
        assert!(
            out.contains(&current),
            "{name}: migrated and recorded: {out}"
        );
    }
}

/// A store written by a newer format is refused with a clear message, and left as it was.
#[tokio::test]
async fn a_data_directory_from_a_newer_format_is_refused_untouched() {
    let (dir, _) = fixture_copy("format-0");
    let data = dir.join("data");
    {
        let db = redb::Database::open(data.join("fleethub.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(redb::TableDefinition::<&str, &[u8]>::new("meta"))
            .unwrap()
            .insert("format", b"99".as_slice())
            .unwrap();
        tx.commit().unwrap();
    }
    let before: Vec<(PathBuf, Vec<u8>)> = ["fleethub.redb", "queues.redb"]
        .iter()
        .map(|f| (data.join(f), std::fs::read(data.join(f)).unwrap()))
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleethub"))
        .arg("--data-dir")
        .arg(&data)
        .args([
            "serve",
            "--mqtt",
            "127.0.0.1:0",
            "--mqtts",
            "off",
            "--api",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("format 99") && err.contains("newer fleethub"),
        "{err}"
    );
    for (path, bytes) in before {
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{} untouched",
            path.display()
        );
    }
    let (ok, report) = store_check(&data);
    assert!(!ok && report.contains("newer"), "{report}");
}

/// A migration cut by `kill -9` at any moment leaves the directory usable: the next start
/// completes it and serves everything.
#[tokio::test]
async fn a_migration_cut_by_kill_9_completes_on_the_next_start() {
    for delay_ms in [0u64, 5, 20, 60] {
        let (dir, config) = fixture_copy("format-0");
        let data = dir.join("data");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleethub"))
            .arg("--data-dir")
            .arg(&data)
            .args([
                "serve",
                "--config",
                config.to_str().unwrap(),
                "--mqtt",
                "127.0.0.1:0",
                "--mqtts",
                "off",
                "--api",
                "127.0.0.1:0",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
        serves_the_fixture(&hub).await;
    }
}
