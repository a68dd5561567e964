//! Zero-touch provisioning, as the Device Provisioning Service (DPS) does it for symmetric-key
//! attestation: an enrollment says who may register (one device by registration id, or any
//! device of a group, whose key is HMAC-SHA256 of its registration id under the group's key),
//! and a device running the unmodified SDK's `ProvisioningDeviceClient` registers itself over
//! MQTT ([`mqtt`]), is created in the registry with that key, put in the enrollment's device
//! group with its initial twin, and told which hub to connect to (this one).

pub mod mqtt;

use crate::enrollment::Enrollment;
use crate::hub::{Change, SharedHub, TwinWrite};
use crate::identity::IdentityKey;
use crate::registry::{AuthenticationInput, SymmetricKeyInput};

/// Why a registration was refused, with DPS's status code.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("the enrollment is disabled")]
    Disabled,
    /// The device exists with credentials the enrollment did not give it (created by an
    /// operator, or under a group key since rotated): registering does not overwrite them.
    #[error("device '{0}' exists with other credentials; delete it to provision it again")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
}

impl RegistrationError {
    pub fn status(&self) -> u16 {
        match self {
            RegistrationError::Disabled => 403,
            RegistrationError::Conflict(_) => 409,
            RegistrationError::Failed(_) => 500,
        }
    }
}

/// Registers `registration_id` under `enrollment`: creates the device with `keys` unless it
/// exists (registering again with the same keys returns the same device, untouched), and on
/// creation puts it in the enrollment's device group and applies its initial twin.
pub async fn register(
    hub: &SharedHub,
    enrollment: &Enrollment,
    registration_id: &str,
    keys: (String, String),
) -> Result<String, RegistrationError> {
    if enrollment.provisioning_status != "enabled" {
        return Err(RegistrationError::Disabled);
    }
    let key = IdentityKey::parse(registration_id)
        .map_err(|e| RegistrationError::Failed(e.to_string()))?;
    let fail = |e: &dyn std::fmt::Display| RegistrationError::Failed(e.to_string());
    if let Some(existing) = hub.registry.get(&key) {
        let auth = &existing.authentication;
        let ours = [&keys.0, &keys.1];
        let same = auth.kind == crate::registry::AUTH_SAS
            && (ours.contains(&&auth.symmetric_key.primary_key)
                || ours.contains(&&auth.symmetric_key.secondary_key));
        return if same {
            Ok(registration_id.to_string())
        } else {
            Err(RegistrationError::Conflict(registration_id.to_string()))
        };
    }
    let group = enrollment.device_group.clone();
    let k = key.clone();
    let h = hub.clone();
    tokio::task::spawn_blocking(move || {
        let auth = AuthenticationInput {
            kind: Some(crate::registry::AUTH_SAS.into()),
            symmetric_key: Some(SymmetricKeyInput {
                primary_key: Some(keys.0),
                secondary_key: Some(keys.1),
            }),
            x509_thumbprint: None,
        };
        h.registry
            .create_with(&k, None, Some(auth), Default::default())
            .map_err(|e| e.to_string())?;
        if let Some(path) = &group {
            h.fleet
                .assign(&h.registry, &k, path)
                .map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(())
    })
    .await
    .map_err(|e| fail(&e))?
    .map_err(|e| fail(&e))?;
    if let Some(twin) = &enrollment.initial_twin {
        if twin.tags.is_some() || twin.desired.is_some() {
            hub.write_twin(
                key.clone(),
                TwinWrite::Operator {
                    tags: twin.tags.clone(),
                    desired: twin.desired.clone(),
                    if_match: None,
                },
            )
            .await
            .map_err(|e| fail(&e))?;
        }
    }
    hub.changed(Change::Registered(key.device.clone()))
        .await
        .map_err(|e| fail(&e))?;
    Ok(registration_id.to_string())
}
