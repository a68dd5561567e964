//! Opening a connection: the first packet must be a CONNECT within the connect timeout; its
//! credentials are checked (a device or module SAS token, or the admin token for a service
//! connection), a second connection with the same id takes over, the CONNACK is written and
//! a stored session (clean session 0) is resumed.

use super::*;

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
    #[error("{0} authenticates with an X.509 certificate and sent none")]
    NoCertificate(String),
    #[error("the client certificate's thumbprint is not {0}'s")]
    WrongThumbprint(String),
    #[error("the client certificate does not authenticate {0}: {1}")]
    Certificate(String, String),
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
    client_chain: &[Vec<u8>],
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
    let identity = hub
        .registry
        .get(&key)
        .ok_or_else(|| Refusal::Unknown(client_id.to_string()))?;
    if identity.status == Status::Disabled {
        return Err(Refusal::Disabled(client_id.to_string()));
    }
    if identity.authentication.kind == crate::registry::AUTH_SELF_SIGNED {
        // The TLS handshake proved the client holds the certificate's key; its thumbprint
        // must be registered. No token, so no expiry: the certificate is the credential.
        let der = client_chain
            .first()
            .ok_or_else(|| Refusal::NoCertificate(client_id.to_string()))?;
        let registered = identity.authentication.x509_thumbprint.as_ref();
        let thumbprints = registered
            .into_iter()
            .flat_map(|t| [&t.primary_thumbprint, &t.secondary_thumbprint])
            .filter_map(|t| t.as_deref());
        if !crate::x509::matches_thumbprint(der, thumbprints) {
            return Err(Refusal::WrongThumbprint(client_id.to_string()));
        }
        return Ok((Principal::Identity(key), None));
    }
    if identity.authentication.kind == crate::registry::AUTH_CA {
        // Chains to a verified CA and names the device in its common name.
        if client_chain.is_empty() {
            return Err(Refusal::NoCertificate(client_id.to_string()));
        }
        hub.certificates
            .authenticates(client_chain, key.device.as_str())
            .map_err(|why| Refusal::Certificate(client_id.to_string(), why))?;
        return Ok((Principal::Identity(key), None));
    }
    if password.is_empty() {
        return Err(Refusal::NoPassword);
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

/// Answers a CONNECT with a refusal `code` (the caller then closes the connection).
async fn refuse<W: AsyncWrite + Unpin>(
    writer: &mut W,
    wbuf: &mut BytesMut,
    code: ConnectReturnCode,
) {
    let ack = ConnAck {
        session_present: false,
        code,
    };
    let _ = V4.write(Packet::ConnAck(ack, None), wbuf);
    let _ = write_all(writer, wbuf).await;
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

/// The connect-flags byte of a CONNECT at the start of `buf`, once enough of it is there.
pub(super) fn connect_flags(buf: &[u8]) -> Option<u8> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let i = variable_header_at(buf)?;
    let name_len = u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]) as usize;
    // Protocol name, then the level byte, then the flags.
    buf.get(i + 2 + name_len + 1).copied()
}

/// An accepted connection, ready to run.
pub(super) struct Open {
    pub(super) session: Session,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
    pub(super) token_deadline: Option<Instant>,
}

/// Reads and checks the CONNECT, answers it, and resumes a stored session; `None` when the
/// connection is refused or fails on the way (the CONNACK, if any, is written).
pub(super) async fn open<R, W>(
    reader: &mut R,
    writer: &mut W,
    peer: SocketAddr,
    hub: SharedHub,
    client_chain: Vec<Vec<u8>>,
) -> Option<Open>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Small to start: most of a fleet is idle connections. The read buffer grows while
    // reads fill it (`ReadSize`); the write buffer as packets are written.
    let mut rbuf = BytesMut::with_capacity(READ_BUF_START);
    let mut wbuf = BytesMut::new();
    let timeout = hub.limits.connect_timeout();
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
    // Zero-touch provisioning (DPS) shares the listener: its own protocol, then the end.
    if let Some(l) = login.as_ref() {
        if crate::provisioning::mqtt::is_provisioning(&hub, &l.username) {
            crate::provisioning::mqtt::serve(
                reader,
                writer,
                rbuf,
                crate::provisioning::mqtt::Attempt {
                    registration_id: &connect.client_id,
                    username: &l.username,
                    password: &l.password,
                    peer,
                },
                hub,
            )
            .await;
            return None;
        }
    }
    let (principal, token_expiry) = match authenticate(
        &hub,
        &connect.client_id,
        login.as_ref(),
        &client_chain,
    ) {
        Ok(p) => p,
        Err(refusal) => {
            hub.metrics
                .connection_attempts
                .with_label_values(&[refusal.metric_label()])
                .inc();
            info!(%peer, client_id = %connect.client_id, reason = %refusal, "connection refused");
            refuse(writer, &mut wbuf, ConnectReturnCode::NotAuthorized).await;
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
        match hub.sessions.get(&session_key).await {
            Ok(found) => found,
            Err(e) => {
                // Refuse rather than pretend there was no session: the client retries.
                warn!(client_id = %connect.client_id, error = %e, "could not read a stored session");
                refuse(writer, &mut wbuf, ConnectReturnCode::ServiceUnavailable).await;
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
        // In a cluster: the previous connection on another node closes too, and what other
        // nodes address to this identity comes here.
        if let Some(bus) = hub.cluster.bus() {
            bus.attach(key, conn_id).await;
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
        queued: crate::hub::Routed::default(),
        deferred_acks: Vec::new(),
        current: None,
        counted_subscriber: false,
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
        inputs: None,
        queue_pkids: QueuePkids::default(),
        events: None,
        mailbox,
        keep_alive: match connect.keep_alive {
            0 => None,
            k => Some(Duration::from_millis(k as u64 * 1500)),
        },
        persistent: !connect.clean_session,
        stored_filters: resumed.as_ref().map(|s| filters_digest(&s.filters)),
        session_key,
        held: None,
        held_publishes: None,
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
