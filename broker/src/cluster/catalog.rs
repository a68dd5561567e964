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

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::rows::{Exclusive, Heard, Row, SharedRows, Upsert, Versions};

/// A store's cache keyed by the table's own keys (a CA's name, an image's or a group
/// deployment's id): what the `*_into` helpers keep in step with the table.
pub type Keyed<T> = RwLock<BTreeMap<String, T>>;

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

impl Catalog {
    /// [`Catalog::share`] for a cache keyed by the table's keys: seeds the table from `map`
    /// and makes `map` what the table holds.
    pub fn share_into<T: Serialize + DeserializeOwned>(
        rows: Arc<SharedRows>,
        map: &Keyed<T>,
    ) -> Result<Catalog, String> {
        let local = map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), json(v)))
            .collect();
        let (catalog, rows) = Catalog::share(rows, local)?;
        fill(&rows, map);
        Ok(catalog)
    }

    /// [`Catalog::hold`], with `map` made what the table holds under the lock.
    pub fn hold_into<T: DeserializeOwned>(&self, map: &Keyed<T>) -> Result<Exclusive, String> {
        let held = self.hold()?;
        fill(held.rows(), map);
        Ok(held)
    }

    /// [`Catalog::heard`] into `map`: newer records replace, deletions remove.
    pub fn heard_into<T: DeserializeOwned>(&self, heard: Heard, map: &Keyed<T>) {
        let cached = || {
            map.read()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned()
                .collect()
        };
        self.heard(heard, cached, |key, row| {
            let mut map = map.write().unwrap_or_else(|e| e.into_inner());
            match row.and_then(|r| serde_json::from_str::<T>(&r.body).ok()) {
                Some(v) => map.insert(key.clone(), v),
                None => map.remove(key),
            };
        });
    }
}

/// Makes `map` the records of `rows` (those that can be read).
fn fill<T: DeserializeOwned>(rows: &[Row], map: &Keyed<T>) {
    let fresh = rows
        .iter()
        .filter_map(|r| Some((r.key.clone(), serde_json::from_str(&r.body).ok()?)))
        .collect();
    *map.write().unwrap_or_else(|e| e.into_inner()) = fresh;
}

/// A record as a catalog stores it.
pub fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
