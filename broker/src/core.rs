//! The embedded rumqttd router, behind a small API: start it, open links into it.
//!
//! Only this module and the front end's codec touch rumqttd types. The router runs on its
//! own OS thread and owns all subscription and fan-out state; every client connection gets
//! one local link into it (see `mqtt.rs`). rumqttd's own listeners are not used: they cannot
//! authorize per topic or translate IoT Hub's `$iothub/...` topics.

use std::sync::Arc;

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, QoS};
use rumqttd::Router;

use crate::config::RouterSection;
use crate::topics::INTERNAL_ROOT_FILTER;

type BuildLink = dyn Fn(&str) -> Result<(LinkTx, LinkRx), CoreError> + Send + Sync;

/// The router did not accept a link (it is full, or gone).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("router refused the link: {0}")]
    Link(String),
    #[error("link task failed: {0}")]
    Task(String),
}

impl From<LinkError> for CoreError {
    fn from(e: LinkError) -> Self {
        CoreError::Link(e.to_string())
    }
}

/// Handle to the running router. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    /// rumqttd's router channel is typed with a crate-private event type, so the sender is
    /// captured in this closure rather than named.
    build: Arc<BuildLink>,
}

impl Core {
    /// Starts the router thread. `max_connections` bounds links (the router preallocates);
    /// `opened` counts the links opened into it (each costs about 230 KB of buffers).
    pub fn start(
        max_connections: usize,
        sizing: &RouterSection,
        opened: prometheus::IntCounter,
    ) -> Core {
        let config = rumqttd::RouterConfig {
            // One extra slot for hub-internal links.
            max_connections: max_connections + 16,
            max_outgoing_packet_count: 200,
            max_segment_size: sizing.max_segment_bytes.max(1024 * 64),
            max_segment_count: sizing.max_segment_count.max(1),
            custom_segment: None,
            // A catch-all log: with no subscriber on a topic, rumqttd would otherwise
            // disconnect the publisher (links use static filters).
            initialized_filters: Some(vec![INTERNAL_ROOT_FILTER.to_string()]),
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = Router::new(0, config).spawn();
        let build = move |client_id: &str| {
            opened.inc();
            LinkBuilder::new(client_id, router_tx.clone())
                .clean_session(true)
                .dynamic_filters(false)
                .build()
                .map(|(tx, rx, _ack)| (tx, rx))
                .map_err(CoreError::from)
        };
        Core {
            build: Arc::new(build),
        }
    }

    /// Opens a link. Blocks until the router answers, so call it off the async runtime.
    /// `link_id` must not contain `+ $ # /` (the router ignores such a connect).
    pub fn link_blocking(&self, link_id: &str) -> Result<(LinkTx, LinkRx), CoreError> {
        (self.build)(link_id)
    }

    /// Opens a link from async code.
    pub async fn link(&self, link_id: String) -> Result<(LinkTx, LinkRx), CoreError> {
        let core = self.clone();
        tokio::task::spawn_blocking(move || core.link_blocking(&link_id))
            .await
            .map_err(|e| CoreError::Task(e.to_string()))?
    }
}

/// `FutureExt::now_or_never` without the futures crate: polls once. `LinkTx::send` is
/// `async` in name only and always completes on the first poll.
pub(crate) trait NowOrNever: std::future::Future + Sized {
    fn now_or_never(self) -> Option<Self::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut fut = std::pin::pin!(self);
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}

impl<F: std::future::Future> NowOrNever for F {}

/// Builds a publish with the given QoS and packet id. rumqttd keeps those fields private;
/// its MQTT-independent serialisation is the public way in.
pub fn publish_with(topic: &str, payload: &[u8], qos: QoS, pkid: u16, retain: bool) -> Publish {
    use bytes::{BufMut, BytesMut};
    let mut b = BytesMut::with_capacity(5 + topic.len() + payload.len());
    b.put_u8(0b0011_0000 | (retain as u8) | ((qos as u8) << 1));
    b.put_u16(pkid);
    b.put_u16(topic.len() as u16);
    b.put_slice(topic.as_bytes());
    b.put_slice(payload);
    Publish::deserialize(b.freeze())
}

/// Writes an MQTT 3.1.1 QoS 1 PUBLISH straight into a connection's write buffer, its topic
/// given in pieces. The delivery of routed messages writes one per message: building the topic
/// with `format!`, a [`Publish`] and then serialising it cost three allocations and two copies
/// of the body per message (4% of the routed path's CPU, BENCHMARKS.md issue 19).
pub fn write_publish_qos1(wbuf: &mut bytes::BytesMut, topic: &[&str], payload: &[u8], pkid: u16) {
    use bytes::BufMut;
    let topic_len: usize = topic.iter().map(|t| t.len()).sum();
    let remaining = 2 + topic_len + 2 + payload.len();
    wbuf.reserve(5 + remaining);
    wbuf.put_u8(0b0011_0010);
    let mut rest = remaining;
    loop {
        let mut byte = (rest % 128) as u8;
        rest /= 128;
        if rest > 0 {
            byte |= 0x80;
        }
        wbuf.put_u8(byte);
        if rest == 0 {
            break;
        }
    }
    wbuf.put_u16(topic_len as u16);
    for t in topic {
        wbuf.put_slice(t.as_bytes());
    }
    wbuf.put_u16(pkid);
    wbuf.put_slice(payload);
}

/// The QoS and packet id of a publish (rumqttd keeps them private; read them back through
/// the same serialisation). Only used off the hot path.
pub fn publish_ids(publish: &Publish) -> (u8, u16) {
    let s = publish.serialize();
    ((s[0] >> 1) & 0b11, u16::from_be_bytes([s[1], s[2]]))
}

pub fn disconnect_packet() -> Packet {
    Packet::Disconnect(
        rumqttd::protocol::Disconnect {
            reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_publish_writes_what_rumqttd_writes() {
        use rumqttd::protocol::{v4::V4, Protocol};
        // Remaining lengths of one, two and three bytes.
        for body_len in [0, 100, 126, 127, 128, 16_000, 16_383, 16_384, 70_000] {
            let body = vec![b'x'; body_len];
            let pieces = [
                "devices/d1/modules/m/inputs/in/",
                "%24.ct=application%2Fjson",
            ];
            let mut ours = bytes::BytesMut::new();
            write_publish_qos1(&mut ours, &pieces, &body, 513);
            let mut theirs = bytes::BytesMut::new();
            let p = publish_with(&pieces.concat(), &body, QoS::AtLeastOnce, 513, false);
            V4.write(Packet::Publish(p, None), &mut theirs).unwrap();
            assert_eq!(ours, theirs, "body of {body_len} bytes");
        }
    }

    #[test]
    fn publish_with_sets_private_fields() {
        let p = publish_with("a/b", b"xyz", QoS::AtLeastOnce, 42, false);
        assert_eq!(publish_ids(&p), (1, 42));
        assert_eq!(&p.topic[..], b"a/b");
        assert_eq!(&p.payload[..], b"xyz");
    }
}
