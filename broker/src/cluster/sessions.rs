//! Persistent MQTT sessions in the table every node shares (`fleethub_sessions`), so a
//! device that reconnects to another node finds its subscriptions there (the Azure IoT SDKs
//! never subscribe again after a reconnect).
//!
//! A session record is the single node's stored session as JSON (`filters`,
//! `last_seen_ms`), with `node` naming the node that holds its client's connection (empty
//! while the client is away); `session.rs` reads and writes the records, this file only
//! the SQL that settles who holds one. That one field
//! settles the races of a client moving between nodes:
//! - the node the client connects to *claims* the record as it reads it (one statement:
//!   `node` = itself, idle time cleared);
//! - the node it left records the disconnect time only where the record is still its own, so
//!   a late disconnect on the old node never marks a session idle that lives on elsewhere;
//! - a node that starts releases what it held before it died (its clients are gone), and the
//!   leader's expiry treats a record held by a node that stopped beating as idle since then.
//!
//! Sessions have no change feed: nothing is cached from them; each CONNECT reads its own.

use super::rows::SharedRows;

/// One write of a batch, in the order the node made them.
#[derive(Debug, Clone)]
pub enum SessionWrite {
    /// The client (connected here) subscribed: its filters as they are now.
    Put(Vec<String>),
    /// Clean session 1, identity deleted: the session ends.
    Remove,
    /// The client's last connection here closed at this time (ms since the epoch).
    Left(u64),
}

impl SharedRows {
    /// Applies a batch of session writes in one transaction (the single node's group commit).
    pub fn write_sessions(&self, writes: Vec<(String, SessionWrite)>) -> Result<(), String> {
        self.call(move |c, table, node| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                for (key, write) in &writes {
                    match write {
                        SessionWrite::Put(filters) => {
                            let body = serde_json::json!({
                                "filters": filters,
                                "last_seen_ms": 0,
                                "node": node,
                            })
                            .to_string();
                            tx.execute(
                                &format!(
                                    "INSERT INTO {table} (key, body, etag, version)
                                     VALUES ($1, $2, '', nextval('{table}_version'))
                                     ON CONFLICT (key) DO UPDATE
                                     SET body = EXCLUDED.body, version = EXCLUDED.version"
                                ),
                                &[key, &body],
                            )
                            .await?;
                        }
                        SessionWrite::Remove => {
                            tx.execute(&format!("DELETE FROM {table} WHERE key = $1"), &[key])
                                .await?;
                        }
                        SessionWrite::Left(at) => {
                            tx.execute(
                                &format!(
                                    "UPDATE {table} SET body = jsonb_set(jsonb_set(body::jsonb,
                                         '{{last_seen_ms}}', to_jsonb($2::bigint)),
                                         '{{node}}', '\"\"')::text,
                                       version = nextval('{table}_version')
                                     WHERE key = $1 AND body::jsonb->>'node' = $3"
                                ),
                                &[key, &(*at as i64), &node],
                            )
                            .await?;
                        }
                    }
                }
                tx.commit().await
            })
        })
    }

    /// Reads the sessions of `keys` (their JSON, by key) and claims them for this node, in
    /// one statement: a connect storm's claims cost one round trip per batch, not per client.
    /// A key without a session is absent from the answer.
    pub fn claim_sessions(
        &self,
        keys: Vec<String>,
    ) -> Result<std::collections::HashMap<String, String>, String> {
        self.call(move |c, table, node| {
            Box::pin(async move {
                c.query(
                    &format!(
                        "UPDATE {table} SET body = jsonb_set(jsonb_set(body::jsonb,
                             '{{last_seen_ms}}', '0'), '{{node}}', to_jsonb($2::text))::text,
                           version = nextval('{table}_version')
                         WHERE key = ANY($1) RETURNING key, body"
                    ),
                    &[&keys, &node],
                )
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
            })
        })
    }

    /// At a node's start: the sessions it held before it stopped (or died) are idle from now,
    /// since none of their clients is connected to it any more.
    pub fn release_sessions(&self, now_ms: u64) -> Result<u64, String> {
        self.call(move |c, table, node| {
            Box::pin(async move {
                c.execute(
                    &format!(
                        "UPDATE {table} SET body = jsonb_set(jsonb_set(body::jsonb,
                             '{{last_seen_ms}}', to_jsonb($2::bigint)), '{{node}}', '\"\"')::text,
                           version = nextval('{table}_version')
                         WHERE body::jsonb->>'node' = $1"
                    ),
                    &[&node, &(now_ms as i64)],
                )
                .await
            })
        })
    }

    /// Removes sessions idle longer than `max_idle_ms`: away since before `now - max_idle`,
    /// or held by a node that has not beaten (or has stopped) for that long. Run by the
    /// leader; returns how many went.
    pub fn expire_sessions(&self, now_ms: u64, max_idle_ms: u64) -> Result<u64, String> {
        self.call(move |c, table, _| {
            Box::pin(async move {
                c.execute(
                    &format!(
                        "DELETE FROM {table} s WHERE
                           ((s.body::jsonb->>'last_seen_ms')::bigint <> 0
                             AND (s.body::jsonb->>'last_seen_ms')::bigint < $1)
                           OR (coalesce(s.body::jsonb->>'node', '') <> ''
                             AND NOT EXISTS (SELECT 1 FROM fleethub_nodes n
                               WHERE n.node = s.body::jsonb->>'node' AND NOT n.stopped
                                 AND n.heartbeat_at > now() - $2::bigint * interval '1 millisecond'))"
                    ),
                    &[
                        &(now_ms.saturating_sub(max_idle_ms) as i64),
                        &(max_idle_ms as i64),
                    ],
                )
                .await
            })
        })
    }

    /// How many records the table holds.
    pub fn count(&self) -> Result<i64, String> {
        self.call(|c, table, _| {
            Box::pin(async move {
                c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                    .await?
                    .try_get(0)
            })
        })
    }

    /// The first node of a cluster brings its own sessions (key, JSON): written where the
    /// table is empty, never over another node's.
    pub fn seed_sessions(&self, local: Vec<(String, String)>) -> Result<(), String> {
        if local.is_empty() || self.count()? > 0 {
            return Ok(());
        }
        let rows = local
            .into_iter()
            .map(|(k, body)| (k, body, String::new()))
            .collect();
        self.insert_new(rows).map(|_| ())
    }
}
