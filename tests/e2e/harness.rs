//! A real hub for a test: the `fleethub` binary started on ephemeral ports in its own temp
//! data directory, killed by its process id and cleaned up on `Drop`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleethub::api::wire::{CreateDevice, CreateModule};
use fleethub::client::ApiClient;
use fleethub::hub::Endpoints;
use fleethub::identity::IdentityKey;
use reqwest::Method;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, Publish, QoS, Transport,
};
use serde_json::Value;
use tokio::sync::mpsc;

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A fresh, unique temp directory (removed by `Hub`'s `Drop`).
pub fn temp_dir(name: &str) -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "fleethub-e2e-{name}-{}-{n}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

pub struct Hub {
    child: Option<Child>,
    pub dir: PathBuf,
    pub endpoints: Endpoints,
    pub token: String,
    pub hostname: String,
    extra_args: Vec<String>,
    /// The typed API client the CLI uses too.
    pub client: ApiClient,
}

impl Hub {
    /// Starts a hub with the embedded defaults on port 0.
    pub async fn start(name: &str) -> Hub {
        Self::start_with(temp_dir(name), &[]).await
    }

    /// Starts a hub in `dir` with extra `serve` arguments.
    pub async fn start_with(dir: PathBuf, extra: &[&str]) -> Hub {
        Hub::start_with_env(dir, extra, &[]).await
    }

    /// As [`Hub::start_with`], with these environment variables set for the hub.
    pub async fn start_with_env(dir: PathBuf, extra: &[&str], env: &[(&str, &str)]) -> Hub {
        let extra_args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let data = dir.join("data");
        // A hub killed with -9 leaves its old endpoints behind.
        let _ = std::fs::remove_file(data.join("endpoints.json"));
        let log = std::fs::File::create(dir.join(format!(
            "hub-{}.log",
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        )))
        .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleethub"));
        cmd.arg("--data-dir").arg(&data).arg("serve");
        let has = |flag: &str| extra_args.iter().any(|a| a == flag);
        for (flag, default) in [
            ("--mqtt", "127.0.0.1:0"),
            ("--mqtts", "127.0.0.1:0"),
            ("--api", "127.0.0.1:0"),
        ] {
            if !has(flag) {
                cmd.arg(flag).arg(default);
            }
        }
        cmd.args(&extra_args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,rumqttd=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("start fleethub");
        let endpoints_path = data.join("endpoints.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoints: Endpoints = loop {
            if let Ok(text) = std::fs::read_to_string(&endpoints_path) {
                if let Ok(e) = serde_json::from_str(&text) {
                    break e;
                }
            }
            assert!(
                Instant::now() < deadline,
                "hub did not start; log in {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let token = std::fs::read_to_string(data.join("admin-token"))
            .expect("admin token")
            .trim()
            .to_string();
        let client = ApiClient::new(&format!("http://{}", endpoints.api), &token);
        let mut hub = Hub {
            child: Some(child),
            dir,
            endpoints,
            token,
            hostname: String::new(),
            extra_args,
            client,
        };
        hub.hostname = hub.client.hub().await.expect("GET /hub").hostname;
        hub
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The hub's process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("hub running").id()
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("hub running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        child.wait().expect("wait for hub")
    }

    /// Starts a new hub process on the same data directory.
    pub async fn restart(mut self) -> Hub {
        self.kill9();
        let dir = std::mem::take(&mut self.dir);
        let extra: Vec<String> = std::mem::take(&mut self.extra_args);
        let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        Hub::start_with(dir, &extra).await
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{}", self.endpoints.api, path)
    }

    /// Calls the API with the admin token as it is on the wire (for tests of the exact JSON
    /// and of bad input); returns status and JSON body (Null when empty).
    pub async fn api(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, value) = self
            .client
            .raw(method, path, body.as_ref())
            .await
            .expect("API reachable");
        let value = match value {
            Value::String(_) => Value::Null,
            v => v,
        };
        (status.as_u16(), value)
    }

    /// Registers a device and returns its primary key.
    pub async fn create_device(&self, id: &str) -> String {
        let body = CreateDevice {
            device_id: id.to_string(),
            ..Default::default()
        };
        let view = self
            .client
            .create_device(&body)
            .await
            .expect("device created");
        view.identity.authentication.symmetric_key.primary_key
    }

    pub async fn create_module(&self, device: &str, module: &str) -> String {
        let body = CreateModule {
            module_id: module.to_string(),
            ..Default::default()
        };
        let view = self
            .client
            .create_module(device, &body)
            .await
            .expect("module created");
        view.identity.authentication.symmetric_key.primary_key
    }

    /// A SAS token for `identity` (`d` or `d/m`) valid for an hour.
    pub fn sas(&self, identity: &str, key: &str) -> String {
        let key_id = IdentityKey::parse(identity).unwrap();
        let expiry = unix_now() + 3600;
        fleethub::sas::generate(
            &fleethub::sas::resource_for(&self.hostname, &key_id),
            key,
            expiry,
        )
        .unwrap()
    }

    pub fn username(&self, identity: &str) -> String {
        format!("{}/{identity}/?api-version=2021-04-12", self.hostname)
    }

    /// Options for a device or module connection over plain MQTT.
    pub fn options(&self, identity: &str, password: &str) -> MqttOptions {
        let addr = self.endpoints.mqtt.expect("plain MQTT enabled");
        let mut o = MqttOptions::new(identity, addr.ip().to_string(), addr.port());
        o.set_credentials(self.username(identity), password);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(512 * 1024, 512 * 1024);
        o
    }

    /// Options for the same over TLS, trusting the hub's generated CA.
    pub fn tls_options(&self, identity: &str, password: &str) -> MqttOptions {
        let addr = self.endpoints.mqtts.expect("MQTTS enabled");
        let mut o = MqttOptions::new(identity, "localhost", addr.port());
        o.set_credentials(self.username(identity), password);
        o.set_keep_alive(Duration::from_secs(30));
        let ca = std::fs::read(self.data_dir().join("tls/ca.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
        o
    }

    /// A connected device; panics if the hub refuses it.
    pub async fn device(&self, identity: &str, key: &str) -> Client {
        let o = self.options(identity, &self.sas(identity, key));
        Client::connect(o)
            .await
            .unwrap_or_else(|code| panic!("{identity} refused: {code:?}"))
    }

    /// A service connection (admin token) that watches all telemetry.
    pub async fn monitor(&self) -> Client {
        let addr = self.endpoints.mqtt.unwrap();
        let mut o = MqttOptions::new(
            format!("monitor-{:x}", rand::random::<u32>()),
            addr.ip().to_string(),
            addr.port(),
        );
        o.set_credentials("$service", self.token.clone());
        o.set_max_packet_size(512 * 1024, 512 * 1024);
        let client = Client::connect(o).await.expect("monitor connects");
        // The live view of all telemetry (`$fleethub/events/#` alone reads the $Default
        // consumer group: see `events.rs`).
        client.subscribe_ok("$fleethub/events/+/#").await;
        client
    }

    pub async fn metrics(&self) -> String {
        self.client.metrics().await.expect("GET /metrics")
    }

    /// The desired document of the twin at `path` (`/twins/d[/modules/m]`), without
    /// `$metadata` and `$version`: what a device that applied every patch should hold.
    pub async fn desired_document(&self, path: &str) -> serde_json::Map<String, Value> {
        let identity = path.trim_start_matches("/twins/").replace("/modules/", "/");
        let key = IdentityKey::parse(&identity).expect("a twin path");
        let twin = self.client.twin(&key).await.expect("GET twin");
        let mut d = twin
            .properties
            .desired
            .as_object()
            .cloned()
            .unwrap_or_default();
        d.remove("$metadata");
        d.remove("$version");
        d
    }

    /// The value of one metric line (`name{labels}`), 0 when absent.
    pub async fn metric(&self, line_prefix: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with(line_prefix) && l[line_prefix.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits up to `within` for a metric to reach `at_least`, and returns its last value:
    /// counters move when the hub gets to the work (accepting, refusing), a moment after the
    /// client's side of it completed.
    pub async fn metric_reaching(
        &self,
        line_prefix: &str,
        at_least: f64,
        within: std::time::Duration,
    ) -> f64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = self.metric(line_prefix).await;
            if v >= at_least || tokio::time::Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill9();
        if !self.dir.as_os_str().is_empty() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What a test client observed.
#[derive(Debug)]
pub enum Seen {
    Publish(Publish),
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    PubAck(#[allow(dead_code)] u16),
    Disconnected(String),
}

/// An MQTT client whose event loop runs in a task and reports what it sees.
pub struct Client {
    pub client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    /// Events that arrived while waiting for a SUBACK.
    early: std::collections::VecDeque<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects; `Err(code)` when the hub refuses the CONNECT.
    pub async fn connect(options: MqttOptions) -> Result<Client, ConnectReturnCode> {
        Self::connect_session(options).await.map(|(c, _)| c)
    }

    /// Connects and also returns the CONNACK's session-present flag.
    pub async fn connect_session(
        options: MqttOptions,
    ) -> Result<(Client, bool), ConnectReturnCode> {
        let (client, mut events) = AsyncClient::new(options, 1000);
        let session_present = first_connack(&mut events).await?;
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Seen::Publish(p));
                    }
                    Ok(Event::Incoming(Packet::SubAck(s))) => {
                        let _ = tx.send(Seen::SubAck(s.return_codes));
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = tx.send(Seen::PubAck(a.pkid));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Seen::Disconnected(e.to_string()));
                        return;
                    }
                }
            }
        });
        Ok((
            Client {
                client,
                seen,
                early: Default::default(),
                task,
            },
            session_present,
        ))
    }

    async fn recv_until(&mut self, deadline: tokio::time::Instant) -> Option<Seen> {
        if let Some(e) = self.early.pop_front() {
            return Some(e);
        }
        tokio::time::timeout_at(deadline, self.seen.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next event, or `None` after `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Seen> {
        self.recv_until(tokio::time::Instant::now() + within).await
    }

    /// Waits for the next publish, skipping acks.
    pub async fn next_publish(&mut self, within: Duration) -> Option<Publish> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.recv_until(deadline).await? {
                Seen::Publish(p) => return Some(p),
                Seen::Disconnected(_) => return None,
                _ => {}
            }
        }
    }

    /// Waits until the connection drops; returns the error text.
    pub async fn disconnected(&mut self, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Seen::Disconnected(e) = self.recv_until(deadline).await? {
                return Some(e);
            }
        }
    }

    /// Subscribes and returns the SUBACK codes; publishes that arrive first are kept.
    pub async fn subscribe_many(&mut self, filters: &[&str]) -> Vec<rumqttc::SubscribeReasonCode> {
        let filters = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce));
        self.client.subscribe_many(filters).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut kept = Vec::new();
        loop {
            let event = tokio::time::timeout_at(deadline, self.seen.recv())
                .await
                .expect("SUBACK in time")
                .expect("connected");
            match event {
                Seen::SubAck(codes) => {
                    self.early.extend(kept);
                    return codes;
                }
                Seen::Disconnected(e) => panic!("disconnected while subscribing: {e}"),
                other => kept.push(other),
            }
        }
    }

    pub async fn subscribe_ok(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn first_connack(events: &mut EventLoop) -> Result<bool, ConnectReturnCode> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                return if ack.code == ConnectReturnCode::Success {
                    Ok(ack.session_present)
                } else {
                    Err(ack.code)
                };
            }
            Ok(Ok(_)) => {}
            Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => return Err(code),
            Ok(Err(e)) => panic!("connection failed before CONNACK: {e}"),
            Err(_) => panic!("no CONNACK within 10 s"),
        }
    }
}

/// Runs the `fleethub` CLI against a hub; returns (success, stdout, stderr).
/// Words of a command line as a shell splits it: spaces separate, single or double quotes
/// keep spaces inside one word.
pub fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

impl Hub {
    /// Runs one `fleethub` CLI command against this hub, written as in the README:
    /// `hub.fleethub("device update c1 --device-group 'Coffee/Field Test'")`. Returns whether
    /// it succeeded, its stdout and its stderr.
    pub fn fleethub(&self, line: &str) -> (bool, String, String) {
        let words = shell_words(line);
        let args: Vec<&str> = words.iter().map(String::as_str).collect();
        cli(self, &args)
    }
}

pub fn cli(hub: &Hub, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleethub"))
        .arg("--data-dir")
        .arg(hub.data_dir())
        .args(args)
        .env_remove("FLEETHUB_URL")
        .env_remove("FLEETHUB_TOKEN")
        .output()
        .expect("run fleethub CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Client {
    /// Publishes messages `from..from + n` at QoS 1, topic and payload made from each number
    /// by `message`, and waits until every one is acknowledged.
    pub async fn publish_acked(
        &mut self,
        from: usize,
        n: usize,
        message: impl Fn(usize) -> (String, String) + Send + 'static,
    ) {
        let publisher = self.client.clone();
        let sending = tokio::spawn(async move {
            for i in from..from + n {
                let (topic, payload) = message(i);
                publisher
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap();
            }
        });
        let mut acked = 0;
        while acked < n {
            match self.next(Duration::from_secs(60)).await {
                Some(Seen::PubAck(_)) => acked += 1,
                Some(_) => {}
                None => panic!("{acked} of {n} acknowledged"),
            }
        }
        sending.await.unwrap();
    }

    /// Publishes telemetry `seq={i}&site=lab`, body `{"n":i}`, for `i` in `from..from + n`
    /// as `device`, at QoS 1, and waits for every PUBACK (the custom-endpoint tests).
    pub async fn publish_numbered(&mut self, device: &str, from: usize, n: usize) {
        let device = device.to_string();
        self.publish_acked(from, n, move |i| {
            (
                format!("devices/{device}/messages/events/seq={i}&site=lab"),
                format!("{{\"n\":{i}}}"),
            )
        })
        .await;
    }

    /// Publishes and waits for the next publish whose topic starts with `prefix`.
    pub async fn request(&mut self, topic: &str, body: &[u8], prefix: &str) -> Publish {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body.to_vec())
            .await
            .unwrap();
        self.next_publish_on(prefix, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("no answer on {prefix} to {topic}"))
    }

    /// The next publish on a topic starting with `prefix`, skipping others.
    pub async fn next_publish_on(&mut self, prefix: &str, within: Duration) -> Option<Publish> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let p = self.next_publish(left).await?;
            if p.topic.starts_with(prefix) {
                return Some(p);
            }
        }
    }
}

/// An MQTT packet: fixed-header byte `first`, the remaining length, `body` (raw tests).
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        p.push(b);
        if len == 0 {
            break;
        }
    }
    p.extend(body);
    p
}

/// The variable header and payload of a v3.1.1 CONNECT with connect flags `flags`,
/// keep-alive 30 s, client id, username and password.
pub fn connect_body(flags: u8, client_id: &str, user: &str, pass: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 30];
    for s in [client_id, user, pass] {
        body.extend((s.len() as u16).to_be_bytes());
        body.extend(s.as_bytes());
    }
    body
}

/// Parses a JSON payload.
pub fn json_of(p: &Publish) -> Value {
    serde_json::from_slice(&p.payload)
        .unwrap_or_else(|_| panic!("not JSON on {}: {:?}", p.topic, p.payload))
}

/// A free loopback port (bound, read back, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A bare rumqttd on `port` (no auth): an upstream broker for tests. It runs until the test
/// process ends.
pub fn start_bare_broker(port: u16) {
    use std::collections::HashMap;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = rumqttd::ServerSettings {
        name: "upstream".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 300 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let _ = rumqttd::Broker::new(config).start();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "bare broker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP proxy in front of a hub listener, to cut connections while the hub runs and to
/// keep clients out for a while ("away"), as a network would.
pub struct Proxy {
    /// Where it listens (port 0 given: the port picked).
    listening: std::net::SocketAddr,
    target: Arc<std::sync::Mutex<std::net::SocketAddr>>,
    blocked: Arc<std::sync::atomic::AtomicBool>,
    open: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` and forwards each connection to `target`.
    pub async fn start(listen: &str, target: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .expect("proxy binds");
        let listening = listener.local_addr().expect("proxy address");
        let target = Arc::new(std::sync::Mutex::new(target));
        let blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let (t, b, o) = (target.clone(), blocked.clone(), open.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if b.load(Ordering::Relaxed) {
                    continue; // dropped: refused while "away"
                }
                let to = *t.lock().unwrap();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                o.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            listening,
            target,
            blocked,
            open,
            accept,
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.listening.port()
    }

    /// Where new connections go from now on (a restarted hub's new port).
    pub fn retarget(&self, target: std::net::SocketAddr) {
        *self.target.lock().unwrap() = target;
    }

    /// Drops every open connection at once.
    pub fn cut(&self) {
        for task in self.open.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// While blocked, new connections are closed at once.
    pub fn block(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Polls `count` until it reaches `want` (30 s at most), then reads it once more a moment
/// later, so a duplicate that arrives late is counted too.
pub async fn settled_count<F, Fut>(want: u64, count: F) -> u64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = count().await;
        if n >= want || Instant::now() > deadline {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return count().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
