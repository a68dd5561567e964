//! Several hub nodes on one PostgreSQL and NATS (a preview; README "Cluster" says what is
//! shared and what is not yet).
//!
//! The pieces: [`rows`] (a shared table of JSON records with a change feed, which the
//! registry, twins, deployments, sessions and C2D queues write through), [`catalog`] (the
//! small tables written under a cluster-wide lock), [`sessions`], [`c2d`] and [`images`] (the
//! SQL particular to those stores), [`bus`] (messages to the node holding an identity's
//! connection). This file: who is in the cluster, and which node is the leader. A node
//! started with `[cluster] postgres` does two things here:
//!
//! - **Membership** ([`heartbeats`]): every `heartbeat_ms` it writes its row in
//!   `fleethub_nodes` (addresses, version, connections). A row not written for
//!   `node_timeout_ms`, by PostgreSQL's clock, is a node gone; a node that stopped cleanly
//!   says so. `GET /cluster` and `fleethub cluster status` read the table.
//! - **Leadership** ([`leadership`]): the leader is the node whose connection holds one
//!   PostgreSQL advisory lock. A follower asks for it every heartbeat; a leader checks its
//!   connection every heartbeat and steps down as soon as a check fails or takes longer
//!   than two heartbeats. When a leader dies (even `kill -9`) its connection closes,
//!   PostgreSQL releases the lock, and the next follower to ask takes over. Two leaders at
//!   once would need PostgreSQL to grant the lock twice; a leader cut off from PostgreSQL
//!   stops its work before anyone else can be granted it (its session must end first).
//!
//! Work that must run once for the whole fleet (deployment rollouts and the reconcile that
//! precedes them, the queue TTL sweeper) runs through [`singleton`]: on the leader only,
//! started when it becomes leader and stopped when it is not. A hub without `[cluster]` is
//! its own leader for good, so the single node runs the same code it always did.

pub mod bus;
pub mod c2d;
pub mod catalog;
pub mod images;
mod leader;
pub mod rows;
pub mod sessions;
mod status;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::ClusterSection;

pub use leader::leadership;
pub use status::{heartbeats, status, Beat, ClusterStatus, NodeView, PostgresHealth};

/// The advisory lock the leader holds, in PostgreSQL's two-key form: "flee" and 1. Seen in
/// `pg_locks` as classid 0x666c6565, objid 1, objsubid 2.
const LOCK: (i32, i32) = (0x666c_6565, 1);

/// The schema every node creates if missing; creating it under a transaction-scoped advisory
/// lock keeps nodes starting together from racing on `CREATE TABLE`.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS fleethub_nodes (
    node text PRIMARY KEY,
    api text NOT NULL,
    mqtt text,
    version text NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    connections bigint NOT NULL,
    stopped boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS fleethub_settings (
    key text PRIMARY KEY,
    value text NOT NULL
)";

/// PostgreSQL could not be reached or refused what the cluster asked.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster PostgreSQL ({what}): {source}")]
    Postgres {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cluster PostgreSQL: no answer within {0:?}")]
    Timeout(Duration),
    #[error("cluster PostgreSQL: the connection closed")]
    Closed,
    #[error(transparent)]
    Nats(#[from] bus::BusError),
}

/// This node's place in the cluster: its name, whether it leads, what singleton work it runs.
pub struct Cluster {
    /// `None` for a single hub (no `[cluster]`).
    cfg: Option<ClusterSection>,
    node: String,
    leader: watch::Sender<bool>,
    /// Names of the singleton work running on this node now.
    running: Mutex<BTreeSet<&'static str>>,
    /// Messages between nodes, when `[cluster] nats` is set.
    bus: Option<Arc<bus::Bus>>,
}

impl Cluster {
    /// A hub on its own: always its own leader.
    pub fn single(node: &str) -> Cluster {
        Cluster {
            cfg: None,
            node: node.to_string(),
            leader: watch::Sender::new(true),
            running: Mutex::default(),
            bus: None,
        }
    }

    /// A cluster node: checks that PostgreSQL answers and creates the schema. A node that
    /// cannot reach the shared PostgreSQL does not start: on its own it would be a second,
    /// separate hub under the same name.
    pub async fn join(cfg: &ClusterSection) -> Result<Cluster, ClusterError> {
        let client = connect(&cfg.postgres, &cfg.node, "setup").await?;
        let pg = |what| move |source| ClusterError::Postgres { what, source };
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({}, 0); {SCHEMA}; COMMIT;",
                LOCK.0
            ))
            .await
            .map_err(pg("creating the schema"))?;
        let bus = match cfg.nats.is_empty() {
            true => None,
            false => Some(Arc::new(bus::Bus::connect(&cfg.nats, &cfg.node).await?)),
        };
        info!(node = cfg.node, nats = bus.is_some(), "joined the cluster");
        Ok(Cluster {
            cfg: Some(cfg.clone()),
            node: cfg.node.clone(),
            leader: watch::Sender::new(false),
            running: Mutex::default(),
            bus,
        })
    }

    /// The cluster's admin token: the first node's, taken by every node that joins after it,
    /// so one token works on every node's API and as the service password on every node's
    /// MQTT (one fleet, one operator credential).
    pub async fn shared_admin_token(&self, local: &str) -> Result<String, ClusterError> {
        let Some(cfg) = &self.cfg else {
            return Ok(local.to_string());
        };
        let client = connect(&cfg.postgres, &cfg.node, "setup").await?;
        let pg = |what| move |source| ClusterError::Postgres { what, source };
        client
            .execute(
                "INSERT INTO fleethub_settings (key, value) VALUES ('admin_token', $1) ON CONFLICT (key) DO NOTHING",
                &[&local],
            )
            .await
            .map_err(pg("storing the admin token"))?;
        let row = client
            .query_one(
                "SELECT value FROM fleethub_settings WHERE key = 'admin_token'",
                &[],
            )
            .await
            .map_err(pg("reading the admin token"))?;
        Ok(row.get(0))
    }

    /// Messages between nodes (`None`: a single hub, or a cluster without NATS).
    pub fn bus(&self) -> Option<&Arc<bus::Bus>> {
        self.bus.as_ref()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The cluster settings, `None` for a single hub.
    pub fn config(&self) -> Option<&ClusterSection> {
        self.cfg.as_ref()
    }

    /// Whether this node leads now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Follows leadership changes.
    pub fn watch_leader(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    fn set_leader(&self, leads: bool) {
        self.leader
            .send_if_modified(|l| std::mem::replace(l, leads) != leads);
    }

    /// The singleton work running here now, by name.
    pub fn running(&self) -> Vec<&'static str> {
        match self.running.lock() {
            Ok(r) => r.iter().copied().collect(),
            Err(_) => Vec::new(),
        }
    }

    fn mark(&self, name: &'static str, runs: bool) {
        if let Ok(mut r) = self.running.lock() {
            if runs {
                r.insert(name);
            } else {
                r.remove(name);
            }
        }
    }
}

/// Runs `work` while this node is the leader: started with a stop signal of its own when the
/// node becomes leader, told to stop (and awaited) when it stops being leader or the server
/// stops. The work ends its own loop on that signal, as every background task does.
pub async fn singleton<F, Fut>(
    name: &'static str,
    cluster: Arc<Cluster>,
    mut stop: watch::Receiver<bool>,
    work: F,
) where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut leader = cluster.watch_leader();
    loop {
        tokio::select! {
            r = leader.wait_for(|l| *l) => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let (term_tx, term_rx) = watch::channel(false);
        cluster.mark(name, true);
        if cluster.config().is_some() {
            info!(
                work = name,
                node = cluster.node(),
                "leader: singleton work started"
            );
        }
        let mut running = std::pin::pin!(work(term_rx));
        // Each wait ends in a plain value: the guard `wait_for` returns must not live
        // across the awaits below.
        let deposed = async { leader.wait_for(|l| !*l).await.is_ok() };
        let stopped = async { stop.wait_for(|s| *s).await.is_ok() };
        let stopping = tokio::select! {
            _ = &mut running => false,
            _ = deposed => {
                let _ = term_tx.send(true);
                running.await;
                false
            }
            _ = stopped => {
                let _ = term_tx.send(true);
                running.await;
                true
            }
        };
        cluster.mark(name, false);
        if stopping {
            return;
        }
        if cluster.config().is_some() {
            warn!(
                work = name,
                node = cluster.node(),
                "singleton work stopped: no longer leader"
            );
        }
    }
}

/// How every cluster connection to PostgreSQL is made; `role` names it in `pg_stat_activity`
/// (`fleethub:{node}:{role}`).
fn config(url: &str, node: &str, role: &str) -> Result<tokio_postgres::Config, ClusterError> {
    let mut config: tokio_postgres::Config =
        url.parse().map_err(|source| ClusterError::Postgres {
            what: "the connection string",
            source,
        })?;
    config
        .application_name(format!("fleethub:{node}:{role}"))
        .connect_timeout(Duration::from_secs(5))
        // A peer that vanished without closing is noticed in seconds, not hours.
        .keepalives_idle(Duration::from_secs(5));
    Ok(config)
}

/// A connection to the cluster's PostgreSQL, its driver spawned; `role` names it in
/// `pg_stat_activity` (`fleethub:{node}:{role}`), which is how the status finds the leader.
async fn connect(
    url: &str,
    node: &str,
    role: &str,
) -> Result<tokio_postgres::Client, ClusterError> {
    let (client, connection) = config(url, node, role)?
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|source| ClusterError::Postgres {
            what: "connecting",
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "cluster PostgreSQL connection ended");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A follower's view: leadership comes and goes by hand.
    fn follower() -> Arc<Cluster> {
        let c = Cluster::single("n");
        c.set_leader(false);
        Arc::new(c)
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn singleton_work_runs_only_while_leading_and_stops_with_the_server() {
        let cluster = follower();
        let (stop_tx, stop_rx) = watch::channel(false);
        let started = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let (s, r) = (started.clone(), running.clone());
        let task = tokio::spawn(singleton(
            "work",
            cluster.clone(),
            stop_rx,
            move |mut term| {
                let (s, r) = (s.clone(), r.clone());
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    r.fetch_add(1, Ordering::SeqCst);
                    let _ = term.wait_for(|t| *t).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                }
            },
        ));
        settle().await;
        assert_eq!(started.load(Ordering::SeqCst), 0, "a follower runs nothing");
        assert!(cluster.running().is_empty());

        cluster.set_leader(true);
        settle().await;
        assert_eq!(running.load(Ordering::SeqCst), 1);
        assert_eq!(cluster.running(), ["work"]);

        cluster.set_leader(false);
        settle().await;
        assert_eq!(
            running.load(Ordering::SeqCst),
            0,
            "deposed: the work stopped"
        );
        assert!(cluster.running().is_empty());

        cluster.set_leader(true);
        settle().await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "a new term starts it again"
        );
        assert_eq!(running.load(Ordering::SeqCst), 1);

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("singleton ends with the server")
            .unwrap();
        assert_eq!(
            running.load(Ordering::SeqCst),
            0,
            "stopped before returning"
        );
    }
}
