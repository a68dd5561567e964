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

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fleethub_router::queue::Entry;
use serde_json::{Map, Value};
use tokio_postgres::types::ToSql;
use tracing::info;

use super::endpoint::{Endpoint, SessionFuture};
use super::QueueReader;

/// The driver's name in health reports.
pub const KIND: &str = "postgres";
/// Rows per batch (8 parameters each, far below PostgreSQL's 65,535).
const BATCH: usize = 500;

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

/// The endpoint's table, created if missing.
pub fn create_table(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (\
         id text PRIMARY KEY, enqueued_time timestamptz NOT NULL, \
         device_id text, module_id text, \
         properties jsonb NOT NULL, system_properties jsonb NOT NULL, \
         body_json jsonb, body bytea)"
    )
}

/// One multi-row INSERT of `rows` rows (8 parameters each, in column order) that skips ids
/// already there.
pub fn insert(table: &str, rows: usize) -> String {
    let mut sql = format!(
        "INSERT INTO {table} (id, enqueued_time, device_id, module_id, properties, \
         system_properties, body_json, body) VALUES "
    );
    for i in 0..rows {
        let b = i * 8;
        if i > 0 {
            sql.push(',');
        }
        let row: Vec<String> = (b + 1..=b + 8).map(|p| format!("${p}")).collect();
        sql.push_str(&format!("({})", row.join(",")));
    }
    sql.push_str(" ON CONFLICT (id) DO NOTHING");
    sql
}

/// The kind's session, for [`Endpoints`](super::endpoint::Endpoints).
pub fn session(endpoint: Arc<Endpoint>) -> SessionFuture {
    Box::pin(async move { endpoint.postgres_session().await })
}

impl Endpoint {
    /// One connection: write from the queue until something fails.
    async fn postgres_session(&self) -> Result<(), String> {
        let (client, connection) = tokio_postgres::connect(&self.cfg.url, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let mut connection = tokio::spawn(connection);
        let table = &self.cfg.table;
        client
            .batch_execute(&create_table(table))
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
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * 8);
            for r in &rows {
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
            let sql = insert(table, rows.len());
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
