//! Validated identity names: [`DeviceId`], [`ModuleId`] and the [`IdentityKey`] that names
//! either a device or one of its modules.
//!
//! Ids are checked once, where they enter the hub (API, CONNECT, topics); everything past
//! that edge holds these types and never re-validates.

use std::fmt;
use std::sync::Arc;

/// Longest id IoT Hub accepts.
pub const MAX_ID_LEN: usize = 128;

/// Characters IoT Hub allows in device and module ids besides ASCII letters and digits.
const EXTRA_ID_CHARS: &str = "-.+%_#*?!(),:=@$'";

/// Why a name is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty")]
    Empty { kind: &'static str },
    #[error("{kind} id is {len} characters long; at most {MAX_ID_LEN} are allowed")]
    TooLong { kind: &'static str, len: usize },
    #[error("{kind} id has {ch:?} at position {position}; allowed are ASCII letters, digits and - . + % _ # * ? ! ( ) , : = @ $ '")]
    InvalidChar {
        kind: &'static str,
        ch: char,
        position: usize,
    },
}

fn validate(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    let len = s.chars().count();
    if len > MAX_ID_LEN {
        return Err(IdError::TooLong { kind, len });
    }
    if let Some((position, ch)) = s
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || EXTRA_ID_CHARS.contains(*c)))
    {
        return Err(IdError::InvalidChar { kind, ch, position });
    }
    Ok(())
}

macro_rules! id_type {
    ($name:ident, $kind:literal) => {
        #[doc = concat!("A validated ", $kind, " id (IoT Hub's rule).")]
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn new(s: &str) -> Result<Self, IdError> {
                validate($kind, s)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        /// Deserializing validates: a stored or received id is checked like any other.
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(DeviceId, "device");
id_type!(ModuleId, "module");

/// A device, or a module of a device: the unit that authenticates and owns topics.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct IdentityKey {
    pub device: DeviceId,
    pub module: Option<ModuleId>,
}

impl IdentityKey {
    pub fn device(device: DeviceId) -> Self {
        Self {
            device,
            module: None,
        }
    }

    pub fn module(device: DeviceId, module: ModuleId) -> Self {
        Self {
            device,
            module: Some(module),
        }
    }

    /// Parses `deviceId` or `deviceId/moduleId` (an MQTT client id, a store key).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        match s.split_once('/') {
            None => Ok(Self::device(DeviceId::new(s)?)),
            Some((d, m)) => Ok(Self::module(DeviceId::new(d)?, ModuleId::new(m)?)),
        }
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.module {
            None => write!(f, "{}", self.device),
            Some(m) => write!(f, "{}/{}", self.device, m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_iot_hub_characters() {
        assert!(DeviceId::new("dev-1.a+b%c_d#e*f?g!h(i)j,k:l=m@n$o'p").is_ok());
        assert!(DeviceId::new(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_with_reason() {
        assert_eq!(DeviceId::new(""), Err(IdError::Empty { kind: "device" }));
        assert_eq!(
            DeviceId::new(&"a".repeat(129)),
            Err(IdError::TooLong {
                kind: "device",
                len: 129
            })
        );
        assert_eq!(
            ModuleId::new("ab/c"),
            Err(IdError::InvalidChar {
                kind: "module",
                ch: '/',
                position: 2
            })
        );
        assert!(DeviceId::new("héllo").is_err());
        assert!(DeviceId::new("a b").is_err());
    }

    #[test]
    fn identity_key_parses_device_and_module() {
        let k = IdentityKey::parse("d1/m1").unwrap();
        assert_eq!(k.to_string(), "d1/m1");
        assert!(IdentityKey::parse("d1/m1/x").is_err());
        assert_eq!(IdentityKey::parse("d1").unwrap().module, None);
    }

    proptest! {
        #[test]
        fn validation_never_panics_and_valid_ids_round_trip(s in ".{0,140}") {
            if let Ok(id) = DeviceId::new(&s) {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert!(!s.contains('/'));
            }
        }
    }
}
