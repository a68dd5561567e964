//! Enrollments: who may provision themselves, as the Device Provisioning Service (DPS) keeps
//! them for symmetric-key attestation. An enrollment group admits any registration id whose
//! key is HMAC-SHA256 of the id under the group's key; an individual enrollment admits one
//! registration id with its own key. The store knows no hub: [`crate::provisioning`] turns an
//! attested registration into a device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::cluster::catalog::{json, Catalog};
use crate::cluster::rows::{Exclusive, Heard, Row, SharedRows};
use crate::storage::{JsonTable, Store};

const ENROLLMENTS: JsonTable<Enrollment> = JsonTable::new("enrollments");

#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("store: {0}")]
    Store(String),
}

crate::storage::store_errors!(EnrollmentError);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum EnrollmentKind {
    /// Any registration id, with a key derived from the group's.
    Group,
    /// One registration id, with its own key.
    Individual,
}

/// What a device registered by an enrollment starts with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InitialTwin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Map<String, Value>>,
}

/// An enrollment, as stored and as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Enrollment {
    /// The group's id, or the individual registration id.
    pub id: String,
    pub kind: EnrollmentKind,
    pub primary_key: String,
    pub secondary_key: String,
    /// DPS's `provisioningStatus`: `enabled` or `disabled`.
    pub provisioning_status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    pub created_time: String,
}

/// `POST /enrollmentGroups` and `POST /enrollments`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnrollmentInput {
    pub id: String,
    #[serde(default)]
    pub primary_key: Option<String>,
    #[serde(default)]
    pub secondary_key: Option<String>,
    #[serde(default)]
    pub provisioning_status: Option<String>,
    #[serde(default)]
    pub device_group: Option<String>,
    #[serde(default)]
    pub initial_twin: Option<InitialTwin>,
}

/// The key a device of a group derives from its registration id, as DPS and the SDKs do:
/// base64(HMAC-SHA256(base64-decoded group key, registration id)).
pub fn derive_key(group_key_b64: &str, registration_id: &str) -> Option<String> {
    use base64::Engine;
    use hmac::Mac;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(group_key_b64).ok()?;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).ok()?;
    mac.update(registration_id.as_bytes());
    Some(b64.encode(mac.finalize().into_bytes()))
}

pub struct Enrollments {
    db: Arc<Store>,
    by_key: RwLock<BTreeMap<(EnrollmentKind, String), Enrollment>>,
    writer: Mutex<()>,
    /// On a cluster node: the table the nodes share (`cluster::catalog`).
    shared: std::sync::OnceLock<Catalog>,
}

fn table_key(kind: EnrollmentKind, id: &str) -> String {
    match kind {
        EnrollmentKind::Group => format!("group/{id}"),
        EnrollmentKind::Individual => format!("individual/{id}"),
    }
}

impl Enrollments {
    pub fn open(db: Arc<Store>) -> Result<Enrollments, EnrollmentError> {
        let by_key = ENROLLMENTS
            .load::<EnrollmentError>(&db)?
            .into_iter()
            .map(|(_, e)| ((e.kind, e.id.clone()), e))
            .collect();
        Ok(Enrollments {
            db,
            by_key: RwLock::new(by_key),
            writer: Mutex::new(()),
            shared: std::sync::OnceLock::new(),
        })
    }

    /// Makes this store a cluster node's: a device provisions through any node under an
    /// enrollment made on any node. The first node of a new cluster brings its own.
    pub fn share(&self, rows: Arc<SharedRows>) -> Result<(), EnrollmentError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let local = self
            .read()
            .values()
            .map(|e| (table_key(e.kind, &e.id), json(e)))
            .collect();
        let (catalog, rows) = Catalog::share(rows, local).map_err(EnrollmentError::Store)?;
        self.replace(&rows);
        let _ = self.shared.set(catalog);
        Ok(())
    }

    /// The shared table, on a cluster node.
    pub fn shared_rows(&self) -> Option<Arc<SharedRows>> {
        self.shared.get().map(Catalog::rows)
    }

    fn replace(&self, rows: &[Row]) {
        let by_key = rows
            .iter()
            .filter_map(|r| serde_json::from_str::<Enrollment>(&r.body).ok())
            .map(|e| ((e.kind, e.id.clone()), e))
            .collect();
        *self.by_key.write().unwrap_or_else(|e| e.into_inner()) = by_key;
    }

    /// Applies what another node changed (newer records only).
    pub fn heard(&self, heard: Heard) {
        let Some(catalog) = self.shared.get() else {
            return;
        };
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let cached = || {
            self.read()
                .values()
                .map(|e| table_key(e.kind, &e.id))
                .collect()
        };
        catalog.heard(heard, cached, |key, row| {
            let mut by_key = self.by_key.write().unwrap_or_else(|e| e.into_inner());
            match row.and_then(|r| serde_json::from_str::<Enrollment>(&r.body).ok()) {
                Some(e) => {
                    by_key.insert((e.kind, e.id.clone()), e);
                }
                None => by_key.retain(|(kind, id), _| table_key(*kind, id) != *key),
            }
        });
    }

    /// On a cluster node: the table's cluster-wide lock, with the cache made what the table
    /// holds under it (callers hold `writer`).
    fn hold(&self) -> Result<Option<Exclusive>, EnrollmentError> {
        let Some(catalog) = self.shared.get() else {
            return Ok(None);
        };
        let held = catalog.hold().map_err(EnrollmentError::Store)?;
        self.replace(held.rows());
        Ok(Some(held))
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<(EnrollmentKind, String), Enrollment>> {
        self.by_key.read().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, held: Option<Exclusive>, e: &Enrollment) -> Result<(), EnrollmentError> {
        match (held, self.shared.get()) {
            (Some(held), Some(catalog)) => catalog
                .commit(held, vec![(table_key(e.kind, &e.id), Some(json(e)))])
                .map_err(EnrollmentError::Store)?,
            _ => {
                let tx = self.db.begin_write()?;
                ENROLLMENTS.put::<EnrollmentError>(&tx, &table_key(e.kind, &e.id), e)?;
                tx.commit()?;
            }
        }
        self.by_key
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((e.kind, e.id.clone()), e.clone());
        Ok(())
    }

    pub fn list(&self, kind: EnrollmentKind) -> Vec<Enrollment> {
        self.read()
            .values()
            .filter(|e| e.kind == kind)
            .cloned()
            .collect()
    }

    /// How many enrollments of both kinds there are.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    pub fn get(&self, kind: EnrollmentKind, id: &str) -> Option<Enrollment> {
        self.read().get(&(kind, id.to_string())).cloned()
    }

    pub fn create(
        &self,
        kind: EnrollmentKind,
        input: EnrollmentInput,
    ) -> Result<Enrollment, EnrollmentError> {
        // Registration ids are device ids; group ids follow the same rules.
        crate::identity::DeviceId::new(&input.id).map_err(|e| EnrollmentError::Invalid {
            field: "id",
            message: e.to_string(),
        })?;
        let status = input
            .provisioning_status
            .unwrap_or_else(|| "enabled".into());
        if status != "enabled" && status != "disabled" {
            return Err(EnrollmentError::Invalid {
                field: "provisioningStatus",
                message: format!("'{status}': enabled or disabled"),
            });
        }
        let key = |k: Option<String>, field: &'static str| -> Result<String, EnrollmentError> {
            let k = k.unwrap_or_else(crate::sas::new_key);
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(&k) {
                Ok(b) if (16..=64).contains(&b.len()) => Ok(k),
                _ => Err(EnrollmentError::Invalid {
                    field,
                    message: "base64 of 16 to 64 bytes".into(),
                }),
            }
        };
        let enrollment = Enrollment {
            id: input.id,
            kind,
            primary_key: key(input.primary_key, "primaryKey")?,
            secondary_key: key(input.secondary_key, "secondaryKey")?,
            provisioning_status: status,
            device_group: input.device_group,
            initial_twin: input.initial_twin,
            created_time: crate::registry::now_rfc3339(),
        };
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.hold()?;
        if self.get(kind, &enrollment.id).is_some() {
            return Err(EnrollmentError::Exists(format!(
                "enrollment '{}'",
                enrollment.id
            )));
        }
        self.save(held, &enrollment)?;
        Ok(enrollment)
    }

    pub fn set_status(
        &self,
        kind: EnrollmentKind,
        id: &str,
        status: &str,
    ) -> Result<Enrollment, EnrollmentError> {
        if status != "enabled" && status != "disabled" {
            return Err(EnrollmentError::Invalid {
                field: "provisioningStatus",
                message: format!("'{status}': enabled or disabled"),
            });
        }
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.hold()?;
        let mut e = self
            .get(kind, id)
            .ok_or_else(|| EnrollmentError::NotFound(format!("enrollment '{id}'")))?;
        e.provisioning_status = status.to_string();
        self.save(held, &e)?;
        Ok(e)
    }

    pub fn delete(&self, kind: EnrollmentKind, id: &str) -> Result<(), EnrollmentError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.hold()?;
        if self.get(kind, id).is_none() {
            return Err(EnrollmentError::NotFound(format!("enrollment '{id}'")));
        }
        match (held, self.shared.get()) {
            (Some(held), Some(catalog)) => catalog
                .commit(held, vec![(table_key(kind, id), None)])
                .map_err(EnrollmentError::Store)?,
            _ => {
                let tx = self.db.begin_write()?;
                ENROLLMENTS.remove::<EnrollmentError>(&tx, &table_key(kind, id))?;
                tx.commit()?;
            }
        }
        self.by_key
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(kind, id.to_string()));
        Ok(())
    }

    /// The enrollment a registration id's token was signed under, with the device's keys:
    /// its individual enrollment if it has one (as DPS prefers), else the first group whose
    /// derived key signed it. `verify` says whether a key signed the token.
    pub fn attest(
        &self,
        registration_id: &str,
        verify: impl Fn(&str) -> bool,
    ) -> Option<(Enrollment, String, String)> {
        if let Some(e) = self.get(EnrollmentKind::Individual, registration_id) {
            let (p, s) = (e.primary_key.clone(), e.secondary_key.clone());
            return (verify(&p) || verify(&s)).then_some((e, p, s));
        }
        self.list(EnrollmentKind::Group).into_iter().find_map(|g| {
            let primary = derive_key(&g.primary_key, registration_id)?;
            let secondary = derive_key(&g.secondary_key, registration_id)?;
            (verify(&primary) || verify(&secondary)).then_some((g, primary, secondary))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The derivation the SDK samples document (Python: `derive_device_key`).
    #[test]
    fn derived_keys_are_hmac_sha256_of_the_registration_id() {
        let group = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
        let a = derive_key(group, "dev-1").unwrap();
        let b = derive_key(group, "dev-2").unwrap();
        assert_ne!(a, b);
        assert_eq!(a, derive_key(group, "dev-1").unwrap());
        use base64::Engine;
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&a)
                .unwrap()
                .len(),
            32
        );
        assert_eq!(derive_key("not base64!", "x"), None);
    }
}
