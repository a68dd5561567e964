//! DPS's MQTT protocol, on the hub's MQTTS listener: a CONNECT whose username is
//! `{idScope}/registrations/{registrationId}/…` and whose password is a SAS token for
//! `{idScope}/registrations/{registrationId}` (with or without `skn=registration`; the Python
//! SDK omits it) signed with the device's key; then `$dps/registrations/PUT/iotdps-register/
//! ?$rid=…` answered 202 `assigning` with an operation id, and
//! `$dps/registrations/GET/iotdps-get-operationstatus/?$rid=…&operationId=…` answered 200
//! `assigned` with the hub and device id (or the refusal's status code).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Packet, PingResp, Protocol, PubAck, PubAckReason, QoS, SubAck,
    SubscribeReasonCode,
};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use super::register;
use crate::enrollment::Enrollment;
use crate::hub::SharedHub;

/// Whether a CONNECT's username is a provisioning one for this hub's ID scope.
pub fn is_provisioning(hub: &SharedHub, username: &str) -> bool {
    username
        .strip_prefix(hub.config.provisioning.id_scope.as_str())
        .is_some_and(|rest| rest.starts_with("/registrations/"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The enrollment whose key signed `password` for `registration_id`, with the device keys.
fn attest(
    hub: &SharedHub,
    registration_id: &str,
    password: &str,
) -> Option<(Enrollment, String, String)> {
    let token = crate::sas::SasToken::parse(password).ok()?;
    let resource = format!(
        "{}/registrations/{registration_id}",
        hub.config.provisioning.id_scope
    );
    let t = now();
    hub.enrollments.attest(registration_id, |key| {
        token.verify(&resource, key, t).is_ok()
    })
}

async fn flush<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) -> std::io::Result<()> {
    if !buf.is_empty() {
        w.write_all(buf).await?;
        buf.clear();
        w.flush().await?;
    }
    Ok(())
}

fn respond(buf: &mut BytesMut, status: u16, rid: &str, extra: &str, body: serde_json::Value) {
    let topic = format!("$dps/registrations/res/{status}/?$rid={rid}{extra}");
    let publish = crate::core::publish_with(
        &topic,
        body.to_string().as_bytes(),
        QoS::AtMostOnce,
        0,
        false,
    );
    let _ = V4.write(Packet::Publish(publish, None), buf);
}

/// The value of `name` in a topic's query string.
fn query_value<'a>(topic: &'a str, name: &str) -> Option<&'a str> {
    topic
        .split_once('?')?
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// A provisioning client's CONNECT: who it says it is and its token.
pub struct Attempt<'a> {
    /// The CONNECT's client id: the registration id.
    pub registration_id: &'a str,
    pub username: &'a str,
    pub password: &'a str,
    pub peer: SocketAddr,
}

/// Serves one provisioning client after its CONNECT: answers it, then registrations and
/// status polls until the client leaves or goes quiet.
pub async fn serve<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut rbuf: BytesMut,
    attempt: Attempt<'_>,
    hub: SharedHub,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Attempt {
        registration_id,
        username,
        password,
        peer,
    } = attempt;
    let mut wbuf = BytesMut::new();
    let named = username
        .split('/')
        .nth(2)
        .is_some_and(|r| r == registration_id);
    let attested = if named {
        attest(&hub, registration_id, password)
    } else {
        None
    };
    let Some((enrollment, primary, secondary)) = attested else {
        hub.metrics
            .provisioning
            .with_label_values(&["not_authorized"])
            .inc();
        info!(%peer, registration_id, "provisioning refused: no enrollment's key signed the token");
        let ack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::NotAuthorized,
        };
        let _ = V4.write(Packet::ConnAck(ack, None), &mut wbuf);
        let _ = flush(writer, &mut wbuf).await;
        return;
    };
    let ack = ConnAck {
        session_present: false,
        code: ConnectReturnCode::Success,
    };
    let _ = V4.write(Packet::ConnAck(ack, None), &mut wbuf);
    if flush(writer, &mut wbuf).await.is_err() {
        return;
    }
    // Operation ids handed out on this connection, and what each came to.
    let mut operations: HashMap<String, (u16, serde_json::Value)> = HashMap::new();
    loop {
        let packet = loop {
            match V4.read_mut(&mut rbuf, 64 * 1024) {
                Ok(p) => break p,
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {}
                Err(e) => {
                    debug!(%peer, error = %e, "provisioning: malformed packet");
                    return;
                }
            }
            rbuf.reserve(1024);
            match tokio::time::timeout(Duration::from_secs(120), reader.read_buf(&mut rbuf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        };
        match packet {
            Packet::Subscribe(s, _) => {
                let return_codes = s
                    .filters
                    .iter()
                    .map(|f| {
                        if f.path.starts_with("$dps/registrations/res/") {
                            SubscribeReasonCode::Success(QoS::AtMostOnce)
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                let ack = SubAck {
                    pkid: s.pkid,
                    return_codes,
                };
                let _ = V4.write(Packet::SubAck(ack, None), &mut wbuf);
            }
            Packet::Publish(p, _) => {
                let (qos, pkid) = crate::core::publish_ids(&p);
                if qos == 1 {
                    let ack = PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    };
                    let _ = V4.write(Packet::PubAck(ack, None), &mut wbuf);
                }
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                let rid = query_value(&topic, "$rid").unwrap_or("0").to_string();
                if topic.starts_with("$dps/registrations/PUT/iotdps-register/") {
                    let keys = (primary.clone(), secondary.clone());
                    let operation = crate::sas::new_key()
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric())
                        .take(20)
                        .collect::<String>();
                    let outcome = match register(&hub, &enrollment, registration_id, keys).await {
                        Ok(device_id) => {
                            hub.metrics
                                .provisioning
                                .with_label_values(&["assigned"])
                                .inc();
                            let t = crate::registry::now_rfc3339();
                            (
                                200,
                                json!({
                                    "operationId": operation,
                                    "status": "assigned",
                                    "registrationState": {
                                        "registrationId": registration_id,
                                        "createdDateTimeUtc": t,
                                        "assignedHub": hub.config.hostname,
                                        "deviceId": device_id,
                                        "status": "assigned",
                                        "substatus": "initialAssignment",
                                        "lastUpdatedDateTimeUtc": t,
                                        "etag": operation,
                                    }
                                }),
                            )
                        }
                        // As DPS does it: the operation completes with status `disabled`,
                        // which the SDKs hand to the device as the registration's result.
                        Err(e @ super::RegistrationError::Disabled) => {
                            hub.metrics
                                .provisioning
                                .with_label_values(&["disabled"])
                                .inc();
                            info!(%peer, registration_id, reason = %e, "provisioning refused");
                            let t = crate::registry::now_rfc3339();
                            (
                                200,
                                json!({
                                    "operationId": operation,
                                    "status": "disabled",
                                    "registrationState": {
                                        "registrationId": registration_id,
                                        "createdDateTimeUtc": t,
                                        "status": "disabled",
                                        "errorCode": 403001,
                                        "errorMessage": e.to_string(),
                                        "lastUpdatedDateTimeUtc": t,
                                        "etag": operation,
                                    }
                                }),
                            )
                        }
                        Err(e) => {
                            hub.metrics
                                .provisioning
                                .with_label_values(&["failed"])
                                .inc();
                            info!(%peer, registration_id, reason = %e, "provisioning failed");
                            let status = e.status();
                            (
                                status,
                                json!({
                                    "errorCode": u32::from(status) * 1000 + 1,
                                    "trackingId": operation,
                                    "message": e.to_string(),
                                    "timestampUtc": crate::registry::now_rfc3339(),
                                }),
                            )
                        }
                    };
                    if outcome.0 == 200 {
                        respond(
                            &mut wbuf,
                            202,
                            &rid,
                            "&retry-after=1",
                            json!({ "operationId": operation, "status": "assigning" }),
                        );
                        operations.insert(operation, outcome);
                    } else {
                        respond(&mut wbuf, outcome.0, &rid, "", outcome.1);
                    }
                } else if topic.starts_with("$dps/registrations/GET/iotdps-get-operationstatus/") {
                    let op = query_value(&topic, "operationId").unwrap_or_default();
                    match operations.get(op) {
                        Some((status, body)) => respond(&mut wbuf, *status, &rid, "", body.clone()),
                        None => respond(
                            &mut wbuf,
                            404,
                            &rid,
                            "",
                            json!({"errorCode": 404001, "message": format!("no operation {op}")}),
                        ),
                    }
                } else {
                    debug!(%peer, topic, "provisioning: unknown topic");
                    return;
                }
            }
            Packet::PingReq(_) => {
                let _ = V4.write(Packet::PingResp(PingResp), &mut wbuf);
            }
            Packet::Disconnect(..) => return,
            _ => {}
        }
        if flush(writer, &mut wbuf).await.is_err() {
            return;
        }
    }
}
