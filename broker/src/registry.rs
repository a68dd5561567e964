//! The identity registry: devices and modules with their keys and status, durable in redb.
//!
//! Every write commits to the store before it is acknowledged (redb commits are ACID and
//! fsynced), then updates an in-memory cache that CONNECT authentication reads without
//! touching the disk. Connection state and last activity are runtime facts kept beside the
//! cache; last activity is written back when a connection closes.

use std::sync::Arc;
use std::time::SystemTime;

use crate::storage::Store;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::cluster::rows::{Heard, SharedRows, Versions};
use crate::identity::{DeviceId, IdError, IdentityKey};
use crate::sas;
use crate::storage::JsonTable;

/// Key: `deviceId` or `deviceId/moduleId` (`/` never appears in an id). Value: JSON record.
/// Key: `device` or `device/module`. Value: JSON [`Identity`].
const IDENTITIES: JsonTable<Identity> = JsonTable::new("identities");

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("store: {0}")]
    Store(String),
}

crate::storage::store_errors!(RegistryError);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    pub primary_key: String,
    pub secondary_key: String,
}

/// An X.509 self-signed device's certificate fingerprints (hex SHA-1 or SHA-256 of the
/// certificate, any case, colons allowed), as IoT Hub registers them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_thumbprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_thumbprint: Option<String>,
}

/// How an identity authenticates, IoT Hub's `authentication.type`: `sas` (a token signed
/// with one of its keys), `selfSigned` (a TLS client certificate with a registered
/// thumbprint). Keys are kept for every kind; only `sas` accepts tokens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    #[serde(rename = "type")]
    pub kind: String,
    pub symmetric_key: SymmetricKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<X509Thumbprint>,
}

/// `authentication.type` values.
pub const AUTH_SAS: &str = "sas";
pub const AUTH_SELF_SIGNED: &str = "selfSigned";
/// A certificate that chains to a verified CA and names the device in its common name.
pub const AUTH_CA: &str = "certificateAuthority";

/// A registry entry as stored and as the API shows it (IoT Hub's field names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub device_id: crate::identity::DeviceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<crate::identity::ModuleId>,
    /// Random per creation: a device deleted and re-created is a different identity.
    pub generation_id: String,
    /// Changes on every update.
    pub etag: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    pub authentication: Authentication,
    pub created_time: String,
    #[serde(default)]
    pub last_activity_time: Option<String>,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// The device group (GUID) a device is in; see `fleet`. Modules have none of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_group_id: Option<String>,
}

/// IoT Hub's device capabilities. An `iotEdge` device is a gateway: messages it forwards keep
/// the original device and module ids they carry (a nested fleethub, an IoT Edge device).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    #[serde(default)]
    pub iot_edge: bool,
}

/// What the API returns: the record plus runtime connection state and, for a device in a
/// group, the group's `Product/Group` path.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityView {
    #[serde(flatten)]
    pub identity: Identity,
    pub connection_state: ConnectionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_group: Option<String>,
}

/// IoT Hub's `connectionState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionState {
    Connected,
    Disconnected,
}

/// Fields an update may change.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthenticationInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// `Product/Group` (or a group id) to move a device into; applied by `fleet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_group: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthenticationInput {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<X509Thumbprint>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SymmetricKeyInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

#[derive(Default)]
struct Live {
    connected: bool,
    last_activity: Option<SystemTime>,
}

pub struct Registry {
    db: Arc<Store>,
    /// Serialises read-modify-write operations: without it, a last-activity write that read
    /// the record before an API update could put the old record back over it.
    writer: std::sync::Mutex<()>,
    cache: DashMap<IdentityKey, Arc<Identity>>,
    live: DashMap<IdentityKey, Live>,
    /// Identities whose last activity waits to be written.
    activity: crate::gathered::Gathered<IdentityKey>,
    /// On a cluster node: the table every node shares, which then holds the records instead
    /// of the local store (the cache follows it through [`Registry::heard`]).
    shared: std::sync::OnceLock<Arc<SharedRows>>,
    /// On a cluster node: the shared version of each cached record (of a deletion: the
    /// version it was deleted at), so a late answer never puts an older record back.
    versions: Versions,
}

/// How often a write that found the record changed by another node reads it again.
const SHARED_RETRIES: usize = 8;

/// Now as RFC 3339 with milliseconds (`2026-11-29T12:00:00.123Z`), as IoT Hub writes times.
pub fn now_rfc3339() -> String {
    rfc3339_millis(SystemTime::now())
}

/// `t` as RFC 3339 with milliseconds. Every telemetry message is stamped with its enqueued
/// time, so the date and time of day are formatted once per second per thread and only the
/// milliseconds per call (humantime's formatter on every message was 1.4% of the routed path's
/// CPU).
pub fn rfc3339_millis(t: SystemTime) -> String {
    use std::cell::RefCell;
    use std::time::{Duration, UNIX_EPOCH};
    thread_local! {
        /// The second last formatted on this thread, and its text up to the seconds.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let Ok(since) = t.duration_since(UNIX_EPOCH) else {
        return humantime::format_rfc3339_millis(t).to_string();
    };
    let (secs, millis) = (since.as_secs(), since.subsec_millis());
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != secs || second.1.is_empty() {
            let mut text =
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs))
                    .to_string();
            text.pop(); // the 'Z'
            *second = (secs, text);
        }
        let mut out = String::with_capacity(second.1.len() + 5);
        out.push_str(&second.1);
        out.push('.');
        for digit in [millis / 100, millis / 10 % 10, millis % 10] {
            out.push(char::from(b'0' + digit as u8));
        }
        out.push('Z');
        out
    })
}

fn new_tag() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn check_key(field: &'static str, key: &str) -> Result<(), RegistryError> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| RegistryError::Invalid {
            field,
            message: "not base64".into(),
        })?;
    if !(16..=64).contains(&bytes.len()) {
        return Err(RegistryError::Invalid {
            field,
            message: format!("{} bytes; keys are 16 to 64 bytes", bytes.len()),
        });
    }
    Ok(())
}

fn auth_from(
    input: Option<AuthenticationInput>,
    is_module: bool,
) -> Result<Authentication, RegistryError> {
    let input = input.unwrap_or_default();
    let kind = input.kind.clone().unwrap_or_else(|| AUTH_SAS.into());
    let x509_thumbprint = match kind.as_str() {
        AUTH_SAS | AUTH_CA => {
            if input.x509_thumbprint.is_some() {
                return Err(RegistryError::Invalid {
                    field: "authentication.x509Thumbprint",
                    message: "only for authentication type \"selfSigned\"".into(),
                });
            }
            if kind == AUTH_CA && is_module {
                return Err(RegistryError::Invalid {
                    field: "authentication.type",
                    message: "certificateAuthority is for devices; modules use sas or selfSigned".into(),
                });
            }
            None
        }
        AUTH_SELF_SIGNED => {
            let t = input.x509_thumbprint.clone().unwrap_or_default();
            let mut any = false;
            for (field, value) in [
                (
                    "authentication.x509Thumbprint.primaryThumbprint",
                    &t.primary_thumbprint,
                ),
                (
                    "authentication.x509Thumbprint.secondaryThumbprint",
                    &t.secondary_thumbprint,
                ),
            ] {
                if let Some(v) = value {
                    if crate::x509::normalize_thumbprint(v).is_none() {
                        return Err(RegistryError::Invalid {
                            field,
                            message: format!("'{v}': 40 (SHA-1) or 64 (SHA-256) hex digits"),
                        });
                    }
                    any = true;
                }
            }
            if !any {
                return Err(RegistryError::Invalid {
                    field: "authentication.x509Thumbprint.primaryThumbprint",
                    message: "a selfSigned identity needs a thumbprint".into(),
                });
            }
            Some(t)
        }
        other => {
            return Err(RegistryError::Invalid {
                field: "authentication.type",
                message: format!(
                    "'{other}' is not supported; use \"sas\", \"selfSigned\" or \"certificateAuthority\""
                ),
            })
        }
    };
    let keys = input.symmetric_key.unwrap_or_default();
    let primary_key = keys.primary_key.unwrap_or_else(sas::new_key);
    let secondary_key = keys.secondary_key.unwrap_or_else(sas::new_key);
    check_key("authentication.symmetricKey.primaryKey", &primary_key)?;
    check_key("authentication.symmetricKey.secondaryKey", &secondary_key)?;
    Ok(Authentication {
        kind,
        symmetric_key: SymmetricKey {
            primary_key,
            secondary_key,
        },
        x509_thumbprint,
    })
}

impl Registry {
    /// Loads every identity of the store into the cache.
    pub fn open(db: Arc<Store>) -> Result<Registry, RegistryError> {
        let cache = DashMap::new();
        for (k, identity) in IDENTITIES.load::<RegistryError>(&db)? {
            cache.insert(IdentityKey::parse(&k)?, Arc::new(identity));
        }
        Ok(Registry {
            db,
            writer: std::sync::Mutex::new(()),
            cache,
            live: DashMap::new(),
            activity: Default::default(),
            shared: std::sync::OnceLock::new(),
            versions: Versions::default(),
        })
    }

    /// Makes this registry a cluster node's: the records live in `rows` from now on. The
    /// first node of a new cluster seeds the shared table with what its own store holds;
    /// every node then takes the shared table as it is.
    pub fn share(&self, rows: Arc<SharedRows>) -> Result<(), RegistryError> {
        let _writer = self.lock();
        let (mut all, _) = rows.load().map_err(RegistryError::Store)?;
        if all.is_empty() {
            let local: Vec<(String, String, String)> = self
                .cache
                .iter()
                .map(|e| row_of(e.key(), e.value()))
                .collect::<Result<_, _>>()?;
            if !local.is_empty() {
                rows.insert_new(local).map_err(RegistryError::Store)?;
                all = rows.load().map_err(RegistryError::Store)?.0;
            }
        }
        self.cache.clear();
        for row in &all {
            match (
                IdentityKey::parse(&row.key),
                serde_json::from_str::<Identity>(&row.body),
            ) {
                (Ok(k), Ok(identity)) => {
                    self.versions.insert(k.clone(), row.version);
                    self.cache.insert(k, Arc::new(identity));
                }
                _ => tracing::warn!(
                    key = row.key,
                    "a shared identity record cannot be read; skipped"
                ),
            }
        }
        let _ = self.shared.set(rows);
        Ok(())
    }

    fn shared(&self) -> Option<&Arc<SharedRows>> {
        self.shared.get()
    }

    /// Applies what another node changed; returns the identities whose connections must
    /// close (deleted, disabled, or with new credentials), as they would on that node.
    pub fn heard(&self, heard: Heard) -> Vec<IdentityKey> {
        let mut kick = Vec::new();
        let _writer = self.lock();
        let cached = || self.cache.iter().map(|e| e.key().clone()).collect();
        heard.apply_newer(&self.versions, cached, |key, row| {
            let next = row.and_then(|r| serde_json::from_str::<Identity>(&r.body).ok());
            match next {
                Some(identity) => {
                    let closes = identity.status == Status::Disabled
                        || self.get(key).is_some_and(|old| {
                            old.authentication != identity.authentication
                                || old.generation_id != identity.generation_id
                        });
                    self.cache.insert(key.clone(), Arc::new(identity));
                    if closes {
                        kick.push(key.clone());
                    }
                }
                None => {
                    if self.cache.remove(key).is_some() {
                        self.live.remove(key);
                        kick.push(key.clone());
                    }
                }
            }
        });
        kick
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // A panic while holding the lock leaves nothing half-written (redb transactions are
        // atomic), so a poisoned lock is safe to take.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put(&self, key: &IdentityKey, identity: &Identity) -> Result<(), RegistryError> {
        if let Some(rows) = self.shared() {
            // Only creation comes here on a cluster node (changes go through `modify`): the
            // key must still be free in the shared table.
            let written = rows
                .insert_new(vec![row_of(key, identity)?])
                .map_err(RegistryError::Store)?;
            let Some(Some(version)) = written.first().copied() else {
                if let Ok(Ok(theirs)) = rows.get(&key.to_string()) {
                    if let Ok(identity) = serde_json::from_str::<Identity>(&theirs.body) {
                        self.versions.insert(key.clone(), theirs.version);
                        self.cache.insert(key.clone(), Arc::new(identity));
                    }
                }
                return Err(RegistryError::Exists(describe(key)));
            };
            self.versions.insert(key.clone(), version);
            self.cache.insert(key.clone(), Arc::new(identity.clone()));
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        IDENTITIES.put::<RegistryError>(&tx, &key.to_string(), identity)?;
        tx.commit()?;
        self.cache.insert(key.clone(), Arc::new(identity.clone()));
        Ok(())
    }

    /// Creates a device or module; a module's device must exist.
    pub fn create(
        &self,
        key: &IdentityKey,
        status: Option<Status>,
        auth: Option<AuthenticationInput>,
    ) -> Result<Identity, RegistryError> {
        self.create_with(key, status, auth, Capabilities::default())
    }

    pub fn create_with(
        &self,
        key: &IdentityKey,
        status: Option<Status>,
        auth: Option<AuthenticationInput>,
        capabilities: Capabilities,
    ) -> Result<Identity, RegistryError> {
        let _writer = self.lock();
        if self.cache.contains_key(key) {
            return Err(RegistryError::Exists(describe(key)));
        }
        if key.module.is_some()
            && !self
                .cache
                .contains_key(&IdentityKey::device(key.device.clone()))
        {
            return Err(RegistryError::NotFound(format!("device '{}'", key.device)));
        }
        let identity = Identity {
            device_id: key.device.clone(),
            module_id: key.module.clone(),
            generation_id: new_tag(),
            etag: new_tag(),
            status: status.unwrap_or(Status::Enabled),
            status_reason: None,
            authentication: auth_from(auth, key.module.is_some())?,
            created_time: now_rfc3339(),
            last_activity_time: None,
            capabilities,
            device_group_id: None,
        };
        self.put(key, &identity)?;
        Ok(identity)
    }

    pub fn get(&self, key: &IdentityKey) -> Option<Arc<Identity>> {
        self.cache.get(key).map(|e| e.value().clone())
    }

    pub fn view(&self, identity: &Identity) -> IdentityView {
        let key = key_of(identity);
        let (connected, last) = self
            .live
            .get(&key)
            .map(|l| (l.connected, l.last_activity))
            .unwrap_or((false, None));
        let mut identity = identity.clone();
        if let Some(t) = last {
            identity.last_activity_time = Some(humantime::format_rfc3339_millis(t).to_string());
        }
        IdentityView {
            identity,
            connection_state: if connected {
                ConnectionState::Connected
            } else {
                ConnectionState::Disconnected
            },
            device_group: None,
        }
    }

    pub fn update(
        &self,
        key: &IdentityKey,
        update: IdentityUpdate,
    ) -> Result<Identity, RegistryError> {
        self.modify(key, |next| {
            if let Some(s) = update.status {
                next.status = s;
            }
            if update.status_reason.is_some() {
                next.status_reason = update.status_reason.clone();
            }
            if let Some(c) = &update.capabilities {
                next.capabilities = *c;
            }
            if let Some(auth) = &update.authentication {
                let keys = auth.symmetric_key.clone().unwrap_or_default();
                let merged = AuthenticationInput {
                    kind: auth.kind.clone().or(Some(next.authentication.kind.clone())),
                    // Thumbprints carry over unless the update changes the kind to SAS.
                    x509_thumbprint: match auth.kind.as_deref() {
                        Some(AUTH_SAS) => auth.x509_thumbprint.clone(),
                        _ => auth
                            .x509_thumbprint
                            .clone()
                            .or(next.authentication.x509_thumbprint.clone()),
                    },
                    symmetric_key: Some(SymmetricKeyInput {
                        primary_key: Some(
                            keys.primary_key
                                .unwrap_or(next.authentication.symmetric_key.primary_key.clone()),
                        ),
                        secondary_key: Some(
                            keys.secondary_key
                                .unwrap_or(next.authentication.symmetric_key.secondary_key.clone()),
                        ),
                    }),
                };
                next.authentication = auth_from(Some(merged), key.module.is_some())?;
            }
            Ok(())
        })
    }

    /// Read-modify-write of one record under the writer lock, with a new etag.
    fn modify(
        &self,
        key: &IdentityKey,
        change: impl Fn(&mut Identity) -> Result<(), RegistryError>,
    ) -> Result<Identity, RegistryError> {
        let _writer = self.lock();
        if let Some(rows) = self.shared() {
            return self.modify_shared(rows, key, change);
        }
        let current = self
            .get(key)
            .ok_or_else(|| RegistryError::NotFound(describe(key)))?;
        let mut next = (*current).clone();
        change(&mut next)?;
        next.etag = new_tag();
        self.put(key, &next)?;
        Ok(next)
    }

    /// [`Registry::modify`] on a cluster node: read the record from the shared table, change
    /// it, and write it only if nobody did meanwhile (else read again).
    fn modify_shared(
        &self,
        rows: &SharedRows,
        key: &IdentityKey,
        change: impl Fn(&mut Identity) -> Result<(), RegistryError>,
    ) -> Result<Identity, RegistryError> {
        let name = key.to_string();
        for _ in 0..SHARED_RETRIES {
            let found = match rows.get(&name).map_err(RegistryError::Store)? {
                Ok(found) => found,
                Err(at) => {
                    if self.versions.newer(key, at) {
                        self.versions.insert(key.clone(), at);
                        self.cache.remove(key);
                    }
                    return Err(RegistryError::NotFound(describe(key)));
                }
            };
            let (etag, current) = (
                found.etag.clone(),
                serde_json::from_str::<Identity>(&found.body)?,
            );
            // Applied to the record as it is now, again after a write that found another etag.
            let mut next = current.clone();
            change(&mut next)?;
            next.etag = new_tag();
            let body = serde_json::to_string(&next)?;
            if let Some(version) = rows
                .replace(&name, body, next.etag.clone(), &etag)
                .map_err(RegistryError::Store)?
            {
                self.versions.insert(key.clone(), version);
                self.cache.insert(key.clone(), Arc::new(next.clone()));
                return Ok(next);
            }
        }
        Err(RegistryError::Store(format!(
            "{} keeps changing on other nodes",
            describe(key)
        )))
    }

    /// Puts a device in a group (the caller has checked the group exists).
    pub fn set_device_group(
        &self,
        key: &IdentityKey,
        group: Option<String>,
    ) -> Result<Identity, RegistryError> {
        self.modify(key, |next| {
            next.device_group_id = group.clone();
            Ok(())
        })
    }

    /// Deletes an identity; deleting a device deletes its modules. Returns what was deleted.
    pub fn delete(&self, key: &IdentityKey) -> Result<Vec<IdentityKey>, RegistryError> {
        let _writer = self.lock();
        if !self.cache.contains_key(key) {
            return Err(RegistryError::NotFound(describe(key)));
        }
        let mut gone = vec![key.clone()];
        if key.module.is_none() {
            gone.extend(self.modules_of(&key.device).into_iter().map(|i| key_of(&i)));
        }
        if let Some(rows) = self.shared() {
            let at = rows
                .delete(gone.iter().map(|k| k.to_string()).collect())
                .map_err(RegistryError::Store)?;
            for k in &gone {
                self.versions.insert(k.clone(), at);
                self.cache.remove(k);
                self.live.remove(k);
            }
            return Ok(gone);
        }
        let tx = self.db.begin_write()?;
        for k in &gone {
            IDENTITIES.remove::<RegistryError>(&tx, &k.to_string())?;
        }
        tx.commit()?;
        for k in &gone {
            self.cache.remove(k);
            self.live.remove(k);
        }
        Ok(gone)
    }

    /// Devices (no modules) in id order, `limit` of them after `after`.
    pub fn list_devices(
        &self,
        limit: usize,
        after: Option<&str>,
    ) -> (Vec<Arc<Identity>>, Option<String>) {
        let mut all: Vec<Arc<Identity>> = self
            .cache
            .iter()
            .filter(|e| e.key().module.is_none())
            .filter(|e| after.is_none_or(|a| e.key().device.as_str() > a))
            .map(|e| e.value().clone())
            .collect();
        all.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        let next = (all.len() > limit).then(|| all[limit - 1].device_id.to_string());
        all.truncate(limit);
        (all, next)
    }

    pub fn modules_of(&self, device: &DeviceId) -> Vec<Arc<Identity>> {
        let mut v: Vec<Arc<Identity>> = self
            .cache
            .iter()
            .filter(|e| &e.key().device == device && e.key().module.is_some())
            .map(|e| e.value().clone())
            .collect();
        v.sort_by(|a, b| a.module_id.cmp(&b.module_id));
        v
    }

    /// Every identity, devices and modules, in no particular order.
    pub fn identities(&self) -> Vec<Arc<Identity>> {
        self.cache.iter().map(|e| e.value().clone()).collect()
    }

    pub fn device_count(&self) -> usize {
        self.cache
            .iter()
            .filter(|e| e.key().module.is_none())
            .count()
    }

    /// Runtime: a connection for `key` opened or closed.
    pub fn set_connected(&self, key: &IdentityKey, connected: bool) {
        let mut live = self.live.entry(key.clone()).or_default();
        live.connected = connected;
        live.last_activity = Some(SystemTime::now());
    }

    /// Runtime: `key` sent something.
    pub fn touch(&self, key: &IdentityKey) {
        if let Some(mut live) = self.live.get_mut(key) {
            live.last_activity = Some(SystemTime::now());
        }
    }

    /// Writes the last activity time of `key` to the store (on disconnect).
    pub fn persist_activity(&self, key: &IdentityKey) -> Result<(), RegistryError> {
        self.persist_activities(std::slice::from_ref(key))
    }

    /// `key`'s record as cached, and with its last activity time from this node's live
    /// state; `None` when there is no record or no activity to write.
    fn with_activity(&self, key: &IdentityKey) -> Option<(Arc<Identity>, Identity)> {
        let current = self.get(key)?;
        let t = self.live.get(key).and_then(|l| l.last_activity)?;
        let mut next = (*current).clone();
        next.last_activity_time = Some(humantime::format_rfc3339_millis(t).to_string());
        Some((current, next))
    }

    /// Writes the last activity times of `keys` in one transaction.
    fn persist_activities(&self, keys: &[IdentityKey]) -> Result<(), RegistryError> {
        let _writer = self.lock();
        if let Some(rows) = self.shared() {
            // One record at a time, each only if unchanged since it was cached: a last
            // activity time never writes an old record over another node's change.
            for key in keys {
                let Some((current, next)) = self.with_activity(key) else {
                    continue;
                };
                let body = serde_json::to_string(&next)?;
                if let Some(version) = rows
                    .replace(&key.to_string(), body, next.etag.clone(), &current.etag)
                    .map_err(RegistryError::Store)?
                {
                    self.versions.insert(key.clone(), version);
                    self.cache.insert(key.clone(), Arc::new(next));
                }
            }
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        let mut written = Vec::new();
        for key in keys {
            let Some((_, next)) = self.with_activity(key) else {
                continue;
            };
            IDENTITIES.put::<RegistryError>(&tx, &key.to_string(), &next)?;
            written.push((key.clone(), next));
        }
        tx.commit()?;
        for (key, identity) in written {
            self.cache.insert(key, Arc::new(identity));
        }
        Ok(())
    }

    /// Queues `key`'s last activity for the store (a connection closed). Returns true when
    /// the caller must run [`Registry::write_activity`] (off the async threads): one writer
    /// at a time, each transaction taking everything queued meanwhile, so a fleet that
    /// disconnects at once costs a few transactions, not a blocking thread and a commit per
    /// device.
    pub fn queue_activity(&self, key: IdentityKey) -> bool {
        self.activity.push(key)
    }

    /// Writes queued last-activity times until none is left; returns how many were written.
    pub fn write_activity(&self) -> Result<usize, RegistryError> {
        let mut total = 0;
        while let Some(mut keys) = self.activity.take() {
            keys.sort();
            keys.dedup();
            if let Err(e) = self.persist_activities(&keys) {
                // The next disconnect starts a writer again; these times are lost (they are
                // not acknowledged data: the next connection sets them anew).
                self.activity.stop();
                return Err(e);
            }
            total += keys.len();
        }
        Ok(total)
    }
}

/// An identity as a shared record: its key, JSON and etag.
fn row_of(
    key: &IdentityKey,
    identity: &Identity,
) -> Result<(String, String, String), RegistryError> {
    Ok((
        key.to_string(),
        serde_json::to_string(identity)?,
        identity.etag.clone(),
    ))
}

pub fn key_of(identity: &Identity) -> IdentityKey {
    IdentityKey {
        device: identity.device_id.clone(),
        module: identity.module_id.clone(),
    }
}

pub fn describe(key: &IdentityKey) -> String {
    match &key.module {
        None => format!("device '{}'", key.device),
        Some(m) => format!("module '{}' of device '{}'", m, key.device),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_match_humantime_across_seconds_and_milliseconds() {
        use std::time::{Duration, UNIX_EPOCH};
        let start = UNIX_EPOCH + Duration::from_millis(1_764_417_599_000);
        // Within one second, across second, day and year boundaries, and back in time.
        let offsets = [
            0u64,
            1,
            9,
            10,
            99,
            100,
            999,
            1000,
            1001,
            86_400_000,
            2_678_400_000,
            5,
        ];
        for ms in offsets {
            let t = start + Duration::from_millis(ms) + Duration::from_micros(999);
            assert_eq!(
                super::rfc3339_millis(t),
                humantime::format_rfc3339_millis(t).to_string()
            );
        }
        let epoch = UNIX_EPOCH;
        assert_eq!(super::rfc3339_millis(epoch), "1970-01-01T00:00:00.000Z");
    }

    use super::*;

    fn temp_registry(name: &str) -> (Registry, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("fh-reg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        (
            Registry::open(Arc::new(Store::create(&dir.join("store.redb")).unwrap())).unwrap(),
            dir,
        )
    }

    /// What another node's changes do to this node's cache: only newer versions apply, late
    /// answers never put an older record back, deletions and disabling close connections.
    #[test]
    fn heard_changes_apply_in_version_order_and_say_whom_to_disconnect() {
        use crate::cluster::rows::{Heard, Row};
        let (r, dir) = temp_registry("heard");
        let key = IdentityKey::parse("d1").unwrap();
        let made = r.create(&key, None, None).unwrap();
        let row = |identity: &Identity, version: i64| Row {
            key: "d1".into(),
            body: serde_json::to_string(identity).unwrap(),
            etag: identity.etag.clone(),
            version,
        };
        let mut renamed = made.clone();
        renamed.status_reason = Some("v5".into());
        renamed.etag = "e5".into();
        let kick = r.heard(Heard::Changed("d1".into(), Ok(row(&renamed, 5))));
        assert!(
            kick.is_empty(),
            "a change that does not disable keeps the connection"
        );
        assert_eq!(r.get(&key).unwrap().status_reason.as_deref(), Some("v5"));

        let mut older = made.clone();
        older.status_reason = Some("v3".into());
        assert!(r
            .heard(Heard::Changed("d1".into(), Ok(row(&older, 3))))
            .is_empty());
        assert!(r.heard(Heard::Changed("d1".into(), Err(4))).is_empty());
        assert_eq!(
            r.get(&key).unwrap().status_reason.as_deref(),
            Some("v5"),
            "older answers are ignored"
        );

        let mut disabled = renamed.clone();
        disabled.status = Status::Disabled;
        assert_eq!(
            r.heard(Heard::Changed("d1".into(), Ok(row(&disabled, 6)))),
            vec![key.clone()]
        );
        let mut rekeyed = renamed.clone();
        rekeyed.authentication.symmetric_key.primary_key =
            "bmV3IGtleSBuZXcga2V5IG5ldyBrZXkgbmV3IGtleQ==".into();
        assert_eq!(
            r.heard(Heard::Changed("d1".into(), Ok(row(&rekeyed, 7)))),
            vec![key.clone()]
        );

        // The whole table again: a record missing from it is gone only if it was missing as
        // of a version newer than this node's.
        let other = IdentityKey::parse("d2").unwrap();
        r.heard(Heard::Changed(
            "d2".into(),
            Ok(Row {
                key: "d2".into(),
                ..row(&made, 20)
            }),
        ));
        assert!(r.get(&other).is_some());
        assert!(r.heard(Heard::All(vec![row(&rekeyed, 7)], 15)).is_empty());
        assert!(
            r.get(&other).is_some(),
            "d2 (version 20) is newer than the snapshot"
        );
        assert_eq!(
            r.heard(Heard::All(vec![row(&rekeyed, 7)], 21)),
            vec![other.clone()]
        );
        assert!(r.get(&other).is_none());
        assert_eq!(
            r.heard(Heard::Changed("d1".into(), Err(30))),
            vec![key.clone()]
        );
        assert!(r.get(&key).is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn create_get_update_delete_and_reopen() {
        let (reg, dir) = temp_registry("crud");
        let d1 = IdentityKey::parse("d1").unwrap();
        let m1 = IdentityKey::parse("d1/m1").unwrap();
        assert!(matches!(
            reg.create(&m1, None, None),
            Err(RegistryError::NotFound(_))
        ));
        let created = reg.create(&d1, None, None).unwrap();
        assert!(matches!(
            reg.create(&d1, None, None),
            Err(RegistryError::Exists(_))
        ));
        reg.create(&m1, None, None).unwrap();
        let upd = reg
            .update(
                &d1,
                IdentityUpdate {
                    status: Some(Status::Disabled),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(upd.status, Status::Disabled);
        assert_ne!(upd.etag, created.etag);
        drop(reg);
        let reg =
            Registry::open(Arc::new(Store::create(&dir.join("store.redb")).unwrap())).unwrap();
        assert_eq!(reg.get(&d1).unwrap().status, Status::Disabled);
        assert_eq!(reg.modules_of(&d1.device).len(), 1);
        assert_eq!(reg.delete(&d1).unwrap().len(), 2);
        assert!(reg.get(&m1).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn activity_write_never_undoes_a_concurrent_update() {
        let (reg, dir) = temp_registry("race");
        let reg = Arc::new(reg);
        let d1 = IdentityKey::parse("d1").unwrap();
        reg.create(&d1, None, None).unwrap();
        reg.set_connected(&d1, true);
        for i in 0..50 {
            let status = if i % 2 == 0 {
                Status::Disabled
            } else {
                Status::Enabled
            };
            let (r, k) = (reg.clone(), d1.clone());
            let t = std::thread::spawn(move || r.persist_activity(&k).unwrap());
            reg.update(
                &d1,
                IdentityUpdate {
                    status: Some(status),
                    ..Default::default()
                },
            )
            .unwrap();
            t.join().unwrap();
            assert_eq!(reg.get(&d1).unwrap().status, status, "round {i}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Disconnects queue their activity; one writer takes all of them in one go, and the
    /// next disconnect after it finished starts a writer again.
    #[test]
    fn queued_activity_is_written_by_one_writer_at_a_time() {
        let (reg, dir) = temp_registry("activity");
        let keys: Vec<IdentityKey> = (0..5)
            .map(|i| IdentityKey::parse(&format!("d{i}")).unwrap())
            .collect();
        for k in &keys {
            reg.create(k, None, None).unwrap();
            reg.set_connected(k, true);
            reg.set_connected(k, false);
        }
        let starts: Vec<bool> = keys.iter().map(|k| reg.queue_activity(k.clone())).collect();
        assert_eq!(starts, [true, false, false, false, false]);
        assert!(
            !reg.queue_activity(keys[0].clone()),
            "a writer is due already"
        );
        assert_eq!(reg.write_activity().unwrap(), 5, "each identity once");
        for k in &keys {
            assert!(reg.get(k).unwrap().last_activity_time.is_some());
        }
        assert!(reg.queue_activity(keys[1].clone()), "the writer finished");
        assert_eq!(reg.write_activity().unwrap(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn list_pages_in_id_order() {
        let (reg, dir) = temp_registry("list");
        for i in 0..5 {
            reg.create(&IdentityKey::parse(&format!("d{i}")).unwrap(), None, None)
                .unwrap();
        }
        let (page, next) = reg.list_devices(2, None);
        assert_eq!(
            page.iter()
                .map(|i| i.device_id.as_str())
                .collect::<Vec<_>>(),
            ["d0", "d1"]
        );
        let (page, next) = reg.list_devices(2, next.as_deref());
        assert_eq!(page[0].device_id.as_str(), "d2");
        let (page, next) = reg.list_devices(2, next.as_deref());
        assert_eq!((page.len(), next), (1, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_keys_are_refused_with_field() {
        let (reg, dir) = temp_registry("keys");
        let err = reg
            .create(
                &IdentityKey::parse("d1").unwrap(),
                None,
                Some(AuthenticationInput {
                    kind: None,
                    x509_thumbprint: None,
                    symmetric_key: Some(SymmetricKeyInput {
                        primary_key: Some("short".into()),
                        secondary_key: None,
                    }),
                }),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("primaryKey"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
