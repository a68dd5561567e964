//! A small shared table every node caches whole (products and groups, images, group
//! deployments, CA certificates, enrollments): written rarely, by operators, under the
//! table's cluster-wide lock.
//!
//! A store that holds its records in memory becomes a cluster node's by keeping a
//! [`Catalog`] beside its cache: [`Catalog::share`] seeds the table from the first node's
//! own records and hands back what the table holds; every write takes [`Catalog::hold`]
//! (the lock, with the table as it is, which the store makes its cache before it checks
//! anything) and ends with [`Catalog::commit`]; [`Catalog::heard`] applies other nodes'
//! changes that are newer than what the node has.

use std::sync::Arc;

use super::rows::{Exclusive, Heard, Row, SharedRows, Upsert, Versions};

pub struct Catalog {
    rows: Arc<SharedRows>,
    versions: Versions<String>,
}

impl Catalog {
    /// Makes the table the store's: when it is empty (a new cluster) it is seeded with
    /// `local` (key, JSON); returns the records it holds now, which the store caches.
    pub fn share(
        rows: Arc<SharedRows>,
        local: Vec<(String, String)>,
    ) -> Result<(Catalog, Vec<Row>), String> {
        let catalog = Catalog {
            rows,
            versions: Versions::default(),
        };
        let held = catalog.rows.exclusive()?;
        if held.rows().is_empty() && !local.is_empty() {
            let writes: Vec<Upsert> = local.into_iter().map(|(k, v)| (k, Some(v))).collect();
            catalog.commit(held, writes)?;
            let (rows, _) = catalog.rows.load()?;
            return Ok((catalog, rows));
        }
        let rows = held.rows().to_vec();
        for row in &rows {
            catalog.versions.insert(row.key.clone(), row.version);
        }
        Ok((catalog, rows))
    }

    /// The table, for its change feed.
    pub fn rows(&self) -> Arc<SharedRows> {
        self.rows.clone()
    }

    /// The table's cluster-wide lock and its records as they are: the caller makes its
    /// cache these records (`rows`, the version of each recorded here) before it checks.
    pub fn hold(&self) -> Result<Exclusive, String> {
        let held = self.rows.exclusive()?;
        self.versions.clear();
        for row in held.rows() {
            self.versions.insert(row.key.clone(), row.version);
        }
        Ok(held)
    }

    /// Writes (`Some(json)`) and deletes (`None`) under the held lock and commits.
    pub fn commit(&self, held: Exclusive, writes: Vec<Upsert>) -> Result<(), String> {
        let keys: Vec<String> = writes.iter().map(|(k, _)| k.clone()).collect();
        for (k, v) in keys.into_iter().zip(held.commit(writes)?) {
            self.versions.insert(k, v);
        }
        Ok(())
    }

    /// Hands `apply` each record another node changed that is newer than this node's copy
    /// (`None`: deleted). `cached`: the keys the node holds.
    pub fn heard(
        &self,
        heard: Heard,
        cached: impl FnOnce() -> Vec<String>,
        apply: impl FnMut(&String, Option<&Row>),
    ) {
        heard.apply_newer(&self.versions, cached, apply);
    }
}

/// A record as a catalog stores it.
pub fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
