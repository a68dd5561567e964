//! Leadership through one PostgreSQL advisory lock (see the module above).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::{connect, Cluster, ClusterError, LOCK};

/// Holds or asks for the lock until the server stops. One connection does nothing else, so
/// the lock lives exactly as long as that session: released by PostgreSQL when the node dies,
/// given up on purpose by closing the connection when the node stops.
pub async fn leadership(cluster: Arc<Cluster>, mut stop: watch::Receiver<bool>) {
    let Some(cfg) = cluster.config().cloned() else {
        return;
    };
    let beat = Duration::from_millis(cfg.heartbeat_ms);
    loop {
        match connect(&cfg.postgres, &cfg.node, "leadership").await {
            Ok(client) => {
                let mut tick = tokio::time::interval(beat);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.wait_for(|s| *s) => {
                            cluster.set_leader(false);
                            return; // dropping the client closes the session: the lock goes
                        }
                    }
                    match step(&client, cluster.is_leader(), 2 * beat).await {
                        Ok(leads) => {
                            if leads && !cluster.is_leader() {
                                info!(node = cfg.node, "this node is the cluster leader");
                            }
                            cluster.set_leader(leads);
                        }
                        Err(e) => {
                            if cluster.is_leader() {
                                warn!(node = cfg.node, error = %e, "stepping down as leader: PostgreSQL did not answer");
                            } else {
                                warn!(node = cfg.node, error = %e, "cannot ask for leadership");
                            }
                            cluster.set_leader(false);
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                cluster.set_leader(false);
                warn!(node = cfg.node, error = %e, "cannot reach the cluster's PostgreSQL");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(beat) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One heartbeat of leadership: a leader checks its session is alive (the lock is held as
/// long as it is), a follower asks for the lock. Either way within `within`.
async fn step(
    client: &tokio_postgres::Client,
    leads: bool,
    within: Duration,
) -> Result<bool, ClusterError> {
    if client.is_closed() {
        return Err(ClusterError::Closed);
    }
    let ask = async {
        if leads {
            client.simple_query("SELECT 1").await.map(|_| true)
        } else {
            client
                .query_one(
                    "SELECT pg_try_advisory_lock($1::int4, $2::int4)",
                    &[&LOCK.0, &LOCK.1],
                )
                .await
                .map(|row| row.get::<_, bool>(0))
        }
    };
    match tokio::time::timeout(within, ask).await {
        Ok(Ok(leads)) => Ok(leads),
        Ok(Err(source)) => Err(ClusterError::Postgres {
            what: "leadership",
            source,
        }),
        Err(_) => Err(ClusterError::Timeout(within)),
    }
}
