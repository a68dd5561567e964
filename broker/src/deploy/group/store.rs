//! Where group deployments are kept (redb): every deployment made for a group, newest in
//! force. Knows no hub.
//!
//! On a cluster node ([`GroupDeployments::share`]) they live in a table the nodes share;
//! a new one is numbered under the table's cluster-wide lock, so "newest" means the same
//! on every node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::storage::Store;
use serde::{Deserialize, Serialize};

use super::super::DeployError;
use crate::cluster::catalog::{json, Catalog};
use crate::cluster::rows::{Heard, SharedRows};
use crate::images::Images;
use crate::registry::now_rfc3339;
use crate::storage::JsonTable;

/// Key: deployment id (GUID). Value: JSON [`GroupDeployment`].
const GROUP_DEPLOYMENTS: JsonTable<GroupDeployment> = JsonTable::new("group_deployments");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupDeployment {
    pub id: String,
    pub group_id: String,
    /// As given: image ids (pinned), `name:X.Y.Z` (resolved to an id at creation) or
    /// `name:latest` (kept, resolved whenever the state is computed).
    pub images: Vec<String>,
    pub created_time: String,
    /// Creation order, so "newest" never depends on clock resolution.
    pub sequence: u64,
}

pub struct GroupDeployments {
    db: Arc<Store>,
    by_id: RwLock<BTreeMap<String, GroupDeployment>>,
    writer: Mutex<()>,
    /// On a cluster node: the table the nodes share (`cluster::catalog`).
    shared: std::sync::OnceLock<Catalog>,
}

impl GroupDeployments {
    pub fn open(db: Arc<Store>) -> Result<GroupDeployments, DeployError> {
        let by_id: BTreeMap<String, GroupDeployment> = GROUP_DEPLOYMENTS
            .load::<DeployError>(&db)?
            .into_iter()
            .collect();
        Ok(GroupDeployments {
            db,
            by_id: RwLock::new(by_id),
            writer: Mutex::new(()),
            shared: std::sync::OnceLock::new(),
        })
    }

    /// Makes this store a cluster node's. The first node of a new cluster brings its own.
    pub fn share(&self, rows: Arc<SharedRows>) -> Result<(), DeployError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let catalog = Catalog::share_into(rows, &self.by_id).map_err(DeployError::Store)?;
        let _ = self.shared.set(catalog);
        Ok(())
    }

    /// The shared table, on a cluster node.
    pub fn shared_rows(&self) -> Option<Arc<SharedRows>> {
        self.shared.get().map(Catalog::rows)
    }

    /// Applies what another node changed (newer records only).
    pub fn heard(&self, heard: Heard) {
        if let Some(catalog) = self.shared.get() {
            let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            catalog.heard_into(heard, &self.by_id);
        }
    }

    /// Writes (`Some`) and deletes (`None`) records: under the held cluster-wide lock on a
    /// cluster node, in one redb transaction otherwise; then in memory.
    fn write(
        &self,
        held: Option<crate::cluster::rows::Exclusive>,
        writes: Vec<(String, Option<GroupDeployment>)>,
    ) -> Result<(), DeployError> {
        match (held, self.shared.get()) {
            (Some(held), Some(catalog)) => {
                let rows = writes
                    .iter()
                    .map(|(id, d)| (id.clone(), d.as_ref().map(json)))
                    .collect();
                catalog.commit(held, rows).map_err(DeployError::Store)?;
            }
            _ => {
                let tx = self.db.begin_write()?;
                for (id, d) in &writes {
                    match d {
                        Some(d) => GROUP_DEPLOYMENTS.put::<DeployError>(&tx, id, d)?,
                        None => GROUP_DEPLOYMENTS.remove::<DeployError>(&tx, id)?,
                    }
                }
                tx.commit()?;
            }
        }
        let mut map = self.by_id.write().unwrap_or_else(|e| e.into_inner());
        for (id, d) in writes {
            match d {
                Some(d) => {
                    map.insert(id, d);
                }
                None => {
                    map.remove(&id);
                }
            }
        }
        Ok(())
    }

    /// On a cluster node: the table's cluster-wide lock, with this node's cache made what
    /// the table holds under it.
    fn hold(&self) -> Result<Option<crate::cluster::rows::Exclusive>, DeployError> {
        match self.shared.get() {
            Some(catalog) => catalog
                .hold_into(&self.by_id)
                .map(Some)
                .map_err(DeployError::Store),
            None => Ok(None),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, GroupDeployment>> {
        self.by_id.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A group's deployments, newest first; the first is the one in force.
    pub fn history(&self, group_id: &str) -> Vec<GroupDeployment> {
        let mut v: Vec<GroupDeployment> = self
            .read()
            .values()
            .filter(|d| d.group_id == group_id)
            .cloned()
            .collect();
        v.sort_by_key(|d| std::cmp::Reverse(d.sequence));
        v
    }

    pub fn current(&self, group_id: &str) -> Option<GroupDeployment> {
        self.history(group_id).into_iter().next()
    }

    /// Records a new deployment for a group (replacing the current one). Every image
    /// reference must resolve now; exact versions are pinned to their ids.
    pub fn create(
        &self,
        catalog: &Images,
        group_id: &str,
        refs: &[String],
    ) -> Result<GroupDeployment, DeployError> {
        if refs.is_empty() {
            return Err(DeployError::Invalid {
                field: "images",
                message: "a deployment names at least one image".into(),
            });
        }
        let mut images = Vec::with_capacity(refs.len());
        for r in refs {
            let image = catalog.resolve(r)?;
            images.push(if r.ends_with(":latest") {
                r.clone()
            } else {
                image.id
            });
        }
        images.dedup();
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.hold()?;
        let sequence = self.read().values().map(|d| d.sequence).max().unwrap_or(0) + 1;
        let d = GroupDeployment {
            id: crate::fleet::new_guid(),
            group_id: group_id.to_string(),
            images,
            created_time: now_rfc3339(),
            sequence,
        };
        self.write(held, vec![(d.id.clone(), Some(d.clone()))])?;
        Ok(d)
    }

    /// Forgets a deleted group's deployments.
    pub fn forget_group(&self, group_id: &str) -> Result<(), DeployError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.hold()?;
        let gone = self
            .history(group_id)
            .into_iter()
            .map(|d| (d.id, None))
            .collect();
        self.write(held, gone)
    }

    /// Groups whose deployment in force follows `name:latest`.
    pub fn groups_following(&self, name: &str) -> Vec<String> {
        let latest = format!("{name}:latest");
        let groups: std::collections::BTreeSet<String> =
            self.read().values().map(|d| d.group_id.clone()).collect();
        groups
            .into_iter()
            .filter(|g| self.current(g).is_some_and(|d| d.images.contains(&latest)))
            .collect()
    }
}
