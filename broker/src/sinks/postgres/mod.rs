//! Custom endpoints into PostgreSQL (`[endpoints.NAME] kind = "postgres"`), reached by
//! `INTO Endpoint("NAME")` routes.
//!
//! Each endpoint's queue (`$endpoint/NAME`) is the durable store-and-forward queue, as for
//! every sink. One task per endpoint keeps a connection (`tokio-postgres`), creates the
//! table if missing, and writes what the queue holds in batches: one multi-row `INSERT` per
//! batch (one transaction); entries leave the queue only once it committed. A row's `id` is
//! `{hub}:{queue sequence number}` and the insert skips ids already there, so what is written
//! again after a lost commit acknowledgement (a dropped connection, a restart) never makes a
//! second row.
//!
//! Columns: `id text primary key`, `enqueued_time timestamptz`, `device_id`, `module_id`
//! (text), `properties` and `system_properties` (jsonb, system properties by IoT Hub's names),
//! `body_json` (jsonb, when the body is JSON) or `body` (bytea, otherwise).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fleethub_router::queue::{DiskQueue, Entry};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio_postgres::types::ToSql;
use tracing::{info, warn};

use super::{Context, Health, QueueReader, SinkDriver, SinkId, StopFuture};
use crate::config::EndpointSection;
use crate::metrics::Metrics;

/// The driver's name in health reports.
pub const KIND: &str = "postgres";
/// Rows per batch (8 parameters each, far below PostgreSQL's 65,535).
const BATCH: usize = 500;

/// Every configured PostgreSQL endpoint, each with its task.
pub struct Postgres {
    endpoints: HashMap<String, Running>,
}

struct Running {
    connected: Arc<AtomicBool>,
    wake: Arc<Notify>,
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Postgres {
    pub fn start(ctx: &Context) -> Postgres {
        let mut endpoints = HashMap::new();
        for (name, cfg) in &ctx.config.endpoints {
            if cfg.kind != KIND {
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
        Postgres { endpoints }
    }
}

impl SinkDriver for Postgres {
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

/// One row's values, in column order.
struct Row {
    id: String,
    enqueued: std::time::SystemTime,
    device: Option<String>,
    module: Option<String>,
    properties: Value,
    system: Value,
    body_json: Option<Value>,
    body: Option<Vec<u8>>,
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
                    warn!(endpoint = self.name, error = %e, "PostgreSQL endpoint lost; messages wait in its queue");
                } else {
                    tracing::debug!(endpoint = self.name, error = %e, "PostgreSQL endpoint unreachable");
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

    /// One connection: write from the queue until something fails.
    async fn session(&self) -> Result<(), String> {
        let (client, connection) = tokio_postgres::connect(&self.cfg.url, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let mut connection = tokio::spawn(connection);
        let table = &self.cfg.table;
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (\
                 id text PRIMARY KEY, enqueued_time timestamptz NOT NULL, \
                 device_id text, module_id text, \
                 properties jsonb NOT NULL, system_properties jsonb NOT NULL, \
                 body_json jsonb, body bytea)"
            ))
            .await
            .map_err(|e| e.to_string())?;
        self.connected.store(true, Ordering::Relaxed);
        info!(endpoint = self.name, table, "PostgreSQL endpoint connected");
        let mut reader = QueueReader::new(BATCH);
        loop {
            let entries = reader
                .read(&*self.queue, &self.queue_name, crate::c2d::now_ms())
                .map_err(|e| e.to_string())?;
            if entries.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    done = &mut connection => {
                        return Err(format!("connection ended: {done:?}"));
                    }
                }
                reader.rewind();
                continue;
            }
            let rows: Vec<Row> = entries.iter().map(|e| self.row(e)).collect();
            let mut sql = format!(
                "INSERT INTO {table} (id, enqueued_time, device_id, module_id, properties, \
                 system_properties, body_json, body) VALUES "
            );
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * 8);
            for (i, r) in rows.iter().enumerate() {
                let b = i * 8;
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${},${},${},${},${},${},${},${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 8
                ));
                params.extend([
                    &r.id as &(dyn ToSql + Sync),
                    &r.enqueued,
                    &r.device,
                    &r.module,
                    &r.properties,
                    &r.system,
                    &r.body_json,
                    &r.body,
                ]);
            }
            sql.push_str(" ON CONFLICT (id) DO NOTHING");
            client
                .execute(sql.as_str(), &params)
                .await
                .map_err(|e| e.to_string())?;
            for e in entries {
                reader.acked(e.key);
            }
            reader.flush(&*self.queue, &self.metrics);
        }
    }

    fn row(&self, entry: &Entry) -> Row {
        let message =
            fleethub_router::Message::from_bag(&entry.bag, bytes::Bytes::new()).unwrap_or_default();
        let properties: Map<String, Value> = message
            .properties
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.clone().map(Value::String).unwrap_or(Value::Null),
                )
            })
            .collect();
        let system: Map<String, Value> = message
            .system
            .iter()
            .map(|(k, v)| {
                (
                    crate::sinks::jetstream::system_header(k).to_string(),
                    Value::String(v.to_string()),
                )
            })
            .collect();
        let body_json = std::str::from_utf8(&entry.body)
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(s).ok());
        let body = body_json.is_none().then(|| entry.body.to_vec());
        Row {
            id: format!("{}:{}", self.hub_id, entry.key.seq),
            enqueued: UNIX_EPOCH + Duration::from_millis(entry.enqueued_ms),
            device: message.system.connection_device_id.clone(),
            module: message.system.connection_module_id.clone(),
            properties: Value::Object(properties),
            system: Value::Object(system),
            body_json,
            body,
        }
    }
}
