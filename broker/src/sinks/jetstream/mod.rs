//! Custom endpoints into NATS JetStream (`[endpoints.NAME] kind = "jetstream"`), reached by
//! `INTO Endpoint("NAME")` routes, as IoT Hub routes to its custom endpoints.
//!
//! Each endpoint's queue (`$endpoint/NAME`) is the durable store-and-forward queue, so TTL,
//! priority and quotas apply as to every sink. One task per endpoint keeps a connection
//! (the official `async-nats` client), makes sure the stream exists, and publishes from the
//! queue within a window; an entry leaves the queue only once JetStream acknowledged storing
//! it. Each message carries `Nats-Msg-Id: {hub}:{sequence}`, the queue entry's own number, so
//! what is sent again after a lost acknowledgement (a dropped connection, a restart) is
//! dropped by JetStream's duplicate window, and is recognisable by consumers beyond it.
//! Properties travel as headers: application properties by name, system properties by
//! IoT Hub's names (`iothub-connection-device-id`, `iothub-enqueuedtime`, `content-type`…).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use fleethub_router::queue::{DiskQueue, Entry};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{Context, Health, QueueReader, SinkDriver, SinkId, StopFuture};
use crate::config::EndpointSection;
use crate::metrics::Metrics;

/// The driver's name in health reports.
pub const KIND: &str = "jetstream";
/// Publishes awaiting JetStream's acknowledgement at once, per endpoint.
const WINDOW: usize = 256;

/// Every configured JetStream endpoint, each with its task.
pub struct JetStream {
    endpoints: HashMap<String, Running>,
}

struct Running {
    connected: Arc<AtomicBool>,
    wake: Arc<Notify>,
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl JetStream {
    pub fn start(ctx: &Context) -> JetStream {
        let mut endpoints = HashMap::new();
        for (name, cfg) in &ctx.config.endpoints {
            if cfg.kind != "jetstream" {
                continue;
            }
            let connected = Arc::new(AtomicBool::new(false));
            let wake = Arc::new(Notify::new());
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let endpoint = Endpoint {
                name: name.clone(),
                queue_name: SinkId::Endpoint(name.clone()).to_string(),
                cfg: cfg.clone(),
                hub_id: ctx.config.hub_id.to_string(),
                queue: ctx.queues.clone(),
                metrics: ctx.metrics.clone(),
                connected: connected.clone(),
                wake: wake.clone(),
            };
            let task = tokio::spawn(endpoint.run(stopped));
            endpoints.insert(
                name.clone(),
                Running {
                    connected,
                    wake,
                    stop,
                    task: std::sync::Mutex::new(Some(task)),
                },
            );
        }
        JetStream { endpoints }
    }
}

impl SinkDriver for JetStream {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn owns(&self, sink: &SinkId) -> bool {
        matches!(sink, SinkId::Endpoint(name) if self.endpoints.contains_key(name))
    }

    fn refuses(&self, _sink: &SinkId) -> Option<String> {
        None
    }

    fn wake(&self, sink: &SinkId) {
        if let SinkId::Endpoint(name) = sink {
            if let Some(r) = self.endpoints.get(name) {
                r.wake.notify_one();
            }
        }
    }

    fn health(&self) -> Health {
        Health {
            kind: KIND,
            enabled: !self.endpoints.is_empty(),
            connected: (!self.endpoints.is_empty()).then(|| {
                self.endpoints
                    .values()
                    .all(|r| r.connected.load(Ordering::Relaxed))
            }),
        }
    }

    /// Ends every endpoint's task and waits for it; entries in flight stay queued.
    fn stop(&self) -> StopFuture<'_> {
        Box::pin(async move {
            for r in self.endpoints.values() {
                let _ = r.stop.send(true);
                let task = r.task.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(task) = task {
                    let _ = task.await;
                }
            }
        })
    }
}

struct Endpoint {
    name: String,
    queue_name: String,
    cfg: EndpointSection,
    hub_id: String,
    queue: Arc<DiskQueue>,
    metrics: Arc<Metrics>,
    connected: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Endpoint {
    async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let session = tokio::select! {
                r = self.session() => r,
                _ = stop.wait_for(|s| *s) => break,
            };
            if let Err(e) = session {
                if self.connected.swap(false, Ordering::Relaxed) {
                    warn!(endpoint = self.name, error = %e, "JetStream endpoint lost; messages wait in its queue");
                } else {
                    tracing::debug!(endpoint = self.name, error = %e, "JetStream endpoint unreachable");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        self.connected.store(false, Ordering::Relaxed);
    }

    /// One connection: publish from the queue until something fails.
    async fn session(&self) -> Result<(), String> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(self.cfg.url.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let js = async_nats::jetstream::new(client);
        let prefix = self.cfg.subject.split('.').next().unwrap_or("fleethub");
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: self.cfg.stream.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
        self.connected.store(true, Ordering::Relaxed);
        info!(
            endpoint = self.name,
            url = self.cfg.url,
            stream = self.cfg.stream,
            "JetStream endpoint connected"
        );
        // A fresh window per connection: what was in flight on the last one is read again.
        let mut reader = QueueReader::new(WINDOW);
        // Published and awaiting JetStream's acknowledgement, oldest first: a rolling window,
        // refilled as each acknowledgement comes.
        let mut pending = std::collections::VecDeque::with_capacity(WINDOW);
        let mut unflushed = 0;
        loop {
            let entries = reader
                .read(&*self.queue, &self.queue_name, crate::c2d::now_ms())
                .map_err(|e| e.to_string())?;
            for entry in entries {
                let (subject, headers) = self.describe(&entry);
                let ack = js
                    .publish_with_headers(subject, headers, entry.body.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                pending.push_back((entry.key, ack));
            }
            let Some((key, ack)) = pending.pop_front() else {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                reader.rewind();
                continue;
            };
            ack.await.map_err(|e| e.to_string())?;
            reader.acked(key);
            unflushed += 1;
            // Acknowledged entries leave the queue in batches (one removal call each).
            if unflushed >= 64 || pending.is_empty() {
                reader.flush(&*self.queue, &self.metrics);
                unflushed = 0;
            }
        }
    }

    /// The subject (the template filled in) and headers of one entry.
    fn describe(&self, entry: &Entry) -> (String, HeaderMap) {
        let message =
            fleethub_router::Message::from_bag(&entry.bag, bytes::Bytes::new()).unwrap_or_default();
        let sys = &message.system;
        let token = |v: Option<&str>| v.map(subject_token).unwrap_or_else(|| "~".into());
        let subject = self
            .cfg
            .subject
            .replace("{hub}", &subject_token(&self.hub_id))
            .replace("{device}", &token(sys.connection_device_id.as_deref()))
            .replace("{module}", &token(sys.connection_module_id.as_deref()))
            .replace("{output}", &token(sys.output_name.as_deref()));
        let mut headers = HeaderMap::new();
        let mut put = |name: &str, value: &str| {
            if let (Ok(n), Ok(v)) = (HeaderName::from_str(name), HeaderValue::from_str(value)) {
                headers.insert(n, v);
            }
        };
        put("Nats-Msg-Id", &format!("{}:{}", self.hub_id, entry.key.seq));
        for (bag_name, value) in sys.iter() {
            put(system_header(bag_name), value);
        }
        for (name, value) in &message.properties {
            put(name, value.as_deref().unwrap_or(""));
        }
        (subject, headers)
    }
}

/// IoT Hub's name for a system property, by its bag name.
pub(crate) fn system_header(bag_name: &str) -> &str {
    match bag_name {
        "$.ct" => "content-type",
        "$.ce" => "content-encoding",
        "$.mid" => "message-id",
        "$.cid" => "correlation-id",
        "$.on" => "iothub-outputname",
        "$.to" => "to",
        "$.uid" => "user-id",
        "$.exp" => "absolute-expiry-time",
        "$.cdid" => "iothub-connection-device-id",
        "$.cmid" => "iothub-connection-module-id",
        other => other,
    }
}

/// An id as one subject token: NATS splits subjects at `.` and reserves `*`, `>` and
/// whitespace, so those (and `%`) are percent-encoded.
fn subject_token(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for c in id.chars() {
        if c == '.' || c == '*' || c == '>' || c == '%' || c.is_whitespace() || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_single_subject_tokens() {
        assert_eq!(subject_token("dev-1"), "dev-1");
        assert_eq!(subject_token("a.b*c>d e%"), "a%2Eb%2Ac%3Ed%20e%25");
        assert_eq!(subject_token("$edgeHub"), "$edgeHub");
    }
}
