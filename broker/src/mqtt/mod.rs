//! The MQTT front end: what devices and modules actually connect to.
//!
//! Each accepted socket (plain or TLS) runs one task:
//! 1. read CONNECT (rumqttd's v4 codec), authenticate the SAS token or the admin token, and
//!    resume the client's persistent session (this file: accept, `open`, `Session`);
//! 2. wait for whatever comes and do that wake-up's work ([`connection_loop`]);
//! 3. handle what the client sends, refusing what is not its own ([`inbound`]), its
//!    subscriptions and stored session ([`subscriptions`]), and deliver what the hub has for
//!    it: direct messages, C2D, module inputs ([`delivery`]).
//!
//! Everything addressed to one identity goes straight to its connection; only telemetry
//! fan-out to service connections passes through the embedded router, over a local link opened
//! when first needed. Packets are decoded with rumqttd's own codec, so the QoS and packet id it
//! keeps private travel untouched.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use fleethub_router::Message;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Error as CodecError, Filter, Packet, PingResp, Protocol, PubAck,
    PubAckReason, QoS, SubAck, Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::core::{disconnect_packet, publish_ids, publish_with, NowOrNever};
use crate::hub::{LiveConnection, SharedHub};
use crate::identity::IdentityKey;
use crate::registry::Status;
use crate::sas::{resource_for, SasToken};
use crate::topics::{self, envelope, Delivery, Inbound, MappedFilter, Principal};

mod connection_loop;
mod consumer;
mod delivery;
mod handshake;
mod inbound;
mod publish;
mod subscriptions;
#[cfg(test)]
mod tests;
pub mod websocket;

use handshake::open;
use subscriptions::filters_digest;

/// Username that marks a service connection (password: the admin token).
pub const SERVICE_USERNAME: &str = "$service";

/// Everything the front end reads off a client's raw bytes before any session state exists:
/// the PUBLISH ids and CONNECT flags from the fixed header, then rumqttd's decoder over
/// every packet, and the identity a CONNECT names. For the fuzzer; never panics.
pub fn read_raw(bytes: &[u8]) {
    let _ = inbound::peek_publish_ids(bytes);
    let _ = handshake::connect_flags(bytes);
    let mut buf = BytesMut::from(bytes);
    while let Ok(packet) = V4.read_mut(&mut buf, 300 * 1024) {
        if let Packet::Connect(connect, _, _, _, login) = packet {
            let _ = IdentityKey::parse(&connect.client_id);
            if let Some(login) = login {
                let _ = crate::sas::SasToken::parse(&login.password);
            }
        }
    }
}

/// A place among the connections that have not finished CONNECT.
pub type Pending = tokio::sync::OwnedSemaphorePermit;

/// The budget of connections not yet through CONNECT, `[mqtt] max_pending_connections`.
fn pending_budget(hub: &SharedHub) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(
        hub.config.limits.max_pending_connections.max(1),
    ))
}

/// A place for a new socket, or `None` (counted) when too many have not finished CONNECT: a
/// flood of silent sockets is closed as it arrives instead of taking the file descriptors
/// devices need.
fn take_place(hub: &SharedHub, pending: &Arc<tokio::sync::Semaphore>) -> Option<Pending> {
    match pending.clone().try_acquire_owned() {
        Ok(place) => Some(place),
        Err(_) => {
            hub.metrics.mqtt_pending_refused.inc();
            None
        }
    }
}

/// Accepts plain TCP connections until `shutdown` flips.
///
/// Every connection task holds a clone of `open`, so the server knows when the last one ended.
pub async fn serve_tcp(
    listener: TcpListener,
    hub: SharedHub,
    mut shutdown: watch::Receiver<bool>,
    open: tokio::sync::mpsc::Sender<()>,
) {
    let pending = pending_budget(&hub);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(place) = take_place(&hub, &pending) else {
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (hub, open) = (hub.clone(), open.clone());
                    tokio::spawn(async move {
                        connection(stream, peer, hub, place, Vec::new()).await;
                        drop(open);
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Accepts TLS connections until `shutdown` flips. The handshake runs in the connection's
/// own task so a slow client never holds up the accept loop.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    hub: SharedHub,
    mut shutdown: watch::Receiver<bool>,
    open: tokio::sync::mpsc::Sender<()>,
) {
    let pending = pending_budget(&hub);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(place) = take_place(&hub, &pending) else {
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (hub, acceptor, open) = (hub.clone(), acceptor.clone(), open.clone());
                    tokio::spawn(async move {
                        let _open = open;
                        let timeout = hub.limits.connect_timeout();
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => {
                                let cert = client_certificate(&tls);
                                connection(tls, peer, hub, place, cert).await
                            }
                            Ok(Err(e)) => {
                                hub.metrics.connection_attempts.with_label_values(&["tls_error"]).inc();
                                debug!(%peer, error = %e, "TLS handshake failed");
                            }
                            Err(_) => debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Writes and flushes what is pending. The flush matters for layered streams (TLS,
/// WebSockets) that may hold written bytes back; on a TCP socket it is free.
async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) -> std::io::Result<()> {
    if !buf.is_empty() {
        w.write_all(buf).await?;
        buf.clear();
        w.flush().await?;
    }
    Ok(())
}

/// First capacity of a connection's read buffer: a CONNECT with a SAS token fits.
const READ_BUF_START: usize = 512;
/// Capacity of an idle connection's read buffer once it is open: enough for a PINGREQ or a
/// SUBSCRIBE; it grows again as soon as more arrives.
const READ_BUF_IDLE: usize = 128;
/// A drained read buffer larger than this is given back (a burst is over).
const READ_BUF_KEEP: usize = 64 * 1024;

/// Keeps room to read into for the handshake (which reads little).
fn make_room(rbuf: &mut BytesMut) {
    if rbuf.capacity() - rbuf.len() < 64 {
        rbuf.reserve(READ_BUF_START);
    }
}

/// How much a connection reads at once: small while it is quiet (most of a fleet), doubling
/// while reads fill the buffer (a busy publisher reads up to 64 KiB at a time), halving as
/// reads come back small. `BytesMut::reserve` alone cannot do this: it reclaims the space
/// of consumed packets before it grows, so a buffer that starts small stays small.
struct ReadSize {
    want: usize,
}

impl ReadSize {
    fn new() -> ReadSize {
        ReadSize {
            want: READ_BUF_IDLE,
        }
    }

    /// Gives `rbuf` room for the next read; returns how much room it has.
    fn prepare(&self, rbuf: &mut BytesMut) -> usize {
        if rbuf.is_empty() && rbuf.capacity() > 2 * self.want {
            // Traffic calmed down: give the large buffer back.
            *rbuf = BytesMut::with_capacity(self.want);
        } else if rbuf.capacity() - rbuf.len() < self.want / 2 {
            rbuf.reserve(self.want);
        }
        rbuf.capacity() - rbuf.len()
    }

    /// A read of `n` bytes into `room`.
    fn read(&mut self, n: usize, room: usize) {
        if n == room {
            self.want = (self.want * 2).min(READ_BUF_KEEP);
        } else if n < self.want / 8 {
            self.want = (self.want / 2).max(READ_BUF_IDLE);
        }
    }
}

/// Where the variable header of the packet at the start of `buf` begins: after the type byte
/// and the remaining length (1 to 4 bytes); `None` while the header is incomplete or malformed.
pub(super) fn variable_header_at(buf: &[u8]) -> Option<usize> {
    buf.first()?;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            return Some(i);
        }
        if i > 4 {
            return None;
        }
    }
}

/// Runs one client connection to its end.
/// `pending` is this connection's place among those not yet through CONNECT, given back once
/// the handshake is done.
/// The certificate chain a TLS client presented (end entity first, DER); empty for none.
pub fn client_certificate<IO>(tls: &tokio_rustls::server::TlsStream<IO>) -> Vec<Vec<u8>> {
    tls.get_ref()
        .1
        .peer_certificates()
        .map(|chain| chain.iter().map(|c| c.as_ref().to_vec()).collect())
        .unwrap_or_default()
}

pub async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    hub: SharedHub,
    pending: Pending,
    client_chain: Vec<Vec<u8>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    // The handshake runs in a boxed future: its state (the CONNECT, credentials, the session
    // being resumed) is freed before the connection settles into its long wait.
    let opened = Box::pin(open(&mut reader, &mut writer, peer, hub, client_chain)).await;
    drop(pending);
    let Some(mut open) = opened else {
        let _ = writer.shutdown().await;
        return;
    };
    // `open` stays whole (its parts are taken, not moved out by a pattern) so the task keeps
    // one copy of it across the long wait.
    let Err(end) = open
        .session
        .run(
            &mut reader,
            &mut writer,
            &mut open.rbuf,
            &mut open.wbuf,
            open.token_deadline,
        )
        .await;
    debug!(principal = ?open.session.principal, reason = end, "connection closed");
    let _ = writer.shutdown().await;
    // Dropping the session releases the router link, the gauge and the live entry.
    drop(open);
}

/// Forgets a connection in the live table, if it is still the current one for its id.
fn release(hub: &SharedHub, principal: &Principal, conn_id: u64) {
    if *principal == Principal::Service {
        hub.services.remove(&conn_id);
    }
    if let Principal::Identity(key) = principal {
        if let Some(bus) = hub.cluster.bus() {
            bus.detach(conn_id);
        }
        let ours = hub
            .live
            .remove_if(key, |_, live| live.conn_id == conn_id)
            .is_some();
        if ours {
            hub.registry.set_connected(key, false);
            if hub.registry.queue_activity(key.clone()) {
                let hub = hub.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = hub.registry.write_activity() {
                        warn!(error = %e, "could not store last activity times");
                    }
                });
            }
        }
    }
}

struct Session {
    hub: SharedHub,
    conn_id: u64,
    /// An `iotEdge` identity: its messages may carry the original sender's ids.
    gateway: bool,
    /// Queue entries of routed messages read in this batch, appended as one unit.
    queued: crate::hub::Routed,
    /// PUBACKs of this batch, written once its queue entries are committed.
    deferred_acks: Vec<u16>,
    /// (QoS, packet id) of the PUBLISH being handled.
    current: Option<(u8, u16)>,
    /// A service connection counted in `Hub::event_subscribers`.
    counted_subscriber: bool,
    principal: Principal,
    /// Internal topic of this identity's telemetry, computed once.
    telemetry_topic: String,
    /// The connection's link into the embedded router, opened the first time something has
    /// to go through it (telemetry while a service watches, a service's subscriptions): a
    /// device that only publishes and gets its own messages never costs a router slot.
    link_tx: Option<LinkTx>,
    /// A link just opened, for `run` to start reading.
    new_link_rx: Option<Box<LinkRx>>,
    /// Client filters in force, checked again on delivery.
    filters: Vec<MappedFilter>,
    /// Router subscriptions in flight (service connections only).
    router_subs: Option<Box<RouterSubs>>,
    keep_alive: Option<Duration>,
    c2d: C2dDelivery,
    /// For one of the hub's modules, routed messages in flight from its input queues,
    /// created at its first delivery (devices never need it).
    inputs: Option<Box<crate::sinks::module_input::InputDelivery>>,
    /// For a service connection reading a consumer group, the events in flight.
    events: Option<Box<consumer::GroupReader>>,
    queue_pkids: QueuePkids,
    /// The store key of this client's session ([`crate::session`]).
    session_key: String,
    /// Clean session 0: subscriptions are stored and outlive the connection.
    persistent: bool,
    /// A digest of the filters last stored for this session (none stored yet: `None`), so
    /// a SUBSCRIBE that changes nothing writes nothing.
    stored_filters: Option<u64>,
    /// What the hub tells this connection, and whether it listens for method requests
    /// (the API answers 404103 at once when it does not).
    mailbox: Arc<crate::hub::Mailbox>,
    /// A session change being committed and what may go out to the client only after it
    /// (the SUBACK and what follows it).
    held: Option<Box<HeldReply>>,
    /// Publishes the store refused, held with their acks until it takes them. Boxed and
    /// rare: most connections never hold anything.
    held_publishes: Option<Box<Held>>,
}

/// A session write being committed.
type HeldCommit = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), crate::session::SessionError>> + Send>,
>;

/// SUBSCRIBEs handed to the embedded router (service connections), waiting for its SUBACK.
#[derive(Default)]
struct RouterSubs {
    /// Per packet id, the codes of refused filters are known; `None` marks a filter
    /// forwarded to the router.
    pending: Vec<(u16, Vec<Option<SubscribeReasonCode>>)>,
    /// Subscriptions re-made for a resumed session: their SUBACKs are not the client's (it
    /// sent no SUBSCRIBE).
    restoring: Vec<u16>,
}

/// Packets that wait for a session write to be committed.
struct HeldReply {
    commit: HeldCommit,
    out: BytesMut,
}

/// C2D messages in flight to this device, delivered from the durable queue by the front end
/// itself.
#[derive(Default)]
struct C2dDelivery {
    /// Subscribed to `devices/{d}/messages/devicebound/#`.
    active: bool,
    inflight: std::collections::VecDeque<(u16, u64)>,
    /// Highest sequence handed out on this connection.
    last_seq: u64,
}

const C2D_WINDOW: usize = 16;

/// Packet ids for what the front end delivers from durable queues (C2D, module inputs), from
/// a range the embedded router never uses (it cycles within 1..=100), so the client's PUBACK
/// can be matched to the entry it completes.
#[derive(Default)]
struct QueuePkids {
    next: u16,
}

const QUEUE_PKID_BASE: u16 = 1000;

impl QueuePkids {
    fn next(&mut self) -> u16 {
        if self.next < QUEUE_PKID_BASE {
            self.next = QUEUE_PKID_BASE;
        }
        let p = self.next;
        self.next = if p == u16::MAX {
            QUEUE_PKID_BASE
        } else {
            p + 1
        };
        p
    }
}

/// Cleanup lives in `Drop` so it also happens if a connection task panics.
impl Drop for Session {
    fn drop(&mut self) {
        // `LinkTx::send` never awaits (it is synchronous inside), so one poll completes it.
        if let Some(tx) = &mut self.link_tx {
            let _ = tx.send(disconnect_packet()).now_or_never();
        }
        self.hub.metrics.connections.dec();
        self.hub.sessions.disconnected(&self.session_key);
        if self.events.is_some() {
            self.hub.events.leave(self.conn_id);
        }
        if self.counted_subscriber {
            self.hub
                .event_subscribers
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        release(&self.hub, &self.principal, self.conn_id);
    }
}

enum Outcome {
    Unscheduled,
    Close,
}

/// What ended a connection's wait.
enum Wake {
    Read,
    Timer,
    /// Boxed: a notification is about 800 bytes, and every connection's task would carry room
    /// for one while only service connections and watched publishers get any.
    Router(Box<Result<Option<Notification>, rumqttd::local::LinkError>>),
    Mailbox,
    Committed(
        Option<(
            Result<(), fleethub_router::queue::AppendError>,
            PendingCommit,
        )>,
    ),
    /// Time to offer the held publishes to the store again.
    Retry,
}

/// A deadline that never comes (no keep-alive, a token without expiry).
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// A read batch waiting for its routed messages to be committed.
struct PendingCommit {
    committed: fleethub_router::queue::AppendFuture,
    acks: Vec<u16>,
    /// The distinct sinks the batch's entries went to, woken once they are committed.
    sinks: Vec<crate::sinks::SinkId>,
    count: u64,
    /// Messages of the batch not yet counted as refused (a retried batch was, once).
    fresh: u64,
}

/// Publishes the store refused (the `refuse` quota, the disk at its floor) and everything
/// read after them, held on the connection with their PUBACKs until the store takes them:
/// the device stays connected and its acknowledgements come, in order, once there is room.
#[derive(Default)]
struct Held {
    /// Batches whose commit came back while holding, in order: refused ones with their
    /// entries, stored ones with only their acks (which must wait for the refused before).
    refused: std::collections::VecDeque<HeldBatch>,
    /// Batches read while holding, never offered yet: all newer than `refused`.
    waiting: std::collections::VecDeque<HeldBatch>,
    /// Messages in `waiting`: past [`Held::MAX_WAITING`] the socket is not read.
    waiting_count: u64,
    retry_at: Option<tokio::time::Instant>,
}

struct HeldBatch {
    entries: Vec<fleethub_router::queue::NewEntry>,
    acks: Vec<u16>,
    sinks: Vec<crate::sinks::SinkId>,
    count: u64,
    fresh: u64,
}

impl Held {
    /// How many publishes one connection may have read and not stored before its socket is
    /// left unread: bounds the memory a device can make the hub hold while the store is full.
    const MAX_WAITING: u64 = 1_000;
    /// How often the held publishes are offered again.
    const RETRY: Duration = Duration::from_millis(500);

    fn full(&self) -> bool {
        self.waiting_count >= Self::MAX_WAITING
    }

    /// Everything held, oldest first, as one batch: stored whole or refused whole, so a
    /// retry never reorders what it holds.
    fn into_batch(self) -> HeldBatch {
        let mut all = HeldBatch {
            entries: Vec::new(),
            acks: Vec::new(),
            sinks: Vec::new(),
            count: 0,
            fresh: 0,
        };
        for b in self.refused.into_iter().chain(self.waiting) {
            all.entries.extend(b.entries);
            all.acks.extend(b.acks);
            for s in b.sinks {
                if !all.sinks.contains(&s) {
                    all.sinks.push(s);
                }
            }
            all.count += b.count;
            all.fresh += b.fresh;
        }
        all
    }
}
