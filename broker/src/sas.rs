//! IoT Hub shared access signatures.
//!
//! A token is `SharedAccessSignature sr={url-encoded resource}&sig={url-encoded
//! base64 signature}&se={expiry, unix seconds}`; the signature is
//! base64(HMAC-SHA256(base64-decoded key, url-encoded resource + "\n" + expiry)).
//! The string signed is the `sr` exactly as it appears in the token, so a token verifies
//! whatever percent-encoding style its signer used.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use sha2::Sha256;

use crate::identity::IdentityKey;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused. The hub logs these; the client only ever sees "not authorized".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("token does not start with 'SharedAccessSignature '")]
    NotSas,
    #[error("token lacks the '{0}' field")]
    MissingField(&'static str),
    #[error("token field '{0}' is malformed")]
    Malformed(&'static str),
    #[error("token expired at {expiry} (now {now})")]
    Expired { expiry: u64, now: u64 },
    #[error("token resource '{found}' is not '{expected}'")]
    WrongResource { found: String, expected: String },
    #[error("signature does not match")]
    BadSignature,
    #[error("key is not valid base64")]
    BadKey,
}

/// A token split into its fields; nothing is trusted until [`SasToken::verify`] passes.
#[derive(Debug, Clone)]
pub struct SasToken {
    /// `sr` as it appears in the token (still url-encoded): what was signed.
    raw_resource: String,
    /// `sr` decoded.
    pub resource: String,
    signature: Vec<u8>,
    pub expiry: u64,
}

impl SasToken {
    pub fn parse(token: &str) -> Result<SasToken, SasError> {
        let fields = token
            .strip_prefix("SharedAccessSignature ")
            .ok_or(SasError::NotSas)?;
        let (mut sr, mut sig, mut se) = (None, None, None);
        for part in fields.split('&') {
            match part.split_once('=') {
                Some(("sr", v)) => sr = Some(v),
                Some(("sig", v)) => sig = Some(v),
                Some(("se", v)) => se = Some(v),
                _ => {}
            }
        }
        let raw_resource = sr.ok_or(SasError::MissingField("sr"))?.to_string();
        let resource = percent_decode_str(&raw_resource)
            .decode_utf8()
            .map_err(|_| SasError::Malformed("sr"))?
            .into_owned();
        let sig = percent_decode_str(sig.ok_or(SasError::MissingField("sig"))?)
            .decode_utf8()
            .map_err(|_| SasError::Malformed("sig"))?;
        let signature = B64
            .decode(sig.as_bytes())
            .map_err(|_| SasError::Malformed("sig"))?;
        let expiry = se
            .ok_or(SasError::MissingField("se"))?
            .parse()
            .map_err(|_| SasError::Malformed("se"))?;
        Ok(SasToken {
            raw_resource,
            resource,
            signature,
            expiry,
        })
    }

    /// Checks expiry, that the token is for `expected_resource` (hostname compared without
    /// case, as DNS names are), and the signature against `key_b64`.
    pub fn verify(&self, expected_resource: &str, key_b64: &str, now: u64) -> Result<(), SasError> {
        if self.expiry <= now {
            return Err(SasError::Expired {
                expiry: self.expiry,
                now,
            });
        }
        if !resource_matches(&self.resource, expected_resource) {
            return Err(SasError::WrongResource {
                found: self.resource.clone(),
                expected: expected_resource.to_string(),
            });
        }
        let key = B64.decode(key_b64).map_err(|_| SasError::BadKey)?;
        let mut mac = HmacSha256::new_from_slice(&key).map_err(|_| SasError::BadKey)?;
        mac.update(format!("{}\n{}", self.raw_resource, self.expiry).as_bytes());
        mac.verify_slice(&self.signature)
            .map_err(|_| SasError::BadSignature)
    }
}

fn resource_matches(found: &str, expected: &str) -> bool {
    let found = found.trim_end_matches('/');
    match (found.split_once('/'), expected.split_once('/')) {
        (Some((fh, fp)), Some((eh, ep))) => fh.eq_ignore_ascii_case(eh) && fp == ep,
        _ => false,
    }
}

/// The resource URI a device or module token must name.
pub fn resource_for(hostname: &str, identity: &IdentityKey) -> String {
    match &identity.module {
        None => format!("{hostname}/devices/{}", identity.device),
        Some(m) => format!("{hostname}/devices/{}/modules/{m}", identity.device),
    }
}

/// Makes a token for `resource`, valid until `expiry` (unix seconds).
pub fn generate(resource: &str, key_b64: &str, expiry: u64) -> Result<String, SasError> {
    let key = B64.decode(key_b64).map_err(|_| SasError::BadKey)?;
    let sr = utf8_percent_encode(resource, NON_ALPHANUMERIC).to_string();
    let mut mac = HmacSha256::new_from_slice(&key).map_err(|_| SasError::BadKey)?;
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = B64.encode(mac.finalize().into_bytes());
    let sig = utf8_percent_encode(&sig, NON_ALPHANUMERIC);
    Ok(format!(
        "SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"
    ))
}

/// Whether two secrets are equal, in time that does not depend on where they differ (so a
/// guesser learns nothing from how fast a wrong one is refused).
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A fresh random 256-bit key, base64 encoded, as IoT Hub generates them.
pub fn new_key() -> String {
    let bytes: [u8; 32] = rand::random();
    B64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHMtMzItYnl0ZXMhISE=";

    #[test]
    fn generated_token_verifies() {
        let t = generate("hub.local/devices/d1", KEY, 2000).unwrap();
        let parsed = SasToken::parse(&t).unwrap();
        assert_eq!(parsed.resource, "hub.local/devices/d1");
        parsed.verify("hub.local/devices/d1", KEY, 1000).unwrap();
        parsed.verify("HUB.local/devices/d1", KEY, 1000).unwrap();
    }

    #[test]
    fn known_vector_from_python_sdk_style_signing() {
        // Signed with the Azure SDKs' recipe: quote(uri, safe='') lower-case-free, key b64.
        let sr = "myhub.azure-devices.net%2Fdevices%2Fdev1";
        let key = B64.decode(KEY).unwrap();
        let mut mac = HmacSha256::new_from_slice(&key).unwrap();
        mac.update(format!("{sr}\n1900000000").as_bytes());
        let sig = utf8_percent_encode(&B64.encode(mac.finalize().into_bytes()), NON_ALPHANUMERIC)
            .to_string();
        let token = format!("SharedAccessSignature sr={sr}&sig={sig}&se=1900000000");
        SasToken::parse(&token)
            .unwrap()
            .verify("myhub.azure-devices.net/devices/dev1", KEY, 1_800_000_000)
            .unwrap();
    }

    #[test]
    fn refuses_expired_wrong_resource_and_bad_signature() {
        let t = SasToken::parse(&generate("h/devices/d1", KEY, 100).unwrap()).unwrap();
        assert!(matches!(
            t.verify("h/devices/d1", KEY, 100),
            Err(SasError::Expired { .. })
        ));
        assert!(matches!(
            t.verify("h/devices/d2", KEY, 1),
            Err(SasError::WrongResource { .. })
        ));
        assert!(matches!(
            t.verify("h/devices/d1/modules/m", KEY, 1),
            Err(SasError::WrongResource { .. })
        ));
        let other = new_key();
        assert_eq!(
            t.verify("h/devices/d1", &other, 1),
            Err(SasError::BadSignature)
        );
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }

    #[test]
    fn refuses_malformed_tokens() {
        assert_eq!(SasToken::parse("Bearer x").unwrap_err(), SasError::NotSas);
        assert_eq!(
            SasToken::parse("SharedAccessSignature sig=a&se=1").unwrap_err(),
            SasError::MissingField("sr")
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=!!&se=1").unwrap_err(),
            SasError::Malformed("sig")
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=AAAA&se=x").unwrap_err(),
            SasError::Malformed("se")
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = SasToken::parse(&s);
            let _ = SasToken::parse(&format!("SharedAccessSignature {s}"));
        }
    }
}
