//! The second hour with the unmodified Azure IoT device SDK for Python: a device client and a
//! module client keep receiving desired patches, method calls and C2D messages across a
//! SIGTERM restart, a `kill -9` restart and a connection cut by the network, with no call by
//! the test on the client (the SDK reconnects by itself, clean session 0, and never
//! subscribes again); each ends with the desired document of its twin. And a client whose SAS
//! token lives two minutes renews it (by reconnecting) several times without losing anything.
//! And the same device against a cluster: reconnecting through one address to another node,
//! then to a third after its node was killed, it keeps its session.
//! Skipped locally without FLEETHUB_PYTHON, like the other interop tests.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::harness::{Hub, Proxy};
use crate::interop::{hub_named_by_loopback, python, script, sdk_device};

/// The SDK script's output, with the events not yet asked for kept in order.
struct Sdk {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stdin: tokio::process::ChildStdin,
    kept: Vec<Value>,
}

impl Sdk {
    async fn spawn(
        python: &str,
        kind: &str,
        cs: &str,
        ca: &std::path::Path,
        ttl: Option<u32>,
        websockets: bool,
        cert_files: Option<&(PathBuf, PathBuf)>,
    ) -> Sdk {
        let mut cmd = tokio::process::Command::new(python);
        cmd.arg(script("session_device.py"))
            .arg(kind)
            .arg(cs)
            .arg(ca)
            .env("SDK_WEBSOCKETS", if websockets { "1" } else { "0" });
        if let Some((cert, key)) = cert_files {
            cmd.env("SDK_X509_CERT", cert).env("SDK_X509_KEY", key);
        }
        if let Some(ttl) = ttl {
            cmd.arg(ttl.to_string());
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let stdin = child.stdin.take().unwrap();
        Sdk {
            child,
            lines,
            stdin,
            kept: Vec::new(),
        }
    }

    /// The first event (kept or new) for which `pred` holds; earlier others stay kept.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.kept.iter().position(&pred) {
            return self.kept.remove(i);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("SDK: no {what} in time; seen {:?}", self.kept))
                .unwrap()
                .unwrap_or_else(|| panic!("SDK exited waiting for {what}; seen {:?}", self.kept));
            let event: Value = serde_json::from_str(&line).unwrap();
            if pred(&event) {
                return event;
            }
            self.kept.push(event);
        }
    }

    async fn command(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
    }

    async fn quit(mut self) {
        self.command("quit").await;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("SDK exits")
            .unwrap();
        assert!(status.success());
    }
}

async fn patch(hub: &Hub, path: &str, desired: Value) {
    let (s, b) = hub
        .api(
            Method::PATCH,
            path,
            Some(json!({"properties": {"desired": desired}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
}

/// Waits until the device's document equals its twin's desired document.
async fn converges(sdk: &mut Sdk, hub: &Hub, twin_path: &str, how: &str) {
    let want = Value::Object(hub.desired_document(twin_path).await);
    let got = sdk
        .wait_for(&format!("{how}: desired doc {want}"), |e| {
            e.get("doc") == Some(&want)
        })
        .await;
    assert_eq!(got["doc"], want);
}

/// Waits until the twin's `connectionState` says the client is gone.
async fn hub_sees_offline(hub: &Hub, twin_path: &str, how: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, twin) = hub.api(Method::GET, twin_path, None).await;
        assert_eq!(s, 200, "{twin}");
        if twin["connectionState"] == "Disconnected" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{how}: the hub still sees the client connected: {twin}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn method(hub: &Hub, method_path: &str, name: &str) -> (u16, Value) {
    hub.api(
        Method::POST,
        method_path,
        Some(json!({"methodName": name, "payload": {"x": 1}, "responseTimeoutInSeconds": 20})),
    )
    .await
}

/// The listener the SDK reaches: MQTTS, or WebSockets for `websockets=True`.
fn sdk_listener(hub: &Hub, websockets: bool) -> std::net::SocketAddr {
    if websockets {
        hub.endpoints.wss.expect("WSS enabled")
    } else {
        hub.endpoints.mqtts.expect("MQTTS enabled")
    }
}

async fn sdk_survives(kind: &str, websockets: bool) {
    sdk_survives_with(kind, websockets, "sas").await
}

/// The second hour for a client of `kind` over WebSockets or TLS, authenticated by `auth`
/// (`sas`, or for a device `self-signed` or `ca`: see [`sdk_device`]).
async fn sdk_survives_with(kind: &str, websockets: bool, auth: &str) {
    let Some(python) = python() else { return };
    let name = format!(
        "interop-sessions-{kind}-{auth}{}",
        if websockets { "-wss" } else { "" }
    );
    let (mut hub, ip) = hub_named_by_loopback(&name, false, websockets).await;
    // The SDK dials {hostname}:8883 (443 over WebSockets): the proxy there stands for the
    // network.
    let port = if websockets { 443 } else { 8883 };
    let proxy = Proxy::start(&format!("{ip}:{port}"), sdk_listener(&hub, websockets)).await;

    let (dkey, cert_files) = sdk_device(&hub, auth).await;
    let (cs, twin_path, method_path) = if kind == "module" {
        let mkey = hub.create_module("sdk-dev", "sdk-mod").await;
        (
            format!("HostName={ip};DeviceId=sdk-dev;ModuleId=sdk-mod;SharedAccessKey={mkey}"),
            "/twins/sdk-dev/modules/sdk-mod",
            "/devices/sdk-dev/modules/sdk-mod/methods",
        )
    } else {
        (
            format!("HostName={ip};DeviceId=sdk-dev;SharedAccessKey={dkey}"),
            "/twins/sdk-dev",
            "/devices/sdk-dev/methods",
        )
    };
    patch(
        &hub,
        twin_path,
        json!({"cws": {"temperature": 38, "pressure": 78}}),
    )
    .await;
    let ca = hub.data_dir().join("tls/ca.pem");
    let mut sdk = Sdk::spawn(
        &python,
        kind,
        &cs,
        &ca,
        None,
        websockets,
        cert_files.as_ref(),
    )
    .await;
    let ready = sdk.wait_for("ready", |e| e.get("ready").is_some()).await;
    assert_eq!(
        ready["doc"],
        Value::Object(hub.desired_document(twin_path).await)
    );

    for (round, how) in ["sigterm", "kill9", "cut"].into_iter().enumerate() {
        // The client is kept away while things happen, then let back in.
        proxy.block(true);
        match how {
            "sigterm" => {
                assert!(hub.terminate().success());
                hub = hub.restart().await;
            }
            "kill9" => {
                hub.kill9();
                hub = hub.restart().await;
            }
            _ => {}
        }
        proxy.retarget(sdk_listener(&hub, websockets));
        proxy.cut();
        sdk.wait_for(&format!("{how}: disconnected"), |e| e["connected"] == false)
            .await;
        // The SDK sees its socket close before the hub does (on a loaded machine, a while
        // before): the method below is for a client the hub knows is offline.
        hub_sees_offline(&hub, twin_path, how).await;
        if kind == "device" {
            let (s, b) = hub
                .api(
                    Method::POST,
                    "/devices/sdk-dev/messages",
                    Some(json!({"body": format!("away-{how}"), "messageId": format!("m-{how}")})),
                )
                .await;
            assert_eq!(s, 202, "{b}");
        }
        // A change that removes a key: the device must end without it.
        patch(
            &hub,
            twin_path,
            json!({"cws": {"pressure": null, "temperature": 40 + round}, "round": how}),
        )
        .await;
        let (s, b) = method(&hub, method_path, "while-away").await;
        assert_eq!(
            (s, b["errorCode"].clone()),
            (404, json!(404103)),
            "{how}: {b}"
        );
        proxy.block(false);

        sdk.wait_for(&format!("{how}: reconnected"), |e| e["connected"] == true)
            .await;
        if kind == "device" {
            let c2d = sdk
                .wait_for(&format!("{how}: C2D sent while away"), |e| {
                    e.get("c2d").is_some()
                })
                .await;
            assert_eq!(c2d["c2d"], format!("away-{how}"));
        }
        converges(&mut sdk, &hub, twin_path, how).await;

        let (s, b) = method(&hub, method_path, &format!("after-{how}")).await;
        assert_eq!(s, 200, "{how}: {b}");
        assert_eq!(b["payload"]["handled"], format!("after-{how}"));
        patch(
            &hub,
            twin_path,
            json!({"cws": {"pressure": round}, "live": how}),
        )
        .await;
        converges(&mut sdk, &hub, twin_path, how).await;
        // Back to no pressure for the next round's removal.
        patch(&hub, twin_path, json!({"cws": {"pressure": null}})).await;
        converges(&mut sdk, &hub, twin_path, how).await;
    }
    sdk.quit().await;
    drop(proxy);
}

#[tokio::test]
async fn azure_iot_python_sdk_device_keeps_receiving_across_restarts_and_cuts() {
    sdk_survives("device", false).await;
}

/// Sessions apply on every transport: the same second hour over WebSockets.
#[tokio::test]
async fn azure_iot_python_sdk_over_websockets_keeps_receiving_across_restarts_and_cuts() {
    sdk_survives("device", true).await;
}

/// And for every auth kind: a device with a self-signed certificate over TLS, and one with
/// a CA-signed certificate over WebSockets.
#[tokio::test]
async fn azure_iot_python_sdk_x509_self_signed_keeps_receiving_across_restarts_and_cuts() {
    sdk_survives_with("device", false, "self-signed").await;
}

#[tokio::test]
async fn azure_iot_python_sdk_x509_ca_over_websockets_keeps_receiving_across_restarts_and_cuts() {
    sdk_survives_with("device", true, "ca").await;
}

#[tokio::test]
async fn azure_iot_python_sdk_module_keeps_receiving_across_restarts_and_cuts() {
    sdk_survives("module", false).await;
}

/// With two-minute tokens the SDK renews every few seconds (it reconnects 120 s before
/// expiry): telemetry, desired patches and C2D keep flowing and nothing is lost.
#[tokio::test]
async fn azure_iot_python_sdk_renews_short_tokens_without_loss() {
    let Some(python) = python() else { return };
    let (hub, ip) = hub_named_by_loopback("interop-renewal", true, false).await;
    let key = hub.create_device("sdk-dev").await;
    let cs = format!("HostName={ip};DeviceId=sdk-dev;SharedAccessKey={key}");
    let mut monitor = hub.monitor().await;
    let ca = hub.data_dir().join("tls/ca.pem");
    let accepted = "fleethub_connection_attempts_total{result=\"accepted\"}";
    let before = hub.metric(accepted).await;
    let mut sdk = Sdk::spawn(&python, "device", &cs, &ca, Some(126), false, None).await;
    sdk.wait_for("ready", |e| e.get("ready").is_some()).await;

    let started = Instant::now();
    let mut sent = 0;
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(20) {
        sdk.command(&format!("send m{sent}")).await;
        sent += 1;
        if sent % 10 == 0 {
            round += 1;
            patch(&hub, "/twins/sdk-dev", json!({"round": round})).await;
            let (s, _) = hub
                .api(
                    Method::POST,
                    "/devices/sdk-dev/messages",
                    Some(json!({"body": format!("c2d-{round}")})),
                )
                .await;
            assert_eq!(s, 202);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for i in 0..sent {
        sdk.wait_for(&format!("m{i} acknowledged"), |e| {
            e["sent"] == format!("m{i}")
        })
        .await;
    }
    for r in 1..=round {
        sdk.wait_for(&format!("c2d-{r}"), |e| e["c2d"] == format!("c2d-{r}"))
            .await;
    }
    converges(&mut sdk, &hub, "/twins/sdk-dev", "renewals").await;
    sdk.quit().await;

    let mut seen = std::collections::HashSet::new();
    while let Some(p) = monitor.next_publish(Duration::from_secs(2)).await {
        let event = fleethub::cli::describe_event(&p.topic, &p.payload).unwrap();
        if let Some(text) = event["payload"].as_str() {
            seen.insert(text.to_string());
        }
    }
    let missing: Vec<_> = (0..sent)
        .map(|i| format!("m{i}"))
        .filter(|m| !seen.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "telemetry lost across renewals: {missing:?}"
    );
    let renewals = hub.metric(accepted).await - before - 1.0;
    assert!(
        renewals >= 2.0,
        "the SDK renewed by reconnecting ({renewals} times)"
    );
    assert_eq!(hub.metric("fleethub_token_expirations_total").await, 0.0);
}

async fn deploy(hub: &Hub, body: Value) {
    let (s, b) = hub.api(Method::POST, "/deployments", Some(body)).await;
    assert_eq!(s, 201, "{b}");
}

async fn tag(hub: &Hub, tags: Value) {
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/sdk-dev",
            Some(json!({ "tags": tags })),
        )
        .await;
    assert_eq!(s, 200, "{b}");
}

/// Deployments retarget an SDK device that applies patches as they arrive: a higher priority
/// replacing an object, a layer added and deleted, `onUnmatch remove`, fallback to the next
/// best, and a change while the device is away. After each it equals its twin.
#[tokio::test]
async fn azure_iot_python_sdk_device_follows_deployment_retargeting() {
    let Some(python) = python() else { return };
    let (hub, ip) = hub_named_by_loopback("interop-retarget", false, false).await;
    let proxy = Proxy::start(&format!("{ip}:8883"), hub.endpoints.mqtts.unwrap()).await;
    let key = hub.create_device("sdk-dev").await;
    tag(&hub, json!({"env": "prod"})).await;
    let cs = format!("HostName={ip};DeviceId=sdk-dev;SharedAccessKey={key}");
    let ca = hub.data_dir().join("tls/ca.pem");
    let mut sdk = Sdk::spawn(&python, "device", &cs, &ca, None, false, None).await;
    sdk.wait_for("ready", |e| e.get("ready").is_some()).await;
    let content = |props: Value| {
        let mut m = serde_json::Map::new();
        for (k, v) in props.as_object().unwrap() {
            m.insert(format!("properties.desired.{k}"), v.clone());
        }
        json!({ "content": { "deviceContent": m } })
    };
    let twin = "/twins/sdk-dev";

    deploy(
        &hub,
        json!({"id": "base", "targetCondition": "tags.env = 'prod'", "priority": 10,
        "content": content(json!({"cws": {"temperature": 38, "pressure": 78}}))}),
    )
    .await;
    converges(&mut sdk, &hub, twin, "base").await;

    // Priority replacement: the object is replaced, pressure must go.
    deploy(
        &hub,
        json!({"id": "high", "targetCondition": "tags.env = 'prod'", "priority": 20,
        "content": content(json!({"cws": {"temperature": 40}}))}),
    )
    .await;
    converges(&mut sdk, &hub, twin, "priority").await;
    assert_eq!(
        Value::Object(hub.desired_document(twin).await)["cws"],
        json!({"temperature": 40})
    );

    // A layer adds a path; deleting it takes the path away again.
    deploy(
        &hub,
        json!({"id": "layer", "targetCondition": "tags.env = 'prod'", "priority": 1,
        "layered": true, "content": content(json!({"cws.mode": "eco"}))}),
    )
    .await;
    converges(&mut sdk, &hub, twin, "layer").await;
    let (s, _) = hub.api(Method::DELETE, "/deployments/layer", None).await;
    assert_eq!(s, 204);
    converges(&mut sdk, &hub, twin, "layer removed").await;
    assert!(Value::Object(hub.desired_document(twin).await)["cws"]
        .get("mode")
        .is_none());

    // onUnmatch remove: leaving takes its content away, nothing lower takes over.
    deploy(&hub, json!({"id": "remover", "targetCondition": "tags.ring = 'test'", "priority": 30,
        "onUnmatch": "remove", "content": content(json!({"cws": {"temperature": 50}, "extra": {"a": 1}}))})).await;
    tag(&hub, json!({"ring": "test"})).await;
    converges(&mut sdk, &hub, twin, "remover applied").await;
    tag(&hub, json!({"ring": null})).await;
    converges(&mut sdk, &hub, twin, "remover unmatched").await;
    assert!(Value::Object(hub.desired_document(twin).await)
        .get("extra")
        .is_none());

    // Fallback: a canary deployment applies, and on leaving the next best comes back.
    deploy(&hub, json!({"id": "canary", "targetCondition": "tags.ring = 'canary'", "priority": 40,
        "onUnmatch": "fallback", "content": content(json!({"cws": {"pressure": 1, "beta": true}}))})).await;
    tag(&hub, json!({"ring": "canary"})).await;
    converges(&mut sdk, &hub, twin, "canary").await;
    tag(&hub, json!({"ring": null})).await;
    converges(&mut sdk, &hub, twin, "fallback").await;

    // While the device is away, a higher-priority deployment replaces the canary's object:
    // on return the device has the new one, without the canary's keys.
    tag(&hub, json!({"ring": "canary"})).await;
    converges(&mut sdk, &hub, twin, "canary again").await;
    proxy.block(true);
    proxy.cut();
    sdk.wait_for("away", |e| e["connected"] == false).await;
    deploy(
        &hub,
        json!({"id": "late", "targetCondition": "tags.env = 'prod'", "priority": 50,
        "content": content(json!({"cws": {"temperature": 60}}))}),
    )
    .await;
    assert_eq!(
        Value::Object(hub.desired_document(twin).await)["cws"],
        json!({"temperature": 60})
    );
    proxy.block(false);
    sdk.wait_for("back", |e| e["connected"] == true).await;
    converges(&mut sdk, &hub, twin, "away").await;
    sdk.quit().await;
}

/// The unmodified SDK against a fleethub cluster behind one address (a TCP load balancer):
/// the network cuts it from node a and the balancer sends it to b, later b dies (`kill -9`)
/// and it lands on c. It reconnects by itself (clean session 0, no SUBSCRIBE again) and
/// keeps receiving: C2D sent through any node while it was away, the desired changes made
/// meanwhile (removals included), and method calls made through another node. The nodes
/// share one certificate, as nodes behind one name do.
#[tokio::test]
async fn azure_iot_python_sdk_device_keeps_its_session_across_cluster_nodes() {
    let Some(python) = python() else { return };
    let (Some(pg_bin), Some(nats_bin)) = (crate::postgres::pg_bin(), crate::cluster::nats_bin())
    else {
        return;
    };
    let pg = crate::postgres::Pg::init(&pg_bin);
    let nats = crate::cluster::NatsCluster::start(&nats_bin);
    let url = pg.url();
    let ip = crate::interop::random_loopback();
    let node = |name: &str, i: usize, tls: Option<&std::path::Path>| {
        let (dir, config) = crate::cluster::node_dir(name, &url, Some(&nats.urls(i)));
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!("[hub]\nhostname = \"{ip}\"\n"));
        if let Some(tls) = tls {
            text.push_str(&format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                tls.join("server.pem").display(),
                tls.join("server.key").display()
            ));
        }
        std::fs::write(&config, text).unwrap();
        (dir, config)
    };
    let (dir, config) = node("a", 0, None);
    let a = Hub::start_with(dir, &["--config", &config]).await;
    let tls = a.data_dir().join("tls");
    let (dir, config) = node("b", 1, Some(&tls));
    let mut b = Hub::start_with(dir, &["--config", &config]).await;
    let (dir, config) = node("c", 2, Some(&tls));
    let c = Hub::start_with(dir, &["--config", &config]).await;
    let proxy = Proxy::start(&format!("{ip}:8883"), a.endpoints.mqtts.expect("mqtts")).await;

    let key = a.create_device("sdk-dev").await;
    for hub in [&b, &c] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while hub.api(Method::GET, "/devices/sdk-dev", None).await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the device never reached another node"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (twin, methods) = ("/twins/sdk-dev", "/devices/sdk-dev/methods");
    patch(
        &a,
        twin,
        json!({"cws": {"temperature": 38, "pressure": 78}}),
    )
    .await;
    let cs = format!("HostName={ip};DeviceId=sdk-dev;SharedAccessKey={key}");
    let mut sdk = Sdk::spawn(
        &python,
        "device",
        &cs,
        &tls.join("ca.pem"),
        None,
        false,
        None,
    )
    .await;
    let ready = sdk.wait_for("ready", |e| e.get("ready").is_some()).await;
    assert_eq!(ready["doc"], Value::Object(a.desired_document(twin).await));

    // (what happens, where it lands, the node the API calls go through meanwhile)
    for (round, how) in ["cut, to b", "b killed, to c"].into_iter().enumerate() {
        proxy.block(true);
        if round == 1 {
            b.kill9();
        }
        let (lands, via) = if round == 0 { (&b, &c) } else { (&c, &a) };
        proxy.retarget(lands.endpoints.mqtts.expect("mqtts"));
        proxy.cut();
        sdk.wait_for(&format!("{how}: disconnected"), |e| e["connected"] == false)
            .await;
        let (s, body) = via
            .api(
                Method::POST,
                "/devices/sdk-dev/messages",
                Some(json!({"body": format!("away-{round}"), "messageId": format!("m-{round}")})),
            )
            .await;
        assert_eq!(s, 202, "{how}: {body}");
        patch(
            via,
            twin,
            json!({"cws": {"pressure": null, "temperature": 40 + round}, "round": how}),
        )
        .await;
        proxy.block(false);

        sdk.wait_for(&format!("{how}: reconnected"), |e| e["connected"] == true)
            .await;
        let c2d = sdk
            .wait_for(&format!("{how}: C2D sent while away"), |e| {
                e.get("c2d").is_some()
            })
            .await;
        assert_eq!(c2d["c2d"], format!("away-{round}"));
        converges(&mut sdk, via, twin, how).await;
        // A method through another node reaches it where it landed (interest in its new
        // connection crosses the NATS cluster within moments).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (s, body) = method(via, methods, &format!("after-{round}")).await;
            if s == 200 {
                assert_eq!(body["payload"]["handled"], format!("after-{round}"));
                break;
            }
            assert!(Instant::now() < deadline, "{how}: {s} {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        patch(via, twin, json!({"live": how})).await;
        converges(&mut sdk, via, twin, how).await;
    }
    sdk.quit().await;
    drop(proxy);
    drop((a, c));
    drop(pg);
}
