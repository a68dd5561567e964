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

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use fleethub_router::queue::Entry;
use tracing::info;

use super::endpoint::{Endpoint, SessionFuture};
use super::QueueReader;

/// The driver's name in health reports.
pub const KIND: &str = "jetstream";
/// Publishes awaiting JetStream's acknowledgement at once, per endpoint.
const WINDOW: usize = 256;

/// The kind's session, for [`Endpoints`](super::endpoint::Endpoints).
pub fn session(endpoint: Arc<Endpoint>) -> SessionFuture {
    Box::pin(async move { endpoint.jetstream_session().await })
}

impl Endpoint {
    /// One connection: publish from the queue until something fails.
    async fn jetstream_session(&self) -> Result<(), String> {
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
