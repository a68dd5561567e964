//! Membership: each node's heartbeat row, and the status built from the table and the locks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use super::{connect, Cluster, ClusterError, LOCK};

/// `GET /cluster`: the nodes as the shared PostgreSQL knows them, and this node's part.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// `single` (no `[cluster]`) or `cluster`.
    pub mode: String,
    /// The node that answered.
    pub node: String,
    /// The node holding leadership now, as PostgreSQL's locks say (`None`: nobody yet).
    pub leader: Option<String>,
    /// Singleton work running on the node that answered.
    pub singletons: Vec<String>,
    /// How the shared PostgreSQL answered this request (`None` for a single hub).
    pub postgres: Option<PostgresHealth>,
    /// Whether this node's NATS connection is up (`None`: no `[cluster] nats`).
    #[serde(default)]
    pub nats_connected: Option<bool>,
    pub nodes: Vec<NodeView>,
}

/// The cluster's PostgreSQL, seen from the node that answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostgresHealth {
    pub reachable: bool,
    /// The status queries' round trip.
    pub round_trip_ms: Option<f64>,
    pub server_version: Option<String>,
    pub error: Option<String>,
}

/// One node of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub node: String,
    /// `up` (heard from within `node_timeout_ms`), `stopped` (shut down cleanly) or `gone`.
    pub state: String,
    pub leader: bool,
    pub api: String,
    pub mqtt: Option<String>,
    pub version: String,
    pub started_at: String,
    /// Since its last heartbeat, by PostgreSQL's clock.
    pub last_seen_ms: u64,
    /// Its MQTT connections at that heartbeat.
    pub connections: i64,
}

/// What a node reports of itself at each heartbeat.
pub struct Beat {
    pub api: String,
    pub mqtt: Option<String>,
    pub connections: i64,
}

/// Writes this node's row every heartbeat until the server stops, then marks it stopped (so
/// the status tells a node shut down on purpose, say for an upgrade, from one that died).
pub async fn heartbeats(
    cluster: Arc<Cluster>,
    beat: impl Fn() -> Beat,
    mut stop: watch::Receiver<bool>,
) {
    let Some(cfg) = cluster.config().cloned() else {
        return;
    };
    let every = Duration::from_millis(cfg.heartbeat_ms);
    let mut client: Option<tokio_postgres::Client> = None;
    // The first row this process writes restarts the node's `started_at`.
    let mut first = true;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match connect(&cfg.postgres, &cfg.node, "membership").await {
                Ok(c) => Some(c),
                Err(e) => {
                    warn!(node = cfg.node, error = %e, "cannot report this node to the cluster");
                    None
                }
            };
        }
        if let Some(c) = &client {
            let b = beat();
            let written = tokio::time::timeout(
                2 * every,
                c.execute(
                    "INSERT INTO fleethub_nodes AS n
                         (node, api, mqtt, version, started_at, heartbeat_at, connections, stopped)
                     VALUES ($1, $2, $3, $4, now(), now(), $5, $6)
                     ON CONFLICT (node) DO UPDATE SET api = $2, mqtt = $3, version = $4,
                         heartbeat_at = now(), connections = $5, stopped = $6,
                         started_at = CASE WHEN n.stopped OR $7 THEN now() ELSE n.started_at END",
                    &[
                        &cfg.node,
                        &b.api,
                        &b.mqtt,
                        &env!("CARGO_PKG_VERSION"),
                        &b.connections,
                        &stopping,
                        &first,
                    ],
                ),
            )
            .await;
            match written {
                Ok(Ok(_)) => first = false,
                Ok(Err(e)) => {
                    warn!(node = cfg.node, error = %e, "cannot report this node to the cluster");
                    client = None;
                }
                Err(_) => {
                    warn!(
                        node = cfg.node,
                        "the cluster's PostgreSQL did not take a heartbeat in time"
                    );
                    client = None;
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// The status `GET /cluster` answers: the node table and the lock, read now.
pub async fn status(cluster: &Cluster) -> ClusterStatus {
    let singletons = cluster.running().into_iter().map(String::from).collect();
    let node = cluster.node().to_string();
    let Some(cfg) = cluster.config() else {
        return ClusterStatus {
            mode: "single".into(),
            leader: Some(node.clone()),
            node,
            singletons,
            postgres: None,
            nats_connected: None,
            nodes: Vec::new(),
        };
    };
    let started = Instant::now();
    let (leader, nodes, postgres) = match read(cfg).await {
        Ok((leader, nodes, version)) => (
            leader,
            nodes,
            PostgresHealth {
                reachable: true,
                round_trip_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
                server_version: Some(version),
                error: None,
            },
        ),
        Err(e) => (
            None,
            Vec::new(),
            PostgresHealth {
                reachable: false,
                round_trip_ms: None,
                server_version: None,
                error: Some(e.to_string()),
            },
        ),
    };
    ClusterStatus {
        mode: "cluster".into(),
        node,
        leader,
        singletons,
        postgres: Some(postgres),
        nats_connected: cluster.bus().map(|b| b.connected()),
        nodes,
    }
}

type Read = (Option<String>, Vec<NodeView>, String);

async fn read(cfg: &crate::config::ClusterSection) -> Result<Read, ClusterError> {
    let client = connect(&cfg.postgres, &cfg.node, "status").await?;
    let within = Duration::from_secs(5);
    let pg = |what| move |source| ClusterError::Postgres { what, source };
    let work = async {
        // Who holds the lock, from PostgreSQL's own bookkeeping: right even when the holder
        // died a moment ago and its heartbeat row does not know it yet.
        let holder = client
            .query_opt(
                &format!(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                     WHERE l.locktype = 'advisory' AND l.granted
                       AND l.classid = {} AND l.objid = {} AND l.objsubid = 2",
                    LOCK.0, LOCK.1
                ),
                &[],
            )
            .await
            .map_err(pg("reading the leader"))?;
        let leader = holder.and_then(|row| {
            let name: String = row.try_get(0).ok()?;
            name.strip_prefix("fleethub:")
                .and_then(|n| n.strip_suffix(":leadership"))
                .map(str::to_string)
        });
        let rows = client
            .query(
                "SELECT node, api, mqtt, version,
                        to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                        (extract(epoch FROM now() - heartbeat_at) * 1000)::int8,
                        connections, stopped
                 FROM fleethub_nodes ORDER BY node",
                &[],
            )
            .await
            .map_err(pg("reading the nodes"))?;
        let version: String = client
            .query_one("SELECT current_setting('server_version')", &[])
            .await
            .map_err(pg("reading the server version"))?
            .get(0);
        let mut nodes = Vec::with_capacity(rows.len());
        for r in &rows {
            let read = pg("reading a node's row");
            let node: String = r.try_get(0).map_err(read)?;
            let last_seen_ms = r.try_get::<_, i64>(5).map_err(read)?.max(0) as u64;
            let state = if r.try_get::<_, bool>(7).map_err(read)? {
                "stopped"
            } else if last_seen_ms <= cfg.node_timeout_ms {
                "up"
            } else {
                "gone"
            };
            nodes.push(NodeView {
                leader: leader.as_deref() == Some(node.as_str()),
                node,
                state: state.into(),
                api: r.try_get(1).map_err(read)?,
                mqtt: r.try_get(2).map_err(read)?,
                version: r.try_get(3).map_err(read)?,
                started_at: r.try_get(4).map_err(read)?,
                last_seen_ms,
                connections: r.try_get(6).map_err(read)?,
            });
        }
        Ok((leader, nodes, version))
    };
    tokio::time::timeout(within, work)
        .await
        .map_err(|_| ClusterError::Timeout(within))?
}
