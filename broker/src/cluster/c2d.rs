//! Cloud-to-device queues in the table every node shares (`fleethub_c2d`), so a message sent
//! to a device that is away reaches it on whichever node it connects to next.
//!
//! The records use the shared table shape: the key is `{device}\n{seq}` with the sequence
//! zero-padded to 20 digits, so one device's messages are one key range in sequence order
//! (`\n` is never part of a device id). The sequence is the table's version sequence,
//! taken when the message is stored: it grows across every node, which a per-node counter
//! would not, and a connection reading "after the last sequence it delivered" must never
//! find a message from another node behind its cursor. Ranges compare bytes (`COLLATE "C"`,
//! with an index of that order), whatever the database's own collation.

use super::rows::SharedRows;

fn key_of(device: &str, seq: u64) -> String {
    format!("{device}\n{seq:020}")
}

/// The key range of one device's messages: from `{device}\n` up to (not including)
/// `{device}\x0b`, the next character after `\n`.
fn range_of(device: &str, after: u64) -> (String, String) {
    (
        key_of(device, after.saturating_add(1)),
        format!("{device}\u{b}"),
    )
}

impl SharedRows {
    /// The index the range reads walk (created once, by whichever node comes first).
    pub fn index_c2d(&self) -> Result<(), String> {
        self.call(|c, table, _| {
            Box::pin(async move {
                // Under the lock table creation takes: nodes starting together do not race.
                c.batch_execute(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({}, 0);
                     CREATE INDEX IF NOT EXISTS {table}_bytes ON {table} (key COLLATE \"C\");
                     COMMIT;",
                    super::LOCK.0
                ))
                .await
            })
        })
    }

    /// Stores the message `body_for` makes with the next number of the cluster's sequence
    /// (its JSON carries that number); returns the number.
    pub fn enqueue_c2d(
        &self,
        device: &str,
        body_for: impl FnOnce(u64) -> String + Send + 'static,
    ) -> Result<u64, String> {
        let device = device.to_string();
        self.call(move |c, table, _| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let seq: i64 = tx
                    .query_one(&format!("SELECT nextval('{table}_version')"), &[])
                    .await?
                    .try_get(0)?;
                let body = body_for(seq as u64);
                tx.execute(
                    &format!(
                        "INSERT INTO {table} (key, body, etag, version) VALUES ($1, $2, '', $3)"
                    ),
                    &[&key_of(&device, seq as u64), &body, &seq],
                )
                .await?;
                tx.commit().await?;
                Ok(seq as u64)
            })
        })
    }

    /// Up to `limit` records of `device` after sequence `after`, in order: each message's
    /// JSON with its sequence.
    pub fn c2d_after(
        &self,
        device: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, String> {
        let (from, to) = range_of(device, after);
        let limit = limit.min(i64::MAX as usize) as i64;
        let rows = self.call(move |c, table, _| {
            Box::pin(async move {
                c.query(
                    &format!(
                        "SELECT body, version FROM {table}
                         WHERE key COLLATE \"C\" >= $1 AND key COLLATE \"C\" < $2
                         ORDER BY key COLLATE \"C\" LIMIT $3"
                    ),
                    &[&from, &to, &limit],
                )
                .await?
                .iter()
                .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)?)))
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            })
        })?;
        Ok(rows
            .into_iter()
            .map(|(body, seq)| (body, seq as u64))
            .collect())
    }

    /// Removes delivered or expired messages of `device`.
    pub fn remove_c2d(&self, device: &str, seqs: &[u64]) -> Result<(), String> {
        let keys: Vec<String> = seqs.iter().map(|s| key_of(device, *s)).collect();
        self.call(move |c, table, _| {
            Box::pin(async move {
                c.execute(
                    &format!("DELETE FROM {table} WHERE key = ANY($1)"),
                    &[&keys],
                )
                .await
                .map(|_| ())
            })
        })
    }

    /// Removes every message of `device` (it was deleted).
    pub fn purge_c2d(&self, device: &str) -> Result<(), String> {
        let (from, to) = (format!("{device}\n"), format!("{device}\u{b}"));
        self.call(move |c, table, _| {
            Box::pin(async move {
                c.execute(
                    &format!(
                        "DELETE FROM {table} WHERE key COLLATE \"C\" >= $1 AND key COLLATE \"C\" < $2"
                    ),
                    &[&from, &to],
                )
                .await
                .map(|_| ())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_devices_keys_are_one_range_in_sequence_order() {
        let (from, to) = range_of("d1", 9);
        let mine = [key_of("d1", 10), key_of("d1", 11), key_of("d1", u64::MAX)];
        for k in &mine {
            assert!(*k >= from && *k < to, "{k:?}");
        }
        assert!(key_of("d1", 10) < key_of("d1", 100));
        // Not mine: earlier sequences, and devices whose ids extend or precede this one.
        for k in [
            key_of("d1", 9),
            key_of("d10", 50),
            key_of("d1-x", 50),
            key_of("d", 50),
        ] {
            assert!(!(k >= from && k < to), "{k:?}");
        }
    }
}
