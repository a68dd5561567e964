//! A table of JSON records every node shares in PostgreSQL, with a change feed.
//!
//! The stores are synchronous (callers block on a redb commit today), so this is too: one
//! thread per table owns a PostgreSQL connection on its own small runtime, and callers block
//! on its answer like they block on a commit. Every write carries an etag; a write meant to
//! replace a record names the etag it read, so two nodes changing the same record at once
//! cannot lose one change (the second write finds another etag and reads again). Each write
//! sends a notification in its transaction (`NOTIFY`, delivered only when it commits), and
//! [`listen`] hands every other node's changes to a callback; after a lost connection it
//! hands over the whole table again, since notifications sent meanwhile are gone.

use std::sync::mpsc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::AsyncMessage;
use tracing::{info, warn};

use super::{connect, ClusterError};
use crate::identity::IdentityKey;

/// One record: its key, JSON text, etag, and version. Versions come from one sequence per
/// table, taken by every write (deletes too), so of two reads of a record the one with the
/// higher version is the newer, whichever arrived last: a node applies what it hears only
/// when it is newer than what it has.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: String,
    pub body: String,
    pub etag: String,
    pub version: i64,
}

/// A record from a result row; an error (not a panic) when the table is not the shape this
/// hub created (say, made by hand or by another program under the same name).
fn row(r: &tokio_postgres::Row) -> Result<Row, tokio_postgres::Error> {
    Ok(Row {
        key: r.try_get(0)?,
        body: r.try_get(1)?,
        etag: r.try_get(2)?,
        version: r.try_get(3)?,
    })
}

type Job =
    Box<dyn FnOnce(&mut tokio_postgres::Client) -> futures_util::future::BoxFuture<'_, ()> + Send>;

/// A shared table (`fleethub_{name}`): key, JSON body, etag.
pub struct SharedRows {
    table: String,
    node: String,
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
}

/// How long a caller waits for PostgreSQL before the write counts as failed.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

impl SharedRows {
    /// Opens (creating if missing) `fleethub_{name}` on its own connection and thread.
    pub fn open(url: &str, node: &str, name: &str) -> Result<SharedRows, ClusterError> {
        let table = format!("fleethub_{name}");
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let (url, role, create) = (
            url.to_string(),
            format!("rows-{name}"),
            format!(
                "BEGIN; SELECT pg_advisory_xact_lock({}, 0);
                 CREATE SEQUENCE IF NOT EXISTS {table}_version;
                 CREATE TABLE IF NOT EXISTS {table} (key text PRIMARY KEY, body text NOT NULL,
                     etag text NOT NULL, version bigint NOT NULL);
                 COMMIT;",
                super::LOCK.0
            ),
        );
        let node_name = node.to_string();
        std::thread::Builder::new()
            .name(format!("fleethub-{table}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut client: Option<tokio_postgres::Client> = None;
                    let mut first = true;
                    loop {
                        if client.as_ref().is_none_or(|c| c.is_closed()) {
                            client = match connect(&url, &node_name, &role).await {
                                Ok(c) => match c.batch_execute(&create).await {
                                    Ok(()) => Some(c),
                                    Err(e) => {
                                        warn!(error = %e, "cannot create a shared table");
                                        None
                                    }
                                },
                                Err(e) => {
                                    warn!(error = %e, "cannot reach the cluster's PostgreSQL");
                                    None
                                }
                            };
                            if first {
                                first = false;
                                let said = match &client {
                                    Some(_) => Ok(()),
                                    None => Err("cannot open the shared table".to_string()),
                                };
                                let _ = ready_tx.send(said);
                            }
                        }
                        let Some(job) = rx.recv().await else { return };
                        match &mut client {
                            Some(c) => job(c).await,
                            // The job's reply channel is dropped: its caller sees a failure.
                            None => drop(job),
                        }
                    }
                });
            })
            .map_err(|_| ClusterError::Closed)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(SharedRows {
                table,
                node: node.to_string(),
                jobs,
            }),
            _ => Err(ClusterError::Closed),
        }
    }

    /// The notification channel of this table.
    pub fn channel(&self) -> &str {
        &self.table
    }

    /// Runs `work` on the table's connection and waits for its answer.
    pub(super) fn call<T: Send + 'static>(
        &self,
        work: impl for<'c> FnOnce(
                &'c mut tokio_postgres::Client,
                String,
                String,
            )
                -> futures_util::future::BoxFuture<'c, Result<T, tokio_postgres::Error>>
            + Send
            + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        let (table, node) = (self.table.clone(), self.node.clone());
        let job: Job = Box::new(move |client| {
            Box::pin(async move {
                let _ = tx.send(work(client, table, node).await);
            })
        });
        self.jobs
            .send(job)
            .map_err(|_| "the shared table's connection is gone".to_string())?;
        match wait_for(&rx) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("cluster PostgreSQL: {e}")),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "cluster PostgreSQL: no answer within {ANSWER_WITHIN:?}"
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err("cluster PostgreSQL cannot be reached".into())
            }
        }
    }

    /// Every record, in key order, and a version newer than any of them (what a record
    /// missing from the answer was missing as of).
    pub fn load(&self) -> Result<(Vec<Row>, i64), String> {
        self.call(|c, table, _| {
            Box::pin(async move {
                let tx = c
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .start()
                    .await?;
                let rows = tx
                    .query(
                        &format!("SELECT key, body, etag, version FROM {table} ORDER BY key"),
                        &[],
                    )
                    .await?;
                let at = next_version(&tx, &table).await?;
                tx.commit().await?;
                Ok((rows.iter().map(row).collect::<Result<_, _>>()?, at))
            })
        })
    }

    /// One record, read now; with no record, the version it was missing as of.
    pub fn get(&self, key: &str) -> Result<Result<Row, i64>, String> {
        let key = key.to_string();
        self.call(move |c, table, _| {
            Box::pin(async move {
                let found = c
                    .query_opt(
                        &format!("SELECT key, body, etag, version FROM {table} WHERE key = $1"),
                        &[&key],
                    )
                    .await?;
                Ok(match found {
                    Some(r) => Ok(row(&r)?),
                    None => Err(next_version(&*c, &table).await?),
                })
            })
        })
    }

    /// Writes `(key, body, etag)` records in one transaction where their keys are free
    /// (never replacing a record); returns the version each was written with, `None` where
    /// the key was taken.
    pub fn insert_new(
        &self,
        rows: Vec<(String, String, String)>,
    ) -> Result<Vec<Option<i64>>, String> {
        self.call(move |c, table, node| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let mut written = Vec::new();
                for (key, body, etag) in &rows {
                    let version: Option<i64> = tx
                        .query_opt(
                            &format!(
                                "INSERT INTO {table} (key, body, etag, version)
                                 VALUES ($1, $2, $3, nextval('{table}_version'))
                                 ON CONFLICT (key) DO NOTHING RETURNING version"
                            ),
                            &[key, body, etag],
                        )
                        .await?
                        .map(|r| r.get(0));
                    if version.is_some() {
                        notify(&tx, &table, &node, key).await?;
                    }
                    written.push(version);
                }
                tx.commit().await?;
                Ok(written)
            })
        })
    }

    /// Replaces `key`'s record if its etag is still `expected`: the new version, or `None`
    /// when it was not (someone changed or deleted it meanwhile: read it again).
    pub fn replace(
        &self,
        key: &str,
        body: String,
        etag: String,
        expected: &str,
    ) -> Result<Option<i64>, String> {
        let (key, expected) = (key.to_string(), expected.to_string());
        self.call(move |c, table, node| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let version: Option<i64> = tx
                    .query_opt(
                        &format!(
                            "UPDATE {table} SET body = $2, etag = $3, version = nextval('{table}_version')
                             WHERE key = $1 AND etag = $4 RETURNING version"
                        ),
                        &[&key, &body, &etag, &expected],
                    )
                    .await?
                    .map(|r| r.get(0));
                if version.is_some() {
                    notify(&tx, &table, &node, &key).await?;
                }
                tx.commit().await?;
                Ok(version)
            })
        })
    }

    /// Deletes `keys` in one transaction; returns the version they were deleted at.
    pub fn delete(&self, keys: Vec<String>) -> Result<i64, String> {
        self.call(move |c, table, node| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                for key in &keys {
                    if tx
                        .execute(&format!("DELETE FROM {table} WHERE key = $1"), &[key])
                        .await?
                        == 1
                    {
                        notify(&tx, &table, &node, key).await?;
                    }
                }
                let at = next_version(&tx, &table).await?;
                tx.commit().await?;
                Ok(at)
            })
        })
    }
}

/// One write of a batch: the record's new body (or its deletion), and the version it must
/// still be at (`None`: it must not exist yet).
#[derive(Debug, Clone)]
pub struct BatchWrite {
    pub key: String,
    /// `None` deletes the record.
    pub body: Option<(String, String)>,
    pub expected: Option<i64>,
}

impl SharedRows {
    /// Applies `writes` in one transaction, each only if its record is still at the version
    /// it names: `Ok(versions)` (the new version of each, or the deletion's), or
    /// `Err(keys)` naming the records someone changed meanwhile, with nothing written.
    pub fn write_batch(
        &self,
        writes: Vec<BatchWrite>,
    ) -> Result<Result<Vec<i64>, Vec<String>>, String> {
        self.call(move |c, table, node| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let mut versions = Vec::with_capacity(writes.len());
                let mut conflicts = Vec::new();
                for w in &writes {
                    let written: Option<i64> = match (&w.body, w.expected) {
                        (Some((body, etag)), Some(v)) => tx
                            .query_opt(
                                &format!(
                                    "UPDATE {table} SET body = $2, etag = $3, version = nextval('{table}_version')
                                     WHERE key = $1 AND version = $4 RETURNING version"
                                ),
                                &[&w.key, body, etag, &v],
                            )
                            .await?
                            .map(|r| r.get(0)),
                        (Some((body, etag)), None) => tx
                            .query_opt(
                                &format!(
                                    "INSERT INTO {table} (key, body, etag, version)
                                     VALUES ($1, $2, $3, nextval('{table}_version'))
                                     ON CONFLICT (key) DO NOTHING RETURNING version"
                                ),
                                &[&w.key, body, etag],
                            )
                            .await?
                            .map(|r| r.get(0)),
                        (None, expected) => {
                            // Deleting what this node never saw deletes whatever is there.
                            let gone = match expected {
                                Some(v) => {
                                    tx.execute(
                                        &format!("DELETE FROM {table} WHERE key = $1 AND version = $2"),
                                        &[&w.key, &v],
                                    )
                                    .await?
                                }
                                None => {
                                    tx.execute(&format!("DELETE FROM {table} WHERE key = $1"), &[&w.key])
                                        .await?;
                                    1
                                }
                            };
                            if gone == 1 {
                                Some(next_version(&tx, &table).await?)
                            } else {
                                None
                            }
                        }
                    };
                    match written {
                        Some(v) => versions.push(v),
                        None => conflicts.push(w.key.clone()),
                    }
                }
                if !conflicts.is_empty() {
                    tx.rollback().await?;
                    return Ok(Err(conflicts));
                }
                for w in &writes {
                    notify(&tx, &table, &node, &w.key).await?;
                }
                tx.commit().await?;
                Ok(Ok(versions))
            })
        })
    }
}

impl SharedRows {
    /// Writes (`Some(body)`) or deletes (`None`) each record whatever it holds now, in one
    /// transaction: for records that are computed from shared inputs, where the last write
    /// is as good as any. Returns the version of each write.
    pub fn upsert_batch(&self, writes: Vec<Upsert>) -> Result<Vec<i64>, String> {
        self.call(move |c, table, node| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let versions = upsert_all(&tx, &table, &node, &writes).await?;
                tx.commit().await?;
                Ok(versions)
            })
        })
    }

    /// The next number of the table's version sequence: increasing across every node.
    pub fn next_sequence(&self) -> Result<i64, String> {
        self.call(|c, table, _| Box::pin(async move { next_version(&*c, &table).await }))
    }
}

/// A record's key and its new body, or `None` to delete it.
pub type Upsert = (String, Option<String>);

/// A table's records read under a cluster-wide lock, held until [`Exclusive::commit`] (or
/// the drop, which writes nothing). For the rarely written catalogs whose rules span
/// records (a product name unique among all products, a group deployment's sequence): the
/// node reads the whole table as it is, checks and computes in Rust, and writes, with no
/// other node's writer in between.
pub struct Exclusive {
    rows: Vec<Row>,
    writes: Option<tokio::sync::oneshot::Sender<Vec<Upsert>>>,
    done: mpsc::Receiver<Result<Vec<i64>, String>>,
}

impl Exclusive {
    /// The table as it is now.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// Writes (`Some(body)`) or deletes (`None`) these records and commits; returns each
    /// write's version.
    pub fn commit(mut self, writes: Vec<Upsert>) -> Result<Vec<i64>, String> {
        let Some(tx) = self.writes.take() else {
            return Err("already committed".into());
        };
        tx.send(writes)
            .map_err(|_| "the shared table's connection is gone".to_string())?;
        match wait_for(&self.done) {
            Ok(r) => r,
            Err(_) => Err(format!(
                "cluster PostgreSQL: no commit within {ANSWER_WITHIN:?}"
            )),
        }
    }
}

impl SharedRows {
    /// Takes the table's cluster-wide write lock (a transaction-scoped advisory lock, so a
    /// node that dies holding it releases it) and reads every record. Writers of this table
    /// that use it run one at a time across the cluster.
    pub fn exclusive(&self) -> Result<Exclusive, String> {
        let (rows_tx, rows_rx) = mpsc::sync_channel::<Result<Vec<Row>, String>>(1);
        let (writes_tx, writes_rx) = tokio::sync::oneshot::channel::<Vec<Upsert>>();
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let (table, node) = (self.table.clone(), self.node.clone());
        let job: Job = Box::new(move |client| {
            Box::pin(async move {
                let outcome = async {
                    let tx = client.transaction().await?;
                    // The second key: this table's name, hashed by PostgreSQL.
                    tx.execute(
                        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                        &[&super::LOCK.0, &table],
                    )
                    .await?;
                    let rows = tx
                        .query(
                            &format!("SELECT key, body, etag, version FROM {table} ORDER BY key"),
                            &[],
                        )
                        .await?
                        .iter()
                        .map(row)
                        .collect::<Result<Vec<_>, _>>()?;
                    let _ = rows_tx.send(Ok(rows));
                    let Ok(writes) = writes_rx.await else {
                        tx.rollback().await?;
                        return Ok(Vec::new());
                    };
                    let versions = upsert_all(&tx, &table, &node, &writes).await?;
                    tx.commit().await?;
                    Ok::<_, tokio_postgres::Error>(versions)
                }
                .await;
                match outcome {
                    Ok(v) => {
                        let _ = done_tx.send(Ok(v));
                    }
                    Err(e) => {
                        let e = format!("cluster PostgreSQL: {e}");
                        let _ = rows_tx.try_send(Err(e.clone()));
                        let _ = done_tx.send(Err(e));
                    }
                }
            })
        });
        self.jobs
            .send(job)
            .map_err(|_| "the shared table's connection is gone".to_string())?;
        let rows = match wait_for(&rows_rx) {
            Ok(r) => r?,
            Err(_) => {
                return Err(format!(
                    "cluster PostgreSQL: the table's lock not granted within {ANSWER_WITHIN:?}"
                ))
            }
        };
        Ok(Exclusive {
            rows,
            writes: Some(writes_tx),
            done: done_rx,
        })
    }
}

/// Writes (`Some(body)`) or deletes (`None`) each record whatever it holds now, notifying
/// each change; the version of each write.
async fn upsert_all(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    node: &str,
    writes: &[Upsert],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let mut versions = Vec::with_capacity(writes.len());
    for (key, body) in writes {
        let version = match body {
            Some(body) => tx
                .query_one(
                    &format!(
                        "INSERT INTO {table} (key, body, etag, version)
                         VALUES ($1, $2, '', nextval('{table}_version'))
                         ON CONFLICT (key) DO UPDATE
                         SET body = EXCLUDED.body, version = EXCLUDED.version
                         RETURNING version"
                    ),
                    &[key, body],
                )
                .await?
                .try_get(0)?,
            None => {
                tx.execute(&format!("DELETE FROM {table} WHERE key = $1"), &[key])
                    .await?;
                next_version(tx, table).await?
            }
        };
        notify(tx, table, node, key).await?;
        versions.push(version);
    }
    Ok(versions)
}

/// Waits (at most [`ANSWER_WITHIN`]) for the table's thread to answer. A caller on an async
/// worker (a connection reading its C2D queue) lets the runtime move the worker's other
/// tasks elsewhere while it waits.
fn wait_for<T>(rx: &mpsc::Receiver<T>) -> Result<T, mpsc::RecvTimeoutError> {
    let wait = || rx.recv_timeout(ANSWER_WITHIN);
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
        _ => wait(),
    }
}

/// A version newer than every write so far: what a missing record or a deletion is dated at.
async fn next_version(
    c: &impl tokio_postgres::GenericClient,
    table: &str,
) -> Result<i64, tokio_postgres::Error> {
    c.query_one(&format!("SELECT nextval('{table}_version')"), &[])
        .await?
        .try_get(0)
}

/// `NOTIFY {table}, '{node}\n{key}'`, sent when the transaction commits.
async fn notify(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    node: &str,
    key: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&table, &format!("{node}\n{key}")],
    )
    .await
    .map(|_| ())
}

/// What [`listen`] hands over.
pub enum Heard {
    /// Another node changed this record, or deleted it (`Err`: missing as of that version).
    Changed(String, Result<Row, i64>),
    /// The whole table, after the feed was (re)connected: anything may have changed. With
    /// the version a record missing from it was missing as of.
    All(Vec<Row>, i64),
}

/// What a shared table's keys are in memory: an identity's key, or a plain name.
pub trait RowKey: Clone + Eq + std::hash::Hash {
    /// `None` for a key this node cannot read (skipped, as a record it cannot read is).
    fn from_row_key(key: &str) -> Option<Self>;
}

impl RowKey for IdentityKey {
    fn from_row_key(key: &str) -> Option<Self> {
        IdentityKey::parse(key).ok()
    }
}

impl RowKey for String {
    fn from_row_key(key: &str) -> Option<Self> {
        Some(key.to_string())
    }
}

impl Heard {
    /// Hands `apply` each record heard that is newer than what `versions` holds, recording
    /// its version first: the record, or `None` when it is gone. After a whole-table read,
    /// every key of `cached` the table no longer holds is gone too. Older answers are
    /// skipped, so a late read never puts an older record back.
    pub fn apply_newer<K: RowKey>(
        self,
        versions: &Versions<K>,
        cached: impl FnOnce() -> Vec<K>,
        mut apply: impl FnMut(&K, Option<&Row>),
    ) {
        let mut one = |key: &K, version: i64, row: Option<&Row>| {
            if versions.newer(key, version) {
                versions.insert(key.clone(), version);
                apply(key, row);
            }
        };
        match self {
            Heard::Changed(key, row) => {
                if let Some(k) = K::from_row_key(&key) {
                    match &row {
                        Ok(r) => one(&k, r.version, Some(r)),
                        Err(at) => one(&k, *at, None),
                    }
                }
            }
            Heard::All(rows, at) => {
                let cached = cached();
                let mut present = std::collections::HashSet::new();
                for row in &rows {
                    if let Some(k) = K::from_row_key(&row.key) {
                        one(&k, row.version, Some(row));
                        present.insert(k);
                    }
                }
                for k in cached.iter().filter(|k| !present.contains(*k)) {
                    one(k, at, None);
                }
            }
        }
    }
}

/// The shared version of each record a node caches (of a deletion: the version it was
/// deleted at), beside the cache it describes.
pub struct Versions<K: RowKey = IdentityKey>(dashmap::DashMap<K, i64>);

impl<K: RowKey> Default for Versions<K> {
    fn default() -> Self {
        Versions(dashmap::DashMap::new())
    }
}

impl<K: RowKey> Versions<K> {
    /// Whether a record of `key` at `version` is newer than what this node has.
    pub fn newer(&self, key: &K, version: i64) -> bool {
        self.0.get(key).is_none_or(|v| *v < version)
    }

    pub fn get(&self, key: &K) -> Option<i64> {
        self.0.get(key).map(|v| *v)
    }

    pub fn insert(&self, key: K, version: i64) {
        self.0.insert(key, version);
    }

    pub fn remove(&self, key: &K) {
        self.0.remove(key);
    }

    pub fn clear(&self) {
        self.0.clear();
    }
}

/// What a node does with the changes heard on one shared table.
pub type OnHeard = std::sync::Arc<dyn Fn(Heard) + Send + Sync>;

/// Follows other nodes' changes to every table of `feeds` until `stop`, calling each
/// table's `on` (from a blocking thread, as the stores are synchronous).
///
/// One connection listens on every table's channel: PostgreSQL wakes every listening
/// backend of the database at each commit that notifies (whatever the channel), so one
/// listener per node, not one per table, keeps a write's cost flat as tables are added.
pub async fn listen(
    feeds: Vec<(std::sync::Arc<SharedRows>, OnHeard)>,
    url: String,
    node: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if feeds.is_empty() {
        return;
    }
    loop {
        match follow(&feeds, &url, &node, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                warn!(error = %e, "change feed lost; reading the shared tables again once it is back")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One connection's worth of the feed: LISTEN on every channel, each whole table once, then
/// each change.
async fn follow(
    feeds: &[(std::sync::Arc<SharedRows>, OnHeard)],
    url: &str,
    node: &str,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    // Its own connection, not `connect`'s: the feed reads the notifications off it.
    let (client, mut connection) = super::config(url, node, "feed")
        .map_err(|e| e.to_string())?
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if heard_tx
                        .send((n.channel().to_string(), n.payload().to_string()))
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let result = async {
        let channels: Vec<String> = feeds
            .iter()
            .map(|(rows, _)| format!("LISTEN {};", rows.channel()))
            .collect();
        client
            .batch_execute(&channels.join(" "))
            .await
            .map_err(|e| e.to_string())?;
        // Listening first, then reading: a change committed in between is heard again,
        // never missed.
        for (rows, on) in feeds {
            let (all, at) = {
                let rows = rows.clone();
                tokio::task::spawn_blocking(move || rows.load())
                    .await
                    .map_err(|e| e.to_string())??
            };
            hand(on, Heard::All(all, at)).await;
        }
        info!(tables = feeds.len(), "following the cluster's changes");
        loop {
            let (channel, payload) = tokio::select! {
                p = heard.recv() => match p {
                    Some(p) => p,
                    None => return Err("the connection closed".to_string()),
                },
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            let Some((from, key)) = payload.split_once('\n') else {
                continue;
            };
            if from == node {
                continue; // this node's own write, applied when it was made
            }
            let Some((rows, on)) = feeds.iter().find(|(rows, _)| rows.channel() == channel) else {
                continue;
            };
            let (r, k) = (rows.clone(), key.to_string());
            let row = tokio::task::spawn_blocking(move || r.get(&k))
                .await
                .map_err(|e| e.to_string())??;
            hand(on, Heard::Changed(key.to_string(), row)).await;
        }
    }
    .await;
    driver.abort();
    result
}

async fn hand(on: &OnHeard, heard: Heard) {
    let on = on.clone();
    let _ = tokio::task::spawn_blocking(move || on(heard)).await;
}
