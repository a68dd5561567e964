//! CA certificates for X.509 CA authentication, as IoT Hub keeps them: a CA is uploaded,
//! proven (its owner signs a certificate whose common name is a code the hub chose, which only
//! the holder of the CA's private key can do), and from then on a device whose certificate
//! chains to it and names the device in its common name may connect (`certificateAuthority`
//! identities).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

use crate::cluster::catalog::{json, Catalog};
use crate::cluster::rows::{Exclusive, Heard, SharedRows};
use crate::storage::{JsonTable, Store};

const CAS: JsonTable<CaCertificate> = JsonTable::new("ca_certificates");

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("store: {0}")]
    Store(String),
}

crate::storage::store_errors!(CertificateError);

/// A registered CA certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CaCertificate {
    pub name: String,
    /// PEM, as uploaded.
    pub certificate: String,
    /// SHA-256 thumbprint of the DER.
    pub thumbprint: String,
    pub subject: String,
    pub is_verified: bool,
    /// What the proof-of-possession certificate's common name must be.
    pub verification_code: String,
    pub created_time: String,
}

/// The first certificate of a PEM text, as DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, CertificateError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or_else(|| CertificateError::Invalid("no PEM certificate in the text".into()))?
        .map(|c| c.as_ref().to_vec())
        .map_err(|e| CertificateError::Invalid(format!("PEM: {e}")))
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertificateError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| CertificateError::Invalid(format!("not an X.509 certificate: {e}")))
}

/// The subject's common name, if it has one.
pub fn common_name(cert: &X509Certificate<'_>) -> Option<String> {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

fn now_valid(cert: &X509Certificate<'_>) -> bool {
    cert.validity().is_valid()
}

/// Whether `child` is signed by `issuer`'s key and names it as issuer.
fn signed_by(child: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    child.issuer() == issuer.subject() && child.verify_signature(Some(issuer.public_key())).is_ok()
}

pub struct CaStore {
    db: Arc<Store>,
    by_name: RwLock<BTreeMap<String, CaCertificate>>,
    writer: Mutex<()>,
    /// On a cluster node: the table the nodes share (`cluster::catalog`).
    shared: std::sync::OnceLock<Catalog>,
}

impl CaStore {
    pub fn open(db: Arc<Store>) -> Result<CaStore, CertificateError> {
        let by_name = CAS.load::<CertificateError>(&db)?.into_iter().collect();
        Ok(CaStore {
            db,
            by_name: RwLock::new(by_name),
            writer: Mutex::new(()),
            shared: std::sync::OnceLock::new(),
        })
    }

    /// Makes this store a cluster node's: a CA added or verified on any node authenticates
    /// devices on every node. The first node of a new cluster brings its own.
    pub fn share(&self, rows: Arc<SharedRows>) -> Result<(), CertificateError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let catalog = Catalog::share_into(rows, &self.by_name).map_err(CertificateError::Store)?;
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
            let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            catalog.heard_into(heard, &self.by_name);
        }
    }

    /// On a cluster node: the table's cluster-wide lock, with the cache made what the table
    /// holds under it (callers hold `writer`).
    fn hold(&self) -> Result<Option<Exclusive>, CertificateError> {
        let Some(catalog) = self.shared.get() else {
            return Ok(None);
        };
        catalog
            .hold_into(&self.by_name)
            .map(Some)
            .map_err(CertificateError::Store)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, CaCertificate>> {
        self.by_name.read().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, held: Option<Exclusive>, ca: &CaCertificate) -> Result<(), CertificateError> {
        match (held, self.shared.get()) {
            (Some(held), Some(catalog)) => catalog
                .commit(held, vec![(ca.name.clone(), Some(json(ca)))])
                .map_err(CertificateError::Store)?,
            _ => {
                let tx = self.db.begin_write()?;
                CAS.put::<CertificateError>(&tx, &ca.name, ca)?;
                tx.commit()?;
            }
        }
        self.by_name
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ca.name.clone(), ca.clone());
        Ok(())
    }

    pub fn list(&self) -> Vec<CaCertificate> {
        self.read().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<CaCertificate> {
        self.read().get(name).cloned()
    }

    /// Uploads a CA certificate (not yet verified); returns it with its verification code.
    pub fn add(&self, name: &str, pem: &str) -> Result<CaCertificate, CertificateError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return Err(CertificateError::Invalid(format!(
                "name '{name}': 1 to 64 letters, digits, '-', '_' or '.'"
            )));
        }
        let der = pem_to_der(pem)?;
        let cert = parse(&der)?;
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(CertificateError::Invalid(
                "certificate: not a CA (basicConstraints CA:TRUE is missing)".into(),
            ));
        }
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.hold()?;
        if self.get(name).is_some() {
            return Err(CertificateError::Exists(format!("CA certificate '{name}'")));
        }
        let ca = CaCertificate {
            name: name.to_string(),
            certificate: pem.to_string(),
            thumbprint: crate::x509::thumbprints(&der).1,
            subject: cert.subject().to_string(),
            is_verified: false,
            verification_code: crate::sas::new_key()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .take(24)
                .collect::<String>()
                .to_uppercase(),
            created_time: crate::registry::now_rfc3339(),
        };
        self.save(held, &ca)?;
        Ok(ca)
    }

    /// Proof of possession: `pem` must be signed by the CA and have the verification code as
    /// its common name.
    pub fn verify(&self, name: &str, pem: &str) -> Result<CaCertificate, CertificateError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.hold()?;
        let mut ca = self
            .get(name)
            .ok_or_else(|| CertificateError::NotFound(format!("CA certificate '{name}'")))?;
        let ca_der = pem_to_der(&ca.certificate)?;
        let ca_cert = parse(&ca_der)?;
        let der = pem_to_der(pem)?;
        let proof = parse(&der)?;
        if common_name(&proof).as_deref() != Some(ca.verification_code.as_str()) {
            return Err(CertificateError::Invalid(format!(
                "verification certificate: its common name must be the verification code {}",
                ca.verification_code
            )));
        }
        if !signed_by(&proof, &ca_cert) {
            return Err(CertificateError::Invalid(
                "verification certificate: not signed by this CA's key".into(),
            ));
        }
        ca.is_verified = true;
        self.save(held, &ca)?;
        Ok(ca)
    }

    pub fn delete(&self, name: &str) -> Result<(), CertificateError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.hold()?;
        if self.get(name).is_none() {
            return Err(CertificateError::NotFound(format!(
                "CA certificate '{name}'"
            )));
        }
        match (held, self.shared.get()) {
            (Some(held), Some(catalog)) => catalog
                .commit(held, vec![(name.to_string(), None)])
                .map_err(CertificateError::Store)?,
            _ => {
                let tx = self.db.begin_write()?;
                CAS.remove::<CertificateError>(&tx, name)?;
                tx.commit()?;
            }
        }
        self.by_name
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        Ok(())
    }

    /// Whether the presented chain (end entity first) leads, through its own intermediates,
    /// to a verified CA, with every certificate in it currently valid, and the end entity's
    /// common name is `expected_cn`.
    pub fn authenticates(&self, chain: &[Vec<u8>], expected_cn: &str) -> Result<(), String> {
        let Some(leaf_der) = chain.first() else {
            return Err("no client certificate".into());
        };
        let leaf = parse(leaf_der).map_err(|e| e.to_string())?;
        if common_name(&leaf).as_deref() != Some(expected_cn) {
            return Err(format!(
                "the certificate's common name is {:?}, not {expected_cn:?}",
                common_name(&leaf)
            ));
        }
        let roots: Vec<Vec<u8>> = self
            .read()
            .values()
            .filter(|c| c.is_verified)
            .filter_map(|c| pem_to_der(&c.certificate).ok())
            .collect();
        let roots: Vec<X509Certificate<'_>> = roots.iter().filter_map(|d| parse(d).ok()).collect();
        let intermediates: Vec<X509Certificate<'_>> =
            chain[1..].iter().filter_map(|d| parse(d).ok()).collect();
        let mut current = leaf;
        for _ in 0..8 {
            if !now_valid(&current) {
                return Err("a certificate in the chain is expired or not yet valid".into());
            }
            if roots.iter().any(|r| signed_by(&current, r) && now_valid(r)) {
                return Ok(());
            }
            match intermediates.iter().find(|i| signed_by(&current, i)) {
                Some(next) => current = next.clone(),
                None => break,
            }
        }
        Err("the certificate does not chain to a verified CA".into())
    }
}
