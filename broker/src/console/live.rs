//! The console's live streams (server-sent events): the fleet overview once a second, and a
//! device's telemetry as it arrives.
//!
//! Why SSE rather than a WebSocket: both streams only flow to the browser, `EventSource`
//! reconnects by itself, and the session cookie goes with it like any same-origin GET.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures_util::Stream;
use prometheus::core::Collector;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::ConsoleState;
use crate::api::ApiError;
use crate::hub::Hub;
use crate::identity::{DeviceId, ModuleId};
use crate::topics;

/// How often the overview is sent.
const OVERVIEW_PERIOD: Duration = Duration::from_secs(1);
/// Telemetry events waiting for a slow browser at most; newer ones are dropped (and counted
/// in the stream) rather than held.
const TELEMETRY_BACKLOG: usize = 256;

/// One overview sample. Counters are totals since the hub started; the page turns
/// consecutive samples into rates, so a missed sample costs nothing.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    /// Unix ms.
    pub time: u64,
    pub devices: usize,
    /// Devices (not modules) with a live connection.
    pub connected: usize,
    /// Every open MQTT connection: devices, modules and service connections.
    pub connections: i64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub queues: Vec<QueueSample>,
    pub errors: Errors,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueSample {
    pub sink: String,
    pub depth: u64,
    pub bytes: u64,
    pub oldest_age_seconds: Option<f64>,
    pub dropped_expired: u64,
    pub dropped_quota: u64,
}

/// Totals of what went wrong, by kind.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Errors {
    pub connections_refused: u64,
    pub authorization_denials: u64,
    pub protocol_errors: u64,
    pub route_condition_errors: u64,
    pub queue_refused: u64,
    pub store_writes_refused: u64,
    pub messages_dropped: u64,
}

/// The sum of a counter family's series whose labels pass `keep`.
fn total(
    vec: &prometheus::IntCounterVec,
    keep: impl Fn(&[prometheus::proto::LabelPair]) -> bool,
) -> u64 {
    vec.collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .filter(|m| keep(m.get_label()))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn label_is(labels: &[prometheus::proto::LabelPair], name: &str, value: &str) -> bool {
    labels
        .iter()
        .any(|l| l.name() == name && l.value() == value)
}

/// The overview as it is now.
pub fn overview(hub: &Hub) -> Overview {
    let m = &hub.metrics;
    let now = crate::c2d::now_ms();
    let queues: Vec<QueueSample> = hub
        .queue_stats()
        .into_iter()
        .map(|s| QueueSample {
            oldest_age_seconds: s.oldest_ms.map(|t| now.saturating_sub(t) as f64 / 1000.0),
            sink: s.sink,
            depth: s.depth,
            bytes: s.bytes,
            dropped_expired: s.dropped_expired,
            dropped_quota: s.dropped_quota,
        })
        .collect();
    let all = |_: &[prometheus::proto::LabelPair]| true;
    let messages_dropped = queues
        .iter()
        .map(|q| q.dropped_expired + q.dropped_quota)
        .sum::<u64>()
        + total(&m.sink_messages, |l| label_is(l, "result", "dropped"));
    Overview {
        time: now,
        devices: hub.registry.device_count(),
        connected: hub.live.iter().filter(|c| c.key().module.is_none()).count(),
        connections: m.connections.get(),
        messages_in: m.telemetry_messages.get(),
        // What left the hub: routed messages their sinks acknowledged, events read by
        // consumer groups, C2D messages delivered.
        messages_out: total(&m.sink_messages, |l| label_is(l, "result", "delivered"))
            + total(&m.events_delivered, all)
            + total(&m.c2d_messages, |l| label_is(l, "event", "delivered")),
        errors: Errors {
            connections_refused: total(&m.connection_attempts, |l| {
                !label_is(l, "result", "accepted")
            }),
            authorization_denials: total(&m.authorization_denials, all),
            protocol_errors: total(&m.protocol_errors, all),
            route_condition_errors: total(&m.route_condition_errors, all),
            queue_refused: m.queue_refused.get(),
            store_writes_refused: m.store_writes_refused.get(),
            messages_dropped,
        },
        queues,
    }
}

/// `GET /ui/live/overview`: an [`Overview`] every second.
pub async fn overview_stream(
    State(state): State<ConsoleState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let hub = state.hub.clone();
    let ticks = tokio::time::interval(OVERVIEW_PERIOD);
    let stream = futures_util::stream::unfold((hub, ticks), |(hub, mut ticks)| async move {
        ticks.tick().await;
        let h = hub.clone();
        // Queue statistics take locks the writers hold: off the async workers.
        let sample = tokio::task::spawn_blocking(move || overview(&h))
            .await
            .ok()?;
        let event = Event::default()
            .event("overview")
            .json_data(&sample)
            .unwrap_or_else(|_| Event::default().comment("unserialisable sample"));
        Some((Ok(event), (hub, ticks)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(Deserialize)]
pub struct TelemetryQuery {
    module: Option<String>,
}

/// One telemetry message as the page shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TelemetryEvent {
    device: String,
    module: Option<String>,
    properties: String,
    /// The body as text when it is UTF-8, else base64 (`base64` true).
    body: String,
    base64: bool,
    /// Messages this stream dropped for a slow browser before this one.
    dropped: u64,
}

/// Counts the stream as a live-view watcher while it lives, so devices' telemetry is
/// offered to the router.
struct Watching(std::sync::Arc<Hub>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.event_subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /ui/live/devices/{d}[?module=m]`: the device's (or module's) telemetry as it
/// arrives, through the same live view `monitor-events` reads: best effort, never stored.
pub async fn telemetry_stream(
    State(state): State<ConsoleState>,
    Path(device): Path<String>,
    Query(q): Query<TelemetryQuery>,
) -> Response {
    let device = match DeviceId::new(&device) {
        Ok(d) => d,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let module = match q.module.as_deref().map(ModuleId::new).transpose() {
        Ok(m) => m,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let filter = format!(
        "{}{}",
        topics::EVENTS_PREFIX,
        topics::telemetry_ids(device.as_str(), module.as_ref().map(|m| m.as_str()))
    );
    let hub = state.hub.clone();
    let link_id = format!("console-{:016x}", rand::random::<u64>());
    let (mut tx, mut rx) = match hub.core.link(link_id).await {
        Ok(link) => link,
        Err(e) => return ApiError::Internal(format!("live view: {e}")).into_response(),
    };
    if let Err(e) = tx.subscribe(filter) {
        return ApiError::Internal(format!("live view: {e}")).into_response();
    }
    hub.metrics.router_links_opened.inc();
    hub.event_subscribers.fetch_add(1, Ordering::Relaxed);
    let watching = Watching(hub.clone());
    let (out, events) = mpsc::channel::<Event>(TELEMETRY_BACKLOG);
    tokio::spawn(async move {
        let _watching = watching;
        let mut dropped = 0u64;
        loop {
            let notification = tokio::select! {
                n = rx.next() => n,
                _ = out.closed() => break,
            };
            match notification {
                Ok(Some(rumqttd::Notification::Forward(f))) => {
                    let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                    let Some((bag, body)) = topics::envelope::unpack(&f.publish.payload) else {
                        continue;
                    };
                    let Some((device, module, _)) = topic
                        .strip_prefix(topics::EVENTS_PREFIX)
                        .and_then(topics::split_telemetry_ids)
                    else {
                        continue;
                    };
                    let (body, base64) = match std::str::from_utf8(&body) {
                        Ok(text) => (text.to_string(), false),
                        Err(_) => (
                            base64::engine::general_purpose::STANDARD.encode(&body),
                            true,
                        ),
                    };
                    let view = TelemetryEvent {
                        device,
                        module,
                        properties: bag.to_string(),
                        body,
                        base64,
                        dropped,
                    };
                    let Ok(event) = Event::default().event("telemetry").json_data(&view) else {
                        continue;
                    };
                    match out.try_send(event) {
                        Ok(()) => dropped = 0,
                        Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                        Err(mpsc::error::TrySendError::Closed(_)) => break,
                    }
                }
                Ok(Some(rumqttd::Notification::Unschedule)) => {
                    if rx.wake().await.is_err() {
                        break;
                    }
                }
                Ok(Some(_)) | Ok(None) => {}
                Err(_) => break,
            }
        }
        use crate::core::NowOrNever;
        let _ = tx.send(crate::core::disconnect_packet()).now_or_never();
    });
    let stream = futures_util::stream::unfold(events, |mut events| async move {
        let event = events.recv().await?;
        Some((Ok::<_, Infallible>(event), events))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
