//! The MQTT front end: what devices and modules actually connect to.
//!
//! Each accepted socket (plain or TLS) runs one task:
//! 1. read CONNECT (rumqttd's v4 codec), authenticate the SAS token or the admin token;
//! 2. open a local link into the embedded router under an internal link id;
//! 3. translate every PUBLISH / SUBSCRIBE through the topic table (`topics.rs`), refusing
//!    what is not the client's, and pass the rest to the router; translate what the router
//!    forwards back to the client's topics.
//!
//! QoS 1 publishes keep their packet id end to end: the router acknowledges into the link,
//! and the front end writes that PUBACK to the client. Packets are decoded with rumqttd's own
//! codec so the QoS and packet id it keeps private travel untouched.

use std::collections::HashMap;
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

/// Username that marks a service connection (password: the admin token).
pub const SERVICE_USERNAME: &str = "$service";

/// Accepts plain TCP connections until `shutdown` flips.
pub async fn serve_tcp(listener: TcpListener, hub: SharedHub, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let hub = hub.clone();
                    tokio::spawn(async move { connection(stream, peer, hub).await });
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
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (hub, acceptor) = (hub.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        let timeout = Duration::from_secs(hub.config.limits.connect_timeout_secs);
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => connection(tls, peer, hub).await,
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

/// Why a CONNECT was refused (logged; the client only sees the CONNACK code).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("client id is not a valid device or module id: {0}")]
    BadClientId(String),
    #[error("username '{0}' does not name the client id")]
    BadUsername(String),
    #[error("no password")]
    NoPassword,
    #[error("{0} is not registered")]
    Unknown(String),
    #[error("{0} is disabled")]
    Disabled(String),
    #[error("token: {0}")]
    Token(#[from] crate::sas::SasError),
    #[error("wrong service password")]
    BadServicePassword,
}

impl Refusal {
    fn metric_label(&self) -> &'static str {
        match self {
            Refusal::BadClientId(_) | Refusal::BadUsername(_) => "bad_client_id",
            Refusal::Unknown(_) => "unknown_identity",
            Refusal::Disabled(_) => "disabled",
            Refusal::Token(crate::sas::SasError::Expired { .. }) => "expired_token",
            _ => "not_authorized",
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks a CONNECT's credentials. Returns who connected and, for a SAS token, when it
/// expires (seconds since the epoch): the connection is closed then, as IoT Hub does.
fn authenticate(
    hub: &SharedHub,
    client_id: &str,
    login: Option<&rumqttd::protocol::Login>,
) -> Result<(Principal, Option<u64>), Refusal> {
    let (username, password) = login
        .map(|l| (l.username.as_str(), l.password.as_str()))
        .unwrap_or(("", ""));
    if username == SERVICE_USERNAME {
        return if hub.is_admin_token(password) {
            Ok((Principal::Service, None))
        } else {
            Err(Refusal::BadServicePassword)
        };
    }
    let key = IdentityKey::parse(client_id).map_err(|e| Refusal::BadClientId(e.to_string()))?;
    // `{hostname}/{deviceId}[/{moduleId}]/?api-version=...`
    let named = username
        .split_once('/')
        .map(|(_host, rest)| rest.split('?').next().unwrap_or("").trim_end_matches('/'));
    if named != Some(client_id) {
        return Err(Refusal::BadUsername(username.to_string()));
    }
    if password.is_empty() {
        return Err(Refusal::NoPassword);
    }
    let identity = hub
        .registry
        .get(&key)
        .ok_or_else(|| Refusal::Unknown(client_id.to_string()))?;
    if identity.status == Status::Disabled {
        return Err(Refusal::Disabled(client_id.to_string()));
    }
    let token = SasToken::parse(password)?;
    let resource = resource_for(&hub.config.hostname, &key);
    let keys = &identity.authentication.symmetric_key;
    let now = unix_now();
    token
        .verify(&resource, &keys.primary_key, now)
        .or_else(|e| match e {
            crate::sas::SasError::BadSignature => token.verify(&resource, &keys.secondary_key, now),
            other => Err(other),
        })?;
    Ok((Principal::Identity(key), Some(token.expiry)))
}

async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) -> std::io::Result<()> {
    if !buf.is_empty() {
        w.write_all(buf).await?;
        buf.clear();
    }
    Ok(())
}

/// Reads the first packet; must be CONNECT within the connect timeout.
async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Option<Packet> {
    let deadline = Instant::now() + timeout;
    loop {
        // MQTT 3.1.1 §3.1.2.3: the reserved connect flag must be 0, or the connection closes.
        if connect_flags(buf).is_some_and(|flags| flags & 1 != 0) {
            debug!("CONNECT with the reserved flag set");
            return None;
        }
        match V4.read_mut(buf, 64 * 1024) {
            Ok(p) => return Some(p),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => {
                debug!(error = %e, "malformed CONNECT");
                return None;
            }
        }
        make_room(buf);
        match tokio::time::timeout_at(deadline, reader.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
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

/// The connect-flags byte of a CONNECT at the start of `buf`, once enough of it is there.
fn connect_flags(buf: &[u8]) -> Option<u8> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    let name_len = u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]) as usize;
    // Protocol name, then the level byte, then the flags.
    buf.get(i + 2 + name_len + 1).copied()
}

/// Runs one client connection to its end.
pub async fn connection<S>(stream: S, peer: SocketAddr, hub: SharedHub)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    // The handshake runs in a boxed future: its state (the CONNECT, credentials, the session
    // being resumed) is freed before the connection settles into its long wait.
    let Some(mut open) = Box::pin(open(&mut reader, &mut writer, peer, hub)).await else {
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

/// An accepted connection, ready to run.
struct Open {
    session: Session,
    rbuf: BytesMut,
    wbuf: BytesMut,
    token_deadline: Option<Instant>,
}

/// Reads and checks the CONNECT, answers it, and resumes a stored session; `None` when the
/// connection is refused or fails on the way (the CONNACK, if any, is written).
async fn open<R, W>(
    reader: &mut R,
    writer: &mut W,
    peer: SocketAddr,
    hub: SharedHub,
) -> Option<Open>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Small to start: most of a fleet is idle connections. The read buffer grows while
    // reads fill it (`ReadSize`); the write buffer as packets are written.
    let mut rbuf = BytesMut::with_capacity(READ_BUF_START);
    let mut wbuf = BytesMut::new();
    let timeout = Duration::from_secs(hub.config.limits.connect_timeout_secs);
    let Some(packet) = read_connect(reader, &mut rbuf, timeout).await else {
        hub.metrics
            .connection_attempts
            .with_label_values(&["bad_request"])
            .inc();
        return None;
    };
    let Packet::Connect(connect, _, _will, _, login) = packet else {
        hub.metrics
            .connection_attempts
            .with_label_values(&["bad_request"])
            .inc();
        debug!(%peer, "first packet was not CONNECT");
        return None;
    };
    let (principal, token_expiry) = match authenticate(&hub, &connect.client_id, login.as_ref()) {
        Ok(p) => p,
        Err(refusal) => {
            hub.metrics
                .connection_attempts
                .with_label_values(&[refusal.metric_label()])
                .inc();
            info!(%peer, client_id = %connect.client_id, reason = %refusal, "connection refused");
            let ack = ConnAck {
                session_present: false,
                code: ConnectReturnCode::NotAuthorized,
            };
            let _ = V4.write(Packet::ConnAck(ack, None), &mut wbuf);
            let _ = write_all(writer, &mut wbuf).await;
            return None;
        }
    };

    // Clean session 1 ends whatever session the client had; clean session 0 resumes it.
    let session_key = match &principal {
        Principal::Identity(key) => key.to_string(),
        Principal::Service => crate::session::service_key(&connect.client_id),
    };
    let resumed = if connect.clean_session {
        if let Err(e) = hub.sessions.remove(&session_key).await {
            warn!(client_id = %connect.client_id, error = %e, "could not end a stored session");
        }
        None
    } else {
        match hub.sessions.get(&session_key) {
            Ok(found) => found,
            Err(e) => {
                // Refuse rather than pretend there was no session: the client retries.
                warn!(client_id = %connect.client_id, error = %e, "could not read a stored session");
                let ack = ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::ServiceUnavailable,
                };
                let _ = V4.write(Packet::ConnAck(ack, None), &mut wbuf);
                let _ = write_all(writer, &mut wbuf).await;
                return None;
            }
        }
    };

    let conn_id = hub.next_conn_id();
    let mailbox = Arc::new(crate::hub::Mailbox::default());
    if let Principal::Identity(key) = &principal {
        // A second connection with the same id replaces the first, as in IoT Hub.
        let previous = hub.live.insert(
            key.clone(),
            LiveConnection {
                conn_id,
                mailbox: mailbox.clone(),
            },
        );
        if let Some(previous) = previous {
            previous.mailbox.kick();
        }
    } else {
        hub.services.insert(conn_id, mailbox.clone());
    }
    hub.metrics
        .connection_attempts
        .with_label_values(&["accepted"])
        .inc();
    hub.metrics.connections.inc();
    hub.sessions.connected(&session_key);
    if let Principal::Identity(key) = &principal {
        hub.registry.set_connected(key, true);
    }
    info!(%peer, client_id = %connect.client_id, resumed = resumed.is_some(), "connected");

    let ack = ConnAck {
        session_present: resumed.is_some(),
        code: ConnectReturnCode::Success,
    };
    let _ = V4.write(Packet::ConnAck(ack, None), &mut wbuf);
    let gateway = match &principal {
        Principal::Identity(key) => hub
            .registry
            .get(key)
            .is_some_and(|i| i.capabilities.iot_edge),
        Principal::Service => false,
    };
    let mut session = Session {
        hub: hub.clone(),
        conn_id,
        gateway,
        queued: Vec::new(),
        deferred_acks: Vec::new(),
        current: None,
        counted_subscriber: false,
        client_topics: None,
        telemetry_topic: match &principal {
            Principal::Identity(key) => topics::telemetry_topic(key),
            Principal::Service => String::new(),
        },
        principal,
        link_tx: None,
        new_link_rx: None,
        filters: Vec::new(),
        router_subs: None,
        c2d: C2dDelivery::default(),
        mailbox,
        keep_alive: match connect.keep_alive {
            0 => None,
            k => Some(Duration::from_millis(k as u64 * 1500)),
        },
        persistent: !connect.clean_session,
        stored_filters: resumed.as_ref().map(|s| filters_digest(&s.filters)),
        session_key,
        held: None,
    };
    if let Some(stored) = resumed {
        if let Err(reason) = session.resume(stored.filters, &mut wbuf).await {
            debug!(%peer, client_id = %connect.client_id, reason, "could not resume the session");
            return None;
        }
    }
    let token_deadline = token_expiry.map(|se| {
        let left = se.saturating_sub(unix_now());
        Instant::now() + Duration::from_secs(left)
    });
    if rbuf.is_empty() {
        // Handshake done: most connections go quiet now.
        rbuf = BytesMut::with_capacity(READ_BUF_IDLE);
    }
    Some(Open {
        session,
        rbuf,
        wbuf,
        token_deadline,
    })
}

/// (QoS, packet id) of the PUBLISH at the start of `buf`, from its fixed header; `None` for
/// other packets or an incomplete header.
fn peek_publish_ids(buf: &[u8]) -> Option<(u8, u16)> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    if qos == 0 {
        return Some((0, 0));
    }
    let topic_len = u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]) as usize;
    let at = i + 2 + topic_len;
    Some((qos, u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?])))
}

/// The original sender named in a gateway-forwarded message's `$.cdid` / `$.cmid`.
fn forwarded_sender(message: &Message) -> Option<IdentityKey> {
    let device =
        crate::identity::DeviceId::new(message.system.connection_device_id.as_deref()?).ok()?;
    match message.system.connection_module_id.as_deref() {
        Some(m) => Some(IdentityKey::module(
            device,
            crate::identity::ModuleId::new(m).ok()?,
        )),
        None => Some(IdentityKey::device(device)),
    }
}

/// Forgets a connection in the live table, if it is still the current one for its id.
fn release(hub: &SharedHub, principal: &Principal, conn_id: u64) {
    if *principal == Principal::Service {
        hub.services.remove(&conn_id);
    }
    if let Principal::Identity(key) = principal {
        let ours = hub
            .live
            .remove_if(key, |_, live| live.conn_id == conn_id)
            .is_some();
        if ours {
            hub.registry.set_connected(key, false);
            let (hub, key) = (hub.clone(), key.clone());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = hub.registry.persist_activity(&key) {
                    warn!(error = %e, "could not store last activity time");
                }
            });
        }
    }
}

struct Session {
    hub: SharedHub,
    conn_id: u64,
    /// An `iotEdge` identity: its messages may carry the original sender's ids.
    gateway: bool,
    /// Queue entries of routed messages read in this batch, appended as one unit.
    queued: Vec<fleethub_router::queue::NewEntry>,
    /// PUBACKs of this batch, written once its queue entries are committed.
    deferred_acks: Vec<u16>,
    /// (QoS, packet id) of the PUBLISH being handled.
    current: Option<(u8, u16)>,
    /// This connection's rows of the topic table, computed once.
    /// Built at the first router delivery: identities get theirs straight from the hub, so
    /// most connections never need it.
    client_topics: Option<Box<topics::ClientTopics>>,
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
}

/// A digest of a session's filter list, to tell whether it changed.
fn filters_digest(filters: &[String]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    filters.hash(&mut h);
    h.finish()
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

/// A router subscription for an internal topic.
fn router_filter(internal: &str, qos: QoS) -> Filter {
    Filter {
        path: internal.to_string(),
        qos,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: rumqttd::protocol::RetainForwardRule::OnEverySubscribe,
    }
}

/// C2D messages in flight to this device, delivered from the durable queue by the front end
/// itself with packet ids from a range the router never uses (it cycles within 1..=100), so
/// the device's PUBACK can be matched to the message it completes.
#[derive(Default)]
struct C2dDelivery {
    /// Subscribed to `devices/{d}/messages/devicebound/#`.
    active: bool,
    inflight: std::collections::VecDeque<(u16, u64)>,
    /// Highest sequence handed out on this connection.
    last_seq: u64,
    next_pkid: u16,
    /// For one of the hub's modules, created at its first delivery (devices never need it).
    inputs: Option<Box<InputsDelivery>>,
}

/// Routed messages in flight to one of the hub's modules from its input queues.
#[derive(Default)]
struct InputsDelivery {
    inflight: HashMap<u16, fleethub_router::queue::EntryKey>,
    keys: std::collections::HashSet<fleethub_router::queue::EntryKey>,
    /// Per input queue, the last key handed out: refills after an ack continue from there;
    /// a wake (new entries committed) starts again from the head.
    cursor: HashMap<String, fleethub_router::queue::EntryKey>,
    /// Routed messages the module acknowledged in the read batch being handled: removed
    /// from their queues and replaced in the window together, once per batch, not per ack.
    acked: Vec<fleethub_router::queue::EntryKey>,
}

const C2D_WINDOW: usize = 16;
/// Routed messages in flight to one module at once. A module reads for many publishers, and
/// its connection task gets a turn like each of theirs: with a window of 100 it fell behind
/// 20 publishing devices (a backlog of 100k entries in the routed benchmark), with 1000 it
/// keeps up (p50 latency 386 ms -> 13 ms). Unacknowledged entries stay queued either way.
const INPUT_WINDOW: usize = 1000;
const C2D_PKID_BASE: u16 = 1000;

impl C2dDelivery {
    fn pkid(&mut self) -> u16 {
        if self.next_pkid < C2D_PKID_BASE {
            self.next_pkid = C2D_PKID_BASE;
        }
        let p = self.next_pkid;
        self.next_pkid = if p == u16::MAX { C2D_PKID_BASE } else { p + 1 };
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
        if self.counted_subscriber {
            self.hub
                .event_subscribers
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        release(&self.hub, &self.principal, self.conn_id);
    }
}

impl Session {
    async fn run<R, W>(
        &mut self,
        reader: &mut R,
        writer: &mut W,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
        token_deadline: Option<Instant>,
    ) -> Result<std::convert::Infallible, &'static str>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mailbox = self.mailbox.clone();
        let hub = self.hub.clone();
        let mut deadline = Instant::now() + self.keep_alive.unwrap_or(FAR);
        let token_deadline = token_deadline.unwrap_or_else(|| Instant::now() + FAR);
        // Batches whose routed messages are being committed, oldest first, with the PUBACKs
        // that wait for them. The connection keeps reading meanwhile (pipelining); acks go
        // out when their batch is committed, so always in the order publishes came in.
        let mut commits: std::collections::VecDeque<PendingCommit> =
            std::collections::VecDeque::new();
        let mut link_rx: Option<Box<LinkRx>> = None;
        let mut read_size = ReadSize::new();
        // Made once per connection, not once per wake-up: registering a timer takes a lock
        // shared with other connections. It is moved only when it fires early (the
        // keep-alive deadline moves with every read).
        let timer = tokio::time::sleep_until(deadline.min(token_deadline));
        tokio::pin!(timer);
        loop {
            if hub.is_stopping() {
                return Err("hub shutting down");
            }
            // What each wake-up brought: decode, route, acknowledge, write. Its rarely needed
            // parts (router hand-off and notifications) are boxed where they are awaited, so
            // an idle connection's task stays small; this part runs inline because boxing it
            // per wake-up cost a fifth of the routed throughput.
            self.work(
                writer,
                rbuf,
                wbuf,
                &mut commits,
                &mut link_rx,
                &mut deadline,
            )
            .await?;
            let room = read_size.prepare(rbuf);
            let woke = tokio::select! {
                read = reader.read_buf(rbuf) => match read {
                    Ok(0) | Err(_) => return Err("socket closed"),
                    Ok(n) => {
                        read_size.read(n, room);
                        Wake::Read
                    }
                },
                notification = next_notification(&mut link_rx) => Wake::Router(notification),
                _ = mailbox.ready() => Wake::Mailbox,
                done = next_commit(&mut commits), if !commits.is_empty() => Wake::Committed(done),
                _ = &mut timer => {
                    let now = Instant::now();
                    if now >= token_deadline {
                        // As IoT Hub: the SDKs renew by reconnecting before this.
                        self.hub.metrics.token_expirations.inc();
                        return Err("SAS token expired");
                    }
                    if now >= deadline {
                        return Err("keep-alive expired");
                    }
                    Wake::Timer
                }
            };
            match woke {
                // Read into `rbuf`: decoded by `work` at the top of the loop.
                Wake::Read => {}
                // Fired for a keep-alive deadline that has moved since.
                Wake::Timer => timer.as_mut().reset(deadline.min(token_deadline)),
                Wake::Router(first) => {
                    Box::pin(self.router_notifications(*first, writer, wbuf, &mut link_rx)).await?
                }
                Wake::Mailbox => {
                    if mailbox.kicked() {
                        return Err(
                            "closed by the hub (taken over, disabled, deleted or stopping)",
                        );
                    }
                    // Everything waiting, in one go.
                    for d in mailbox.take() {
                        self.on_direct(d, wbuf);
                    }
                    if mailbox.take_c2d() {
                        self.c2d_fill(wbuf);
                    }
                }
                Wake::Committed(done) => {
                    if let Some((result, batch)) = done {
                        self.commit_done(result, batch, wbuf);
                    }
                    // Later batches may be committed too: the writer answers in order.
                    while let Some(front) = commits.front_mut() {
                        match (&mut front.committed).now_or_never() {
                            Some(result) => {
                                if let Some(batch) = commits.pop_front() {
                                    self.commit_done(result, batch, wbuf);
                                }
                            }
                            None => break,
                        }
                    }
                }
            }
        }
    }

    /// One wake-up's work: write what is pending, decode and handle every complete packet
    /// read, stage their acknowledgements behind the routed messages' commit, write again.
    async fn work<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
        commits: &mut std::collections::VecDeque<PendingCommit>,
        link_rx: &mut Option<Box<LinkRx>>,
        deadline: &mut Instant,
    ) -> Result<(), &'static str> {
        write_all(writer, wbuf).await.map_err(|_| "write failed")?;
        // Packets may already be buffered (read together with CONNECT).
        match self.drain_input(rbuf, wbuf).await {
            Ok(true) => *deadline = Instant::now() + self.keep_alive.unwrap_or(FAR),
            Ok(false) => {}
            Err(reason) => {
                // Acks read before the bad packet still count: no redelivery for them.
                self.inputs_acked_flush(wbuf);
                let _ = write_all(writer, wbuf).await;
                return Err(reason);
            }
        }
        self.inputs_acked_flush(wbuf);
        self.stage_acks(commits, wbuf);
        write_all(writer, wbuf).await.map_err(|_| "write failed")?;
        if let Some(rx) = self.new_link_rx.take() {
            *link_rx = Some(rx);
        }
        Ok(())
    }

    /// Handles `first` and everything else the router has queued for this link, in one go.
    async fn router_notifications<W: AsyncWrite + Unpin>(
        &mut self,
        first: Result<Option<Notification>, rumqttd::local::LinkError>,
        writer: &mut W,
        wbuf: &mut BytesMut,
        link_rx: &mut Option<Box<LinkRx>>,
    ) -> Result<(), &'static str> {
        let mut unscheduled = false;
        let mut next = first;
        loop {
            match next {
                Ok(Some(n)) => match self.on_notification(n, wbuf).await {
                    Some(Outcome::Unscheduled) => unscheduled = true,
                    Some(Outcome::Close) => return Err("closed by router"),
                    None => {}
                },
                Ok(None) => break,
                Err(_) => return Err("router link closed"),
            }
            next = match link_rx.as_mut().and_then(|rx| rx.next().now_or_never()) {
                Some(n) => n,
                None => break,
            };
        }
        write_all(writer, wbuf).await.map_err(|_| "write failed")?;
        if let (true, Some(rx)) = (unscheduled, link_rx.as_mut()) {
            rx.wake().await.map_err(|_| "router link closed")?;
        }
        Ok(())
    }

    /// Hands this batch's routed messages to the queue writer (not waiting) and parks its
    /// PUBACKs behind the commit; with nothing to commit and nothing pending, acks go now.
    fn stage_acks(
        &mut self,
        commits: &mut std::collections::VecDeque<PendingCommit>,
        wbuf: &mut BytesMut,
    ) {
        let acks = std::mem::take(&mut self.deferred_acks);
        if self.queued.is_empty() {
            if commits.is_empty() {
                write_acks(&acks, wbuf);
            } else if let Some(last) = commits.back_mut() {
                last.acks.extend(acks);
            }
            return;
        }
        let entries = std::mem::take(&mut self.queued);
        let sinks = crate::hub::Hub::sinks_of(&entries);
        let count = entries.len() as u64;
        let committed =
            fleethub_router::queue::Queue::append(&*self.hub.queues, entries, crate::c2d::now_ms());
        commits.push_back(PendingCommit {
            committed,
            acks,
            sinks,
            count,
        });
    }

    /// A batch's routed messages are stored (or were refused): release its PUBACKs.
    fn commit_done(
        &mut self,
        result: Result<(), fleethub_router::queue::QueueError>,
        batch: PendingCommit,
        wbuf: &mut BytesMut,
    ) {
        match result {
            Ok(()) => {
                self.hub.wake_sinks(batch.sinks.iter().map(String::as_str));
                write_acks(&batch.acks, wbuf);
            }
            Err(e) => {
                // Not stored, so not acknowledged: the device sends them again.
                self.hub.metrics.queue_refused.inc_by(batch.count);
                if !matches!(e, fleethub_router::queue::QueueError::Full) {
                    warn!(error = %e, "could not queue routed messages");
                }
            }
        }
    }

    /// Decodes and handles every complete packet in `rbuf`. Returns whether any was read.
    async fn drain_input(
        &mut self,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
    ) -> Result<bool, &'static str> {
        let max_payload = self.hub.config.limits.max_payload_bytes;
        let mut to_router: Vec<Packet> = Vec::new();
        let mut any = false;
        let result = loop {
            if rbuf.is_empty() {
                break Ok(());
            }
            // QoS 2 is not part of IoT Hub's MQTT; refuse it before decoding.
            if rbuf[0] >> 4 == 3 && (rbuf[0] >> 1) & 0b11 == 2 {
                self.protocol_error("qos2");
                break Err("QoS 2 publish");
            }
            // MQTT 3.1.1 §3.8.1, §3.10.1: SUBSCRIBE and UNSUBSCRIBE carry flags 0010; any
            // other value is malformed and closes the connection.
            if matches!(rbuf[0] >> 4, 8 | 10) && rbuf[0] & 0x0f != 0b0010 {
                self.protocol_error("malformed");
                break Err("bad SUBSCRIBE/UNSUBSCRIBE flags");
            }
            // QoS and packet id of a PUBLISH, read from its header: rumqttd keeps them private.
            self.current = peek_publish_ids(rbuf);
            let packet = match V4.read_mut(rbuf, max_payload + 64 * 1024) {
                Ok(p) => p,
                Err(CodecError::InsufficientBytes(_)) => break Ok(()),
                Err(CodecError::PayloadSizeLimitExceeded(_)) => {
                    self.protocol_error("payload_too_large");
                    break Err("payload too large");
                }
                Err(e) => {
                    debug!(error = %e, "malformed packet");
                    self.protocol_error("malformed");
                    break Err("malformed packet");
                }
            };
            any = true;
            if let Err(reason) = self.on_packet(packet, wbuf, &mut to_router) {
                break Err(reason);
            }
            // A subscription change is acknowledged only once the session holding it is
            // stored; later packets wait behind it so replies keep their order.
            if let Some(held) = self.held.take() {
                if let Err(e) = held.commit.await {
                    warn!(principal = ?self.principal, error = %e, "could not store the session");
                    break Err("session store failed");
                }
                wbuf.extend_from_slice(&held.out);
            }
        };
        if !to_router.is_empty() {
            // Boxed: the router hand-off is most of this future's size and only connections
            // that use the router (service clients, telemetry while someone watches) need it.
            Box::pin(self.send_to_router(to_router)).await?;
        }
        result.map(|()| any)
    }

    fn protocol_error(&self, reason: &str) {
        self.hub
            .metrics
            .protocol_errors
            .with_label_values(&[reason])
            .inc();
    }

    fn deny(&self, action: &str, topic: &str) {
        self.hub
            .metrics
            .authorization_denials
            .with_label_values(&[action])
            .inc();
        warn!(principal = ?self.principal, action, topic, "not authorized");
    }

    /// Hands a batch to the router with one wake-up.
    async fn send_to_router(&mut self, mut packets: Vec<Packet>) -> Result<(), &'static str> {
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        if self.link_tx.is_none() {
            let (tx, rx) = self
                .hub
                .core
                .link(format!("c{}", self.conn_id))
                .await
                .map_err(|e| {
                    warn!(error = %e, "router refused a link");
                    "router refused a link"
                })?;
            self.link_tx = Some(tx);
            self.new_link_rx = Some(Box::new(rx));
        }
        let Some(link) = self.link_tx.as_mut() else {
            return Err("router link closed");
        };
        {
            let mut buffer = link.buffer();
            buffer.extend(packets);
        }
        link.send(last)
            .await
            .map(|_| ())
            .map_err(|_| "router link closed")
    }

    fn on_packet(
        &mut self,
        packet: Packet,
        wbuf: &mut BytesMut,
        to_router: &mut Vec<Packet>,
    ) -> Result<(), &'static str> {
        match packet {
            Packet::Publish(mut publish, _) => {
                let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                    self.protocol_error("malformed");
                    return Err("topic not UTF-8");
                };
                // MQTT 3.1.1 §3.3.2.1: a topic name never holds wildcards.
                if topic.contains(['+', '#']) {
                    self.protocol_error("malformed");
                    return Err("wildcard in a PUBLISH topic");
                }
                let max = self.hub.config.limits.max_payload_bytes;
                if publish.payload.len() > max {
                    self.protocol_error("payload_too_large");
                    return Err("payload too large");
                }
                match topics::classify_publish(&self.principal, topic) {
                    Inbound::Telemetry { bag } => {
                        let Principal::Identity(key) = &self.principal else {
                            return Err("service connections cannot publish");
                        };
                        let mut message = match Message::from_bag(bag, publish.payload.clone()) {
                            Ok(m) => m,
                            Err(e) => {
                                warn!(principal = ?self.principal, error = %e, "bad property bag");
                                self.protocol_error("bad_property_bag");
                                return Err("bad property bag");
                            }
                        };
                        // Connection ids come from authentication, never from the client;
                        // only a gateway may forward another sender's ids.
                        let forwarded =
                            self.gateway && message.system.connection_device_id.is_some();
                        if !forwarded {
                            message.system.connection_device_id = Some(key.device.to_string());
                            message.system.connection_module_id =
                                key.module.as_ref().map(|m| m.to_string());
                        }
                        message.system.enqueued_time = Some(crate::registry::now_rfc3339());
                        let sender = if forwarded {
                            forwarded_sender(&message).unwrap_or_else(|| key.clone())
                        } else {
                            key.clone()
                        };
                        let bag = message.to_bag();
                        // The bag must fit the envelope that carries it to service subscribers.
                        if bag.len() > envelope::MAX_SUFFIX {
                            self.protocol_error("bad_property_bag");
                            return Err("property bag too long");
                        }
                        let origin = self
                            .hub
                            .origin(&sender, message.system.output_name.as_deref());
                        let entries = self.hub.dispatch(&message, Some(&bag), &origin, false);
                        self.queued.extend(entries);
                        self.hub.metrics.telemetry_messages.inc();
                        self.hub
                            .metrics
                            .telemetry_bytes
                            .inc_by(message.body.len() as u64);
                        self.hub.registry.touch(key);
                        // The hub acknowledges telemetry itself, in order, once routed; the
                        // router only carries it to service subscribers (monitor-events), so
                        // the envelope and topic are built only while there are some.
                        self.ack_locally();
                        let subscribers = self
                            .hub
                            .event_subscribers
                            .load(std::sync::atomic::Ordering::Relaxed);
                        if subscribers > 0 {
                            if let Some(payload) = envelope::pack(&bag, &message.body) {
                                publish.topic = if forwarded {
                                    topics::telemetry_topic(&sender)
                                } else {
                                    self.telemetry_topic.clone()
                                }
                                .into();
                                publish.payload = payload;
                                publish.retain = false;
                                to_router.push(Packet::Publish(publish, None));
                            }
                        }
                    }
                    Inbound::TwinGet { query } => {
                        if let Principal::Identity(key) = &self.principal {
                            let twin = self.hub.twins.get(key);
                            let body = crate::twin::view::device_json(&twin).to_string();
                            self.hub
                                .twin_response(key, 200, query, None, body.as_bytes());
                            self.hub.metrics.twin_reads.with_label_values(&["ok"]).inc();
                        }
                        self.ack_locally();
                    }
                    Inbound::TwinReportedPatch { query } => {
                        if let Principal::Identity(key) = &self.principal {
                            self.reported_patch(key.clone(), query, &publish.payload);
                        }
                        self.ack_locally();
                    }
                    Inbound::MethodResponse { status, query } => {
                        if let Principal::Identity(key) = &self.principal {
                            let rid = crate::methods::query_param(query, "$rid").unwrap_or("");
                            let payload =
                                serde_json::from_slice(&publish.payload).unwrap_or_else(|_| {
                                    serde_json::Value::String(
                                        String::from_utf8_lossy(&publish.payload).into_owned(),
                                    )
                                });
                            let reply = crate::methods::MethodReply {
                                status: status.parse().unwrap_or(500),
                                payload,
                            };
                            if !self.hub.methods.complete(key, rid, reply) {
                                debug!(identity = %key, rid, "method reply for no waiting call");
                            }
                        }
                        self.ack_locally();
                    }
                    Inbound::Denied => {
                        self.deny("publish", topic);
                        return Err("publish not authorized");
                    }
                }
            }
            Packet::Subscribe(subscribe, _) => self.on_subscribe(subscribe, wbuf, to_router),
            Packet::Unsubscribe(unsubscribe, _) => {
                self.on_unsubscribe(unsubscribe, wbuf, to_router)
            }
            Packet::PubAck(ack, _) if ack.pkid >= C2D_PKID_BASE => self.c2d_acked(ack.pkid, wbuf),
            Packet::PubAck(ack, _) => to_router.push(Packet::PubAck(ack, None)),
            Packet::PingReq(_) => {
                let _ = V4.write(Packet::PingResp(PingResp), wbuf);
            }
            Packet::Disconnect(..) => return Err("client disconnected"),
            Packet::Connect(..) => {
                self.protocol_error("second_connect");
                return Err("second CONNECT");
            }
            _ => {
                self.protocol_error("unexpected_packet");
                return Err("unexpected packet");
            }
        }
        Ok(())
    }

    /// Validates a reported patch and queues it; the answer (204 with the new version, or 400
    /// with the reason) is published once the patch is committed.
    fn reported_patch(&self, key: IdentityKey, query: &str, body: &[u8]) {
        use crate::twin::{doc, TwinOp};
        let parsed = serde_json::from_slice::<serde_json::Value>(body)
            .map_err(|e| doc::PatchError::NotJson(e.to_string()))
            .and_then(|v| doc::validate("properties.reported", v));
        let patch = match parsed {
            Ok(p) => p,
            Err(e) => {
                let body = serde_json::json!({ "message": e.to_string() }).to_string();
                self.hub
                    .twin_response(&key, 400, query, None, body.as_bytes());
                self.hub
                    .metrics
                    .twin_patches
                    .with_label_values(&["reported", "bad_request"])
                    .inc();
                return;
            }
        };
        let committed = self
            .hub
            .twins
            .submit(key.clone(), TwinOp::Reported(patch.clone()));
        let (hub, query) = (self.hub.clone(), query.to_string());
        tokio::spawn(async move {
            match committed.await {
                Ok(applied) => {
                    hub.twin_response(&key, 204, &query, Some(applied.twin.reported.version), b"");
                    hub.metrics
                        .twin_patches
                        .with_label_values(&["reported", "ok"])
                        .inc();
                    hub.twin_changed(&key, &patch, applied.twin.reported.version);
                    if !hub.deployments.is_empty() {
                        // Reported properties may select deployments.
                        let _ = crate::deploy::targeted::reconcile(&hub, vec![key.device.clone()])
                            .await;
                    }
                }
                Err(e) => {
                    let body = serde_json::json!({ "message": e.to_string() }).to_string();
                    hub.twin_response(&key, 500, &query, None, body.as_bytes());
                    hub.metrics
                        .twin_patches
                        .with_label_values(&["reported", "error"])
                        .inc();
                }
            }
        });
    }

    /// Sends queued C2D messages while the window has room.
    fn c2d_fill(&mut self, wbuf: &mut BytesMut) {
        let Principal::Identity(key) = &self.principal else {
            return;
        };
        if key.module.is_some() {
            // Woken: new entries, possibly of a higher priority than the cursors.
            if let Some(inputs) = self.c2d.inputs.as_mut() {
                inputs.cursor.clear();
            }
            return self.inputs_fill(wbuf);
        }
        if key.module.is_some() || !self.c2d.active {
            return;
        }
        let room = C2D_WINDOW.saturating_sub(self.c2d.inflight.len());
        if room == 0 {
            return;
        }
        let device = key.device.as_str();
        match self.hub.c2d.pending(device, self.c2d.last_seq, room) {
            Ok((messages, expired)) => {
                self.hub
                    .metrics
                    .c2d_messages
                    .with_label_values(&["expired"])
                    .inc_by(expired);
                for m in messages {
                    let topic = format!("devices/{device}/messages/devicebound/{}", m.bag(device));
                    let pkid = self.c2d.pkid();
                    let p = publish_with(&topic, &m.body_bytes(), QoS::AtLeastOnce, pkid, false);
                    let _ = V4.write(Packet::Publish(p, None), wbuf);
                    self.c2d.inflight.push_back((pkid, m.seq));
                    self.c2d.last_seq = m.seq;
                }
            }
            Err(e) => warn!(identity = %key, error = %e, "cannot read the C2D queue"),
        }
    }

    /// The device acknowledged a C2D message: it leaves the queue.
    fn c2d_acked(&mut self, pkid: u16, wbuf: &mut BytesMut) {
        if let Some(inputs) = self.c2d.inputs.as_mut() {
            if let Some(key) = inputs.inflight.remove(&pkid) {
                // A module took a routed message: it leaves its queue with the rest of the
                // batch (`inputs_acked_flush`).
                inputs.keys.remove(&key);
                inputs.acked.push(key);
                return;
            }
        }
        let Some(pos) = self.c2d.inflight.iter().position(|(p, _)| *p == pkid) else {
            return;
        };
        let Some((_, seq)) = self.c2d.inflight.remove(pos) else {
            return;
        };
        if let Principal::Identity(key) = &self.principal {
            let (hub, device) = (self.hub.clone(), key.device.to_string());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = hub.c2d.remove_many(&device, &[seq]) {
                    warn!(device, error = %e, "cannot remove a delivered C2D message");
                }
            });
            self.hub
                .metrics
                .c2d_messages
                .with_label_values(&["delivered"])
                .inc();
        }
        self.c2d_fill(wbuf);
    }

    /// The routed messages acknowledged in this read batch leave their queues (one call),
    /// are counted (one metric update per sink) and the window is refilled once.
    fn inputs_acked_flush(&mut self, wbuf: &mut BytesMut) {
        let Some(inputs) = self.c2d.inputs.as_mut() else {
            return;
        };
        if inputs.acked.is_empty() {
            return;
        }
        let mut acked = std::mem::take(&mut inputs.acked);
        acked.sort_by(|a, b| a.sink.cmp(&b.sink));
        for run in acked.chunk_by(|a, b| a.sink == b.sink) {
            self.hub
                .metrics
                .sink_messages
                .with_label_values(&[&run[0].sink, "delivered"])
                .inc_by(run.len() as u64);
        }
        fleethub_router::queue::Queue::remove(&*self.hub.queues, acked);
        self.inputs_fill(wbuf);
    }

    /// Delivers routed messages from this module's input queues (`/modules/{m}/inputs/*`),
    /// highest priority first, while the window has room.
    fn inputs_fill(&mut self, wbuf: &mut BytesMut) {
        use fleethub_router::queue::Queue;
        let Principal::Identity(key) = &self.principal else {
            return;
        };
        let Some(module) = &key.module else {
            return;
        };
        if !self.c2d.active {
            return;
        }
        let prefix = format!("/modules/{module}/inputs/");
        let sinks: Vec<String> = self
            .hub
            .queues
            .sinks()
            .into_iter()
            .filter(|(s, _)| s.starts_with(&prefix))
            .map(|(s, _)| s)
            .collect();
        let now = crate::c2d::now_ms();
        let mut inputs = self.c2d.inputs.take().unwrap_or_default();
        for sink in sinks {
            let room = INPUT_WINDOW.saturating_sub(inputs.inflight.len());
            if room == 0 {
                break;
            }
            let cursor = inputs.cursor.get(&sink).cloned();
            let peeked =
                match self
                    .hub
                    .queues
                    .peek_after(&sink, cursor.as_ref(), &inputs.keys, room, now)
                {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(sink, error = %e, "cannot read a module input queue");
                        continue;
                    }
                };
            let input = &sink[prefix.len()..];
            let last = peeked.entries.last().map(|e| e.key.clone());
            for entry in peeked.entries {
                let topic = format!(
                    "devices/{}/modules/{module}/inputs/{input}/{}",
                    key.device, entry.bag
                );
                let pkid = self.c2d.pkid();
                let p = publish_with(&topic, &entry.body, QoS::AtLeastOnce, pkid, false);
                let _ = V4.write(Packet::Publish(p, None), wbuf);
                inputs.keys.insert(entry.key.clone());
                inputs.inflight.insert(pkid, entry.key);
            }
            if let Some(last) = last {
                inputs.cursor.insert(sink, last);
            }
        }
        self.c2d.inputs = Some(inputs);
    }

    /// PUBACK a QoS 1 publish the hub handled itself. Acknowledgements wait until the end of
    /// the read batch, after its routed messages are committed to their queues, and go out
    /// in the order the publishes came in.
    fn ack_locally(&mut self) {
        if let Some((1, pkid)) = self.current {
            self.deferred_acks.push(pkid);
        }
    }

    /// A message for this identity alone: written if one of its filters asks for it.
    fn on_direct(&mut self, d: crate::hub::Direct, wbuf: &mut BytesMut) {
        let Principal::Identity(key) = &self.principal else {
            return;
        };
        let topic = format!("{}{}", topics::client_prefix(key, d.delivery), d.suffix);
        if !self
            .filters
            .iter()
            .any(|f| topics::filter_matches(&f.client, &topic))
        {
            return;
        }
        let retain = d.delivery == Delivery::DesiredState;
        let publish =
            rumqttd::protocol::Publish::new(bytes::Bytes::from(topic.into_bytes()), d.body, retain);
        let _ = V4.write(Packet::Publish(publish, None), wbuf);
    }

    fn on_subscribe(
        &mut self,
        subscribe: Subscribe,
        wbuf: &mut BytesMut,
        to_router: &mut Vec<Packet>,
    ) {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut forward = Vec::new();
        let mut send_state = false;
        for f in &subscribe.filters {
            let granted = if f.qos == QoS::AtMostOnce {
                QoS::AtMostOnce
            } else {
                // IoT Hub has no QoS 2; grant at most 1.
                QoS::AtLeastOnce
            };
            match topics::map_filter(&self.principal, &f.path) {
                Some(mapped) if matches!(self.principal, Principal::Identity(_)) => {
                    // An identity's own topics are served by the front end, not the router.
                    if let Principal::Identity(key) = &self.principal {
                        send_state |=
                            mapped.internal == topics::internal_topic(key, Delivery::DesiredState);
                    }
                    codes.push(Some(SubscribeReasonCode::Success(granted)));
                    self.filters.retain(|m| m.client != mapped.client);
                    self.filters.push(mapped);
                }
                Some(mapped) => {
                    codes.push(None);
                    forward.push(router_filter(&mapped.internal, granted));
                    self.filters.retain(|m| m.client != mapped.client);
                    self.filters.push(mapped);
                }
                None => {
                    self.deny("subscribe", &f.path);
                    codes.push(Some(SubscribeReasonCode::Failure));
                }
            }
        }
        self.filters_changed();
        let commit = self.store_session();
        let mut out = BytesMut::new();
        if forward.is_empty() {
            let return_codes = codes
                .into_iter()
                .map(|c| c.unwrap_or(SubscribeReasonCode::Failure))
                .collect();
            let ack = SubAck {
                pkid: subscribe.pkid,
                return_codes,
            };
            let _ = V4.write(Packet::SubAck(ack, None), &mut out);
            if send_state {
                // The desired document acts as a retained message: it follows the SUBACK.
                self.send_desired_state(&mut out);
            }
        } else {
            let subs = self.router_subs.get_or_insert_with(Default::default);
            subs.pending.retain(|(p, _)| *p != subscribe.pkid);
            subs.pending.push((subscribe.pkid, codes));
            let sub = Subscribe {
                pkid: subscribe.pkid,
                filters: forward,
            };
            to_router.push(Packet::Subscribe(sub, None));
        }
        self.hold_or_write(commit, out, wbuf);
    }

    /// What follows a change of this connection's filters: C2D / inputs delivery on or off,
    /// the API's view of whether methods can be taken, the telemetry subscriber count.
    fn filters_changed(&mut self) {
        self.update_c2d_active();
        if let Principal::Identity(key) = &self.principal {
            let internal = topics::internal_topic(key, Delivery::MethodRequest);
            let listening = self.filters.iter().any(|f| f.internal == internal);
            self.mailbox.methods.store(listening, Ordering::Relaxed);
        }
        if self.principal == Principal::Service
            && !self.filters.is_empty()
            && !self.counted_subscriber
        {
            self.counted_subscriber = true;
            self.hub
                .event_subscribers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// For a persistent session whose filters differ from the stored ones: the write that
    /// stores them (to be committed before the client's SUBACK / UNSUBACK).
    fn store_session(&mut self) -> Option<HeldCommit> {
        if !self.persistent {
            return None;
        }
        let filters: Vec<String> = self.filters.iter().map(|f| f.client.clone()).collect();
        if self.stored_filters == Some(filters_digest(&filters)) {
            // A client subscribing again to what it has (rumqttc after a reconnect).
            return None;
        }
        self.stored_filters = Some(filters_digest(&filters));
        Some(Box::pin(self.hub.sessions.put(&self.session_key, filters)))
    }

    fn hold_or_write(&mut self, commit: Option<HeldCommit>, out: BytesMut, wbuf: &mut BytesMut) {
        match commit {
            Some(commit) => self.held = Some(Box::new(HeldReply { commit, out })),
            None => wbuf.extend_from_slice(&out),
        }
    }

    /// The desired document on `$fleethub/twin/desired/` (fleethub's retained form).
    /// Nothing until something was set.
    fn send_desired_state(&mut self, out: &mut BytesMut) {
        let Principal::Identity(key) = &self.principal else {
            return;
        };
        let twin = self.hub.twins.get(key);
        if twin.desired.version <= 1 && twin.desired.data.is_empty() {
            return;
        }
        let d = crate::hub::Direct {
            delivery: Delivery::DesiredState,
            suffix: format!("?$version={}", twin.desired.version),
            body: twin.desired.with_version().to_string().into(),
        };
        self.on_direct(d, out);
    }

    /// Resumes a stored session (CONNACK session-present 1 is already written): its filters
    /// are in force again without a SUBSCRIBE; queued C2D and module inputs flow; a device
    /// listening for desired patches gets one that brings whatever copy it holds up to its
    /// twin (changes made while it was away, removals as `null`).
    async fn resume(
        &mut self,
        filters: Vec<String>,
        wbuf: &mut BytesMut,
    ) -> Result<(), &'static str> {
        let mut forward = Vec::new();
        for client in &filters {
            let Some(mapped) = topics::map_filter(&self.principal, client) else {
                continue;
            };
            if self.principal == Principal::Service
                && !forward.iter().any(|f: &Filter| f.path == mapped.internal)
            {
                forward.push(router_filter(&mapped.internal, QoS::AtLeastOnce));
            }
            self.filters.retain(|m| m.client != mapped.client);
            self.filters.push(mapped);
        }
        self.filters_changed();
        self.hub.metrics.sessions_resumed.inc();
        if let Principal::Identity(key) = &self.principal {
            let key = key.clone();
            let patch_topic = topics::internal_topic(&key, Delivery::DesiredPatch);
            if self.filters.iter().any(|f| f.internal == patch_topic) {
                let twin = self.hub.twins.get(&key);
                if twin.desired.version > 1 || !twin.desired.data.is_empty() {
                    let d = crate::hub::Direct {
                        delivery: Delivery::DesiredPatch,
                        suffix: format!("?$version={}", twin.desired.version),
                        body: twin.desired.resume_patch().to_string().into(),
                    };
                    self.on_direct(d, wbuf);
                }
            }
            let state_topic = topics::internal_topic(&key, Delivery::DesiredState);
            if self.filters.iter().any(|f| f.internal == state_topic) {
                self.send_desired_state(wbuf);
            }
        }
        if !forward.is_empty() {
            // Packet ids the client cannot have in flight yet: it sent nothing so far.
            let pkid = 1;
            self.router_subs
                .get_or_insert_with(Default::default)
                .restoring
                .push(pkid);
            let sub = Subscribe {
                pkid,
                filters: forward,
            };
            self.send_to_router(vec![Packet::Subscribe(sub, None)])
                .await?;
        }
        Ok(())
    }

    /// C2D flows while a device has a filter on its devicebound topic.
    fn update_c2d_active(&mut self) {
        let Principal::Identity(key) = &self.principal else {
            return;
        };
        if key.module.is_some() && key.device != self.hub.config.hub_id {
            return;
        }
        let own = topics::internal_topic(key, Delivery::Own);
        let active = self.filters.iter().any(|f| f.internal == own);
        if active && !self.c2d.active {
            self.mailbox.wake_c2d();
        }
        self.c2d.active = active;
    }

    fn on_unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        wbuf: &mut BytesMut,
        to_router: &mut Vec<Packet>,
    ) {
        let mut internal = Vec::new();
        let local = matches!(self.principal, Principal::Identity(_));
        for f in &unsubscribe.filters {
            if let Some(mapped) = topics::map_filter(&self.principal, f) {
                self.filters.retain(|m| m.client != mapped.client);
                // Leave the router filter while another client filter still needs it.
                if !local && !self.filters.iter().any(|m| m.internal == mapped.internal) {
                    internal.push(mapped.internal);
                }
            }
        }
        self.filters_changed();
        let commit = self.store_session();
        let mut out = BytesMut::new();
        if internal.is_empty() {
            let ack = UnsubAck {
                pkid: unsubscribe.pkid,
                reasons: vec![],
            };
            let _ = V4.write(Packet::UnsubAck(ack, None), &mut out);
        } else {
            let unsub = Unsubscribe {
                pkid: unsubscribe.pkid,
                filters: internal,
            };
            to_router.push(Packet::Unsubscribe(unsub, None));
        }
        self.hold_or_write(commit, out, wbuf);
    }

    async fn on_notification(&mut self, n: Notification, wbuf: &mut BytesMut) -> Option<Outcome> {
        use rumqttd::protocol::Packet as P;
        match n {
            Notification::Forward(forward) => {
                let mut publish = forward.publish;
                let delivered = std::str::from_utf8(&publish.topic)
                    .ok()
                    .zip(envelope::unpack(&publish.payload))
                    .and_then(|(topic, (suffix, body))| {
                        let principal = &self.principal;
                        self.client_topics
                            .get_or_insert_with(|| Box::new(topics::ClientTopics::new(principal)))
                            .to_client(topic, suffix)
                            .map(|t| (t, body))
                    })
                    .filter(|(t, _)| {
                        self.filters
                            .iter()
                            .any(|f| topics::filter_matches(&f.client, t))
                    });
                match delivered {
                    Some((topic, body)) => {
                        publish.topic = topic.into();
                        publish.payload = body;
                        let _ = V4.write(P::Publish(publish, None), wbuf);
                    }
                    None => {
                        // Not for this client's filters: settle it with the router so its
                        // inflight window does not stall.
                        let (qos, pkid) = publish_ids(&publish);
                        if qos == 1 {
                            let ack = PubAck {
                                pkid,
                                reason: PubAckReason::Success,
                            };
                            if let Some(tx) = &mut self.link_tx {
                                let _ = tx.send(P::PubAck(ack, None)).await;
                            }
                        }
                    }
                }
                None
            }
            Notification::DeviceAck(ack) => {
                let packet: P = ack.into();
                match packet {
                    P::SubAck(suback, _)
                        if self
                            .router_subs
                            .as_ref()
                            .is_some_and(|r| r.restoring.contains(&suback.pkid)) =>
                    {
                        if let Some(r) = self.router_subs.as_mut() {
                            r.restoring.retain(|p| *p != suback.pkid);
                        }
                    }
                    P::SubAck(suback, _) => {
                        let pending = self.router_subs.as_mut().and_then(|r| {
                            r.pending
                                .iter()
                                .position(|(p, _)| *p == suback.pkid)
                                .map(|i| r.pending.swap_remove(i).1)
                        });
                        let return_codes = match pending {
                            Some(codes) => {
                                let mut router = suback.return_codes.into_iter();
                                codes
                                    .into_iter()
                                    .map(|c| {
                                        c.or_else(|| router.next())
                                            .unwrap_or(SubscribeReasonCode::Failure)
                                    })
                                    .collect()
                            }
                            None => suback.return_codes,
                        };
                        let ack = SubAck {
                            pkid: suback.pkid,
                            return_codes,
                        };
                        let _ = V4.write(P::SubAck(ack, None), wbuf);
                    }
                    // Telemetry was acknowledged by the front end already.
                    P::PingResp(_) | P::ConnAck(..) | P::PubAck(..) => {}
                    other => {
                        let _ = V4.write(other, wbuf);
                    }
                }
                None
            }
            Notification::Unschedule => Some(Outcome::Unscheduled),
            Notification::Disconnect(..) => Some(Outcome::Close),
            _ => None,
        }
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
            Result<(), fleethub_router::queue::QueueError>,
            PendingCommit,
        )>,
    ),
}

/// A deadline that never comes (no keep-alive, a token without expiry).
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// The next router notification, or never while the connection has no link. The link's
/// own future (about 300 bytes) is boxed so connections without a link, most of a fleet,
/// do not carry room for it.
async fn next_notification(
    rx: &mut Option<Box<LinkRx>>,
) -> Box<Result<Option<Notification>, rumqttd::local::LinkError>> {
    match rx {
        Some(rx) => Box::new(Box::pin(rx.next()).await),
        None => std::future::pending().await,
    }
}

/// A read batch waiting for its routed messages to be committed.
struct PendingCommit {
    committed: fleethub_router::queue::AppendFuture,
    acks: Vec<u16>,
    /// The distinct sinks the batch's entries went to, woken once they are committed.
    sinks: Vec<String>,
    count: u64,
}

/// Waits for the oldest pending commit and takes it off the queue.
async fn next_commit(
    commits: &mut std::collections::VecDeque<PendingCommit>,
) -> Option<(
    Result<(), fleethub_router::queue::QueueError>,
    PendingCommit,
)> {
    let result = (&mut commits.front_mut()?.committed).await;
    commits.pop_front().map(|batch| (result, batch))
}

fn write_acks(acks: &[u16], wbuf: &mut BytesMut) {
    for pkid in acks {
        let ack = PubAck {
            pkid: *pkid,
            reason: PubAckReason::Success,
        };
        let _ = V4.write(Packet::PubAck(ack, None), wbuf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn read_size_grows_while_reads_fill_and_shrinks_when_quiet() {
        let mut size = ReadSize::new();
        let mut buf = BytesMut::with_capacity(READ_BUF_IDLE);
        // A busy client: every read fills the room it had.
        for _ in 0..12 {
            let room = size.prepare(&mut buf);
            assert!(room >= 64, "room {room}");
            buf.extend_from_slice(&vec![0u8; room]);
            size.read(room, room);
            buf.clear();
        }
        assert_eq!(size.want, READ_BUF_KEEP);
        assert!(size.prepare(&mut buf) >= READ_BUF_KEEP / 2);
        // Quiet again: small reads halve it, and the large buffer is given back.
        for _ in 0..12 {
            let room = size.prepare(&mut buf);
            size.read(2, room);
        }
        assert_eq!(size.want, READ_BUF_IDLE);
        size.prepare(&mut buf);
        assert!(buf.capacity() <= 2 * READ_BUF_IDLE, "{}", buf.capacity());
    }

    #[test]
    fn connect_flags_are_read_from_the_header() {
        // CONNECT, remaining length 12, "MQTT", level 4, flags 0b1100_0011.
        let mut p = vec![0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b1100_0011];
        assert_eq!(connect_flags(&p), Some(0b1100_0011));
        p.truncate(9);
        assert_eq!(connect_flags(&p), None, "not all there yet");
        assert_eq!(connect_flags(&[0x30, 0]), None, "not a CONNECT");
    }

    #[test]
    fn peeked_ids_match_the_encoded_publish() {
        for (qos, pkid, topic_len, payload_len) in [
            (1, 7, 3, 5),
            (1, 65535, 300, 20000),
            (0, 0, 10, 0),
            (1, 1, 0, 0),
        ] {
            let topic = "t".repeat(topic_len);
            let qos_level = if qos == 1 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            let p = publish_with(&topic, &vec![1u8; payload_len], qos_level, pkid, false);
            let mut buf = BytesMut::new();
            V4.write(Packet::Publish(p, None), &mut buf).unwrap();
            assert_eq!(
                peek_publish_ids(&buf),
                Some((qos, if qos == 1 { pkid } else { 0 }))
            );
        }
        assert_eq!(peek_publish_ids(&[0x30]), None);
        assert_eq!(peek_publish_ids(&[0x82, 0x02, 0, 1]), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn peek_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = peek_publish_ids(&bytes);
            let _ = connect_flags(&bytes);
        }

        /// Whatever a client sends, decoding returns a packet or an error, never a panic.
        #[test]
        fn codec_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..8 {
                if V4.read_mut(&mut buf, 1024).is_err() {
                    break;
                }
            }
        }

        /// Same, for inputs that start like a real packet of each type.
        #[test]
        fn codec_never_panics_on_plausible_headers(
            kind in 1u8..16, flags in 0u8..16, len in 0u8..128,
            body in proptest::collection::vec(any::<u8>(), 0..160),
        ) {
            let mut bytes = vec![(kind << 4) | flags, len];
            bytes.extend(body);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = V4.read_mut(&mut buf, 1024);
        }
    }
}
