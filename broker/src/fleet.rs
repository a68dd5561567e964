//! Products and device groups, Azure Sphere's way of organising a fleet.
//!
//! A product names a kind of device (unique in the hub, a GUID fixed at creation, a
//! description). Its device groups say who gets what: each device is in exactly one group of
//! exactly one product once assigned, and a group's settings (application updates on or off,
//! the OS feed) apply to every device in it. Creating a product creates the five groups Azure
//! Sphere creates, unless asked not to.
//!
//! Products and groups live in the same redb store as the registry. Every write commits
//! before it is acknowledged, then replaces the in-memory copy that reads use. One writer lock
//! serialises writes with device assignment, so a group cannot be deleted while a device is
//! being moved into it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::storage::Store;
use serde::{Deserialize, Serialize};

use crate::cluster::catalog::{json, Catalog};
use crate::cluster::rows::{Exclusive, Heard, Row, SharedRows, Upsert};
use crate::identity::IdentityKey;
use crate::registry::{now_rfc3339, Identity, Registry, RegistryError};
use crate::storage::JsonTable;

/// Key: product id (GUID). Value: JSON [`Product`].
const PRODUCTS: JsonTable<Product> = JsonTable::new("products");
/// Key: group id (GUID). Value: JSON [`DeviceGroup`].
const GROUPS: JsonTable<DeviceGroup> = JsonTable::new("device_groups");

/// Longest product or group name, as in Azure Sphere.
pub const MAX_NAME: usize = 50;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FleetError {
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    /// Refused because devices still depend on it.
    #[error("{0}")]
    InUse(String),
    #[error("store: {0}")]
    Store(String),
}

crate::storage::store_errors!(FleetError);

impl From<RegistryError> for FleetError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(what) => FleetError::NotFound(what),
            RegistryError::Exists(what) => FleetError::Exists(what),
            RegistryError::InvalidId(e) => FleetError::Invalid {
                field: "deviceId",
                message: e.to_string(),
            },
            RegistryError::Invalid { field, message } => FleetError::Invalid { field, message },
            RegistryError::Store(s) => FleetError::Store(s),
        }
    }
}

/// A product or group name: 1 to 50 characters, ASCII letters, digits and spaces, not only
/// spaces. Compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn new(field: &'static str, s: &str) -> Result<Name, FleetError> {
        let invalid = |message: String| FleetError::Invalid { field, message };
        if s.trim().is_empty() {
            return Err(invalid("must not be empty".into()));
        }
        let count = s.chars().count();
        if count > MAX_NAME {
            return Err(invalid(format!(
                "'{s}' is {count} characters; at most {MAX_NAME}"
            )));
        }
        if let Some((i, c)) = s
            .chars()
            .enumerate()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == ' '))
        {
            return Err(invalid(format!(
                "'{s}': character {} ({c:?}) is not a letter, digit or space",
                i + 1
            )));
        }
        Ok(Name(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Names are unique case-insensitively.
    pub fn same(&self, other: &str) -> bool {
        self.0.eq_ignore_ascii_case(other)
    }
}

impl TryFrom<String> for Name {
    type Error = FleetError;
    fn try_from(s: String) -> Result<Name, FleetError> {
        Name::new("name", &s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which OS releases a group's devices take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OsFeed {
    /// Released OS versions.
    Retail,
    /// Release candidates, ahead of retail, for evaluation.
    RetailEval,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub id: String,
    pub name: Name,
    #[serde(default)]
    pub description: String,
    pub created_time: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceGroup {
    pub id: String,
    pub product_id: String,
    pub name: Name,
    #[serde(default)]
    pub description: String,
    /// Whether deployments' application images reach this group's devices.
    pub application_updates: bool,
    pub os_feed: OsFeed,
    pub created_time: String,
}

/// The groups a new product gets (Azure Sphere's defaults): name, description, application
/// updates, OS feed.
pub const DEFAULT_GROUPS: [(&str, &str, bool, OsFeed); 5] = [
    (
        "Development",
        "Devices used to develop applications; deployments do not update their applications",
        false,
        OsFeed::Retail,
    ),
    (
        "Field Test",
        "Devices testing applications in the field",
        true,
        OsFeed::Retail,
    ),
    ("Production", "Devices in production", true, OsFeed::Retail),
    (
        "Field Test OS Evaluation",
        "Field test devices evaluating upcoming OS releases",
        true,
        OsFeed::RetailEval,
    ),
    (
        "Production OS Evaluation",
        "Production devices evaluating upcoming OS releases",
        true,
        OsFeed::RetailEval,
    ),
];

/// Changes to a group; `None` keeps the field.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_updates: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_feed: Option<OsFeed>,
}

#[derive(Default)]
struct State {
    products: BTreeMap<String, Product>,
    groups: BTreeMap<String, DeviceGroup>,
}

pub struct Fleet {
    db: Arc<Store>,
    state: RwLock<State>,
    writer: Mutex<()>,
    /// On a cluster node: the shared table (`p/{id}` products, `g/{id}` groups) and the
    /// version of each cached record.
    shared: std::sync::OnceLock<Catalog>,
}

/// A writer's hold on the fleet: this node's lock and, on a cluster node, the cluster-wide
/// one with the table as it stood when it was taken.
struct Held<'a> {
    _local: MutexGuard<'a, ()>,
    exclusive: Option<Exclusive>,
}

pub fn new_guid() -> String {
    let b: [u8; 16] = rand::random();
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

impl Fleet {
    pub fn open(db: Arc<Store>) -> Result<Fleet, FleetError> {
        let state = State {
            products: PRODUCTS.load::<FleetError>(&db)?.into_iter().collect(),
            groups: GROUPS.load::<FleetError>(&db)?.into_iter().collect(),
        };
        Ok(Fleet {
            db,
            state: RwLock::new(state),
            writer: Mutex::new(()),
            shared: std::sync::OnceLock::new(),
        })
    }

    /// Makes this fleet a cluster node's: products and groups live in `rows` from now on.
    /// The first node of a new cluster brings its own.
    pub fn share(&self, rows: Arc<SharedRows>) -> Result<(), FleetError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let local = {
            let state = self.read();
            state
                .products
                .values()
                .map(|p| (format!("p/{}", p.id), json(p)))
                .chain(
                    state
                        .groups
                        .values()
                        .map(|g| (format!("g/{}", g.id), json(g))),
                )
                .collect()
        };
        let (catalog, rows) = Catalog::share(rows, local).map_err(FleetError::Store)?;
        self.replace_state(&rows);
        let _ = self.shared.set(catalog);
        Ok(())
    }

    /// The shared table, on a cluster node.
    pub fn shared_rows(&self) -> Option<Arc<SharedRows>> {
        self.shared.get().map(Catalog::rows)
    }

    /// Replaces what this node holds with the shared table's records.
    fn replace_state(&self, rows: &[Row]) {
        let mut state = State::default();
        for row in rows {
            apply_row(&mut state, &row.key, Some(&row.body));
        }
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// Applies what another node changed (newer records only).
    pub fn heard(&self, heard: Heard) {
        let Some(catalog) = self.shared.get() else {
            return;
        };
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let cached = || {
            let state = self.read();
            state
                .products
                .keys()
                .map(|id| format!("p/{id}"))
                .chain(state.groups.keys().map(|id| format!("g/{id}")))
                .collect()
        };
        catalog.heard(heard, cached, |key, row| {
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            apply_row(&mut state, key, row.map(|r| r.body.as_str()));
        });
    }

    /// Takes the writer's lock; on a cluster node also the cluster-wide one, and reads the
    /// shared table afresh under it, so what the writer checks (a name free, a group
    /// empty) is true of the whole cluster when it commits.
    fn lock(&self) -> Result<Held<'_>, FleetError> {
        // redb transactions are atomic, so a poisoned lock guards nothing half-written.
        let local = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let exclusive = match self.shared.get() {
            Some(catalog) => {
                let held = catalog.hold().map_err(FleetError::Store)?;
                self.replace_state(held.rows());
                Some(held)
            }
            None => None,
        };
        Ok(Held {
            _local: local,
            exclusive,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits these puts and deletes in one transaction, then applies them to memory.
    fn commit(
        &self,
        held: Held<'_>,
        products: &[&Product],
        groups: &[&DeviceGroup],
        delete_products: &[&str],
        delete_groups: &[&str],
    ) -> Result<(), FleetError> {
        if let (Some(exclusive), Some(catalog)) = (held.exclusive, self.shared.get()) {
            let writes: Vec<Upsert> = products
                .iter()
                .map(|p| (format!("p/{}", p.id), Some(json(p))))
                .chain(
                    groups
                        .iter()
                        .map(|g| (format!("g/{}", g.id), Some(json(g)))),
                )
                .chain(delete_products.iter().map(|id| (format!("p/{id}"), None)))
                .chain(delete_groups.iter().map(|id| (format!("g/{id}"), None)))
                .collect();
            catalog
                .commit(exclusive, writes)
                .map_err(FleetError::Store)?;
        } else {
            let tx = self.db.begin_write()?;
            for product in products {
                PRODUCTS.put::<FleetError>(&tx, &product.id, product)?;
            }
            for id in delete_products {
                PRODUCTS.remove::<FleetError>(&tx, id)?;
            }
            for group in groups {
                GROUPS.put::<FleetError>(&tx, &group.id, *group)?;
            }
            for id in delete_groups {
                GROUPS.remove::<FleetError>(&tx, id)?;
            }
            tx.commit()?;
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        for p in products {
            state.products.insert(p.id.clone(), (*p).clone());
        }
        for g in groups {
            state.groups.insert(g.id.clone(), (*g).clone());
        }
        for id in delete_products {
            state.products.remove(*id);
        }
        for id in delete_groups {
            state.groups.remove(*id);
        }
        Ok(())
    }

    /// Every product, by name.
    pub fn products(&self) -> Vec<Product> {
        let mut v: Vec<Product> = self.read().products.values().cloned().collect();
        v.sort_by_key(|p| p.name.as_str().to_ascii_lowercase());
        v
    }

    /// A product by GUID or (case-insensitive) name.
    pub fn product(&self, name_or_id: &str) -> Option<Product> {
        let state = self.read();
        state.products.get(name_or_id).cloned().or_else(|| {
            state
                .products
                .values()
                .find(|p| p.name.same(name_or_id))
                .cloned()
        })
    }

    fn require_product(&self, name_or_id: &str) -> Result<Product, FleetError> {
        self.product(name_or_id)
            .ok_or_else(|| FleetError::NotFound(format!("product '{name_or_id}'")))
    }

    /// A product's groups, by name.
    pub fn groups_of(&self, product_id: &str) -> Vec<DeviceGroup> {
        let mut v: Vec<DeviceGroup> = self
            .read()
            .groups
            .values()
            .filter(|g| g.product_id == product_id)
            .cloned()
            .collect();
        v.sort_by_key(|g| g.name.as_str().to_ascii_lowercase());
        v
    }

    pub fn group_by_id(&self, id: &str) -> Option<DeviceGroup> {
        self.read().groups.get(id).cloned()
    }

    /// A group by product (name or GUID) and group (name or GUID).
    pub fn group(&self, product: &str, group: &str) -> Result<DeviceGroup, FleetError> {
        let p = self.require_product(product)?;
        self.groups_of(&p.id)
            .into_iter()
            .find(|g| g.id == group || g.name.same(group))
            .ok_or_else(|| FleetError::NotFound(format!("device group '{}/{group}'", p.name)))
    }

    /// A group by `Product/Group` path, or by its GUID.
    pub fn resolve(&self, path: &str) -> Result<DeviceGroup, FleetError> {
        if let Some(g) = self.group_by_id(path) {
            return Ok(g);
        }
        let Some((product, group)) = path.split_once('/') else {
            return Err(FleetError::Invalid {
                field: "deviceGroup",
                message: format!("'{path}' is not \"Product/Group\" or a group id"),
            });
        };
        self.group(product, group)
    }

    /// `Product/Group` of a group id.
    pub fn path_of(&self, group_id: &str) -> Option<String> {
        let state = self.read();
        let g = state.groups.get(group_id)?;
        let p = state.products.get(&g.product_id)?;
        Some(format!("{}/{}", p.name, g.name))
    }

    /// Creates a product and, unless `default_groups` is false, its five default groups, in
    /// one transaction.
    pub fn create_product(
        &self,
        name: &str,
        description: Option<String>,
        default_groups: bool,
    ) -> Result<(Product, Vec<DeviceGroup>), FleetError> {
        let name = Name::new("name", name)?;
        let held = self.lock()?;
        if self.product(name.as_str()).is_some() {
            return Err(FleetError::Exists(format!("product '{name}'")));
        }
        let now = now_rfc3339();
        let product = Product {
            id: new_guid(),
            name,
            description: description.unwrap_or_default(),
            created_time: now.clone(),
        };
        let groups: Vec<DeviceGroup> = if default_groups {
            DEFAULT_GROUPS
                .iter()
                .map(|(name, description, updates, feed)| DeviceGroup {
                    id: new_guid(),
                    product_id: product.id.clone(),
                    name: Name((*name).to_string()),
                    description: (*description).to_string(),
                    application_updates: *updates,
                    os_feed: *feed,
                    created_time: now.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        self.commit(
            held,
            &[&product],
            &groups.iter().collect::<Vec<_>>(),
            &[],
            &[],
        )?;
        Ok((product, groups))
    }

    /// Renames a product or changes its description; its GUID never changes.
    pub fn update_product(
        &self,
        name_or_id: &str,
        new_name: Option<&str>,
        description: Option<String>,
    ) -> Result<Product, FleetError> {
        let new_name = new_name.map(|n| Name::new("name", n)).transpose()?;
        let held = self.lock()?;
        let mut product = self.require_product(name_or_id)?;
        if let Some(n) = new_name {
            if let Some(other) = self.product(n.as_str()) {
                if other.id != product.id {
                    return Err(FleetError::Exists(format!("product '{n}'")));
                }
            }
            product.name = n;
        }
        if let Some(d) = description {
            product.description = d;
        }
        self.commit(held, &[&product], &[], &[], &[])?;
        Ok(product)
    }

    /// Deletes a product and its groups; refused while any device is in one of them.
    pub fn delete_product(&self, name_or_id: &str, registry: &Registry) -> Result<(), FleetError> {
        let held = self.lock()?;
        let product = self.require_product(name_or_id)?;
        let groups = self.groups_of(&product.id);
        let ids: Vec<&str> = groups.iter().map(|g| g.id.as_str()).collect();
        let devices = devices_in(registry, &ids);
        if !devices.is_empty() {
            return Err(FleetError::InUse(format!(
                "product '{}' still has {} device(s) in its groups (e.g. '{}'); move them to \
                 another product's group first",
                product.name,
                devices.len(),
                devices[0]
            )));
        }
        self.commit(held, &[], &[], &[product.id.as_str()], &ids)
    }

    pub fn create_group(
        &self,
        product: &str,
        name: &str,
        description: Option<String>,
        application_updates: Option<bool>,
        os_feed: Option<OsFeed>,
    ) -> Result<DeviceGroup, FleetError> {
        let name = Name::new("name", name)?;
        let held = self.lock()?;
        let p = self.require_product(product)?;
        if self
            .groups_of(&p.id)
            .iter()
            .any(|g| g.name.same(name.as_str()))
        {
            return Err(FleetError::Exists(format!(
                "device group '{}/{name}'",
                p.name
            )));
        }
        let group = DeviceGroup {
            id: new_guid(),
            product_id: p.id,
            name,
            description: description.unwrap_or_default(),
            application_updates: application_updates.unwrap_or(true),
            os_feed: os_feed.unwrap_or(OsFeed::Retail),
            created_time: now_rfc3339(),
        };
        self.commit(held, &[], &[&group], &[], &[])?;
        Ok(group)
    }

    pub fn update_group(
        &self,
        product: &str,
        group: &str,
        update: GroupUpdate,
    ) -> Result<DeviceGroup, FleetError> {
        let new_name = update
            .name
            .as_deref()
            .map(|n| Name::new("name", n))
            .transpose()?;
        let held = self.lock()?;
        let mut g = self.group(product, group)?;
        if let Some(n) = new_name {
            let clash = self
                .groups_of(&g.product_id)
                .into_iter()
                .any(|other| other.id != g.id && other.name.same(n.as_str()));
            if clash {
                return Err(FleetError::Exists(format!("device group '{product}/{n}'")));
            }
            g.name = n;
        }
        if let Some(d) = update.description {
            g.description = d;
        }
        if let Some(u) = update.application_updates {
            g.application_updates = u;
        }
        if let Some(f) = update.os_feed {
            g.os_feed = f;
        }
        self.commit(held, &[], &[&g], &[], &[])?;
        Ok(g)
    }

    /// Deletes a group; refused while devices are in it.
    pub fn delete_group(
        &self,
        product: &str,
        group: &str,
        registry: &Registry,
    ) -> Result<(), FleetError> {
        let held = self.lock()?;
        let g = self.group(product, group)?;
        let devices = devices_in(registry, &[g.id.as_str()]);
        if !devices.is_empty() {
            return Err(FleetError::InUse(format!(
                "device group '{product}/{}' still has {} device(s) (e.g. '{}'); move them \
                 first",
                g.name,
                devices.len(),
                devices[0]
            )));
        }
        self.commit(held, &[], &[], &[], &[g.id.as_str()])
    }

    /// Moves a device into the group at `path` (`Product/Group` or a group id). A device is
    /// in exactly one group, so this replaces whatever group it was in.
    pub fn assign(
        &self,
        registry: &Registry,
        device: &IdentityKey,
        path: &str,
    ) -> Result<Identity, FleetError> {
        if device.module.is_some() {
            return Err(FleetError::Invalid {
                field: "deviceGroup",
                message: "modules belong to their device's group".into(),
            });
        }
        let _held = self.lock()?;
        let group = self.resolve(path)?;
        Ok(registry.set_device_group(device, Some(group.id))?)
    }

    /// How many devices each group holds.
    pub fn device_counts(&self, registry: &Registry) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for identity in registry.identities() {
            if let (None, Some(g)) = (&identity.module_id, &identity.device_group_id) {
                *counts.entry(g.clone()).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// Devices (ids, sorted) in any of these groups.
fn devices_in(registry: &Registry, groups: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = registry
        .identities()
        .iter()
        .filter(|i| i.module_id.is_none())
        .filter(|i| {
            i.device_group_id
                .as_deref()
                .is_some_and(|g| groups.contains(&g))
        })
        .map(|i| i.device_id.to_string())
        .collect();
    v.sort();
    v
}

/// Applies one shared record (`p/{id}` or `g/{id}`; `None`: deleted) to `state`.
fn apply_row(state: &mut State, key: &str, body: Option<&str>) {
    if let Some(id) = key.strip_prefix("p/") {
        match body.and_then(|b| serde_json::from_str::<Product>(b).ok()) {
            Some(p) => {
                state.products.insert(id.to_string(), p);
            }
            None => {
                state.products.remove(id);
            }
        }
    } else if let Some(id) = key.strip_prefix("g/") {
        match body.and_then(|b| serde_json::from_str::<DeviceGroup>(b).ok()) {
            Some(g) => {
                state.groups.insert(id.to_string(), g);
            }
            None => {
                state.groups.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(Name::new("name", "Coffee Maker 2").is_ok());
        assert!(Name::new("name", &"a".repeat(50)).is_ok());
        let e = Name::new("name", &"a".repeat(51)).unwrap_err();
        assert!(e.to_string().contains("51 characters; at most 50"), "{e}");
        let e = Name::new("name", "Coffee-Maker").unwrap_err();
        assert!(e.to_string().contains("character 7 ('-')"), "{e}");
        assert!(Name::new("name", "").is_err());
        assert!(Name::new("name", "   ").is_err());
        assert!(Name::new("name", "Caf\u{e9}").is_err());
        assert!(Name::new("name", "Production").unwrap().same("PRODUCTION"));
    }

    proptest::proptest! {
        #[test]
        fn any_name_is_accepted_or_refused_without_panic(s in "\\PC{0,80}") {
            if let Ok(n) = Name::new("name", &s) {
                proptest::prop_assert!(n.as_str().chars().count() <= MAX_NAME);
                proptest::prop_assert!(n.as_str().chars().all(|c| c.is_ascii_alphanumeric() || c == ' '));
            }
        }
    }

    fn fleet() -> (Fleet, Registry, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("fleet-test-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Arc::new(Store::create(&dir.join("t.redb")).unwrap());
        (
            Fleet::open(db.clone()).unwrap(),
            Registry::open(db).unwrap(),
            dir,
        )
    }

    #[test]
    fn default_groups_duplicates_and_deletion_rules() {
        let (fleet, registry, dir) = fleet();
        let (p, groups) = fleet.create_product("Coffee Maker", None, true).unwrap();
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, DEFAULT_GROUPS.map(|g| g.0).to_vec());
        assert!(!groups[0].application_updates);
        assert_eq!(groups[3].os_feed, OsFeed::RetailEval);
        assert!(matches!(
            fleet.create_product("coffee MAKER", None, true),
            Err(FleetError::Exists(_))
        ));
        assert!(matches!(
            fleet.create_group("Coffee Maker", "production", None, None, None),
            Err(FleetError::Exists(_))
        ));
        // The same group name is fine in another product.
        fleet.create_product("Toaster", None, false).unwrap();
        fleet
            .create_group("Toaster", "Production", None, None, None)
            .unwrap();

        let key = IdentityKey::parse("d1").unwrap();
        registry.create(&key, None, None).unwrap();
        fleet
            .assign(&registry, &key, "coffee maker/field test")
            .unwrap();
        let e = fleet.delete_product("Coffee Maker", &registry).unwrap_err();
        assert!(matches!(e, FleetError::InUse(_)), "{e}");
        assert!(e.to_string().contains("1 device(s)"), "{e}");
        assert!(fleet
            .delete_group("Coffee Maker", "Field Test", &registry)
            .is_err());
        fleet.assign(&registry, &key, "Toaster/Production").unwrap();
        fleet.delete_product("Coffee Maker", &registry).unwrap();
        assert!(fleet.product(&p.id).is_none());
        assert!(fleet.groups_of(&p.id).is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
