//! A custom endpoint into NATS JetStream with a real `nats-server -js`: routed messages
//! arrive in the stream with their subject and properties; with the server stopped
//! mid-stream they wait in the hub's queue, and once it is back every acknowledged message
//! is in the stream, none twice. Skipped loudly without nats-server outside CI; under CI
//! (which installs Debian's nats-server) it must run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::{settled_count, temp_dir, Hub};

fn nats_server() -> Option<PathBuf> {
    let found = std::env::var_os("FLEETHUB_NATS_SERVER")
        .map(PathBuf::from)
        .or_else(|| {
            [
                "/usr/bin/nats-server",
                "/usr/sbin/nats-server",
                "/usr/local/bin/nats-server",
            ]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
        });
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("nats-server must be installed under CI (.ci/run installs it)");
        }
        eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
    }
    found
}

/// A nats-server with JetStream on a free port, its store in `dir`; killed on drop.
struct Nats {
    child: std::process::Child,
    port: u16,
}

impl Nats {
    fn start(bin: &Path, dir: &Path, port: u16) -> Nats {
        let child = std::process::Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nats-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nats { child, port }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How many messages the stream holds (0 while it cannot be asked).
async fn stream_messages(url: &str) -> u64 {
    let client = match async_nats::connect(url).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("connect: {e}");
            return 0;
        }
    };
    let js = async_nats::jetstream::new(client);
    let mut stream = match js.get_stream("TELEMETRY").await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("get_stream: {e}");
            return 0;
        }
    };
    match stream.info().await {
        Ok(i) => i.state.messages,
        Err(e) => {
            eprintln!("info: {e}");
            0
        }
    }
}

async fn wait_for_messages(url: &str, want: u64) -> u64 {
    settled_count(want, || stream_messages(url)).await
}

#[tokio::test]
async fn routed_messages_reach_jetstream_and_survive_its_outage() {
    let Some(bin) = nats_server() else { return };
    let nats_dir = temp_dir("nats-store");
    let nats = Nats::start(&bin, &nats_dir, free_port());
    let dir = temp_dir("jetstream");
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            r#"[routes]
lake = "FROM /messages/* WHERE site = 'lab' INTO Endpoint(\"lake\")"

[endpoints.lake]
kind = "jetstream"
url = "{}"
stream = "TELEMETRY"
subject = "telemetry.{{hub}}.{{device}}.{{module}}"
"#,
            nats.url()
        ),
    )
    .unwrap();
    let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let key = hub.create_device("sensor.1").await;
    let mut dev = hub.device("sensor.1", &key).await;

    dev.publish_numbered("sensor.1", 0, 1_000).await;
    let arrived = wait_for_messages(&nats.url(), 1_000).await;
    if arrived != 1_000 {
        let m = hub.metrics().await;
        let lines: Vec<&str> = m
            .lines()
            .filter(|l| l.contains("endpoint") || l.contains("route"))
            .collect();
        panic!("{arrived} of 1000 in the stream; {lines:#?}");
    }
    // Subject and headers: the ids as tokens, the properties by name.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    let first = stream.get_raw_message(1).await.unwrap();
    assert_eq!(first.subject.as_str(), "telemetry.fleethub.sensor%2E1.~");
    assert_eq!(&first.payload[..], b"{\"n\":0}");
    let header = |name: &str| {
        first
            .headers
            .get(name)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    assert_eq!(header("seq"), "0");
    assert_eq!(header("site"), "lab");
    assert_eq!(header("iothub-connection-device-id"), "sensor.1");
    assert!(header("Nats-Msg-Id").starts_with("fleethub:"), "{first:?}");
    assert!(!header("iothub-enqueuedtime").is_empty());

    // The server stops mid-stream: the hub still acknowledges (the queue keeps them).
    let port = nats.port;
    drop(nats);
    dev.publish_numbered("sensor.1", 1_000, 1_000).await;
    let depth = "fleethub_queue_depth{sink=\"$endpoint/lake\"}";
    assert!(hub.metric(depth).await > 0.0, "waiting in the queue");
    // Back (same store, same port): every acknowledged message arrives, none twice.
    let nats = Nats::start(&bin, &nats_dir, port);
    assert_eq!(wait_for_messages(&nats.url(), 2_000).await, 2_000);
    let deadline = Instant::now() + Duration::from_secs(10);
    while hub.metric(depth).await > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(hub.metric(depth).await, 0.0, "the queue drained");
    let delivered = "fleethub_sink_messages_total{result=\"delivered\",sink=\"$endpoint/lake\"}";
    assert!(hub.metric(delivered).await >= 2_000.0);
    drop(nats);
    let _ = std::fs::remove_dir_all(&nats_dir);
}

#[tokio::test]
async fn a_route_to_an_endpoint_that_is_not_configured_is_flagged() {
    let dir = temp_dir("endpoint-missing");
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        "[routes]\nlost = \"FROM /messages/* INTO Endpoint(\\\"nowhere\\\")\"\n",
    )
    .unwrap();
    let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let (ok, out, err) = hub.fleethub("route list");
    assert!(ok, "{err}");
    assert!(out.contains("nowhere"), "{out}");
    // A bad endpoint kind is refused at start with its name.
    let dir = temp_dir("endpoint-bad");
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        "[endpoints.db]\nkind = \"kafka\"\nurl = \"nats://127.0.0.1:1\"\nstream = \"S\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleethub"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--mqtt",
            "127.0.0.1:0",
        ])
        .args(["--mqtts", "off", "--api", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[endpoints.db]") && err.contains("kafka"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
