//! Cluster membership and leadership with a real PostgreSQL (a temp cluster made by `initdb`,
//! on a free port): three fleethub nodes elect exactly one leader, which alone runs the
//! singleton work; `kill -9` of the leader hands leadership to another node within seconds;
//! a node stopped with SIGTERM shows as stopped, a killed one as gone; a node that cannot
//! reach its PostgreSQL refuses to start. The registry is shared: a device created on one
//! node connects to another, and disabling or deleting it anywhere disconnects it wherever it
//! is connected. Skipped loudly without PostgreSQL outside CI.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleethub::api::wire::ClusterStatus;
use reqwest::Method;
use rumqttc::ConnectReturnCode;
use serde_json::json;

use crate::harness::{cli, free_port, temp_dir, Client, Hub};
use crate::postgres::{pg_bin, Pg};

/// A node's directory with its config: 200 ms heartbeats, gone after 1 s of silence; NATS
/// when given.
pub(crate) fn node_dir(name: &str, url: &str, nats: Option<&str>) -> (PathBuf, String) {
    let dir = temp_dir(&format!("cluster-{name}"));
    let config = dir.join("hub.toml");
    let nats = nats
        .map(|n| format!("nats = \"{n}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "[cluster]\nnode = \"{name}\"\npostgres = \"{url}\"\n{nats}heartbeat_ms = 200\nnode_timeout_ms = 1000\n"
        ),
    )
    .expect("write config");
    (dir, config.to_string_lossy().into_owned())
}

async fn start_node(name: &str, url: &str) -> Hub {
    let (dir, config) = node_dir(name, url, None);
    Hub::start_with(dir, &["--config", &config]).await
}

/// Runs `fleethub serve` on a node's directory where it must not start: whether it exited
/// with success, and what it said.
fn refused_start(dir: &std::path::Path, config: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleethub"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["serve", "--config", config])
        .args([
            "--mqtt",
            "127.0.0.1:0",
            "--mqtts",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ])
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .expect("run fleethub");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// Polls `hub`'s `GET /cluster` until `done` holds (at most 20 s); the last status either way.
async fn status_until(hub: &Hub, done: impl Fn(&ClusterStatus) -> bool) -> ClusterStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = hub.client.cluster().await.expect("GET /cluster");
        if done(&status) || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn state_of<'a>(s: &'a ClusterStatus, node: &str) -> Option<&'a str> {
    s.nodes
        .iter()
        .find(|n| n.node == node)
        .map(|n| n.state.as_str())
}

const SINGLETONS: [&str; 2] = ["rollouts", "ttl-sweeper"];

#[tokio::test]
async fn three_nodes_elect_one_leader_and_another_takes_over_when_it_is_killed() {
    let Some(bin) = pg_bin() else { return };
    let pg = Pg::init(&bin);
    let url = pg.url();
    let mut nodes = vec![
        ("a", start_node("a", &url).await),
        ("b", start_node("b", &url).await),
        ("c", start_node("c", &url).await),
    ];

    // One admin token for the whole cluster: the first node's.
    assert!(
        nodes.iter().all(|(_, h)| h.token == nodes[0].1.token),
        "every node took the cluster's admin token"
    );
    let status = status_until(&nodes[0].1, |s| {
        s.leader.is_some() && s.nodes.iter().filter(|n| n.state == "up").count() == 3
    })
    .await;
    assert_eq!(status.mode, "cluster");
    let pg_health = status.postgres.as_ref().expect("postgres health");
    assert!(pg_health.reachable, "{pg_health:?}");
    assert_eq!(status.nodes.len(), 3, "{status:?}");
    let leader = status.leader.clone().expect("a leader");
    assert_eq!(
        status.nodes.iter().filter(|n| n.leader).count(),
        1,
        "exactly one leader: {status:?}"
    );

    // Every node agrees; only the leader runs the singleton work and says so in /metrics
    // (with its node label).
    for (name, hub) in &nodes {
        let s = status_until(hub, |s| s.leader.as_deref() == Some(leader.as_str())).await;
        assert_eq!(s.leader.as_deref(), Some(leader.as_str()), "node {name}");
        assert_eq!(s.node, *name);
        let runs = status_until(hub, |s| {
            (s.singletons.len() == 2) == (*name == leader.as_str())
        })
        .await
        .singletons;
        let gauge = hub
            .metric(&format!("fleethub_cluster_leader{{node=\"{name}\"}}"))
            .await;
        if *name == leader.as_str() {
            assert_eq!(runs, SINGLETONS, "the leader runs the singleton work");
            assert_eq!(gauge, 1.0);
        } else {
            assert!(runs.is_empty(), "follower {name} runs {runs:?}");
            assert_eq!(gauge, 0.0);
        }
        assert!(
            hub.metrics()
                .await
                .contains(&format!("fleethub_connections{{node=\"{name}\"}} 0")),
            "every series carries the node label"
        );
    }

    // The CLI shows the same, as JSON and as text.
    let follower = nodes
        .iter()
        .find(|(n, _)| *n != leader)
        .expect("a follower");
    let (ok, out, err) = cli(&follower.1, &["--output", "json", "cluster", "status"]);
    assert!(ok, "{err}");
    let from_cli: ClusterStatus = serde_json::from_str(&out).expect("JSON status");
    assert_eq!(from_cli.leader.as_deref(), Some(leader.as_str()));
    let (ok, out, err) = cli(&follower.1, &["cluster", "status"]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("leader: {leader}")), "{out}");

    // kill -9 the leader: another node takes over and starts the singleton work.
    let at = nodes
        .iter()
        .position(|(n, _)| *n == leader)
        .expect("leader node");
    let (killed_name, mut killed) = nodes.remove(at);
    killed.kill9();
    let killed_at = Instant::now();
    let watcher = &nodes[0].1;
    let after = status_until(watcher, |s| {
        s.leader.as_deref().is_some_and(|l| l != killed_name)
            && state_of(s, killed_name) == Some("gone")
    })
    .await;
    let new_leader = after.leader.clone().expect("a new leader");
    assert_ne!(new_leader, killed_name, "{after:?}");
    assert_eq!(state_of(&after, killed_name), Some("gone"), "{after:?}");
    eprintln!(
        "leadership moved from {killed_name} to {new_leader} in {:?}",
        killed_at.elapsed()
    );
    let (_, new_hub) = nodes
        .iter()
        .find(|(n, _)| *n == new_leader)
        .expect("new leader is a survivor");
    let runs = status_until(new_hub, |s| s.singletons.len() == 2)
        .await
        .singletons;
    assert_eq!(
        runs, SINGLETONS,
        "the new leader took over the singleton work"
    );

    // The killed node comes back as a follower: leadership stays where it is.
    let killed = killed.restart().await;
    let back = status_until(&killed, |s| state_of(s, killed_name) == Some("up")).await;
    assert_eq!(
        back.leader.as_deref(),
        Some(new_leader.as_str()),
        "{back:?}"
    );
    assert!(status_until(&killed, |s| s.singletons.is_empty())
        .await
        .singletons
        .is_empty());

    // A follower stopped with SIGTERM says so: stopped, not gone.
    let at = nodes
        .iter()
        .position(|(n, _)| *n != new_leader)
        .expect("a follower");
    let (stopped_name, mut stopped) = nodes.remove(at);
    assert!(stopped.terminate().success());
    let s = status_until(&killed, |s| state_of(s, stopped_name) == Some("stopped")).await;
    assert_eq!(state_of(&s, stopped_name), Some("stopped"), "{s:?}");
    drop(pg);
}

#[tokio::test]
async fn a_node_without_its_postgres_refuses_to_start() {
    // Nothing listens on this port.
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        free_port()
    );
    let (dir, config) = node_dir("lonely", &url, None);
    let (started, said) = refused_start(&dir, &config);
    assert!(!started, "started without its PostgreSQL");
    assert!(
        said.contains("cluster PostgreSQL") && said.contains("does not start"),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_single_hub_is_its_own_leader() {
    let hub = Hub::start("single-leader").await;
    let s = hub.client.cluster().await.expect("GET /cluster");
    assert_eq!(s.mode, "single");
    assert_eq!(s.leader.as_deref(), Some(s.node.as_str()));
    let runs = status_until(&hub, |s| s.singletons.len() == 2)
        .await
        .singletons;
    assert_eq!(runs, SINGLETONS);
    assert!(s.postgres.is_none() && s.nodes.is_empty());
    assert_eq!(hub.metric("fleethub_cluster_leader").await, 1.0);
    let (ok, out, err) = cli(&hub, &["cluster", "status"]);
    assert!(ok, "{err}");
    assert!(out.contains("single hub"), "{out}");
}

/// Polls node `hub` until `GET {path}` answers `want` (at most 10 s); the time it took.
async fn until_status(hub: &Hub, path: &str, want: u16) -> Duration {
    let start = Instant::now();
    loop {
        let (status, _) = hub.api(Method::GET, path, None).await;
        if status == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{path} still answers {status}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_registry_is_shared_and_a_disabled_device_is_disconnected_on_whichever_node_holds_it() {
    let Some(bin) = pg_bin() else { return };
    let pg = Pg::init(&bin);
    let url = pg.url();

    // A single hub with a device of its own becomes the cluster's first node: its registry
    // seeds the shared table.
    let mut single = Hub::start("cluster-seed").await;
    let old_key = single.create_device("old-1").await;
    assert!(single.terminate().success());
    let dir = std::mem::take(&mut single.dir);
    drop(single);
    let (_, config_a) = node_dir("a", &url, None);
    let a = Hub::start_with(dir, &["--config", &config_a]).await;
    let b = start_node("b", &url).await;
    until_status(&b, "/devices/old-1", 200).await;
    drop(b.device("old-1", &old_key).await);

    // Created on b, known on a at once (a notification, not a poll), and it connects there.
    let key = b.create_device("dev-1").await;
    let seen_after = until_status(&a, "/devices/dev-1", 200).await;
    eprintln!("a device created on b was known on a after {seen_after:?}");
    let mut live = a.device("dev-1", &key).await;
    let (status, body) = b
        .api(
            Method::PATCH,
            "/devices/dev-1",
            Some(json!({ "statusReason": "from b" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        live.disconnected(Duration::from_millis(700))
            .await
            .is_none(),
        "a change that does not disable keeps the connection"
    );

    // Disabled through b: the connection on a closes, and a refuses it from then on.
    let (status, body) = b
        .api(
            Method::PATCH,
            "/devices/dev-1",
            Some(json!({ "status": "disabled" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        live.disconnected(Duration::from_secs(5)).await.is_some(),
        "disabling on b disconnects the device on a"
    );
    assert_eq!(
        Client::connect(a.options("dev-1", &a.sas("dev-1", &key)))
            .await
            .err(),
        Some(ConnectReturnCode::NotAuthorized)
    );

    // Both nodes change the same device at once: neither change is lost, and both nodes end
    // with the same record.
    let (ra, rb) = tokio::join!(
        a.api(
            Method::PATCH,
            "/devices/dev-1",
            Some(json!({ "status": "enabled" }))
        ),
        b.api(
            Method::PATCH,
            "/devices/dev-1",
            Some(json!({ "statusReason": "both" }))
        ),
    );
    assert_eq!((ra.0, rb.0), (200, 200), "{ra:?} {rb:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (on_a, on_b) = loop {
        let (_, on_a) = a.api(Method::GET, "/devices/dev-1", None).await;
        let (_, on_b) = b.api(Method::GET, "/devices/dev-1", None).await;
        if on_a["etag"] == on_b["etag"] || Instant::now() > deadline {
            break (on_a, on_b);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(on_a["etag"], on_b["etag"], "{on_a} / {on_b}");
    assert_eq!(on_a["status"], "enabled", "{on_a}");
    assert_eq!(on_a["statusReason"], "both", "{on_a}");
    let live = a.device("dev-1", &key).await;

    // Deleted through a: gone on b, and its connection on a closed.
    let mut live = live;
    let (status, _) = a.api(Method::DELETE, "/devices/dev-1", None).await;
    assert_eq!(status, 204);
    until_status(&b, "/devices/dev-1", 404).await;
    assert!(live.disconnected(Duration::from_secs(5)).await.is_some());

    // A node killed and started again reads the shared registry, changes made while it was
    // down included.
    let mut a = a;
    a.kill9();
    let key2 = b.create_device("dev-2").await;
    let a = a.restart().await;
    until_status(&a, "/devices/dev-2", 200).await;
    drop(a.device("dev-2", &key2).await);
    until_status(&a, "/devices/dev-1", 404).await;
    drop(pg);
}

/// nats-server, if installed (CI installs it).
pub(crate) fn nats_bin() -> Option<PathBuf> {
    let found = [
        "/usr/bin/nats-server",
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("nats-server must be installed under CI (.ci/run installs it)");
        }
        eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
    }
    found
}

/// Three nats-servers routed into one cluster on free ports; each killed on drop.
pub(crate) struct NatsCluster {
    servers: Vec<Option<std::process::Child>>,
    ports: Vec<u16>,
}

impl NatsCluster {
    pub(crate) fn start(bin: &std::path::Path) -> NatsCluster {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for i in 0..3 {
            let others: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("nats://127.0.0.1:{}", routes[j]))
                .collect();
            let child = Command::new(bin)
                .args(["-a", "127.0.0.1", "-p", &ports[i].to_string()])
                .args([
                    "--server_name",
                    &format!("n{i}"),
                    "--cluster_name",
                    "fleethub",
                ])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[i])])
                .args(["--routes", &others.join(",")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nats-server");
            servers.push(Some(child));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in &ports {
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(Instant::now() < deadline, "nats-server did not listen");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        NatsCluster { servers, ports }
    }

    /// All three servers, `first` first.
    pub(crate) fn urls(&self, first: usize) -> String {
        let mut order: Vec<usize> = vec![first];
        order.extend((0..3).filter(|i| *i != first));
        order
            .iter()
            .map(|i| format!("nats://127.0.0.1:{}", self.ports[*i]))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub(crate) fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

async fn start_bus_node(name: &str, pg: &str, nats: &str) -> Hub {
    let (dir, config) = node_dir(name, pg, Some(nats));
    Hub::start_with(dir, &["--config", &config]).await
}

/// `POST {path}` on `hub` as a method call; status and body.
async fn call_method(
    hub: &Hub,
    device: &str,
    name: &str,
    timeout_s: u64,
) -> (u16, serde_json::Value) {
    hub.api(
        Method::POST,
        &format!("/devices/{device}/methods"),
        Some(json!({"methodName": name, "payload": {"from": "api"}, "responseTimeoutInSeconds": timeout_s})),
    )
    .await
}

/// Answers one method request on `device` (if one comes within `within`) with 200 and
/// `{"answeredBy": by}`.
async fn answer_one_within(device: &mut Client, by: &str, within: Duration) -> bool {
    let Some(req) = device
        .next_publish_on("$iothub/methods/POST/", within)
        .await
    else {
        return false;
    };
    let rid = req.topic.rsplit("$rid=").next().unwrap_or("").to_string();
    device
        .client
        .publish(
            format!("$iothub/methods/res/200/?$rid={rid}"),
            rumqttc::QoS::AtLeastOnce,
            false,
            json!({ "answeredBy": by }).to_string(),
        )
        .await
        .is_ok()
}

#[tokio::test]
async fn a_method_invoked_on_one_node_reaches_the_device_on_another_and_a_reconnect_elsewhere_takes_over(
) {
    let (Some(pg_bin), Some(nats_bin)) = (pg_bin(), nats_bin()) else {
        return;
    };
    let pg = Pg::init(&pg_bin);
    let mut nats = NatsCluster::start(&nats_bin);
    let url = pg.url();
    let a = start_bus_node("a", &url, &nats.urls(0)).await;
    let b = start_bus_node("b", &url, &nats.urls(1)).await;
    let c = start_bus_node("c", &url, &nats.urls(2)).await;
    let s = status_until(&b, |s| s.nats_connected == Some(true)).await;
    assert_eq!(s.nats_connected, Some(true), "{s:?}");

    let key = b.create_device("dev-1").await;
    b.create_device("dev-off").await;
    until_status(&a, "/devices/dev-1", 200).await;
    until_status(&c, "/devices/dev-1", 200).await;

    // The device on a answers a call made through b.
    let mut on_a = a.device("dev-1", &key).await;
    on_a.subscribe_many(&["$iothub/methods/POST/#"]).await;
    // A connection made a moment ago reaches every NATS server's interest within moments;
    // a caller that got "not online" right after the device connected tries again.
    let b_api = (b.api_url("/devices/dev-1/methods"), b.token.clone());
    let ask = |api: (String, String), name: &'static str| {
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(api.0)
                .bearer_auth(api.1)
                .json(&json!({"methodName": name, "payload": {"delay": 1}, "responseTimeoutInSeconds": 10}))
                .send()
                .await
                .expect("call through b");
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let call = ask(b_api.clone(), "reboot");
        let answered = answer_one_within(&mut on_a, "a", Duration::from_secs(3)).await;
        let (status, body) = call.await.unwrap();
        if answered && status == 200 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no call through b reached the device on a: {status} {body}"
        );
    };
    assert_eq!(body, json!({"status": 200, "payload": {"answeredBy": "a"}}));

    // A device connected nowhere: an answer at once, as IoT Hub gives (404103), not a timeout.
    let started = Instant::now();
    let (status, body) = call_method(&c, "dev-off", "reboot", 30).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The same device connects to c: its connection on a closes (taken over), and calls
    // through b now reach it on c.
    let mut on_c = c.device("dev-1", &key).await;
    assert!(
        on_a.disconnected(Duration::from_secs(5)).await.is_some(),
        "connecting on c closed the connection on a"
    );
    on_c.subscribe_many(&["$iothub/methods/POST/#"]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let call = ask(b_api.clone(), "ping");
        let answered = answer_one_within(&mut on_c, "c", Duration::from_secs(3)).await;
        let (status, body) = call.await.unwrap();
        if answered && status == 200 {
            assert_eq!(body["payload"]["answeredBy"], "c", "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no call through b reached the device on c: {status} {body}"
        );
    }

    // C2D sent through a (the device is on c): a hands it to c, which stores it before the
    // 202, and the device receives it there.
    on_c.subscribe_many(&["devices/dev-1/messages/devicebound/#"])
        .await;
    let (status, body) = a
        .api(
            Method::POST,
            "/devices/dev-1/messages",
            Some(json!({"body": {"cmd": "open"}, "properties": {"k": "v"}})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let got = on_c
        .next_publish_on(
            "devices/dev-1/messages/devicebound/",
            Duration::from_secs(10),
        )
        .await
        .expect("C2D sent through a reached the device on c");
    assert_eq!(crate::harness::json_of(&got), json!({"cmd": "open"}));
    assert!(got.topic.contains("k=v"), "{}", got.topic);
    // To a device connected nowhere: stored in the queue every node shares.
    let (status, body) = c
        .api(
            Method::POST,
            "/devices/dev-off/messages",
            Some(json!({"body": "later"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");

    // One NATS server dies (c's first): the nodes move to the others and calls still arrive.
    nats.kill(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let call = ask(b_api.clone(), "ping");
        let answered = answer_one_within(&mut on_c, "c", Duration::from_secs(3)).await;
        let (status, body) = call.await.unwrap();
        if answered && status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no call arrived after a NATS server died: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((a, b, c));
    drop(pg);
}

/// Waits until `hub` sees `device` tagged (another node's tag write reached it).
async fn until_tagged(hub: &Hub, device: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, twin) = hub
            .api(Method::GET, &format!("/twins/{device}"), None)
            .await;
        if twin["tags"]["env"] == "prod" {
            return;
        }
        assert!(Instant::now() < deadline, "tags never arrived: {twin}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn twins_are_shared_a_desired_patch_made_on_one_node_reaches_the_device_on_another() {
    let Some(bin) = pg_bin() else { return };
    let pg = Pg::init(&bin);
    let url = pg.url();
    let a = start_node("a", &url).await;
    let b = start_node("b", &url).await;
    let key = a.create_device("dev-1").await;
    until_status(&b, "/devices/dev-1", 200).await;

    // Desired written through b: the device connected to a gets the patch, at the version b
    // wrote.
    let mut on_a = a.device("dev-1", &key).await;
    on_a.subscribe_many(&[
        "$iothub/twin/PATCH/properties/desired/#",
        "$iothub/twin/res/#",
    ])
    .await;
    let (s, body) = b
        .api(
            Method::PATCH,
            "/twins/dev-1",
            Some(json!({"properties": {"desired": {"fw": "2.0", "mode": {"eco": true}}}})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let p = on_a
        .next_publish_on(
            "$iothub/twin/PATCH/properties/desired/",
            Duration::from_secs(5),
        )
        .await
        .expect("the desired patch written on b reached the device on a");
    assert_eq!(p.topic, "$iothub/twin/PATCH/properties/desired/?$version=2");
    assert_eq!(
        crate::harness::json_of(&p),
        json!({"fw": "2.0", "mode": {"eco": true}, "$version": 2})
    );

    // Reported through a: seen through b.
    let r = on_a
        .request(
            "$iothub/twin/PATCH/properties/reported/?$rid=1",
            br#"{"temp": 21}"#,
            "$iothub/twin/res/",
        )
        .await;
    assert!(r.topic.starts_with("$iothub/twin/res/204/"), "{}", r.topic);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, twin) = b.api(Method::GET, "/twins/dev-1", None).await;
        if twin["properties"]["reported"]["temp"] == 21 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reported on a never showed on b: {twin}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Both nodes write desired at once: neither write is lost, both nodes agree after.
    let (ra, rb) = tokio::join!(
        a.api(
            Method::PATCH,
            "/twins/dev-1",
            Some(json!({"properties": {"desired": {"x": 1}}}))
        ),
        b.api(
            Method::PATCH,
            "/twins/dev-1",
            Some(json!({"properties": {"desired": {"y": 2}}}))
        ),
    );
    assert_eq!((ra.0, rb.0), (200, 200), "{ra:?} {rb:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (on_a_twin, on_b_twin) = loop {
        let (_, ta) = a.api(Method::GET, "/twins/dev-1", None).await;
        let (_, tb) = b.api(Method::GET, "/twins/dev-1", None).await;
        if ta["etag"] == tb["etag"] || Instant::now() > deadline {
            break (ta, tb);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(on_a_twin["etag"], on_b_twin["etag"]);
    let desired = &on_a_twin["properties"]["desired"];
    assert_eq!(
        (&desired["x"], &desired["y"], &desired["$version"]),
        (&json!(1), &json!(2), &json!(4)),
        "{desired}"
    );

    // The device moves to b: its twin is there, everything in it.
    drop(on_a);
    let mut on_b = b.device("dev-1", &key).await;
    on_b.subscribe_many(&["$iothub/twin/res/#"]).await;
    let r = on_b
        .request("$iothub/twin/GET/?$rid=2", b"", "$iothub/twin/res/")
        .await;
    let twin = crate::harness::json_of(&r);
    assert_eq!(twin["desired"]["fw"], "2.0", "{twin}");
    assert_eq!(twin["desired"]["y"], 2, "{twin}");
    assert_eq!(twin["reported"]["temp"], 21, "{twin}");

    // A deployment created on the leader reaches the device on the other node: tags written
    // through one node select it there, and the deployment's desired write is a shared twin
    // write.
    on_b.subscribe_many(&["$iothub/twin/PATCH/properties/desired/#"])
        .await;
    let (s, body) = b
        .api(
            Method::PATCH,
            "/twins/dev-1",
            Some(json!({"tags": {"env": "prod"}})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let leader = status_until(&a, |s| s.leader.is_some())
        .await
        .leader
        .expect("a leader");
    let (lead, other) = if leader == "a" { (&a, &b) } else { (&b, &a) };
    until_tagged(lead, "dev-1").await;
    let (s, body) = lead
        .api(
            Method::POST,
            "/deployments",
            Some(json!({
                "id": "fw-3", "targetCondition": "tags.env = 'prod'", "priority": 10,
                "content": {"deviceContent": {"properties.desired.firmware": {"version": "3.0"}}},
            })),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = on_b
            .next_publish_on(
                "$iothub/twin/PATCH/properties/desired/",
                Duration::from_secs(10),
            )
            .await
            .expect("the deployment's desired patch reached the device on b");
        if crate::harness::json_of(&p)["firmware"]["version"] == "3.0" {
            break;
        }
        assert!(Instant::now() < deadline, "no firmware 3.0 patch");
    }
    let (_, twin) = other.api(Method::GET, "/twins/dev-1", None).await;
    assert_eq!(
        twin["properties"]["desired"]["firmware"]["version"], "3.0",
        "{twin}"
    );

    // Routes written to $edgeHub through b replace a's route table too.
    let (s, body) = b
        .api(
            Method::PATCH,
            "/twins/fleethub/modules/$edgeHub",
            Some(json!({"properties": {"desired": {"routes": {"shared": "FROM /messages/* INTO $upstream"}}}})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, table) = a.api(Method::GET, "/routes", None).await;
        if table.to_string().contains("\"shared\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a's route table never took b's routes: {table}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(pg);
}

#[tokio::test]
async fn a_node_killed_its_devices_reconnect_to_another_and_nothing_acknowledged_is_lost() {
    let Some(bin) = pg_bin() else { return };
    let pg = Pg::init(&bin);
    let url = pg.url();
    let mut a = start_node("a", &url).await;
    let b = start_node("b", &url).await;
    let key = a.create_device("dev-1").await;
    until_status(&b, "/devices/dev-1", 200).await;

    // The device reaches the cluster through one address, as behind a TCP load balancer.
    let lb = crate::harness::Proxy::start("127.0.0.1:0", a.endpoints.mqtt.expect("mqtt")).await;
    let through_lb = |hub: &Hub| {
        let mut o = rumqttc::MqttOptions::new("dev-1", "127.0.0.1", lb.port());
        o.set_credentials(hub.username("dev-1"), hub.sas("dev-1", &key));
        o.set_keep_alive(Duration::from_secs(30));
        o
    };
    let mut dev = Client::connect(through_lb(&a))
        .await
        .expect("connects to a");
    dev.subscribe_many(&["$iothub/twin/res/#"]).await;
    // Acknowledged by a (204), then a dies at once.
    let r = dev
        .request(
            "$iothub/twin/PATCH/properties/reported/?$rid=1",
            br#"{"battery": 87}"#,
            "$iothub/twin/res/",
        )
        .await;
    assert!(r.topic.starts_with("$iothub/twin/res/204/"), "{}", r.topic);
    a.kill9();
    lb.retarget(b.endpoints.mqtt.expect("mqtt"));
    lb.cut();
    assert!(dev.disconnected(Duration::from_secs(10)).await.is_some());

    // It reconnects through the same address, lands on b, and finds what a acknowledged.
    let mut dev = Client::connect(through_lb(&b))
        .await
        .expect("reconnects, to b");
    dev.subscribe_many(&[
        "$iothub/twin/res/#",
        "$iothub/twin/PATCH/properties/desired/#",
        "$iothub/methods/POST/#",
    ])
    .await;
    let r = dev
        .request("$iothub/twin/GET/?$rid=2", b"", "$iothub/twin/res/")
        .await;
    let twin = crate::harness::json_of(&r);
    assert_eq!(
        twin["reported"]["battery"], 87,
        "acknowledged on a, served by b: {twin}"
    );
    let (s, body) = b
        .api(
            Method::PATCH,
            "/twins/dev-1",
            Some(json!({"properties": {"desired": {"mode": "eco"}}})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let p = dev
        .next_publish_on(
            "$iothub/twin/PATCH/properties/desired/",
            Duration::from_secs(5),
        )
        .await
        .expect("desired patch on b");
    assert_eq!(crate::harness::json_of(&p)["mode"], "eco");
    let (s, node) = b.api(Method::GET, "/devices/dev-1", None).await;
    assert_eq!(
        (s, node["connectionState"].as_str()),
        (200, Some("Connected"))
    );
    drop(pg);
}

#[tokio::test]
async fn a_shared_table_of_another_shape_stops_the_node_with_a_message_not_a_panic() {
    let Some(bin) = pg_bin() else { return };
    let pg = Pg::init(&bin);
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    // Made by someone else under the same name: the version is a 32-bit integer.
    client
        .batch_execute(
            "CREATE TABLE fleethub_identities (key text PRIMARY KEY, body text NOT NULL, etag text NOT NULL, version int NOT NULL);
             INSERT INTO fleethub_identities VALUES ('x', '{}', 'e', 1);",
        )
        .await
        .expect("a foreign table");
    let (dir, config) = node_dir("odd", &pg.url(), None);
    let (started, said) = refused_start(&dir, &config);
    assert!(!started, "started on a table it cannot read");
    assert!(said.contains("cluster PostgreSQL"), "{said}");
    assert!(!said.contains("panicked"), "{said}");
    let _ = std::fs::remove_dir_all(dir);
}

/// What an Azure IoT SDK device subscribes once, on its first connection, and never again.
const SDK_FILTERS: [&str; 4] = [
    "devices/dev-1/messages/devicebound/#",
    "$iothub/twin/res/#",
    "$iothub/twin/PATCH/properties/desired/#",
    "$iothub/methods/POST/#",
];

/// Invokes `name` on dev-1 through `via` until the device (reading on `device`) answers it:
/// a connection made a moment ago reaches every NATS server's interest within moments.
async fn method_answered(via: &Hub, device: &mut Client, by: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let url = via.api_url("/devices/dev-1/methods");
        let token = via.token.clone();
        let call = tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&json!({"methodName": "ping", "payload": {}, "responseTimeoutInSeconds": 10}))
                .send()
                .await
                .expect("method call");
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        });
        let answered = answer_one_within(device, by, Duration::from_secs(3)).await;
        let (status, body) = call.await.unwrap();
        if answered && status == 200 {
            assert_eq!(body["payload"]["answeredBy"], by, "{body}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no method call reached the resumed session on {by}: {status} {body}"
        );
    }
}

/// Waits until `hub` shows dev-1 disconnected (its connection there has closed).
async fn disconnected_on(hub: &Hub) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, d) = hub.api(Method::GET, "/devices/dev-1", None).await;
        if d["connectionState"] == "Disconnected" {
            return;
        }
        assert!(Instant::now() < deadline, "still connected: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every publish that arrives until none has for `quiet`.
async fn drain(client: &mut Client, quiet: Duration) -> Vec<rumqttc::Publish> {
    let mut all = Vec::new();
    while let Some(p) = client.next_publish(quiet).await {
        all.push(p);
    }
    all
}

async fn send_c2d(via: &Hub, body: &str) {
    let (s, b) = via
        .api(
            Method::POST,
            "/devices/dev-1/messages",
            Some(json!({ "body": body })),
        )
        .await;
    assert_eq!(s, 202, "C2D {body}: {b}");
}

/// The SDKs connect with clean session 0 and never subscribe again after a reconnect, so a
/// device that lands on another node (a load balancer's choice, or its node died) must find
/// its session there: session-present 1, its subscriptions working without a SUBSCRIBE, the
/// C2D messages sent through any node while it was away delivered, the desired change made
/// while away sent on resume. Clean session 1 on any node ends the session everywhere.
#[tokio::test]
async fn a_device_reconnecting_to_another_node_keeps_its_session_and_gets_what_was_sent_while_away()
{
    let (Some(pg_bin), Some(nats_bin)) = (pg_bin(), nats_bin()) else {
        return;
    };
    let pg = Pg::init(&pg_bin);
    let nats = NatsCluster::start(&nats_bin);
    let url = pg.url();
    let a = start_bus_node("a", &url, &nats.urls(0)).await;
    let b = start_bus_node("b", &url, &nats.urls(1)).await;
    let mut c = start_bus_node("c", &url, &nats.urls(2)).await;
    let key = a.create_device("dev-1").await;
    until_status(&b, "/devices/dev-1", 200).await;
    until_status(&c, "/devices/dev-1", 200).await;

    // One address in front of the nodes, as a TCP load balancer is.
    let lb = crate::harness::Proxy::start("127.0.0.1:0", a.endpoints.mqtt.expect("mqtt")).await;
    let sdk_like = |hub: &Hub| {
        let mut o = rumqttc::MqttOptions::new("dev-1", "127.0.0.1", lb.port());
        o.set_credentials(hub.username("dev-1"), hub.sas("dev-1", &key));
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(false);
        o
    };
    let (mut dev, present) = Client::connect_session(sdk_like(&a))
        .await
        .expect("connects to a");
    assert!(!present, "a first connection has no session");
    let codes = dev.subscribe_many(&SDK_FILTERS).await;
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
        "{codes:?}"
    );

    // Away: C2D through b, a desired change through c; then the device lands on c.
    lb.cut();
    assert!(dev.disconnected(Duration::from_secs(10)).await.is_some());
    disconnected_on(&a).await;
    send_c2d(&b, "while-away").await;
    let (s, body) = c
        .api(
            Method::PATCH,
            "/twins/dev-1",
            Some(json!({"properties": {"desired": {"mode": "eco"}}})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    lb.retarget(c.endpoints.mqtt.expect("mqtt"));
    let (mut dev, present) = Client::connect_session(sdk_like(&c))
        .await
        .expect("reconnects, to c");
    assert!(present, "the session made on a is present on c");
    let got = drain(&mut dev, Duration::from_millis(1500)).await;
    let c2d = got
        .iter()
        .find(|p| p.topic.starts_with("devices/dev-1/messages/devicebound/"))
        .expect("the C2D message sent through b while the device was away");
    assert_eq!(&c2d.payload[..], b"while-away");
    let patch = got
        .iter()
        .find(|p| {
            p.topic
                .starts_with("$iothub/twin/PATCH/properties/desired/")
        })
        .expect("the desired change made while away, on resume");
    assert_eq!(crate::harness::json_of(patch)["mode"], "eco");
    method_answered(&a, &mut dev, "c").await;
    let r = dev
        .request("$iothub/twin/GET/?$rid=g", b"", "$iothub/twin/res/")
        .await;
    assert!(r.topic.starts_with("$iothub/twin/res/200/"), "{}", r.topic);

    // c dies holding the connection; the device comes back through the same address on b.
    c.kill9();
    lb.retarget(b.endpoints.mqtt.expect("mqtt"));
    lb.cut();
    assert!(dev.disconnected(Duration::from_secs(10)).await.is_some());
    send_c2d(&a, "after-the-kill").await;
    let (mut dev, present) = Client::connect_session(sdk_like(&b))
        .await
        .expect("reconnects, to b");
    assert!(present, "the session outlives the node that held it");
    let c2d = dev
        .next_publish_on(
            "devices/dev-1/messages/devicebound/",
            Duration::from_secs(5),
        )
        .await
        .expect("C2D sent through a while the device was away, on b");
    assert_eq!(&c2d.payload[..], b"after-the-kill");
    method_answered(&a, &mut dev, "b").await;

    // Clean session 1 on one node ends the session on every node.
    drop(dev);
    let mut clean = sdk_like(&b);
    clean.set_clean_session(true);
    let (once, present) = Client::connect_session(clean).await.expect("connects");
    assert!(!present);
    drop(once);
    lb.retarget(a.endpoints.mqtt.expect("mqtt"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_fresh, present) = Client::connect_session(sdk_like(&a))
        .await
        .expect("connects to a");
    assert!(
        !present,
        "clean session 1 on b ended the session a would resume"
    );
    let (_, metrics) = (0, a.metrics().await);
    assert!(
        metrics.contains("fleethub_sessions{node=\"a\"} 1")
            || metrics.contains("fleethub_sessions{node=\"a\"} 0"),
        "sessions gauge: {}",
        metrics
            .lines()
            .filter(|l| l.starts_with("fleethub_sessions"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop((a, b));
    drop(pg);
}

/// Expiry of the shared sessions is the leader's: a session whose client left is forgotten
/// after `session_expiry_secs` whichever node it was made on, and so is one held by a node
/// that died (its client never said goodbye), counted from the node's last heartbeat; a
/// session whose client is connected never expires.
#[tokio::test]
async fn the_leader_expires_idle_sessions_of_every_node_including_a_dead_ones() {
    let Some(bin) = pg_bin() else { return };
    let pg = Pg::init(&bin);
    let url = pg.url();
    let node = |name: &str| {
        let (dir, config) = node_dir(name, &url, None);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str("[mqtt]\nsession_expiry_secs = 2\n");
        std::fs::write(&config, text).unwrap();
        (dir, config)
    };
    let (dir, config) = node("a");
    let a = Hub::start_with(dir, &["--config", &config]).await;
    let (dir, config) = node("b");
    let mut b = Hub::start_with(dir, &["--config", &config]).await;
    status_until(&a, |s| s.leader.as_deref() == Some("a")).await;
    let mut keys = Vec::new();
    for d in ["left", "held", "live"] {
        keys.push(a.create_device(d).await);
        until_status(&b, &format!("/devices/{d}"), 200).await;
    }
    let persistent = |hub: &Hub, id: &str, key: &str| {
        let mut o = hub.options(id, &hub.sas(id, key));
        o.set_clean_session(false);
        o
    };
    // Sessions made on b: one client leaves, one stays connected to b (which then dies), one
    // stays connected to a.
    let (mut left, _) = Client::connect_session(persistent(&b, "left", &keys[0]))
        .await
        .unwrap();
    left.subscribe_many(&["$iothub/methods/POST/#"]).await;
    let (mut held, _) = Client::connect_session(persistent(&b, "held", &keys[1]))
        .await
        .unwrap();
    held.subscribe_many(&["$iothub/methods/POST/#"]).await;
    let (mut live, _) = Client::connect_session(persistent(&a, "live", &keys[2]))
        .await
        .unwrap();
    live.subscribe_many(&["$iothub/methods/POST/#"]).await;
    drop(left);
    b.kill9();
    drop(held);

    // Expiry runs every second (half the expiry); gone after 2 s idle (or 2 s of b's silence).
    let gone = |id: &'static str, key: String| {
        let a = &a;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let (c, present) = Client::connect_session(persistent(a, id, &key))
                    .await
                    .unwrap();
                drop(c);
                if !present {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "the session of {id} never expired"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    // Checking reconnects (and so claims) it: only once it is gone does it stay gone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    gone("left", keys[0].clone()).await;
    gone("held", keys[1].clone()).await;
    // The connected one outlived both.
    drop(live);
    let (_again, present) = Client::connect_session(persistent(&a, "live", &keys[2]))
        .await
        .unwrap();
    assert!(present, "a connected client's session does not expire");
    assert!(
        a.metric("fleethub_sessions_expired_total{node=\"a\"}")
            .await
            >= 2.0
    );
    drop(pg);
}

/// Deployments and their rollout state are shared: one created through a follower's API
/// starts its first phase there and reaches devices connected to a third node; the leader's
/// ticker advances it; when the leader is killed mid-rollout the next leader carries it to
/// the end from where it stood. An operator's pause through any node holds the rollout.
#[tokio::test]
async fn a_deployment_made_on_any_node_rolls_out_and_a_new_leader_continues_it() {
    let Some(bin) = pg_bin() else { return };
    let pg = Pg::init(&bin);
    let url = pg.url();
    let mut a = start_node("a", &url).await;
    status_until(&a, |s| s.leader.as_deref() == Some("a")).await;
    let b = start_node("b", &url).await;
    let c = start_node("c", &url).await;
    let mut reporters = Vec::new();
    for i in 0..4 {
        let id = format!("r{i}");
        let key = b.create_device(&id).await;
        until_status(&c, &format!("/devices/{id}"), 200).await;
        let (s, body) = b
            .api(
                Method::PATCH,
                &format!("/twins/{id}"),
                Some(json!({"tags": {"env": "prod"}})),
            )
            .await;
        assert_eq!(s, 200, "{body}");
        until_tagged(&c, &id).await;
        until_tagged(&a, &id).await;
        reporters.push(crate::targeted_deployments::reporter(
            c.device(&id, &key).await,
            false,
        ));
    }

    // Made through b (a follower): phase 1 (one device of four) starts at once.
    let (s, body) = b
        .api(
            Method::POST,
            "/deployments",
            Some(json!({
                "id": "app-2", "targetCondition": "tags.env = 'prod'", "priority": 1,
                "content": {"deviceContent": {"properties.desired.app": {"version": "2"}}},
                "rollout": {"phases": [25, 50, 100], "successThreshold": 100, "failureThreshold": 50, "observeSecs": 2},
            })),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(
        body["rolloutState"]["phaseMembers"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{body}"
    );
    // Paused through c: the leader's ticker holds it; resumed through a, it goes on.
    let (s, body) = c.api(Method::POST, "/deployments/app-2/pause", None).await;
    assert_eq!(s, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, d) = a.api(Method::GET, "/deployments/app-2", None).await;
    assert_eq!(
        (&d["rolloutState"]["status"], &d["rolloutState"]["phase"]),
        (&json!("paused"), &json!(0)),
        "a pause made on c holds the leader's rollout: {d}"
    );
    let (s, body) = a.api(Method::POST, "/deployments/app-2/resume", None).await;
    assert_eq!(s, 200, "{body}");

    // The leader (a) advances it to phase 2 from the devices' reports, then dies.
    crate::targeted_deployments::wait_for(&c, "app-2", |d| {
        d["rolloutState"]["phase"].as_u64() >= Some(1)
    })
    .await;
    a.kill9();
    let s = status_until(&b, |s| matches!(s.leader.as_deref(), Some("b" | "c"))).await;
    let d = crate::targeted_deployments::wait_for(&b, "app-2", |d| {
        d["rolloutState"]["status"] == "completed"
    })
    .await;
    assert_eq!(d["systemMetrics"]["appliedCount"], 4, "{d}");
    assert_eq!(d["systemMetrics"]["reportedSuccessfulCount"], 4, "{d}");
    for i in 0..4 {
        let (_, twin) = c.api(Method::GET, &format!("/twins/r{i}"), None).await;
        assert_eq!(
            twin["properties"]["desired"]["app"]["version"], "2",
            "r{i}: {twin}"
        );
    }
    eprintln!("completed under the new leader {:?}", s.leader);
    drop(reporters);
    drop(pg);
}

/// The Azure Sphere side is shared too: products and groups made on one node are there on
/// the other, with names unique across the cluster even when two nodes create the same one
/// at once; an image taken in by one node is served (by digest) by the other and keeps its
/// name and version to one content cluster-wide; a group deployment made on one node
/// reaches a device connected to the other, and follows `name:latest` when a new version
/// comes in through either.
#[tokio::test]
async fn products_groups_images_and_group_deployments_are_shared() {
    use crate::group_deployments::{images, next_desired, upload};
    let Some(bin) = pg_bin() else { return };
    let pg = Pg::init(&bin);
    let url = pg.url();
    let a = start_node("a", &url).await;
    let b = start_node("b", &url).await;

    let (s, body) = a
        .api(Method::POST, "/products", Some(json!({"name": "Coffee"})))
        .await;
    assert_eq!(s, 201, "{body}");
    until_status(&b, "/products/Coffee", 200).await;
    let (s, body) = b
        .api(Method::POST, "/products", Some(json!({"name": "coffee"})))
        .await;
    assert_eq!(s, 409, "a name taken on a is taken on b: {body}");
    let (ra, rb) = tokio::join!(
        a.api(Method::POST, "/products", Some(json!({"name": "Tea"}))),
        b.api(Method::POST, "/products", Some(json!({"name": "TEA"}))),
    );
    let mut codes = [ra.0, rb.0];
    codes.sort();
    assert_eq!(
        codes,
        [201, 409],
        "one of two creates at once wins: {ra:?} {rb:?}"
    );

    // An image taken in by b: a serves its content and will not give its name to other bytes.
    let brew1 = upload(&b, "brew", "1.0.0", "application", "brew one").await;
    until_status(&a, &format!("/images/{brew1}"), 200).await;
    let got = reqwest::Client::new()
        .get(a.api_url("/images/brew:1.0.0/content"))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status().as_u16(), 200);
    assert_eq!(got.text().await.unwrap(), "brew one");
    let refused = reqwest::Client::new()
        .post(a.api_url("/images?name=brew&version=1.0.0&kind=application"))
        .bearer_auth(&a.token)
        .body("other bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 409);

    // A device on a, put in a group through b, gets the deployment made on b.
    let key = a.create_device("c1").await;
    until_status(&b, "/devices/c1", 200).await;
    let (ok, _, err) = b.fleethub("device update c1 --device-group 'Coffee/Field Test'");
    assert!(ok, "{err}");
    let mut c1 = a.device("c1", &key).await;
    c1.subscribe_many(&["$iothub/twin/PATCH/properties/desired/#"])
        .await;
    let (s, body) = b
        .api(
            Method::POST,
            "/products/Coffee/groups/Field%20Test/deployments",
            Some(json!({"images": ["brew:latest"]})),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let patch = next_desired(&mut c1).await;
    assert_eq!(images(&patch["groupDeployment"]), ["brew:1.0.0"]);
    // A new version taken in by a: the group follows it.
    upload(&a, "brew", "1.1.0", "application", "brew one one").await;
    let patch = next_desired(&mut c1).await;
    assert_eq!(images(&patch["groupDeployment"]), ["brew:1.1.0"]);
    let (s, history) = a
        .api(
            Method::GET,
            "/products/Coffee/groups/Field%20Test/deployments",
            None,
        )
        .await;
    assert_eq!(s, 200, "{history}");
    assert_eq!(
        history["items"].as_array().map(Vec::len),
        Some(1),
        "{history}"
    );
    // The group is in use on either node.
    let (s, body) = a.api(Method::DELETE, "/products/Coffee", None).await;
    assert_eq!(s, 409, "{body}");
    drop(pg);
}

/// Routes device telemetry to module m1's input in1 (written through `a`), and waits until
/// `b` has the route too.
async fn route_telemetry_to_m1(a: &Hub, b: &Hub) {
    let (s, body) = a
        .api(
            Method::PATCH,
            "/twins/fleethub/modules/$edgeHub",
            Some(json!({"properties": {"desired": {"routes": {
                "toM": "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO BrokeredEndpoint(\"/modules/m1/inputs/in1\")"
            }}}})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b
        .api(Method::GET, "/routes", None)
        .await
        .1
        .to_string()
        .contains("toM")
    {
        assert!(Instant::now() < deadline, "b never took the routes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What routes queue for a module reaches it on whichever node it is connected to: the
/// node that queued an entry moves it to the module's node (which commits it before the
/// first lets go), so nothing acknowledged is lost when either node is killed on the way.
#[tokio::test]
async fn routed_messages_reach_a_module_on_another_node_and_survive_either_node_killed() {
    let (Some(pg_bin), Some(nats_bin)) = (pg_bin(), nats_bin()) else {
        return;
    };
    let pg = Pg::init(&pg_bin);
    let nats = NatsCluster::start(&nats_bin);
    let url = pg.url();
    let mut a = start_bus_node("a", &url, &nats.urls(0)).await;
    let mut b = start_bus_node("b", &url, &nats.urls(1)).await;
    let sensor_key = a.create_device("sensor").await;
    let module_key = a.create_module("fleethub", "m1").await;
    until_status(&b, "/devices/fleethub/modules/m1", 200).await;
    until_status(&b, "/devices/sensor", 200).await;
    route_telemetry_to_m1(&a, &b).await;
    const INPUT: &str = "devices/fleethub/modules/m1/inputs/in1/";
    let numbered = |i: usize| {
        (
            "devices/sensor/messages/events/".to_string(),
            format!("{{\"n\":{i}}}"),
        )
    };
    // Every number the module receives until none comes for a while.
    async fn received(module: &mut Client, quiet: Duration) -> Vec<u64> {
        let mut got = Vec::new();
        while let Some(p) = module.next_publish_on(INPUT, quiet).await {
            got.push(
                crate::harness::json_of(&p)["n"]
                    .as_u64()
                    .unwrap_or(u64::MAX),
            );
        }
        got
    }
    let distinct = |got: &[u64]| {
        let mut d = got.to_vec();
        d.sort();
        d.dedup();
        d
    };

    // Queued on a while the module is connected nowhere; it connects to b and gets them all,
    // in order.
    let mut sensor = a.device("sensor", &sensor_key).await;
    sensor.publish_acked(0, 50, numbered).await;
    let mut module = b.device("fleethub/m1", &module_key).await;
    module
        .subscribe_many(&["devices/fleethub/modules/m1/inputs/#"])
        .await;
    let got = received(&mut module, Duration::from_secs(3)).await;
    assert_eq!(got, (0..50).collect::<Vec<u64>>(), "in order, once each");

    // Acknowledged by a, then a is killed at once: what it had not moved yet, it moves after
    // its restart.
    sensor.publish_acked(50, 100, numbered).await;
    a = a.restart().await;
    let got = received(&mut module, Duration::from_secs(4)).await;
    assert_eq!(
        distinct(&got),
        (50..150).collect::<Vec<u64>>(),
        "every message a acknowledged"
    );
    assert!(
        got.len() <= 100 + 256,
        "duplicates bounded by one batch: {}",
        got.len()
    );

    // Moved to b while the module does not read its inputs there; b is killed; the module
    // comes back on a, and b, restarted, hands them over.
    // What a has moved since its restart.
    async fn relayed(hub: &Hub) -> f64 {
        hub.metrics()
            .await
            .lines()
            .filter(|l| {
                l.starts_with("fleethub_sink_messages_total{")
                    && l.contains("result=\"relayed\"")
                    && l.contains("/modules/m1/inputs/in1")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
    drop(module);
    let mut idle = b.device("fleethub/m1", &module_key).await;
    let before = relayed(&a).await;
    let mut sensor = a.device("sensor", &sensor_key).await;
    sensor.publish_acked(150, 30, numbered).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while relayed(&a).await < before + 30.0 {
        assert!(Instant::now() < deadline, "a never moved the entries to b");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.kill9();
    assert!(idle.disconnected(Duration::from_secs(10)).await.is_some());
    let mut module = a.device("fleethub/m1", &module_key).await;
    module
        .subscribe_many(&["devices/fleethub/modules/m1/inputs/#"])
        .await;
    b = b.restart().await;
    let got = received(&mut module, Duration::from_secs(4)).await;
    assert_eq!(
        distinct(&got),
        (150..180).collect::<Vec<u64>>(),
        "what b had taken over reached the module on a: {got:?}"
    );
    drop((a, b));
    drop(pg);
}

/// Device authentication and provisioning records are shared: a CA uploaded on one node and
/// verified on another authenticates a CA-signed device on either; an enrollment group made
/// on one node is there on the other, its id taken there, its status changed there.
#[tokio::test]
async fn ca_certificates_and_enrollments_are_shared() {
    use crate::x509::{options, test_ca};
    let Some(bin) = pg_bin() else { return };
    let pg = Pg::init(&bin);
    let url = pg.url();
    let a = start_node("a", &url).await;
    let b = start_node("b", &url).await;

    let root = test_ca("Fleet Root CA");
    let (s, added) = a
        .api(
            Method::POST,
            "/certificates",
            Some(json!({"name": "fleet-root", "certificate": root.cert.pem()})),
        )
        .await;
    assert_eq!(s, 201, "{added}");
    let code = added["verificationCode"].as_str().unwrap().to_string();
    until_status(&b, "/certificates/fleet-root", 200).await;
    let (s, verified) = b
        .api(
            Method::POST,
            "/certificates/fleet-root/verify",
            Some(json!({"certificate": root.leaf(&code, &[]).cert_pem})),
        )
        .await;
    assert_eq!(s, 200, "{verified}");
    let (ok, _, err) = cli(&a, &["device", "create", "c1", "--auth", "x509-ca"]);
    assert!(ok, "{err}");
    let device = root.leaf("c1", &[]);
    for hub in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Client::connect(options(hub, "c1", "", Some(&device))).await {
                Ok(_) => break,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "the CA verified on b never authenticated c1 on this node: {e:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let (s, g) = a
        .api(
            Method::POST,
            "/enrollmentGroups",
            Some(json!({"id": "line-1"})),
        )
        .await;
    assert_eq!(s, 201, "{g}");
    until_status(&b, "/enrollmentGroups/line-1", 200).await;
    let (s, _) = b
        .api(
            Method::POST,
            "/enrollmentGroups",
            Some(json!({"id": "line-1"})),
        )
        .await;
    assert_eq!(s, 409, "an id taken on a is taken on b");
    let (s, body) = b
        .api(
            Method::PATCH,
            "/enrollmentGroups/line-1",
            Some(json!({"provisioningStatus": "disabled"})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, g) = a.api(Method::GET, "/enrollmentGroups/line-1", None).await;
        if g["provisioningStatus"] == "disabled" {
            break;
        }
        assert!(Instant::now() < deadline, "a never saw b's change: {g}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(pg);
}

/// `kill -9` of a node under load: three devices publish numbered messages one after
/// another through one address (a TCP proxy standing in for a load balancer) to node a,
/// routed to a module connected to node b; a is killed mid-stream, the devices reconnect
/// through the same address to b and go on; one NATS server dies too; a comes back and hands
/// over what it had queued. Every message a device saw acknowledged reaches the module;
/// duplicates are bounded (a message resent after a lost PUBACK, a relayed batch resent).
#[tokio::test]
async fn a_node_killed_under_load_its_devices_move_and_every_acknowledged_message_arrives() {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let (Some(pg_bin), Some(nats_bin)) = (pg_bin(), nats_bin()) else {
        return;
    };
    let pg = Pg::init(&pg_bin);
    let mut nats = NatsCluster::start(&nats_bin);
    let url = pg.url();
    let mut a = start_bus_node("a", &url, &nats.urls(0)).await;
    let b = start_bus_node("b", &url, &nats.urls(2)).await;
    let module_key = a.create_module("fleethub", "m1").await;
    let mut keys = Vec::new();
    for d in ["s0", "s1", "s2"] {
        keys.push((d.to_string(), a.create_device(d).await));
        until_status(&b, &format!("/devices/{d}"), 200).await;
    }
    route_telemetry_to_m1(&a, &b).await;
    until_status(&b, "/devices/fleethub/modules/m1", 200).await;

    // The module on b: everything it receives, as (device, number).
    let mut module = b.device("fleethub/m1", &module_key).await;
    module
        .subscribe_many(&["devices/fleethub/modules/m1/inputs/#"])
        .await;
    let received: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let collecting = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(p) = module
                .next_publish_on(
                    "devices/fleethub/modules/m1/inputs/in1/",
                    Duration::from_secs(60),
                )
                .await
            {
                let v = crate::harness::json_of(&p);
                if let (Some(d), Some(n)) = (v["d"].as_str(), v["n"].as_u64()) {
                    received.lock().unwrap().push((d.to_string(), n));
                }
            }
        })
    };

    // The devices: publish, wait for the PUBACK, next; on a lost connection, reconnect through
    // the same address and send the unacknowledged one again.
    let lb = crate::harness::Proxy::start("127.0.0.1:0", a.endpoints.mqtt.expect("mqtt")).await;
    let (port, username_of) = (lb.port(), |d: &str| a.username(d));
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for (d, key) in &keys {
        let mut o = rumqttc::MqttOptions::new(d.clone(), "127.0.0.1", port);
        o.set_credentials(username_of(d), a.sas(d, key));
        o.set_keep_alive(Duration::from_secs(30));
        let (d, stop) = (d.clone(), stop.clone());
        publishers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0u64;
            let mut client: Option<Client> = None;
            while !stop.load(Ordering::Relaxed) {
                let Some(c) = client.as_mut() else {
                    client = Client::connect(o.clone()).await.ok();
                    if client.is_none() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                };
                let body = json!({"d": d, "n": n}).to_string();
                if c.client
                    .publish(
                        format!("devices/{d}/messages/events/"),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        body,
                    )
                    .await
                    .is_err()
                {
                    client = None;
                    continue;
                }
                match c.next(Duration::from_secs(5)).await {
                    Some(crate::harness::Seen::PubAck(_)) => {
                        acked.push(n);
                        n += 1;
                    }
                    _ => client = None,
                }
            }
            (d, acked)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill9();
    lb.retarget(b.endpoints.mqtt.expect("mqtt"));
    lb.cut();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for p in publishers {
        let (d, a) = p.await.unwrap();
        acked.insert(d, a);
    }
    // b's NATS server dies too; a comes back and hands over what it had queued.
    nats.kill(2);
    a = a.restart().await;
    let want: usize = acked.values().map(Vec::len).sum();
    assert!(want > 30, "the devices hardly published: {acked:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let got: BTreeSet<(String, u64)> = received.lock().unwrap().iter().cloned().collect();
        let missing: Vec<(String, u64)> = acked
            .iter()
            .flat_map(|(d, ns)| ns.iter().map(move |n| (d.clone(), *n)))
            .filter(|m| !got.contains(m))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        missing.is_empty(),
        "{} of {want} acknowledged messages never reached the module, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let all = received.lock().unwrap().len();
    let distinct: BTreeSet<(String, u64)> = received.lock().unwrap().iter().cloned().collect();
    assert!(
        all - distinct.len() <= 256 + keys.len(),
        "{} duplicates of {all}",
        all - distinct.len()
    );
    eprintln!(
        "acknowledged {want}, received {all} ({} duplicates)",
        all - distinct.len()
    );
    collecting.abort();
    drop((a, b));
    drop(pg);
}

/// `monitor-events` (a service connection on `$fleethub/events/+/#`) on one node shows the
/// telemetry of devices connected to the other nodes too, with their property bags; and a
/// node hands nothing out while nobody watches anywhere.
#[tokio::test]
async fn the_live_view_on_one_node_shows_every_nodes_telemetry() {
    let (Some(pg_bin), Some(nats_bin)) = (pg_bin(), nats_bin()) else {
        return;
    };
    let pg = Pg::init(&pg_bin);
    let nats = NatsCluster::start(&nats_bin);
    let url = pg.url();
    let a = start_bus_node("a", &url, &nats.urls(0)).await;
    let b = start_bus_node("b", &url, &nats.urls(1)).await;
    let key = b.create_device("far").await;
    until_status(&a, "/devices/far", 200).await;
    let mut far = b.device("far", &key).await;

    // Nobody watches: b hands nothing out.
    far.publish_acked(0, 5, |i| {
        (
            "devices/far/messages/events/".to_string(),
            format!("{{\"n\":{i}}}"),
        )
    })
    .await;
    // A watcher on a: what the device on b sends arrives, in order, with its properties.
    let mut monitor = a.monitor().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    let mut n = 100;
    while got.len() < 20 {
        far.publish_acked(n, 1, |i| {
            (
                "devices/far/messages/events/site=lab".to_string(),
                format!("{{\"n\":{i}}}"),
            )
        })
        .await;
        n += 1;
        while let Some(p) = monitor.next_publish(Duration::from_millis(50)).await {
            assert!(p.topic.contains("far"), "{}", p.topic);
            got.push(p);
        }
        assert!(
            Instant::now() < deadline,
            "the watcher on a never saw b's telemetry ({} seen)",
            got.len()
        );
    }
    let numbers: Vec<u64> = got
        .iter()
        .filter_map(|p| {
            let text = String::from_utf8_lossy(&p.payload).to_string();
            let start = text.find("{\"n\":")?;
            text[start + 5..].split('}').next()?.parse().ok()
        })
        .collect();
    assert!(
        numbers.iter().all(|n| *n >= 100),
        "nothing from before anyone watched: {numbers:?}"
    );
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "in order: {numbers:?}"
    );
    drop(monitor);
    drop((a, b));
    drop(pg);
}
