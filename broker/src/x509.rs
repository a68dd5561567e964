//! X.509 device authentication: a device proves who it is with a TLS client certificate
//! instead of a SAS token. For a `selfSigned` identity the certificate's thumbprint (SHA-1 or
//! SHA-256 of its DER, as IoT Hub registers them) must be one of the registered ones.
//!
//! TLS asks every client for a certificate but requires none (SAS devices send none). Any
//! certificate is taken at the TLS layer, where rustls still checks the client's signature
//! over the handshake, which proves it holds the private key; whether the certificate
//! authenticates anybody is decided at CONNECT, against the identity the client names.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha1::Digest as _;

/// A thumbprint in canonical form (upper-case hex, no separators); `None` unless it is 40
/// (SHA-1) or 64 (SHA-256) hex digits once colons and spaces are removed.
pub fn normalize_thumbprint(text: &str) -> Option<String> {
    let hex: String = text
        .chars()
        .filter(|c| !matches!(c, ':' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    ((hex.len() == 40 || hex.len() == 64) && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then_some(hex)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The certificate's SHA-1 and SHA-256 thumbprints, canonical.
pub fn thumbprints(der: &[u8]) -> (String, String) {
    (
        hex(&sha1::Sha1::digest(der)),
        hex(&sha2::Sha256::digest(der)),
    )
}

/// Whether the certificate `der` has one of the registered `thumbprints`.
pub fn matches_thumbprint<'a>(der: &[u8], registered: impl IntoIterator<Item = &'a str>) -> bool {
    let (sha1, sha256) = thumbprints(der);
    registered
        .into_iter()
        .filter_map(normalize_thumbprint)
        .any(|t| t == sha1 || t == sha256)
}

/// Asks for a client certificate, takes any, and checks the handshake signature made with
/// it (proof of possession of the private key).
#[derive(Debug)]
pub struct AnyClientCert {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl AnyClientCert {
    pub fn new(provider: Arc<rustls::crypto::CryptoProvider>) -> AnyClientCert {
        AnyClientCert { provider }
    }
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_are_compared_canonically() {
        let der = b"not really a certificate";
        let (sha1, sha256) = thumbprints(der);
        assert_eq!(sha1.len(), 40);
        assert_eq!(sha256.len(), 64);
        let lower_with_colons: String = sha1
            .to_lowercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert!(matches_thumbprint(der, [lower_with_colons.as_str()]));
        assert!(matches_thumbprint(der, ["nonsense", sha256.as_str()]));
        assert!(!matches_thumbprint(der, [&"A".repeat(40) as &str]));
        assert_eq!(normalize_thumbprint("xyz"), None);
        assert_eq!(normalize_thumbprint(&"a".repeat(41)), None);
    }
}
